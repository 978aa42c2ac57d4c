"""The OpenAI completions protocol (slm.openai_api) without a server or an engine: the checks of
a request, its prompts, its engine settings, the body reader, and the one fold of the engine's
events behind both answers (streamed chunks and the whole completion)."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("pydantic", reason="the serve extra: pip install -e '.[serve]'")

from slm.engine import Event  # noqa: E402
from slm.openai_api import (  # noqa: E402
    DONE,
    ApiError,
    Completion,
    Limits,
    StreamOptions,
    check_model,
    parse_request,
    read_json,
    sampling,
    sse,
    stream,
    tokenize_prompts,
)
from slm.tokenizer import gpt2  # noqa: E402

TOK = gpt2()
LIMITS = Limits(max_tokens=100, max_prompt_tokens=20, max_body_bytes=2000, max_n=2, max_prompts=1)


def _error(call, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        call(*args)
    return e.value


# -- the request -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param, message",
    [
        ([1, 2], None, "The request body must be a JSON object, got list"),
        ({"prompt": "hi"}, "model", "Missing required parameter: 'model'"),
        ({"model": "m", "max_new_tokens": 5}, "max_new_tokens", "Unrecognized request argument"),
        ({"model": "m", "prompt": 5}, "prompt", "expected a string, a list of strings"),
        ({"model": "m", "prompt": []}, "prompt", "got [] (an empty list)"),
        ({"model": "m", "max_tokens": "10"}, "max_tokens", "expected an integer in [1, 100], got"),
        ({"model": "m", "max_tokens": 101}, "max_tokens", "got 101"),
        ({"model": "m", "temperature": float("nan")}, "temperature", "a number in [0, 2]"),
        ({"model": "m", "top_k": 0}, "top_k", "an integer >= 1, or -1 or null"),
        ({"model": "m", "n": 3}, "n", "in [1, 2], got 3 (each sample takes a row of the batch)"),
        ({"model": "m", "stop": list("abcde")}, "stop", "up to 4 strings"),
        ({"model": "m", "seed": 2**64}, "seed", "an integer in [0, 2**64)"),
        ({"model": "m", "best_of": 2}, "best_of", "1 (best_of is not supported), got 2"),
        ({"model": "m", "user": ["x"] * 20}, "user", 'a string, got ["x", "x", "x", "x", "x"'),
    ],
)
def test_parse_request_names_the_first_bad_field(body, param, message):
    e = _error(parse_request, body, LIMITS)
    assert e.status == 400 and e.param == param and message in e.message, e.message
    assert e.body() == {
        "error": {"message": e.message, "type": "invalid_request_error", "param": param,
                  "code": None}
    }  # fmt: skip


def test_neutral_values_of_unsupported_options_are_accepted():
    body = {"model": "m", "echo": False, "best_of": 1, "frequency_penalty": 0, "logit_bias": {},
            "suffix": "", "user": "me", "top_k": -1}  # fmt: skip
    req = parse_request(body, LIMITS)
    assert req.model == "m" and req.prompt == ""


def test_check_model():
    check_model(parse_request({"model": "slm"}, LIMITS), "slm")
    e = _error(check_model, parse_request({"model": "gpt-4"}, LIMITS), "slm")
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert e.message == "The model 'gpt-4' does not exist; this server serves 'slm'"


def test_sampling_settings_with_openais_defaults():
    assert sampling(parse_request({"model": "m"}, LIMITS)) == {
        "max_tokens": 16, "temperature": 1.0, "top_k": None, "top_p": None, "n": 1,
        "seed": None, "stop": [],
    }  # fmt: skip
    req = parse_request(
        {"model": "m", "max_tokens": 5, "temperature": 0, "top_k": -1, "top_p": 0.5, "n": 2,
         "seed": 3, "stop": "x"},
        LIMITS,
    )  # fmt: skip
    assert sampling(req) == {
        "max_tokens": 5, "temperature": 0, "top_k": None, "top_p": 0.5, "n": 2, "seed": 3,
        "stop": ["x"],
    }  # fmt: skip
    assert sampling(parse_request({"model": "m", "top_k": 4}, LIMITS))["top_k"] == 4


def test_tokenize_prompts():
    assert tokenize_prompts("Tom had a", TOK, 50257, LIMITS) == [TOK.encode("Tom had a")]
    assert tokenize_prompts("", TOK, 50257, LIMITS) == [[TOK.eot_id]]  # a story start
    assert tokenize_prompts([5, 6], TOK, 50257, LIMITS) == [[5, 6]]
    e = _error(tokenize_prompts, [[1], [2]], TOK, 50257, LIMITS)
    assert "2 prompts, more than this server queues at once (1)" in e.message
    e = _error(tokenize_prompts, [60000], TOK, 50257, LIMITS)
    assert "token id 60000 (prompt 0) is not in the vocabulary [0, 50257)" in e.message
    e = _error(tokenize_prompts, "word" * 30, TOK, 50257, LIMITS)
    assert "prompt 0 has 30 tokens, more than max_prompt_tokens=20" in e.message


class _Body:
    """What read_json reads of a Starlette request: its headers and its body in chunks."""

    def __init__(self, chunks: list[bytes], length: int | None = None) -> None:
        self.chunks = chunks
        self.headers = {} if length is None else {"content-length": str(length)}

    async def stream(self):
        for chunk in self.chunks:
            yield chunk


def test_read_json():
    assert asyncio.run(read_json(_Body([b'{"model":', b' "m"}']), 100)) == {"model": "m"}
    for body in [_Body([b"{}"], length=101), _Body([b"x" * 60, b"x" * 60])]:
        e = _error(asyncio.run, read_json(body, 100))
        assert e.status == 413 and "larger than max_body_bytes=100" in e.message
    for data, reason in [(b'{"a": ', "Expecting value at line 1 column 7"),
                         (b'"\xff"', "not UTF-8"), (b"[" * 5000, "too deep")]:  # fmt: skip
        e = _error(asyncio.run, read_json(_Body([data]), 10_000))
        assert e.status == 400 and f"not valid JSON ({reason}" in e.message, e.message


# -- the answer: one fold for the streamed chunks and the whole completion ---------------------

EVENTS = [  # two prompts, n=2: choices 0-1 of prompt 0, 2-3 of prompt 1, interleaved
    (0, Event("text", 0, "Once", tokens=1)),
    (1, Event("text", 1, " Tom", tokens=1)),
    (0, Event("text", 1, "The", tokens=1)),
    (1, Event("finish", 0, "", "stop", tokens=0)),
    (0, Event("text", 0, " upon", tokens=2)),
    (0, Event("finish", 0, "", "length", tokens=2)),
    (1, Event("finish", 1, "!", "stop", tokens=2)),
    (0, Event("finish", 1, " end", "length", tokens=2)),
]
PROMPTS = [[1, 2, 3], [4]]


def _events(events):
    queue = list(events)

    async def next_event():
        return queue.pop(0)

    return next_event


def _stream(completion: Completion, events, **options) -> list[str]:
    async def collect():
        return [s async for s in stream(completion, _events(events), StreamOptions(**options))]

    return asyncio.run(collect())


def test_the_whole_completion():
    completion = Completion("slm", PROMPTS, 2)
    for i, event in EVENTS:
        assert not completion.done
        completion.add(i, event)
    assert completion.done
    answer = completion.whole()
    assert list(answer) == ["id", "object", "created", "model", "choices", "usage"]
    assert answer["id"].startswith("cmpl-") and answer["object"] == "text_completion"
    assert answer["model"] == "slm" and isinstance(answer["created"], int)
    assert answer["choices"] == [
        {"index": 0, "text": "Once upon", "logprobs": None, "finish_reason": "length"},
        {"index": 1, "text": "The end", "logprobs": None, "finish_reason": "length"},
        {"index": 2, "text": "", "logprobs": None, "finish_reason": "stop"},
        {"index": 3, "text": " Tom!", "logprobs": None, "finish_reason": "stop"},
    ]
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_the_streamed_completion_is_the_same_fold():
    completion = Completion("slm", PROMPTS, 2)
    sent = _stream(completion, EVENTS, include_usage=True)
    assert sent[-1] == DONE and all(s.startswith("data: {") for s in sent[:-1])
    chunks = [json.loads(s.removeprefix("data: ")) for s in sent[:-1]]
    head = {k: completion.head[k] for k in ("id", "object", "created", "model")}
    for chunk, (i, event) in zip(chunks, EVENTS):
        assert chunk == {
            **head,
            "choices": [
                {
                    "index": i * 2 + event.index,
                    "text": event.text,
                    "logprobs": None,
                    "finish_reason": event.finish_reason if event.kind == "finish" else None,
                }
            ],
        }
    assert chunks[-1] == {**head, "choices": [], "usage": completion.usage()}
    assert len(chunks) == len(EVENTS) + 1
    texts = [""] * 4
    for chunk in chunks[:-1]:
        texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert texts == [c["text"] for c in completion.whole()["choices"]]  # both answers agree
    assert sent[0] == sse(chunks[0]) and ", " not in sent[0]  # compact JSON


def test_streamed_usage_options():
    plain = _stream(Completion("slm", PROMPTS, 2), EVENTS)
    assert len(plain) == len(EVENTS) + 1 and "usage" not in "".join(plain)
    continuous = _stream(Completion("slm", PROMPTS, 2), EVENTS, continuous_usage_stats=True)
    usage = [json.loads(s.removeprefix("data: "))["usage"] for s in continuous[:-1]]
    assert [u["completion_tokens"] for u in usage] == [1, 2, 3, 3, 4, 4, 5, 6]
    assert all(u["prompt_tokens"] == 4 for u in usage)


def test_an_engine_error_ends_either_answer():
    error = Event("error", text="decoding failed (RuntimeError: boom)")
    completion = Completion("slm", PROMPTS, 1)
    e = _error(completion.add, 0, error)
    assert (e.status, e.type, e.message) == (500, "server_error", error.text)
    sent = _stream(Completion("slm", PROMPTS, 1), [EVENTS[0], (1, error)])
    assert len(sent) == 2 and DONE not in sent  # a chunk, then the error: no [DONE]
    assert json.loads(sent[1].removeprefix("data: ")) == {
        "error": {"message": error.text, "type": "server_error", "param": None, "code": None}
    }
