"""The server: the continuous batch (slm.engine) against slm.sample.generate, and the OpenAI
API (slm.serve) through the openai client against servers started here on 127.0.0.1, and the
playground in a real headless Chromium.

Two servers run for the whole module, each an in-process uvicorn thread on a free port:
``story`` (a 2-layer GPT trained for a few seconds to tell template stories that end in
<|endoftext|>; learned positions; no API key) and ``guarded`` (a random RoPE GPT; 2 rows, a
queue of 1, an API key, small limits).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed (the dev extra)")
import httpx2 as httpx  # noqa: E402  (openai's HTTP client)
import uvicorn  # noqa: E402

from slm import serve  # noqa: E402
from slm.config import compose  # noqa: E402
from slm.engine import Engine, Request, SampleText  # noqa: E402
from slm.errors import ConfigError  # noqa: E402
from slm.model import GPT, GPTConfig  # noqa: E402
from slm.openai_api import Limits  # noqa: E402
from slm.sample import generate  # noqa: E402
from slm.serve import build, create_app  # noqa: E402
from slm.tokenizer import gpt2  # noqa: E402

TOK = gpt2()
EOT = TOK.eot_id
BLOCK = 32
KEY = "sesame"
ROPE = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, positions="rope")


@pytest.fixture(scope="module")
def rope_model() -> GPT:
    """Random weights: with 50k tokens it almost never draws <|endoftext|>, so it runs on."""
    torch.manual_seed(1)
    return GPT(ROPE).eval()


def _save(model: GPT, path: Path) -> Path:
    torch.save({"model_args": model.config.to_dict(), "model": model.state_dict()}, path)
    return path


@contextmanager
def _serving(app):
    """``app`` on a free port of 127.0.0.1 in a uvicorn thread, stopped at the end."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def story(story_model, tmp_path_factory):
    """(base URL, engine) of the story server."""
    ckpt = _save(story_model, tmp_path_factory.mktemp("story") / "slm.pt")
    overrides = [f"ckpt={ckpt}", "device=cpu", "api_key=null", "weights=fp32"]  # generate's
    app, engine = build(compose("serve", overrides))
    try:
        with _serving(app) as url:
            yield url, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def guarded(rope_model, tmp_path_factory):
    """(base URL, engine) of the small, guarded server."""
    ckpt = _save(rope_model, tmp_path_factory.mktemp("guarded") / "slm.pt")
    overrides = [f"ckpt={ckpt}", "device=cpu", f"api_key={KEY}", "model_name=tiny-rope"]
    overrides += ["weights=fp32"]  # the tokens of generate() on the fp32 model
    overrides += ["max_batch=2", "limits.max_queue=1", "limits.max_tokens=100000"]
    overrides += ["limits.max_body_bytes=2000", "limits.max_prompt_tokens=20"]
    app, engine = build(compose("serve", overrides))
    try:
        with _serving(app) as url:
            yield url, engine
    finally:
        engine.close()


def client(url: str, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def expected(model: GPT, prompt: str, max_tokens: int, seed: int | None = None, n: int = 1, **kw):
    """What slm.sample.generate gives alone, as text: one string per sample."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = TOK.encode(prompt) or [EOT]
    out = generate(model, ids, max_tokens, num_samples=n, generator=gen, stop_token=EOT, **kw)
    return [TOK.decode(s) for s in out]


def _wait(condition, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


# -- the engine: the tokens generate gives, with requests joining and leaving ----------------


class Collect:
    """An ``emit`` callback: each sample's text, finish reason and token count."""

    def __init__(self, n: int = 1, then=None) -> None:
        self.text = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.then = then  # called with each event (in the engine's thread)

    def __call__(self, event) -> None:
        assert event.kind != "error", event.text
        self.text[event.index] += event.text
        self.tokens[event.index] = event.tokens
        if event.kind == "finish":
            self.finish[event.index] = event.finish_reason
        if self.then is not None:
            self.then(event)

    @property
    def done(self) -> bool:
        return None not in self.finish


@pytest.fixture
def engine(request):
    """An engine (max_batch 8) of the model fixture named by the test's parameter."""
    model = request.getfixturevalue(request.param)
    engine = Engine(model, TOK, max_batch=8)
    engine.start()
    yield engine
    engine.close()


def test_the_decode_thread_compiles_under_the_decoders_recompile_limit(story_model, monkeypatch):
    """A compiled Decoder raises dynamo's recompile limit by its graphs; the engine compiles
    them in its own thread, where torch's compile settings (context variables) started at
    their defaults: a server process past 8 graphs of the step failed at start (fullgraph)."""
    from slm.decode import Decoder

    seen = []
    monkeypatch.setattr(Decoder, "warm_up", lambda self: seen.append(
        torch._dynamo.config.recompile_limit))  # fmt: skip
    engine = Engine(story_model, TOK, max_batch=2, compile=True)
    engine.start()
    engine.close()
    assert seen == [torch._dynamo.config.recompile_limit] and seen[0] > 8


def test_compiled_engine_is_compiled_before_it_serves(story_model):
    """compile=True: start() compiles the step (here for 1 row: the trained model's config
    and batch size are those test_generate compiles, so the suite compiles them once); the
    requests after it compile nothing and get generate's tokens, across context shifts."""
    engine = Engine(story_model, TOK, max_batch=1, compile=True)
    engine.start()
    try:
        graphs = dict(torch._dynamo.utils.counters["stats"])
        a, b = Collect(), Collect()
        engine.submit(
            [
                Request(TOK.encode("Sam had a"), 50, emit=a, temperature=0),
                Request(TOK.encode("Mia had a"), 50, emit=b, temperature=1.0, top_k=5, seed=2),
            ]
        )  # one after the other in the one row
        _wait(lambda: a.done and b.done, 60, "the requests")
        assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # nothing compiled
        assert a.text == expected(story_model, "Sam had a", 50, temperature=0)
        assert b.text == expected(story_model, "Mia had a", 50, temperature=1.0, top_k=5, seed=2)
        assert engine.peak_rows == 1
    finally:
        engine.close()


@pytest.mark.parametrize("engine", ["rope_model"], indirect=True)
def test_engine_request_joins_a_running_batch_and_moves_down(engine):
    """B arrives while A decodes and joins its batch; A ends first, B's rows move down to
    row 0 and it goes on: both get exactly their tokens alone."""
    a, b = Collect(), Collect(2)
    prompt_b = TOK.encode("Lily had a bird")

    def submit_b(event) -> None:  # at A's third token, from the engine's own thread
        if event.kind == "text" and event.tokens == 3:
            engine.submit([Request(prompt_b, 40, emit=b, temperature=1.0, seed=11, n=2)])

    a.then = submit_b
    engine.submit([Request(TOK.encode("Tom had a cat"), 12, emit=a, temperature=0)])
    _wait(lambda: a.done and b.done, 60, "A and B")
    assert engine.peak_rows == 3  # A's row and B's two in one step
    assert a.text == expected(engine.model, "Tom had a cat", 12, temperature=0)
    assert b.text == expected(engine.model, "Lily had a bird", 40, temperature=1.0, seed=11, n=2)


@pytest.mark.parametrize("engine", ["rope_model"], indirect=True)
def test_engine_cancel_frees_rows_before_the_next_step(engine):
    events = []
    steps = []

    def cancel_at_5(event) -> None:  # from the engine's thread, between two steps
        events.append(event)
        if event.tokens >= 5 and not steps:
            engine.cancel(r)
            steps.append(engine.steps)

    r = Request(TOK.encode("Once"), 10_000, emit=Collect(then=cancel_at_5), temperature=0)
    engine.submit([r])
    _wait(lambda: engine.rows_in_use == 0 and steps, 10, "the rows to be freed")
    time.sleep(0.05)
    assert engine.steps == steps[0]  # no step ran after the cancel
    assert events[-1].tokens == 5  # and no token came after it


@pytest.mark.parametrize("engine", ["rope_model"], indirect=True)
def test_engine_survives_a_failing_step(engine, monkeypatch):
    """A step that raises fails the requests in it (an error event), not the engine."""
    step = engine.decoder.step_fn
    calls = []

    def fail_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step(*args)

    monkeypatch.setattr(engine.decoder, "step_fn", fail_once)
    errors = []
    r = Request(TOK.encode("Once"), 10, emit=lambda e: errors.append(e), temperature=0)
    engine.submit([r])
    _wait(lambda: errors and errors[-1].kind == "error", 10, "the error")
    assert "RuntimeError: boom" in errors[-1].text
    assert engine.rows_in_use == 0
    ok = Collect()
    engine.submit([Request(TOK.encode("Once"), 10, emit=ok, temperature=0)])
    _wait(lambda: ok.done, 10, "the next request")
    assert ok.text == expected(engine.model, "Once", 10, temperature=0)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # CPU rms_norm
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_engine_with_a_bf16_cache_under_cuda_like_autocast(positions, monkeypatch):
    """The engine as it runs on a GPU: activations under autocast, a bf16 cache, and qk_norm's
    rms_norm returning float32 as CUDA autocast does (CPU autocast does not: emulated). Every
    write (prefill, decode, refill, shift, rows moving down) lands in the bf16 cache."""
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **kw: rms_norm(*a, **kw).float())
    monkeypatch.setattr(
        "slm.precision.inference_precision",
        lambda model, device: (torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16),
    )
    torch.manual_seed(3)
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, positions=positions, qk_norm=True,
        norm="rmsnorm",
    )  # fmt: skip
    engine = Engine(GPT(config).eval(), TOK, max_batch=4)
    engine.start()
    try:
        assert {t.dtype for t in engine.decoder.cache.k + engine.decoder.cache.v} == {
            torch.bfloat16
        }
        short, long = Collect(), Collect(2)
        engine.submit(
            [
                Request(TOK.encode("Once upon"), 5, emit=short, temperature=0),
                Request(TOK.encode("Tom had a"), 50, emit=long, temperature=1.0, seed=1, n=2),
            ]
        )  # the short one ends first: the long one's rows move down, then pass block_size
        _wait(lambda: short.done and long.done, 60, "the requests")
        assert short.tokens == [5] and long.tokens == [50, 50] and engine.peak_rows == 3
    finally:
        engine.close()


def test_engine_queue_is_bounded(rope_model):
    engine = Engine(rope_model, TOK, max_batch=1, max_queue=2)  # not started: nothing runs
    make = lambda: Request([1, 2], 5, emit=lambda e: None)  # noqa: E731
    engine.submit([make(), make()])
    with pytest.raises(Exception, match=r"2 requests are waiting for a row \(max_queue=2\)"):
        engine.submit([make()])
    with pytest.raises(ValueError, match="n=2 is more than max_batch=1"):
        engine.submit([Request([1], 5, emit=lambda e: None, n=2)])


def test_stop_strings_are_held_back_until_known():
    text = SampleText(["went to", "!"])
    out = [text.add(piece.encode()) for piece in ["Tom", " went", " home", ".", " Tom", " went"]]
    # "went" could start "went to": held back until " home" shows it does not.
    assert out == ["Tom", " ", "went home", ".", " Tom", " "]
    assert text.add(b" to") == "" and text.finish_reason == "stop"
    assert text.text == "Tom went home. Tom "  # cut before the stop string, which never went out
    assert SampleText(["x"]).add("a😀".encode()[:3]) == "a"  # half a character waits for the rest
    partial = SampleText([])
    assert partial.add("😀".encode()[:2]) == ""
    assert partial.add(b"", final=True) == "\ufffd"  # a cut-off character at the very end


# -- the API, through the openai client ---------------------------------------------------------


def _ids(model: GPT, prompt: str, max_tokens: int, **kw) -> list[int]:
    return generate(model, TOK.encode(prompt), max_tokens, stop_token=EOT, **kw)[0]


def test_completion_equals_generate(story, story_model):
    url, _ = story
    c = client(url)
    r = c.completions.create(model="slm", prompt="Tom had a", max_tokens=40, temperature=0)
    ids = _ids(story_model, "Tom had a", 40, temperature=0)
    assert r.choices[0].text == TOK.decode(ids)
    assert r.choices[0].text.endswith(" was happy. The end.")  # a whole story
    assert r.choices[0].finish_reason == "stop"  # the story ended at <|endoftext|>
    assert r.object == "text_completion" and r.model == "slm" and r.id.startswith("cmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, len(ids))
    r = c.completions.create(model="slm", prompt="Tom had a", max_tokens=4, temperature=0)
    assert r.choices[0].text == TOK.decode(ids[:4]) and r.choices[0].finish_reason == "length"
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    r = c.completions.create(
        model="slm", prompt="Sam had a", max_tokens=30, seed=7, temperature=1.0, top_p=0.9,
        extra_body={"top_k": 20},
    )  # fmt: skip
    assert r.choices[0].text == expected(story_model, "Sam had a", 30, seed=7, **kw)[0]
    r = c.completions.create(model="slm", prompt="", max_tokens=30, temperature=0)
    assert (
        r.choices[0].text == expected(story_model, "", 30, temperature=0)[0]
    )  # from <|endoftext|>
    assert r.choices[0].text.startswith(" had a") is False and r.usage.prompt_tokens == 1


def test_streaming_equals_generate(story, story_model):
    url, _ = story
    stream = client(url).completions.create(
        model="slm", prompt="Mia had a", max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    ids = _ids(story_model, "Mia had a", 40, temperature=0)
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == TOK.decode(ids)
    assert texts[:-1] == [TOK.decode([t]) for t in ids]  # one chunk per token as it comes
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]] == [None] * len(ids) + ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "text_completion"


def test_n_and_a_list_of_prompts(story, story_model):
    url, _ = story
    c = client(url)
    kw = dict(temperature=1.0, seed=5)
    r = c.completions.create(
        model="slm", prompt=["Tom had a", "Lily had a"], n=2, max_tokens=30, **kw
    )
    want = expected(story_model, "Tom had a", 30, n=2, **kw)
    want += expected(story_model, "Lily had a", 30, n=2, **kw)  # each prompt: its own generator
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in r.choices] == want
    assert len(set(want)) > 2  # the samples differ
    stream = c.completions.create(
        model="slm", prompt=["Tom had a", "Lily had a"], n=2, max_tokens=30, stream=True, **kw
    )
    streamed = [""] * 4
    for chunk in stream:
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == want
    r = c.completions.create(
        model="slm", prompt=TOK.encode("Ben had a"), max_tokens=30, temperature=0
    )
    assert r.choices[0].text == expected(story_model, "Ben had a", 30, temperature=0)[0]


def test_stop_strings(story, story_model):
    url, _ = story
    c = client(url)
    full = expected(story_model, "Ben had a", 40, temperature=0)[0]
    assert " went to the " in full
    r = c.completions.create(
        model="slm", prompt="Ben had a", max_tokens=40, temperature=0, stop=["zebra", " went to"]
    )
    assert r.choices[0].text == full[: full.index(" went to")]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(_ids(story_model, "Ben had a", 40, temperature=0))
    stream = c.completions.create(
        model="slm", prompt="Ben had a", max_tokens=40, temperature=0, stop=" the", stream=True
    )
    chunks = [ch.choices[0] for ch in stream]
    assert "".join(ch.text for ch in chunks) == full[: full.index(" the")]
    assert chunks[-1].finish_reason == "stop"


def test_eight_concurrent_clients_each_get_their_own_text(story, story_model, monkeypatch):
    url, engine = story
    step = engine.decoder.step_fn

    def slowed(*args):  # 5 ms more a step: the 8 requests surely overlap
        time.sleep(0.005)
        return step(*args)

    monkeypatch.setattr(engine.decoder, "step_fn", slowed)
    engine.peak_rows = 0
    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Sue", "Tom", "Lily"]
    cases = [
        (f"{name} had a", dict(temperature=0) if i % 2 else dict(temperature=1.0, seed=i))
        for i, name in enumerate(names)
    ]
    barrier = threading.Barrier(len(cases))
    results: list = [None] * len(cases)

    def run(i: int) -> None:
        prompt, kw = cases[i]
        c = client(url, timeout=60)
        barrier.wait()
        if i % 4 < 2:
            results[i] = c.completions.create(model="slm", prompt=prompt, max_tokens=30, **kw)
            results[i] = results[i].choices[0].text
        else:
            stream = c.completions.create(
                model="slm", prompt=prompt, max_tokens=30, stream=True, **kw
            )
            results[i] = "".join(ch.choices[0].text for ch in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [expected(story_model, p, 30, **kw)[0] for p, kw in cases]
    assert engine.peak_rows > 1  # they were decoded together


def test_long_completion_past_block_size(guarded, rope_model):
    url, _ = guarded
    r = client(url, KEY).completions.create(
        model="tiny-rope", prompt="Once upon a time", max_tokens=70, temperature=0
    )
    assert r.usage.completion_tokens == 70  # two context shifts (block_size 32)
    assert r.choices[0].text == expected(rope_model, "Once upon a time", 70, temperature=0)[0]


# -- limits, bad input, disconnects, the key ----------------------------------------------------

M = "tiny-rope"
JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {KEY}", **JSON}
BAD = [
    (b'{"model": "tiny-rope", "prompt": ', 400, None, "not valid JSON"),
    (b'{"model": "\xff"}', 400, None, "not valid JSON (not UTF-8"),
    (b"[" * 1999, 400, None, "not valid JSON (too deep"),
    (b"[1, 2]", 400, None, "must be a JSON object, got list"),
    ({"prompt": "hi"}, 400, "model", "Missing required parameter: 'model'"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "The model 'gpt-4' does not exist"),
    ({"model": M, "prompt": 5}, 400, "prompt", "expected a string, a list of strings"),
    ({"model": M, "prompt": []}, 400, "prompt", "an empty list"),
    ({"model": M, "prompt": [1, "a"]}, 400, "prompt", "expected a string"),
    ({"model": M, "prompt": [60000]}, 400, "prompt", "token id 60000 (prompt 0)"),
    ({"model": M, "prompt": [[1], "word " * 30]}, 400, "prompt", "expected a string"),
    ({"model": M, "prompt": "word" * 30}, 400, "prompt", "prompt 0 has 30 tokens, more than"),
    ({"model": M, "prompt": ["a", "b"]}, 400, "prompt", "2 prompts, more than this server queues"),
    ({"model": M, "max_tokens": "10"}, 400, "max_tokens", "expected an integer in [1, 100000]"),
    ({"model": M, "max_tokens": True}, 400, "max_tokens", "got true"),
    ({"model": M, "max_tokens": 0}, 400, "max_tokens", "got 0"),
    ({"model": M, "max_tokens": 100001}, 400, "max_tokens", "got 100001"),
    ({"model": M, "temperature": -0.5}, 400, "temperature", "a number in [0, 2]"),
    ({"model": M, "temperature": 2.5}, 400, "temperature", "got 2.5"),
    ({"model": M, "temperature": "hot"}, 400, "temperature", "got 'hot'"),
    ({"model": M, "top_p": 0}, 400, "top_p", "a number in (0, 1]"),
    ({"model": M, "top_p": 1.5}, 400, "top_p", "got 1.5"),
    ({"model": M, "top_k": 0}, 400, "top_k", "an integer >= 1"),
    ({"model": M, "top_k": 2.5}, 400, "top_k", "got 2.5"),
    ({"model": M, "n": 3}, 400, "n", "an integer in [1, 2], got 3 (each sample takes a row"),
    ({"model": M, "n": 0}, 400, "n", "got 0"),
    ({"model": M, "stop": list("abcde")}, 400, "stop", "up to 4 strings"),
    ({"model": M, "stop": [1]}, 400, "stop", "got [1]"),
    ({"model": M, "seed": -1}, 400, "seed", "an integer in [0, 2**64)"),
    ({"model": M, "seed": "x"}, 400, "seed", "got 'x'"),
    ({"model": M, "stream": "yes"}, 400, "stream", "true or false"),
    ({"model": M, "stream_options": {"include_usage": 1}}, 400, "stream_options", "an object"),
    (
        {"model": M, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        "only allowed when 'stream' is enabled",
    ),
    ({"model": M, "logprobs": 2}, 400, "logprobs", "logprobs are not supported"),
    ({"model": M, "echo": True}, 400, "echo", "echo is not supported"),
    ({"model": M, "max_new_tokens": 5}, 400, "max_new_tokens", "Unrecognized request argument"),
    ({"model": M, "prompt": "x" * 3000}, 413, None, "larger than max_body_bytes=2000"),
]


@pytest.mark.parametrize("body, status, param, message", BAD, ids=[str(c[3]) for c in BAD])
def test_bad_requests(guarded, body, status, param, message, caplog):
    url, engine = guarded
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/completions", content=content, headers=AUTH)
    assert r.status_code == status, r.text
    assert not [rec for rec in caplog.records if rec.levelno >= 40]  # no traceback logged
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error" and set(error) == {
        "message", "type", "param", "code"
    }  # fmt: skip
    assert engine.waiting == type(engine.waiting)() and engine.rows_in_use == 0  # never queued


def test_other_bad_requests(guarded):
    url, _ = guarded
    chunks = (b'{"model": "tiny-rope", "prompt": "' + b"x" * 500 for _ in range(5))
    r = httpx.post(f"{url}/v1/completions", content=chunks, headers=AUTH)  # no Content-Length
    assert r.status_code == 413 and "max_body_bytes=2000" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": M, "messages": []}, headers=AUTH)
    assert r.status_code == 404 and "not a chat model" in r.json()["error"]["message"]
    assert "/v1/completions" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "POST /v1/completions" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v2/nothing", headers=AUTH)
    assert r.status_code == 404 and "Unknown route GET /v2/nothing" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # what a client sees
        client(url, KEY).completions.create(model=M, prompt="hi", temperature=3)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    assert _health(url)["status"] == "ok"  # and the server goes on


def test_only_json_is_taken(story):
    """A web page can make a browser POST text/plain, a form or an untyped body to another
    origin without asking first (a CORS "simple" request), and the server has no CORS headers
    only to stop the page reading the answer: anything but JSON is a 415, never decoded."""
    url, engine = story
    body = json.dumps({"model": "slm", "prompt": "Tom had a", "max_tokens": 2}).encode()
    for headers in [{"Content-Type": "text/plain"}, {}, {"Content-Type": "multipart/form-data"},
                    {"Content-Type": "application/x-www-form-urlencoded"}]:  # fmt: skip
        r = httpx.post(f"{url}/v1/completions", content=body, headers=headers)
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert "Content-Type: application/json" in error["message"], error
        assert error["type"] == "invalid_request_error" and error["param"] is None
    assert engine.waiting == type(engine.waiting)() and engine.rows_in_use == 0  # never queued
    origin = {"Origin": "http://elsewhere.example"}
    for kind in ["application/json", "application/json; charset=utf-8"]:
        r = httpx.post(
            f"{url}/v1/completions", content=body, headers={"Content-Type": kind, **origin}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
        assert not any(h.startswith("access-control-") for h in r.headers)  # no CORS


@pytest.mark.parametrize("field", ["max_tokens", "n", "seed"])
def test_an_integer_too_long_for_python_is_a_400(story, field, caplog):
    """Python reads at most 4300 digits of an integer (json.loads: a plain ValueError): a 400
    naming the field, not a 500 with a traceback logged."""
    url, _ = story
    body = b'{"model": "slm", "%s": %s}' % (field.encode(), b"7" * 5000)
    r = httpx.post(f"{url}/v1/completions", content=body, headers=JSON)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "got an integer of 5000 digits" in error["message"]
    assert not [rec for rec in caplog.records if rec.levelno >= 40]  # no traceback logged


def test_the_default_max_tokens_obeys_the_limit(guarded):
    """A request without max_tokens gets OpenAI's 16 tokens, or limits.max_tokens if less."""
    _, engine = guarded
    limits = Limits(max_tokens=4, max_prompt_tokens=20, max_body_bytes=2000, max_n=2,
                    max_prompts=1)  # fmt: skip
    with _serving(create_app(engine, M, limits)) as url:
        r = client(url).completions.create(model=M, prompt="Once", temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_include_usage_chunks_carry_a_null_usage(story):
    """OpenAI: with include_usage, every chunk before the usage chunk has "usage": null."""
    url, _ = story
    body = {"model": "slm", "prompt": "Tom had a", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body)
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 3 and [ch["usage"] for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_retrieve_the_model(guarded):
    """GET /v1/models/{model}, the openai client's models.retrieve: the served model, or
    OpenAI's 404 for another; behind the key as the other routes."""
    url, _ = guarded
    c = client(url, KEY)
    model = c.models.retrieve(M)
    assert model == c.models.list().data[0] and model.id == M and model.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert "The model 'gpt-4' does not exist; this server serves 'tiny-rope'" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.retrieve(M)


@pytest.mark.parametrize(
    "key, command", [("12345", True), ("1.50", True), ("true", True), ("1_000", True),
                     ("12345", False)]
)  # fmt: skip
def test_an_api_key_that_looks_like_a_number_is_the_text_typed(key, command, rope_model, tmp_path):
    """Hydra reads api_key=12345 as an int (1.50 as the float 1.5): the key is what was typed
    (serve.config, the command's config), or an int's digits in a config composed otherwise."""
    ckpt = _save(rope_model, tmp_path / "slm.pt")
    overrides = [f"ckpt={ckpt}", "device=cpu", f"api_key={key}"]
    app, engine = build(serve.config(overrides) if command else compose("serve", overrides))
    try:
        with _serving(app) as url:
            assert client(url, key).models.list().data[0].id == "slm"
            with pytest.raises(openai.AuthenticationError):
                client(url, "wrong").models.list()
    finally:
        engine.close()


@pytest.mark.parametrize("key", ["''", "' '"])
def test_an_empty_api_key_is_refused(key, rope_model, tmp_path):
    ckpt = _save(rope_model, tmp_path / "slm.pt")
    with pytest.raises(ConfigError, match="api_key is set but empty"):
        build(serve.config([f"ckpt={ckpt}", "device=cpu", f"api_key={key}"]))


def test_api_key(guarded):
    url, _ = guarded
    assert client(url, KEY).models.list().data[0].id == "tiny-rope"
    with pytest.raises(openai.AuthenticationError) as e:
        client(url, "wrong").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    routes = [("GET", "/v1/models"), ("GET", f"/v1/models/{M}"), ("POST", "/v1/completions")]
    for method, path in routes + [("GET", "/")]:
        r = httpx.request(method, f"{url}{path}", json={"model": M})
        assert r.status_code == 401 and "didn't provide an API key" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200  # open: for load balancers
    # The playground: a browser asks for the key on a Basic challenge, then sends it.
    assert httpx.get(f"{url}/").headers["www-authenticate"] == 'Basic realm="slm"'
    basic = base64.b64encode(f"me:{KEY}".encode()).decode()
    r = httpx.get(f"{url}/", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200 and "slm playground" in r.text
    r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200


def test_full_queue_429_and_a_disconnect_frees_the_rows(guarded, rope_model):
    """Both rows busy and the queue (1) full: the next request is answered 429. The streaming
    client then disconnects: its rows are freed at once and the queued request runs."""
    url, engine = guarded
    c = client(url, KEY)
    stream = c.completions.create(
        model=M, prompt="Once", max_tokens=100_000, n=2, temperature=0, stream=True
    )  # minutes of tokens
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert _health(url)["running"] == 2
    done = {}

    def queued() -> None:
        r = client(url, KEY, timeout=60).completions.create(
            model=M, prompt="Once", max_tokens=5, temperature=0
        )
        done["text"], done["at"] = r.choices[0].text, time.monotonic()

    waiter = threading.Thread(target=queued)
    waiter.start()
    _wait(lambda: _health(url)["waiting"] == 1, what="the second request to queue")
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=M, prompt="Once", max_tokens=5)
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
    assert "1 requests are waiting for a row (max_queue=1)" in e.value.message
    closed = time.monotonic()
    stream.close()  # the client goes away mid-stream
    waiter.join(timeout=30)
    assert done["text"] == expected(rope_model, "Once", 5, temperature=0)[0]
    assert done["at"] - closed < 5
    _wait(lambda: _health(url)["running"] == 0, 5, "the rows to be freed")


def test_a_client_leaving_a_non_streaming_request_frees_its_rows(guarded):
    url, engine = guarded
    body = json.dumps({"model": M, "prompt": "Once", "max_tokens": 100_000, "temperature": 0})
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((head + body).encode())
        _wait(lambda: _health(url)["running"] == 1, what="the request to run")
    # The client has gone, with minutes of tokens to go: its row is freed at once.
    _wait(lambda: _health(url)["running"] == 0, 5, "the row to be freed")
    steps = engine.steps
    time.sleep(0.1)
    assert engine.steps == steps


def test_a_failing_step_is_a_500_and_the_server_goes_on(guarded, rope_model, monkeypatch):
    url, engine = guarded
    step = engine.decoder.step_fn

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.decoder, "step_fn", boom)
    c = client(url, KEY)
    with pytest.raises(openai.InternalServerError) as e:
        c.completions.create(model=M, prompt="Once", max_tokens=5)
    assert "decoding failed (RuntimeError: boom)" in e.value.message
    with pytest.raises(openai.APIError, match="boom"):
        list(c.completions.create(model=M, prompt="Once", max_tokens=5, stream=True))
    monkeypatch.setattr(engine.decoder, "step_fn", step)
    r = c.completions.create(model=M, prompt="Once", max_tokens=5, temperature=0)
    assert r.choices[0].text == expected(rope_model, "Once", 5, temperature=0)[0]


# -- the playground, in a real browser ---------------------------------------------------------


def _chromium():
    """Selenium's Chrome driving Debian's chromium headless; skips where there is none."""
    binary = next(
        (p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p),
        None,
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium with chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]:
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_playground_streams_a_story(story, story_model, guarded, monkeypatch):
    url, engine = story
    browser = _chromium()
    step = engine.decoder.step_fn

    def slowed(*args):  # ~20 tokens in ~0.6 s: the page shows them coming
        time.sleep(0.03)
        return step(*args)

    monkeypatch.setattr(engine.decoder, "step_fn", slowed)
    js = "return document.getElementById(arguments[0]).textContent"
    try:
        browser.get(f"{url}/")
        _wait(lambda: browser.execute_script(js, "model").startswith("slm"), 10, "the model id")
        prompt = browser.find_element("id", "prompt")
        prompt.clear()
        prompt.send_keys("Lily had a")
        length = browser.find_element("id", "max_tokens")
        length.clear()
        length.send_keys("40")
        browser.execute_script(  # a range input: set it as a drag would
            "const t = document.getElementById('temperature'); t.value = '0';"
            "t.dispatchEvent(new Event('input'));"
        )
        browser.find_element("id", "generate").click()
        want = expected(story_model, "Lily had a", 40, temperature=0)[0]
        seen = []
        deadline = time.monotonic() + 30
        while "finished" not in browser.execute_script(js, "stats"):
            seen.append(browser.execute_script(js, "completion"))
            assert time.monotonic() < deadline, "the story did not finish"
        assert browser.execute_script(js, "completion") == want
        assert browser.execute_script(js, "shown-prompt") == "Lily had a"
        assert any(0 < len(s) < len(want) and want.startswith(s) for s in seen)  # streamed
        stats = browser.execute_script(js, "stats")
        assert "tokens/s" in stats and "finished: end of story" in stats, stats
        assert browser.execute_script(js, "error") == ""
        # With an API key: the browser sends the key it was given (Basic) with the page's calls.
        browser.get(guarded[0].replace("http://", f"http://me:{KEY}@") + "/")
        _wait(lambda: browser.execute_script(js, "model").startswith(M), 10, "the keyed model id")
        assert browser.execute_script(js, "error") == ""
    finally:
        browser.quit()
