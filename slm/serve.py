"""Serve a trained model over the OpenAI completions API, with a story playground at ``/``.

    python -m slm.serve ckpt=outputs/DATE/TIME/slm.pt            # http://127.0.0.1:8000
    python -m slm.serve ckpt=PATH port=8080 max_batch=16 api_key=SECRET

Routes: ``POST /v1/completions`` (OpenAI's request and response, streamed as server-sent
events with ``stream: true``), ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``,
``GET /`` (the playground); ``/v1/chat/completions`` answers that this is a completion model.
No CORS headers: a browser lets only the playground's own origin read the answers (and the
completions route takes JSON only, so no other page can make a browser run it). See
``conf/serve.yaml``.

FastAPI handles HTTP (docs/design.md says why not LitServe); the model runs in this process,
in ``slm.engine.Engine``'s decode thread. Each request is validated (``slm.openai_api``: one
OpenAI-style error object naming the field), its prompts are queued on the engine (429 when
the queue is full) and its events come back through an asyncio queue, folded into the answer
by ``openai_api.Completion``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import socket
import sys
import time
from pathlib import Path

from slm.errors import ConfigError, SlmError, fail, run_cli

try:
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from slm.openai_api import (
        ApiError,
        Completion,
        Limits,
        StreamOptions,
        busy,
        check_model,
        model_not_found,
        not_a_chat_model,
        parse_request,
        read_json,
        sampling,
        stream,
        tokenize_prompts,
    )
except ModuleNotFoundError as e:  # the serve extra
    if __name__ == "__main__":
        fail(
            SlmError(
                f"python -m slm.serve needs the serve extra ({e.name} is not installed): "
                "pip install -e '.[serve]'"
            )
        )
    raise

import anyio
from omegaconf import DictConfig, OmegaConf

from slm.checkpoint import load_model, load_tokenizer
from slm.config import compose, resolve_inference, typed_text
from slm.engine import Engine, Event, QueueFull
from slm.engine import Request as Job
from slm.weights import pack

log = logging.getLogger("slm.serve")

PLAYGROUND = Path(__file__).with_name("playground.html")


# -- the app ---------------------------------------------------------------------------------


def _respond(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
        return _respond(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        routes = (
            "POST /v1/completions, GET /v1/models, GET /v1/models/{model}, GET /health, "
            "GET / (the playground)"
        )
        message = {
            404: f"Unknown route {request.method} {request.url.path}; this server has {routes}",
            405: f"Method {request.method} not allowed on {request.url.path}; it has {routes}",
        }.get(e.status_code, str(e.detail))
        return _respond(ApiError(e.status_code, message))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        message = f"Internal server error ({type(e).__name__}: {e})"
        return _respond(ApiError(500, message, type="server_error"))

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

    model = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "slm",
        "max_model_len": config.block_size,
    }

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model]}

    @api.get("/v1/models/{name:path}")  # an id may hold a '/' (org/name), as the client sends it
    async def retrieve(name: str) -> dict:
        if name != model_name:
            raise model_not_found(name, model_name)
        return model

    @api.post("/v1/chat/completions")
    async def chat() -> None:
        raise not_a_chat_model(model_name)

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await read_json(request, limits.max_body_bytes), limits)
        check_model(req, model_name)
        # Encoding a long prompt takes a while: off the event loop.
        prompts = await anyio.to_thread.run_sync(
            tokenize_prompts, req.prompt, tokenizer, vocab, limits
        )
        settings = sampling(req, limits)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def emitter(i: int):
            return lambda event: loop.call_soon_threadsafe(queue.put_nowait, (i, event))

        jobs = [Job(prompt=ids, emit=emitter(i), **settings) for i, ids in enumerate(prompts)]
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise busy(str(e)) from e

        def cancel() -> None:
            for job in jobs:
                engine.cancel(job)

        completion = Completion(model_name, prompts, settings["n"])
        if req.stream:
            options = req.stream_options or StreamOptions()
            return _Stream(stream(completion, queue.get, options), on_close=cancel)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while not completion.done:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():  # the client has gone: free its rows now
                    get.cancel()
                    return JSONResponse({}, status_code=499)  # read by nobody
                completion.add(*get.result())  # an ApiError where the engine failed
        finally:
            gone.cancel()
            cancel()
        return completion.whole()

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
    device, compile, weights = resolve_inference(
        cfg, "python -m slm.serve ckpt=PATH (a slm.pt or .ckpt)"
    )
    max_batch = _int(cfg, "max_batch", 1, 1024)
    max_queue = _int(cfg, "limits.max_queue", 1)
    max_tokens = _int(cfg, "limits.max_tokens", 1)
    max_prompt_tokens = _int(cfg, "limits.max_prompt_tokens", 1, null=True)
    max_body_bytes = _int(cfg, "limits.max_body_bytes", 64)
    name = cfg.model_name
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model_name={name} must be a non-empty string: the id clients pass")
    api_key = cfg.api_key
    if isinstance(api_key, (int, float)):  # a bool too: a config composed without ``config``
        api_key = str(api_key)
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ConfigError(
            "api_key is set but empty (SLM_API_KEY=''?): set a key, or unset it to serve "
            "without one"
        )
    model = pack(load_model(cfg.ckpt, device), weights)
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


TEXT_KEYS = ("api_key", "model_name")  # strings whatever they look like: api_key=12345


def config(overrides: list[str]) -> DictConfig:
    """``conf/serve.yaml`` with the command line's ``overrides`` (an unknown key: one line), the
    ``TEXT_KEYS`` as typed (Hydra reads ``api_key=1.50`` as the float 1.5)."""
    return typed_text(compose("serve", overrides), overrides, TEXT_KEYS)


def main(argv: list[str] | None = None) -> None:
    cfg = config(sys.argv[1:] if argv is None else argv)
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
        f"{model.weights} weights, compile {engine.compile}: ready in "
        f"{time.perf_counter() - t0:.1f} s\n"
        f"  playground  http://{host}:{port}/\n  API         http://{host}:{port}/v1"
        + ("  (Authorization: Bearer <api_key>)" if cfg.api_key else ""),
        file=sys.stderr,
        flush=True,
    )
    options = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5)
    server = uvicorn.Server(options)  # Ctrl-C: streams still running get 5 s, then are cut
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


if __name__ == "__main__":
    run_cli(main, (ValueError,))  # SlmError, and torch's ValueErrors for a bad device
