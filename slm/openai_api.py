"""OpenAI's completions protocol, apart from the HTTP routes that serve it (``slm.serve``).

The request (``CompletionRequest``, parsed strictly and checked against the server's
``Limits``, each mistake one OpenAI-style ``ApiError`` naming its field), its prompts as token
ids, the settings it asks of the engine, and the answer: ``Completion`` folds the engine's
events into the one object both answers are made of, a chunk per event when streamed (as
server-sent events, ending in ``data: [DONE]``) or the whole completion at the end.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from slm.engine import Event

MAX_STOP = 4  # OpenAI's limit on stop strings
DEFAULT_MAX_TOKENS = 16  # OpenAI's, where the request leaves max_tokens out
MAX_SEED = 2**64  # torch.Generator.manual_seed takes [0, 2**64)
DONE = "data: [DONE]\n\n"  # the last server-sent event of a stream


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


class LongInt:
    """An integer in the request longer than Python converts (``sys.get_int_max_str_digits()``,
    4300 digits by default: ``json.loads`` raises a bare ValueError on it). Kept as its length,
    no field's type takes it: the field's check names it, a 400."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __str__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int | LongInt:
    limit = sys.get_int_max_str_digits()  # 0: no limit
    digits = len(text.lstrip("-"))
    return LongInt(digits) if limit and digits > limit else int(text)


def _short(value: Any) -> str:
    if isinstance(value, LongInt):
        text = str(value)
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = json.dumps(value, default=str)  # a LongInt in a list: its description
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
        got = body if isinstance(body, LongInt) else type(body).__name__
        raise ApiError(400, f"The request body must be a JSON object, got {got}")
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
    if req.stream_options is not None and not req.stream:
        raise ApiError(  # OpenAI's words (vLLM's check too), and the fix
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled: add "
            '"stream": true, or leave stream_options out',
            "stream_options",
        )


def model_not_found(name: str, served: str) -> ApiError:
    """OpenAI's 404 for a model ``name`` other than the one ``served``."""
    return ApiError(
        404,
        f"The model '{name}' does not exist; this server serves '{served}'",
        param="model",
        code="model_not_found",
    )


def check_model(req: CompletionRequest, served: str) -> None:
    """A 404 where the request names another model than the one ``served``."""
    if req.model != served:
        raise model_not_found(req.model, served)


def busy(reason: str) -> ApiError:
    """The 429 of a full queue, with the engine's ``reason``."""
    return ApiError(
        429,
        f"The server is busy: {reason}; retry later",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": "1"},
    )


def not_a_chat_model(served: str) -> ApiError:
    """The 404 of ``/v1/chat/completions``: a model that continues text has no chat."""
    return ApiError(
        404,
        f"This is not a chat model and thus not supported in the v1/chat/completions "
        f"endpoint: '{served}' continues text; use /v1/completions with a prompt",
        param="model",
    )


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


def sampling(req: CompletionRequest, limits: Limits) -> dict[str, Any]:
    """The settings each of the request's prompts asks of the engine (``slm.engine.Request``'s
    keywords), with OpenAI's defaults for those it leaves out (the default length within the
    server's ``limits``: a request that names none must not get more than one may ask for)."""
    return {
        "max_tokens": req.max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens),
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_k": None if req.top_k in (None, -1) else req.top_k,
        "top_p": req.top_p,
        "n": req.n or 1,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop or [],
    }


async def read_json(request, limit: int) -> Any:
    """The JSON body of ``request`` (a Starlette request: its ``headers`` and ``stream()``), at
    most ``limit`` bytes (413 beyond, without reading it all), sent as ``application/json``
    (415 otherwise: a web page can make a browser send text/plain, a form or an untyped body
    to another origin without asking it first, a CORS "simple" request; JSON needs a preflight
    that this server, with no CORS headers, never allows)."""
    kind = request.headers.get("content-type")
    if kind is None or kind.partition(";")[0].strip().lower() != "application/json":
        got = repr(kind) if kind else "no Content-Type"
        raise ApiError(
            415,
            f"The request body must be JSON sent as 'Content-Type: application/json', got {got}",
        )
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
        return json.loads(data, parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        where = f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
        reason = getattr(e, "msg", "not UTF-8" if isinstance(e, UnicodeDecodeError) else "too deep")
        raise ApiError(
            400,
            f"The request body is not valid JSON ({reason}{where}); send a JSON object",
        ) from e


# -- the answer ------------------------------------------------------------------------------


class Completion:
    """One request's answer, folded from the engine's events as they come: each event of
    prompt ``i`` is choice ``i * n + event.index``, whose text, token count and finish
    reason it updates. The streamed answer sends a chunk per event; the whole one is built
    once every choice has finished. Both share the id, the usage and the choice objects."""

    def __init__(self, model: str, prompts: list[list[int]], n: int) -> None:
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self.n = n
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        total = len(prompts) * n
        self.tokens = [0] * total
        self.pieces: list[list[str]] = [[] for _ in range(total)]  # joined once, in whole()
        self.reasons: list[str | None] = [None] * total
        self.finished = 0

    @property
    def done(self) -> bool:
        return self.finished == len(self.pieces)

    def add(self, i: int, event: Event) -> dict:
        """Fold ``event`` of prompt ``i``; its choice (the new text only). An ``error`` event
        (the engine failed the request) is raised as a 500 ``ApiError``."""
        if event.kind == "error":
            raise ApiError(500, event.text, type="server_error")
        index = i * self.n + event.index
        self.tokens[index] = event.tokens
        self.pieces[index].append(event.text)
        finish = event.finish_reason if event.kind == "finish" else None
        if event.kind == "finish":
            self.reasons[index] = finish
            self.finished += 1
        return {"index": index, "text": event.text, "logprobs": None, "finish_reason": finish}

    def usage(self) -> dict:
        done = sum(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def chunk(self, choice: dict, options: StreamOptions) -> dict:
        """A streamed chunk of one ``choice``: with the usage so far where ``options`` ask for
        it in every chunk, with ``"usage": null`` where they ask for a last usage chunk (as
        OpenAI sends every chunk before it)."""
        chunk = {**self.head, "choices": [choice]}
        if options.continuous_usage_stats:
            chunk["usage"] = self.usage()
        elif options.include_usage:
            chunk["usage"] = None
        return chunk

    def whole(self) -> dict:
        """The whole completion: every choice's text and finish reason, and the usage."""
        choices = [
            {"index": i, "text": "".join(pieces), "logprobs": None, "finish_reason": reason}
            for i, (pieces, reason) in enumerate(zip(self.pieces, self.reasons))
        ]
        return {**self.head, "choices": choices, "usage": self.usage()}


def sse(obj: Any) -> str:
    """``obj`` as one server-sent event."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def stream(
    completion: Completion,
    next_event: Callable[[], Awaitable[tuple[int, Event]]],
    options: StreamOptions,
) -> AsyncIterator[str]:
    """The streamed answer as server-sent events: a chunk per event from ``next_event`` (a
    prompt's index and its event) until every choice has finished, the usage last where
    ``options`` ask for it, then ``[DONE]``. An engine error ends it with the error object."""
    while not completion.done:
        i, event = await next_event()
        try:
            choice = completion.add(i, event)
        except ApiError as e:
            yield sse(e.body())
            return
        yield sse(completion.chunk(choice, options))
    if options.include_usage:
        yield sse({**completion.head, "choices": [], "usage": completion.usage()})
    yield DONE
