"""Continuous batching: the decode loop behind ``python -m slm.serve``, where requests join
and leave a running batch.

Each request (one prompt and ``n`` samples of it) takes ``n`` rows of one static KV cache of
``max_batch`` rows. Its prompt is prefilled into those rows as soon as they are free; from then
on it advances one token per step together with every other running request, through one call
of ``GPT.decode`` per step with each row at its own position. A request that ends (its stop
token, a stop string, its token budget) or is cancelled (its client went away) leaves before
the next step, and the rows after it move down, so a step runs on exactly the rows in use (the
batch a waiting request joins) and a lone request is decoded at batch 1.

Each request gets the tokens ``slm.sample.generate`` gives it alone, with the same prompt and
settings: its samples are drawn together from its own generator, as ``generate`` draws its
``num_samples`` (``_next_token``, ``filter_logits``); its prefill is ``generate``'s (a forward
over its rows of the cache); its context shifts follow ``slide`` (learned positions refill its
rows, RoPE shifts them, ``GPT.shift_cache``). Rows never mix in a step; the batched step and
``generate``'s growing cache round differently in the last bits only, which moves a greedy
token only where two logits tie to float precision.

The loop runs in one thread of its own (PyTorch releases the GIL in its kernels); callers
submit ``Request``s and receive ``Event``s through the request's ``emit`` callback, which is
called from that thread. With ``compile=True`` the step is ``torch.compile``d (CUDA graphs on
CUDA) for a few batch sizes (1, 2, 4, ..., ``max_batch``: a step runs at the smallest that
holds the rows in use), all compiled by ``start()`` before the first request.
"""

from __future__ import annotations

import codecs
import collections
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from slm.model import GPT, KVCache
from slm.precision import inference_precision
from slm.sample import _decode_step, _next_token, check_sampling, slide
from slm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting for rows than the engine's ``max_queue``."""


@dataclass
class Event:
    """What happened to a request, in order: ``text`` (new text of sample ``index``),
    ``finish`` (sample ``index`` ended: ``finish_reason`` is ``stop`` or ``length``), or
    ``error`` (the request failed and is over: ``text`` says why). ``tokens``: the tokens
    sample ``index`` has generated so far."""

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass(eq=False)
class Request:
    """One prompt (token ids, 1 to ``block_size`` of them) and ``n`` samples of up to
    ``max_tokens`` tokens each, with ``generate``'s sampling settings. ``seed`` seeds this
    request's own generator (None: a random seed). A sample ends at the tokenizer's
    ``eot_id`` (not part of its text) or at the first of the ``stop`` strings (cut off).
    ``emit`` receives the ``Event``s, called from the engine's thread."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: Sequence[str] = ()
    # Set by the engine.
    cancelled: bool = field(default=False, init=False)
    row: int = field(default=0, init=False)
    step: int = field(default=0, init=False)
    window: torch.Tensor | None = field(default=None, init=False, repr=False)
    logits: torch.Tensor | None = field(default=None, init=False, repr=False)  # to sample from
    next: torch.Tensor | None = field(default=None, init=False, repr=False)  # to decode
    generator: torch.Generator | None = field(default=None, init=False, repr=False)
    texts: list[_Text] = field(default_factory=list, init=False, repr=False)

    @property
    def done(self) -> bool:
        return all(t.finish_reason is not None for t in self.texts)


class _Text:
    """One sample's text as its tokens come: bytes decoded incrementally (a token can end
    inside a UTF-8 character), cut before the first stop string. Text that could be the start
    of a stop string is held back until the next tokens tell."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0  # text[:sent] is out
        self.tokens = 0
        self.finish_reason: str | None = None

    def add(self, data: bytes, final: bool = False) -> str:
        """Decode ``data``; the text that can go out now. A stop string ends the sample."""
        self.text += self.utf8.decode(data, final)
        # A stop string starts at or after `sent`: text that could begin one is never sent.
        found = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if found:
            end = min(found)
            self.text = self.text[:end]
            self.finish_reason = "stop"
        elif final:
            end = len(self.text)
        else:
            tail = self.text[self.sent :]
            hold = max(
                (
                    k
                    for s in self.stop
                    for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])
                ),
                default=0,
            )
            end = len(self.text) - hold
        delta, self.sent = self.text[self.sent : end], end
        return delta


def _buckets(max_batch: int) -> list[int]:
    """The batch sizes a compiled step is built for: powers of two below ``max_batch``, and it."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


def _rows(cache: KVCache, start: int, stop: int, pos: int = 0) -> KVCache:
    """A ``KVCache`` over rows ``start:stop`` of ``cache``: views, so writes land in it."""
    view = KVCache.__new__(KVCache)
    view.k = [t[start:stop] for t in cache.k]
    view.v = [t[start:stop] for t in cache.v]
    view.pos = pos
    return view


class Engine:
    """The continuous batch of ``model`` (in eval mode, on its device): ``start()``, then
    ``submit`` requests from any thread and ``cancel`` them; ``close()`` at the end.

    ``max_batch`` rows are decoded together at most; up to ``max_queue`` requests wait for
    rows (``submit`` raises ``QueueFull`` beyond). ``compile``: the step through
    ``torch.compile`` (see the module docstring)."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        compile: bool = False,
    ) -> None:
        config = model.config
        if tokenizer.eot_id >= config.vocab_size:
            raise ValueError(
                f"the tokenizer's eot_id={tokenizer.eot_id} is outside the model's "
                f"vocab_size={config.vocab_size}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.compile = max_batch, max_queue, compile
        self.device = next(model.parameters()).device
        self.autocast, dtype = inference_precision(model, self.device)
        self.cache = KVCache(config, max_batch, self.device, dtype)
        self.decode = _decode_step(self.device, compile)
        self.sizes = _buckets(max_batch) if compile else []
        if compile:  # one graph per batch size: past dynamo's limit it would run eagerly
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, len(self.sizes) + 8)
        # A compiled step (a CUDA graph) reads and writes its cache at fixed addresses: one
        # view per batch size, made once, the same tensors at every step.
        self.views = {b: _rows(self.cache, 0, b) for b in self.sizes}
        for view in self.views.values():
            for t in view.k + view.v:
                torch._dynamo.mark_static_address(t)
        self.running: list[Request] = []  # in row order: rows 0 .. rows_in_use - 1
        self.waiting: collections.deque[Request] = collections.deque()
        self.steps = 0  # decode steps run
        self.peak_rows = 0  # the most rows one step decoded
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the callers' side (any thread) ------------------------------------------------------

    def start(self) -> None:
        """Start the decode thread; with ``compile``, return once every step is compiled."""
        ready, failed = threading.Event(), []

        def run() -> None:
            try:
                with torch.inference_mode(), self.autocast:
                    self._warm_up()
            except BaseException as e:
                failed.append(e)
                return
            finally:
                ready.set()
            self._loop()

        self._thread = threading.Thread(target=run, name="slm-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue ``requests`` (all or none: ``QueueFull`` when they do not fit the queue)."""
        for r in requests:
            check_sampling(r.max_tokens, r.temperature, r.top_k, r.top_p, r.n)
            if r.n > self.max_batch:
                raise ValueError(f"n={r.n} is more than max_batch={self.max_batch} rows")
            if not 1 <= len(r.prompt) <= self.model.config.block_size:
                raise ValueError(
                    f"the prompt has {len(r.prompt)} tokens; 1 to "
                    f"block_size={self.model.config.block_size} fit"
                )
            if r.max_tokens < 1:
                raise ValueError(f"max_tokens={r.max_tokens} must be >= 1")
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are waiting for a row (max_queue="
                    f"{self.max_queue})"
                )
            for r in requests:
                r.texts = [_Text(r.stop) for _ in range(r.n)]
                if r.temperature > 0:
                    r.generator = torch.Generator(self.device)
                    if r.seed is None:
                        r.generator.seed()
                    else:
                        r.generator.manual_seed(r.seed)
            self.waiting.extend(requests)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (its client is gone): its rows are free before the next step. No
        more events come; a no-op for a request that has ended."""
        with self._cond:
            request.cancelled = True
            if request in self.waiting:
                self.waiting.remove(request)
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread; requests still running or waiting get an ``error`` event."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        for r in [*self.running, *self.waiting]:
            self._fail(r, "the server is shutting down")
        self.running.clear()
        self.waiting.clear()

    @property
    def rows_in_use(self) -> int:
        return sum(r.n for r in self.running)

    # -- the decode thread -------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Compile the step for every batch size (three calls each: dynamo and inductor
        compile on the first, CUDA graphs record on the second and replay from the third)."""
        for b in self.sizes:
            tok = torch.full((b, 1), self.tokenizer.eot_id, dtype=torch.long, device=self.device)
            pos = torch.zeros(b, dtype=torch.long, device=self.device)
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                self.decode(self.model, tok, pos, self.views[b])

    def _loop(self) -> None:
        with torch.inference_mode(), self.autocast:
            while True:
                with self._cond:
                    while not self._closed and not self.waiting and not self.running:
                        self._cond.wait()
                    if self._closed:
                        return
                try:
                    self._admit()
                    if self.running:
                        self._step()
                except Exception as e:  # the step itself failed: fail what ran in it
                    log.exception("decode step failed")
                    for r in self.running:
                        self._fail(r, f"decoding failed ({type(e).__name__}: {e})")
                    self.running.clear()

    def _fail(self, r: Request, message: str) -> None:
        r.cancelled = True
        self._send(r, Event("error", text=message))

    def _send(self, r: Request, event: Event) -> None:
        try:
            r.emit(event)
        except Exception:  # a caller's callback must not stop the loop
            log.exception("a request's emit callback failed")
            r.cancelled = True

    def _free(self) -> None:
        """Drop the requests that ended or were cancelled; move the rows after them down."""
        row = 0
        kept = []
        for r in self.running:
            if r.cancelled or r.done:
                continue
            if r.row != row:  # rows only ever move down: copy in row order
                for t in self.cache.k + self.cache.v:
                    t[row : row + r.n] = t[r.row : r.row + r.n].clone()
                r.row = row
            row += r.n
            kept.append(r)
        self.running = kept

    def _admit(self) -> None:
        """Prefill the waiting requests that fit in the free rows, first come first served,
        and send each one's first token at once (not after the others' prefills)."""
        self._free()
        model = self.model
        while True:
            with self._cond:
                if not self.waiting or self.rows_in_use + self.waiting[0].n > self.max_batch:
                    return
                r = self.waiting.popleft()
            r.row = self.rows_in_use
            self.running.append(r)
            try:  # generate's prefill: the prompt expanded to n rows, over the request's rows
                window = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
                r.window = window.expand(r.n, -1).contiguous()
                cache = _rows(self.cache, r.row, r.row + r.n)
                r.logits = model(r.window, cache=cache, last_only=True)[0][:, -1]
                self._advance([r])
            except Exception as e:
                log.exception("prefill failed")
                self._fail(r, f"prefill failed ({type(e).__name__}: {e})")

    def _advance(self, requests: list[Request]) -> None:
        """Sample each request's next tokens from its logits and send them; then prepare what
        gives the logits after them: a refill of its rows (learned positions, at a context
        shift), or its place in the next decode step (``next``)."""
        if not requests:
            return
        model, block = self.model, self.model.config.block_size
        rope = model.config.positions == "rope"
        toks = [
            _next_token(r.logits, r.temperature, r.top_k, r.top_p, r.generator) for r in requests
        ]
        ids = torch.cat(toks).tolist()  # one device sync for all
        i = 0
        for r, tok in zip(requests, toks):
            r.logits = None
            self._emit(r, ids[i : i + r.n])
            i += r.n
            r.step += 1
            if r.done or r.cancelled:
                continue
            if r.step == r.max_tokens:
                for j, text in enumerate(r.texts):
                    if text.finish_reason is None:
                        self._finish(r, j, "length")
                continue
            old = r.window.size(1)
            r.window, shifted = slide(r.window, tok, block)
            if shifted and not rope:  # learned positions: refill its rows (generate's refill)
                cache = _rows(self.cache, r.row, r.row + r.n)
                r.logits = model(r.window, cache=cache, last_only=True)[0][:, -1]
                continue
            if shifted:  # RoPE: keep the newest positions, moved to the front
                model.shift_cache(
                    _rows(self.cache, r.row, r.row + r.n, pos=old), r.window.size(1) - 1
                )
            r.next = tok

    def _step(self) -> None:
        """One token for every running request: sample and send it (where ``_admit`` has not),
        then compute the next logits of all of them in one ``GPT.decode``."""
        self._advance([r for r in self.running if r.logits is not None])
        self._free()
        decode = [r for r in self.running if r.next is not None]
        if not decode:
            return
        block = self.model.config.block_size
        rows = self.rows_in_use
        size = next((b for b in self.sizes if b >= rows), rows)
        # Rows that do not decode this step (refilled ones, free ones) write a dummy token at
        # a slot past their filled ones, which is written again before it is ever read.
        tok = torch.full((size,), self.tokenizer.eot_id, dtype=torch.long, device=self.device)
        pos = [0] * size
        for r in self.running:
            pos[r.row : r.row + r.n] = [min(r.window.size(1), block - 1)] * r.n
        for r in decode:
            tok[r.row : r.row + r.n] = r.next
            pos[r.row : r.row + r.n] = [r.window.size(1) - 1] * r.n  # the slot of its new token
        pos = torch.tensor(pos, dtype=torch.long, device=self.device)
        cache = self.views[size] if self.sizes else _rows(self.cache, 0, size)
        torch.compiler.cudagraph_mark_step_begin()
        logits = self.decode(self.model, tok[:, None], pos, cache)
        for r in decode:
            r.logits, r.next = logits[r.row : r.row + r.n], None
        self.steps += 1
        self.peak_rows = max(self.peak_rows, rows)

    def _emit(self, r: Request, ids: list[int]) -> None:
        """Send the new tokens of ``r``'s samples (those still going) as text."""
        eot = self.tokenizer.eot_id
        for j, (t, text) in enumerate(zip(ids, r.texts)):
            if text.finish_reason is not None:
                continue  # an ended sample still computes with the others, not emits
            if t == eot:
                self._finish(r, j, "stop")
                continue
            text.tokens += 1
            delta = text.add(self.tokenizer.token_bytes(t))
            if delta:
                self._send(r, Event("text", j, delta, tokens=text.tokens))
            if text.finish_reason is not None:  # a stop string
                self._send(r, Event("finish", j, finish_reason="stop", tokens=text.tokens))

    def _finish(self, r: Request, j: int, reason: str) -> None:
        text = r.texts[j]
        delta = text.add(b"", final=True)  # what was held back, and a cut-off character
        if delta:
            self._send(r, Event("text", j, delta, tokens=text.tokens))
        if text.finish_reason is None:
            text.finish_reason = reason
        self._send(r, Event("finish", j, finish_reason=text.finish_reason, tokens=text.tokens))
