"""Serve a trained model over the OpenAI completions API, with a story playground at ``/``.

    python -m slm.serve ckpt=outputs/DATE/TIME/slm.pt            # http://127.0.0.1:8000
    python -m slm.serve ckpt=PATH port=8080 max_batch=16 api_key=SECRET

Routes: ``POST /v1/completions`` (OpenAI's request and response, streamed as server-sent
events with ``stream: true``), ``GET /v1/models``, ``GET /health``, ``GET /`` (the playground);
``/v1/chat/completions`` answers that this is a completion model. See ``conf/serve.yaml``.

The stack is FastAPI on uvicorn, the one most OpenAI-compatible servers use (vLLM's among
them). LitServe (Lightning's) was the other candidate: its OpenAI spec serves chat completions
only, and its workers run in other processes behind a queue, where the batch here has to see
each request as it arrives, stream its tokens and drop it the moment its client disconnects.
So the model runs in this process, in ``slm.engine.Engine``'s decode thread, and FastAPI
handles HTTP: each request is validated (one OpenAI-style error object naming the field), its
prompts are queued on the engine (429 when the queue is full) and its tokens come back through
an asyncio queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as e:  # the serve extra
    if __name__ == "__main__":
        print(
            f"error: python -m slm.serve needs the serve extra ({e.name} is not installed): "
            "pip install -e '.[serve]'",
            file=sys.stderr,
        )
        sys.exit(1)
    raise

import anyio
from omegaconf import DictConfig, OmegaConf

from slm.checkpoint import load_model, load_tokenizer
from slm.config import compose
from slm.engine import Engine, Event, QueueFull
from slm.engine import Request as Job
from slm.errors import ConfigError, run_cli
from slm.precision import resolve_device

log = logging.getLogger("slm.serve")

PLAYGROUND = Path(__file__).with_name("playground.html")
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_SEED = 2**64  # torch.Generator.manual_seed takes [0, 2**64)


# -- errors ----------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI answers it: ``{"error": {"message", "type", "param",
    "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- the request -----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None  # a last chunk with the usage (OpenAI)
    continuous_usage_stats: bool | None = None  # the usage in every chunk (vLLM's extension)


class CompletionRequest(BaseModel):
    """OpenAI's completions request. Types are checked strictly (``"5"`` is not a number); the
    ranges, which depend on the server's limits, are checked by ``check_request``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (as vLLM): -1 or null = off
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # Accepted at the values that change nothing; anything else is answered "not supported".
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None


NEUTRAL = {
    "echo": (False,),
    "logprobs": (),
    "best_of": (1,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
}


@dataclass
class Limits:
    """What a request may ask for (``limits.*`` in ``conf/serve.yaml``)."""

    max_tokens: int
    max_prompt_tokens: int
    max_body_bytes: int
    max_n: int  # the engine's max_batch: a request's samples are decoded together
    max_prompts: int  # the engine's max_queue: every prompt waits in the queue first


def expected(field: str, limits: Limits) -> str:
    """What ``field`` must be, for the error message."""
    return {
        "model": "a string, the model's id (GET /v1/models)",
        "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
        "max_tokens": f"an integer in [1, {limits.max_tokens}]",
        "temperature": "a number in [0, 2] (0 = greedy)",
        "top_p": "a number in (0, 1]",
        "top_k": "an integer >= 1, or -1 or null for no top-k",
        "n": f"an integer in [1, {limits.max_n}]",
        "stop": f"a string or a list of up to {MAX_STOP} strings",
        "seed": "an integer in [0, 2**64)",
        "stream": "true or false",
        "stream_options": 'an object {"include_usage": bool, "continuous_usage_stats": bool}',
        "user": "a string",
        "echo": "false (echo is not supported)",
        "logprobs": "null (logprobs are not supported)",
        "best_of": "1 (best_of is not supported)",
        "frequency_penalty": "0 (penalties are not supported)",
        "presence_penalty": "0 (penalties are not supported)",
        "logit_bias": "{} (logit_bias is not supported)",
        "suffix": "null (suffix is not supported)",
    }.get(field, "valid")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def invalid(field: str, value: Any, limits: Limits, why: str = "") -> ApiError:
    why = f" ({why})" if why else ""
    want = expected(field, limits)
    return ApiError(
        400, f"Invalid value for '{field}': expected {want}, got {_short(value)}{why}", field
    )


def parse_request(body: Any, limits: Limits) -> CompletionRequest:
    """The request in the JSON ``body``; an ``ApiError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(body).__name__}")
    try:
        req = CompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {field}", field) from e
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{field}'", field) from e
        raise invalid(field, body.get(field), limits) from e
    check_request(req, body, limits)
    return req


def check_request(req: CompletionRequest, body: dict, limits: Limits) -> None:
    """The ranges and the unsupported options of a well-typed request."""

    def bad(field: str, why: str = "") -> ApiError:
        return invalid(field, body.get(field), limits, why)

    if req.max_tokens is not None and not 1 <= req.max_tokens <= limits.max_tokens:
        raise bad("max_tokens")
    if req.temperature is not None and not 0 <= req.temperature <= 2:  # NaN fails too
        raise bad("temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad("top_p")
    if req.top_k is not None and req.top_k != -1 and req.top_k < 1:
        raise bad("top_k")
    if req.n is not None and not 1 <= req.n <= limits.max_n:
        raise bad("n", "each sample takes a row of the batch" if req.n > limits.max_n else "")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise bad("stop")
    if req.seed is not None and not 0 <= req.seed < MAX_SEED:
        raise bad("seed")
    for field, neutral in NEUTRAL.items():
        value = getattr(req, field)
        if value is not None and value not in neutral:
            raise bad(field)
    if isinstance(req.prompt, list) and not req.prompt:
        raise bad("prompt", "an empty list")


def tokenize_prompts(prompt, tokenizer, vocab_size: int, limits: Limits) -> list[list[int]]:
    """Each prompt as token ids (an empty one: the end-of-text token, a story start)."""
    one = isinstance(prompt, str) or all(isinstance(p, int) for p in prompt)
    prompts = [prompt] if one else prompt
    if len(prompts) > limits.max_prompts:
        raise ApiError(
            400,
            f"Invalid value for 'prompt': {len(prompts)} prompts, more than this server queues "
            f"at once ({limits.max_prompts}); send fewer per request",
            "prompt",
        )
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(
                400,
                f"Invalid value for 'prompt': token id {bad[0]} (prompt {i}) is not in the "
                f"vocabulary [0, {vocab_size})",
                "prompt",
            )
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"Invalid value for 'prompt': prompt {i} has {len(ids)} tokens, more than "
                f"max_prompt_tokens={limits.max_prompt_tokens}; shorten it",
                "prompt",
            )
        out.append(ids or [tokenizer.eot_id])
    return out


# -- the app ---------------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, at most ``limit`` bytes (413 beyond, without reading it all)."""
    too_large = ApiError(
        413, f"The request body is larger than max_body_bytes={limit}; send a smaller one"
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        reason = getattr(e, "msg", "not UTF-8" if isinstance(e, UnicodeDecodeError) else "too deep")
        raise ApiError(
            400,
            f"The request body is not valid JSON ({reason}{where}); send a JSON object",
        ) from e


async def _wait_disconnect(request: Request) -> None:
    """Return when the client has gone (the body is read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (a client that
    disconnects ends it at once: Starlette cancels the stream)."""

    def __init__(self, content, on_close) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _auth(api_key: str | None):
    """A dependency: with an ``api_key``, every request must carry it, as
    ``Authorization: Bearer KEY`` or (what a browser sends for the playground) HTTP Basic
    with the key as the password."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        given = None
        if scheme.lower() == "bearer":
            given = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(credentials.strip()).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = None
        if given is not None and secrets.compare_digest(given.encode(), api_key.encode()):
            return
        page = request.url.path == "/"
        message = (
            "Incorrect API key provided"
            if given
            else "You didn't provide an API key: send it as 'Authorization: Bearer KEY'"
        )
        raise ApiError(
            401,
            message,
            type="invalid_request_error",
            code="invalid_api_key",
            # A browser asks for a password on a Basic challenge: the playground's way in.
            headers={"WWW-Authenticate": 'Basic realm="slm"' if page else "Bearer"},
        )

    return check


def create_app(
    engine: Engine,
    model_name: str,
    limits: Limits,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` (started) as ``model_name``."""
    tokenizer, config = engine.tokenizer, engine.model.config
    vocab = min(tokenizer.vocab_size, config.vocab_size)
    created = int(time.time())
    page = PLAYGROUND.read_text(encoding="utf-8")
    app = FastAPI(title="slm", docs_url=None, redoc_url=None, openapi_url=None)
    api = APIRouter(dependencies=[Depends(_auth(api_key))])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        routes = "POST /v1/completions, GET /v1/models, GET /health, GET / (the playground)"
        message = {
            404: f"Unknown route {request.method} {request.url.path}; this server has {routes}",
            405: f"Method {request.method} not allowed on {request.url.path}; it has {routes}",
        }.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return ApiError(
            500, f"Internal server error ({type(e).__name__}: {e})", type="server_error"
        ).response()

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "running": engine.rows_in_use,  # rows of the batch in use
            "waiting": len(engine.waiting),  # prompts waiting for rows
            "max_batch": engine.max_batch,
        }

    @api.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @api.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "slm",
                    "max_model_len": config.block_size,
                }
            ],
        }

    @api.post("/v1/chat/completions")
    async def chat() -> None:
        raise ApiError(
            404,
            f"This is not a chat model and thus not supported in the v1/chat/completions "
            f"endpoint: '{model_name}' continues text; use /v1/completions with a prompt",
            param="model",
        )

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await read_json(request, limits.max_body_bytes), limits)
        if req.model != model_name:
            raise ApiError(
                404,
                f"The model '{req.model}' does not exist; this server serves '{model_name}'",
                param="model",
                code="model_not_found",
            )
        # Encoding a long prompt takes a while: off the event loop.
        prompts = await anyio.to_thread.run_sync(
            tokenize_prompts, req.prompt, tokenizer, vocab, limits
        )
        n = req.n or 1
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def emitter(i: int):
            return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (i, event))

        jobs = [
            Job(
                prompt=ids,
                max_tokens=req.max_tokens or 16,  # OpenAI's default
                emit=emitter(i),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=None if req.top_k in (None, -1) else req.top_k,
                top_p=req.top_p,
                n=n,
                seed=req.seed,
                stop=stop,
            )
            for i, ids in enumerate(prompts)
        ]
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(
                429,
                f"The server is busy: {e}; retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from e

        def cancel() -> None:
            for job in jobs:
                engine.cancel(job)

        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        prompt_tokens = sum(len(ids) for ids in prompts)
        total = len(jobs) * n
        tokens = [0] * total

        def usage() -> dict:
            done = sum(tokens)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": done,
                "total_tokens": prompt_tokens + done,
            }

        if req.stream:
            options = req.stream_options or StreamOptions()

            async def events():
                finished = 0
                while finished < total:
                    i, event = await queue.get()
                    if event.kind == "error":
                        error = ApiError(500, event.text, type="server_error")
                        yield _sse(error.body())
                        return
                    index = i * n + event.index
                    tokens[index] = event.tokens
                    finish = event.finish_reason if event.kind == "finish" else None
                    finished += event.kind == "finish"
                    text = event.text
                    chunk = {
                        **head,
                        "choices": [
                            {
                                "index": index,
                                "text": text,
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                        ],
                    }
                    if options.continuous_usage_stats:
                        chunk["usage"] = usage()
                    yield _sse(chunk)
                if options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"

            return _Stream(events(), on_close=cancel)

        texts = [""] * total
        reasons: list[str | None] = [None] * total
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            finished = 0
            while finished < total:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client has gone: free its rows now
                    get.cancel()
                    return JSONResponse({}, status_code=499)  # read by nobody
                i, event = get.result()
                if event.kind == "error":
                    raise ApiError(500, event.text, type="server_error")
                index = i * n + event.index
                tokens[index] = event.tokens
                texts[index] += event.text
                if event.kind == "finish":
                    reasons[index] = event.finish_reason
                    finished += 1
        finally:
            gone.cancel()
            cancel()
        choices = [
            {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
            for i in range(total)
        ]
        return {**head, "choices": choices, "usage": usage()}

    app.include_router(api)
    return app


# -- the command -----------------------------------------------------------------------------


def _int(cfg: DictConfig, key: str, low: int, high: int | None = None, null: bool = False):
    value = OmegaConf.select(cfg, key)
    if value is None and null:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        where = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{key}={value} must be an integer {where}{' or null' if null else ''}")
    return value


def build(cfg: DictConfig) -> tuple[FastAPI, Engine]:
    """The app and its engine (started: compiled and ready) for a ``conf/serve.yaml`` config;
    a one-line ``ConfigError`` (or ``CheckpointError``) for the first bad value."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise ConfigError("ckpt is required: python -m slm.serve ckpt=PATH (a slm.pt or .ckpt)")
    max_batch = _int(cfg, "max_batch", 1, 1024)
    max_queue = _int(cfg, "limits.max_queue", 1)
    max_tokens = _int(cfg, "limits.max_tokens", 1)
    max_prompt_tokens = _int(cfg, "limits.max_prompt_tokens", 1, null=True)
    max_body_bytes = _int(cfg, "limits.max_body_bytes", 64)
    if cfg.compile != "auto" and not isinstance(cfg.compile, bool):
        raise ConfigError(f"compile={cfg.compile} must be auto, true or false")
    name = cfg.model_name
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model_name={name} must be a non-empty string: the id clients pass")
    api_key = cfg.api_key
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ConfigError(
            "api_key is set but empty (SLM_API_KEY=''?): set a key, or unset it to serve "
            "without one"
        )
    device = resolve_device(cfg.device)
    compile = device.type == "cuda" if cfg.compile == "auto" else cfg.compile
    model = load_model(cfg.ckpt, device)
    tokenizer = load_tokenizer(cfg.ckpt)
    block = model.config.block_size
    if max_prompt_tokens is None:
        max_prompt_tokens = block
    elif max_prompt_tokens > block:
        raise ConfigError(
            f"limits.max_prompt_tokens={max_prompt_tokens} is more than the model reads "
            f"(block_size={block}); use at most {block}, or null"
        )
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, compile=compile)
    engine.start()  # compiles every batch size first: ready means ready
    limits = Limits(max_tokens, max_prompt_tokens, max_body_bytes, max_batch, max_queue)
    return create_app(engine, name, limits, api_key), engine


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, before the model loads: a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(
            f"cannot listen on host={host} port={port} ({e.strerror or e}); pass a free port=N "
            "(or another host)"
        ) from e
    return sock


def main(argv: list[str] | None = None) -> None:
    cfg = compose("serve", sys.argv[1:] if argv is None else argv)  # an unknown key: one line
    host = cfg.host
    if not isinstance(host, str) or not host:
        raise ConfigError(f"host={host} must be an address, e.g. 127.0.0.1 or 0.0.0.0")
    port = _int(cfg, "port", 0, 65535)
    sock = bind(host, port)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    t0 = time.perf_counter()
    app, engine = build(cfg)
    model, device = engine.model, engine.device
    port = sock.getsockname()[1]
    print(
        f"serving '{cfg.model_name}' ({model.num_params()['total'] / 1e6:.1f}M parameters, "
        f"block_size {model.config.block_size}) on {device}, max_batch {engine.max_batch}, "
        f"compile {engine.compile}: ready in {time.perf_counter() - t0:.1f} s\n"
        f"  playground  http://{host}:{port}/\n  API         http://{host}:{port}/v1"
        + ("  (Authorization: Bearer <api_key>)" if cfg.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)  # Ctrl-C: streams still running get 5 s, then are cut
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


if __name__ == "__main__":
    run_cli(main, (ValueError,))  # SlmError, and torch's ValueErrors for a bad device
