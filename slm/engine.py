"""Continuous batching: the decode loop behind ``python -m slm.serve``, where requests join
and leave a running batch; a policy over the one decoder (``slm.decode``).

Each request (one prompt and ``n`` samples of it) is a group of ``n`` rows of the decoder
(``max_batch`` rows). Its prompt is prefilled into those rows as soon as they are free; from
then on it advances one token per step together with every other running request, each row at
its own position. A request that ends (its stop token, a stop string, its token budget) or is
cancelled (its client went away) leaves before the next step, and the rows after it move
down, so a step runs on the rows in use (the batch a waiting request joins) and a lone
request is decoded at batch 1.

Each request gets the tokens ``slm.sample.generate`` gives it alone, with the same prompt and
settings: its samples are drawn together from its own generator (``next_token``), its
prefill and context shifts are the decoder's. Rows never mix in a step; the batched step and
``generate``'s round differently in the last bits only, which moves a greedy token only where
two logits tie to float precision.

The loop runs in one thread of its own (PyTorch releases the GIL in its kernels); callers
submit ``Request``s and receive ``Event``s through the request's ``emit`` callback, which is
called from that thread. With ``compile=True`` the step is ``torch.compile``d (CUDA graphs on
CUDA) for a few batch sizes (1, 2, 4, ..., ``max_batch``), all compiled by ``start()``.
"""

from __future__ import annotations

import codecs
import collections
import contextvars
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from slm.decode import Decoder, Seq
from slm.sampling import check_sampling, next_token
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
    step: int = field(default=0, init=False)
    seq: Seq | None = field(default=None, init=False, repr=False)  # its rows of the decoder
    next: torch.Tensor | None = field(default=None, init=False, repr=False)  # to decode
    generator: torch.Generator | None = field(default=None, init=False, repr=False)
    texts: list[SampleText] = field(default_factory=list, init=False, repr=False)

    @property
    def done(self) -> bool:
        return all(t.finish_reason is not None for t in self.texts)


class SampleText:
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


class Engine:
    """The continuous batch of ``model`` (on its device, run in eval mode): ``start()``, then
    ``submit`` requests from any thread and ``cancel`` them; ``close()`` at the end.

    ``max_batch`` rows are decoded together at most; up to ``max_queue`` requests wait for
    rows (``submit`` raises ``QueueFull`` beyond). ``compile``: the step through
    ``torch.compile`` (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
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
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.decoder = Decoder(model, max_batch, compile=compile)
        self.running: list[Request] = []  # in row order
        self.waiting: collections.deque[Request] = collections.deque()
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
                self.decoder.warm_up()  # compiles every batch size (none when eager)
            except BaseException as e:
                failed.append(e)
                return
            finally:
                ready.set()
            self._loop()

        # In this thread's context: torch's compile settings are context variables (dynamo's
        # recompile limit, which a compiled Decoder raises by its graphs, among them).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(run,), name="slm-engine", daemon=True
        )
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
                r.texts = [SampleText(r.stop) for _ in range(r.n)]
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
    def max_batch(self) -> int:
        return self.decoder.rows

    @property
    def compile(self) -> bool:
        return self.decoder.compile

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def rows_in_use(self) -> int:
        return sum(r.n for r in self.running)

    @property
    def steps(self) -> int:
        """Decode steps run."""
        return self.decoder.steps

    # -- the decode thread -------------------------------------------------------------------

    def _loop(self) -> None:
        with self.decoder.running():
            while True:
                with self._cond:
                    while not self._closed and not self.waiting and not self.running:
                        self._cond.wait()
                    if self._closed:
                        return
                try:
                    self._admit()
                    self._step()
                except Exception as e:  # the step itself failed: fail what ran in it
                    log.exception("decode step failed")
                    for r in self.running:
                        self._fail(r, f"decoding failed ({type(e).__name__}: {e})")
                    self._free()

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
        """Drop the requests that ended or were cancelled: their rows are free (the rows after
        them move down before the next step)."""
        for r in self.running:
            if r.cancelled or r.done:
                self.decoder.remove(r.seq)
        self.running = [r for r in self.running if not (r.cancelled or r.done)]

    def _admit(self) -> None:
        """Prefill the waiting requests that fit in the free rows, first come first served,
        and send each one's first token at once (not after the others' prefills)."""
        self._free()
        while True:
            with self._cond:
                if not self.waiting or self.rows_in_use + self.waiting[0].n > self.max_batch:
                    return
                r = self.waiting.popleft()
            try:  # generate's prefill: the prompt expanded to n rows
                window = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
                r.seq = self.decoder.add(window.expand(r.n, -1).contiguous())
            except Exception as e:
                log.exception("prefill failed")
                self._fail(r, f"prefill failed ({type(e).__name__}: {e})")
                continue
            self.running.append(r)
            self._sample([r])

    def _sample(self, requests: list[Request]) -> None:
        """Draw each request's next tokens from its logits and send them; those that go on
        keep them to decode (``next``)."""
        if not requests:
            return
        toks = [
            next_token(r.seq.logits, r.temperature, r.top_k, r.top_p, r.generator) for r in requests
        ]
        ids = torch.cat(toks).tolist()  # one device sync for all
        i = 0
        for r, tok in zip(requests, toks):
            r.seq.logits = None
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
            r.next = tok

    def _step(self) -> None:
        """One token for every running request: sample and send it (where ``_admit`` has not),
        then compute the next logits of all of them (``Decoder.advance``)."""
        self._sample([r for r in self.running if r.seq.logits is not None])
        self._free()
        go = [r for r in self.running if r.next is not None]
        if not go:
            return
        self.peak_rows = max(self.peak_rows, self.rows_in_use)
        self.decoder.advance([(r.seq, r.next) for r in go])
        for r in go:
            r.next = None

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
