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


@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_need_stream(stream):
    """OpenAI's spec (and vLLM) answer 400 to stream_options without stream: true."""
    body = {"model": "m", "stream_options": {"include_usage": True}}
    if stream is not None:
        body["stream"] = stream
    e = _error(parse_request, body, LIMITS)
    assert (e.status, e.param) == (400, "stream_options")
    assert "The 'stream_options' parameter is only allowed when 'stream' is enabled" in e.message
    assert parse_request({**body, "stream": True}, LIMITS).stream_options.include_usage
    assert parse_request({"model": "m", "stream_options": None}, LIMITS).stream_options is None


def test_check_model():
    check_model(parse_request({"model": "slm"}, LIMITS), "slm")
    e = _error(check_model, parse_request({"model": "gpt-4"}, LIMITS), "slm")
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert e.message == "The model 'gpt-4' does not exist; this server serves 'slm'"


def test_sampling_settings_with_openais_defaults():
    assert sampling(parse_request({"model": "m"}, LIMITS), LIMITS) == {
        "max_tokens": 16, "temperature": 1.0, "top_k": None, "top_p": None, "n": 1,
        "seed": None, "stop": [],
    }  # fmt: skip
    req = parse_request(
        {"model": "m", "max_tokens": 5, "temperature": 0, "top_k": -1, "top_p": 0.5, "n": 2,
         "seed": 3, "stop": "x"},
        LIMITS,
    )  # fmt: skip
    assert sampling(req, LIMITS) == {
        "max_tokens": 5, "temperature": 0, "top_k": None, "top_p": 0.5, "n": 2, "seed": 3,
        "stop": ["x"],
    }  # fmt: skip
    assert sampling(parse_request({"model": "m", "top_k": 4}, LIMITS), LIMITS)["top_k"] == 4


def test_the_default_max_tokens_obeys_the_limit():
    """OpenAI's default of 16 tokens, or the server's limits.max_tokens where that is less."""
    small = Limits(max_tokens=4, max_prompt_tokens=20, max_body_bytes=2000, max_n=2, max_prompts=1)
    assert sampling(parse_request({"model": "m"}, small), small)["max_tokens"] == 4
    assert sampling(parse_request({"model": "m", "max_tokens": 3}, small), small)["max_tokens"] == 3
    assert sampling(parse_request({"model": "m"}, LIMITS), LIMITS)["max_tokens"] == 16


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

    def __init__(
        self, chunks: list[bytes], length: int | None = None, type: str | None = "application/json"
    ) -> None:
        self.chunks = chunks
        self.headers = {} if length is None else {"content-length": str(length)}
        if type is not None:
            self.headers["content-type"] = type

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


@pytest.mark.parametrize("type", ["application/json", "Application/JSON; charset=utf-8"])
def test_read_json_takes_json_with_or_without_a_charset(type):
    assert asyncio.run(read_json(_Body([b'{"model": "m"}'], type=type), 100)) == {"model": "m"}


@pytest.mark.parametrize(
    "type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
             "application/jsonx", "text/plain; charset=application/json"]
)  # fmt: skip
def test_read_json_refuses_other_content_types(type):
    """A web page can send a cross-site POST without a preflight (a "simple" request) only as
    text/plain, a form or with no type at all: a 415 before the body is read or decoded."""
    e = _error(asyncio.run, read_json(_Body([b'{"model": "m"}'], type=type), 100))
    assert e.status == 415 and e.type == "invalid_request_error" and e.param is None
    assert "Content-Type: application/json" in e.message, e.message
    assert (type or "no Content-Type") in e.message


@pytest.mark.parametrize("field", ["max_tokens", "n", "seed", "top_k", "logprobs"])
def test_an_integer_too_long_for_python_is_a_400_naming_its_field(field):
    """json.loads raises a plain ValueError on an integer over Python's int_max_str_digits
    (4300): the field's check names it instead."""
    data = b'{"model": "m", "%s": %s}' % (field.encode(), b"9" * 5000)
    e = _error(parse_request, asyncio.run(read_json(_Body([data]), 10_000)), LIMITS)
    assert e.status == 400 and e.param == field, e.message
    assert e.message.startswith(f"Invalid value for '{field}': expected ")
    assert e.message.endswith("got an integer of 5000 digits"), e.message
    nested = b'{"model": "m", "prompt": [1, %s]}' % (b"9" * 5000)
    e = _error(parse_request, asyncio.run(read_json(_Body([nested]), 10_000)), LIMITS)
    assert e.status == 400 and e.param == "prompt", e.message
    e = _error(parse_request, asyncio.run(read_json(_Body([b"9" * 5000]), 10_000)), LIMITS)
    assert e.message == "The request body must be a JSON object, got an integer of 5000 digits"


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
            "usage": None,  # include_usage: OpenAI's "usage": null before the usage chunk
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


def test_include_usage_sends_a_null_usage_before_the_usage_chunk():
    """OpenAI: with include_usage, every chunk before the last one carries "usage": null (a
    client reads chunk["usage"] without a KeyError); the last has the whole usage."""
    completion = Completion("slm", PROMPTS, 2)
    sent = _stream(completion, EVENTS, include_usage=True)
    chunks = [json.loads(s.removeprefix("data: ")) for s in sent[:-1]]
    assert [ch["usage"] for ch in chunks[:-1]] == [None] * len(EVENTS)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion.usage()
    both = _stream(Completion("slm", PROMPTS, 2), EVENTS, include_usage=True,
                   continuous_usage_stats=True)  # fmt: skip
    usage = [json.loads(s.removeprefix("data: "))["usage"] for s in both[:-1]]
    assert [u["completion_tokens"] for u in usage] == [1, 2, 3, 3, 4, 4, 5, 6, 6]


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
