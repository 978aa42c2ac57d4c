"""The one decoder: KV-cache rows, a position per row, prefill, the decode step, compaction of
ended rows and the context shift. Every way slm produces tokens is a policy over it:
``slm.sample.generate`` (and ``GPT.generate``), the story suite's completions
(``slm.stories``) and the server's continuous batch (``slm.engine``). A policy draws the
tokens (which generator, greedy or sampled) and says which rows end; the decoder turns tokens
into the logits of the next ones.

    decoder = Decoder(model, rows=4)
    with decoder.running():
        seq = decoder.add(prompt)              # (n, T) ids: prefilled, seq.logits (n, V)
        tok = seq.logits.argmax(-1)
        decoder.advance([(seq, tok)])          # seq.logits: the next position's

A ``Seq`` is a group of rows that move together (one prompt's samples); the length of its
``window`` (the tokens in context) is where its rows stand in the cache. When a window
outgrows ``block_size`` the newest ``block_size // 2`` tokens are kept (``slide``): the rows
are refilled from them (learned positions) or the cache is shifted (RoPE,
``GPT.shift_cache``). A step reads the filled slots on a CPU and all ``block_size`` slots on
CUDA (``static_shapes``), where a compiled step is one CUDA graph per batch size
(docs/design.md says why).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from slm import precision


def slide(window: torch.Tensor, tok: torch.Tensor, block_size: int) -> tuple[torch.Tensor, bool]:
    """``window`` (N, T) with the new tokens ``tok`` (N,) appended, and whether that was a
    context shift: past ``block_size`` tokens only the newest ``block_size // 2`` are kept."""
    window = torch.cat([window, tok[:, None]], dim=1)
    if window.size(1) <= block_size:
        return window, False
    return window[:, -max(1, block_size // 2) :], True


def static_shapes(device: torch.device) -> bool:
    """Whether every step reads all ``block_size`` slots, masked per row (shapes that never
    change): on CUDA, where cuDNN attention would plan anew for every key length and a CUDA
    graph replays fixed shapes. Elsewhere a step reads the filled slots only."""
    return device.type == "cuda"


def buckets(rows: int) -> list[int]:
    """The batch sizes a compiled step is built for: powers of two below ``rows``, and it."""
    return [1 << i for i in range(rows.bit_length()) if 1 << i < rows] + [rows]


def _step(model, tok: torch.Tensor, cache, pos: int | torch.Tensor, span: int) -> torch.Tensor:
    """Logits (B, V) of the last of ``tok``'s (B, T) tokens per row, written from cache slot
    ``pos`` on (an int for every row, or (B,), a slot per row), attending over the first
    ``span`` slots: the decode step (T = 1) and, eager, a prefill (``pos`` 0, ``span`` T)."""
    return model(tok, cache=cache, pos=pos, span=span, last_only=True)[0][:, -1]


# One compiled step per device type for the whole process (dynamo adds a graph per model
# config and batch size).
_COMPILED: dict[str, Callable] = {}


def compiled_step(device: torch.device) -> Callable:
    """``_step`` through ``torch.compile``: CUDA graphs on CUDA (``reduce-overhead``, static
    shapes), the default inductor mode elsewhere (the filled length a dynamic size)."""
    if device.type not in _COMPILED:
        cuda = device.type == "cuda"
        if cuda:
            _COMPILED["cuda"] = torch.compile(
                _step, mode="reduce-overhead", fullgraph=True, dynamic=False
            )
        else:  # inductor's default mode, where each op's result is a buffer, not recomputed
            # inside its consumers' loops: it would fold the final norm into the lm_head's
            # streamed product (slm.weights) and redo it for each of the 50k rows; at
            # decode's sizes buffers cost nothing
            options = {"realize_cpu_opcount_threshold": 0}
            _COMPILED[device.type] = torch.compile(_step, fullgraph=True, options=options)
    return _COMPILED[device.type]


@dataclass(eq=False)
class Seq:
    """Rows ``row`` .. ``row + n - 1`` of a decoder, decoded together: ``window`` (n, L) holds
    their tokens in context, filling cache slots 0 .. L - 1; ``logits`` (n, V) are those of
    the next token, set by ``Decoder.add`` and ``Decoder.advance``."""

    row: int
    window: torch.Tensor
    logits: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.window.size(0)

    @property
    def length(self) -> int:
        return self.window.size(1)


class Decoder:
    """The rows of one ``model``'s KV cache (``rows`` of them) and the ``Seq``s in them.

    ``compile``: the step through ``torch.compile`` (``compiled_step``), at the batch sizes
    ``sizes`` (default: ``buckets(rows)``; a step runs at the smallest that holds the rows in
    use), compiled by ``warm_up``. ``cache=False`` keeps no cache: every call recomputes the
    whole window (the reference the cached paths are tested against)."""

    def __init__(
        self,
        model: torch.nn.Module,
        rows: int,
        compile: bool = False,
        cache: bool = True,
        sizes: Sequence[int] | None = None,
    ) -> None:
        self.model, self.config = model, model.config
        self.device = next(model.parameters()).device
        self.autocast, dtype = precision.inference_precision(model, self.device)
        self.rows, self.compile = rows, compile
        self.cache = model.new_cache(rows, dtype) if cache else None
        self.full_span = static_shapes(self.device)
        # The token of rows that do not decode (and of warm_up): <|endoftext|>, where the vocab
        # holds it (a toy model's may not).
        self.filler = self.config.eot_id if self.config.eot_id < self.config.vocab_size else 0
        self.sizes = sorted(sizes or buckets(rows)) if compile else []
        self.step_fn = compiled_step(self.device) if compile else _step
        # A compiled step (a CUDA graph) reads and writes its cache at fixed addresses: one
        # view per batch size, made once, the same tensors at every step.
        self.views = {b: self.cache.rows(0, b) for b in self.sizes} if self.cache else {}
        for view in self.views.values():
            for t in view.k + view.v:
                torch._dynamo.mark_static_address(t)
        self.pos = {b: torch.zeros(b, dtype=torch.long, device=self.device) for b in self.sizes}
        if compile:  # graphs per batch size (and, on a CPU, per dynamic length), of each
            # decoder of the process: past dynamo's limit the step would fail (fullgraph)
            torch._dynamo.config.recompile_limit += 2 * len(self.sizes)
        self.seqs: list[Seq] = []  # in row order
        self.removed: set[Seq] = set()
        self.steps = 0  # decode steps run

    @contextlib.contextmanager
    def running(self) -> Iterator[Decoder]:
        """What every call of the decoder runs under: inference mode, the model in eval
        mode (its mode restored after), autocast as ``slm.precision`` decides."""
        with torch.inference_mode(), precision.eval_mode(self.model), self.autocast:
            yield self

    @property
    def used(self) -> int:
        """Rows in use (those of removed groups still count until the next call)."""
        return sum(s.n for s in self.seqs)

    def add(self, window: torch.Tensor) -> Seq:
        """A new group of rows for the prompts ``window`` (n, T), 1 <= T <= block_size,
        prefilled in one forward over its rows: its ``logits`` are those of the next token."""
        self._compact()
        n, T = window.shape
        if self.used + n > self.rows:
            raise ValueError(f"{n} rows do not fit: {self.used} of {self.rows} are in use")
        seq = Seq(self.used, window)
        seq.logits = self._prefill(seq)
        self.seqs.append(seq)
        return seq

    def remove(self, seq: Seq) -> None:
        """Free ``seq``'s rows (the rows after it move down before the next call)."""
        self.removed.add(seq)

    def advance(self, pairs: Sequence[tuple[Seq, torch.Tensor]]) -> None:
        """Append each group's new tokens ``tok`` (n,) and compute its next ``logits``: by a
        refill where its window shifted (learned positions), else by one step of every such
        group together (after ``GPT.shift_cache`` where a RoPE window shifted)."""
        self._compact()
        block = self.config.block_size
        rope = self.config.positions == "rope"
        step = []
        for seq, tok in pairs:
            old = seq.length
            seq.window, shifted = slide(seq.window, tok, block)
            if self.cache is None or (shifted and not rope):  # recompute, or refill
                seq.logits = self._prefill(seq)
                continue
            if shifted:  # RoPE: keep the newest positions, moved to the front
                self.model.shift_cache(self._rows(seq), old, seq.length - 1)
            step.append((seq, tok))
        if step:
            self._step(step)

    def warm_up(self) -> None:
        """Compile (and on CUDA capture) the step for each batch size of ``sizes``: three
        steps each, at three positions (dynamo and inductor compile on the first, CUDA graphs
        record on the second and replay from the third; on a CPU the second makes the filled
        length a dynamic size)."""
        with self.running():
            for b in self.sizes:
                tok = torch.full((b, 1), self.filler, dtype=torch.long, device=self.device)
                for p in range(3):
                    self.pos[b].fill_(p)
                    torch.compiler.cudagraph_mark_step_begin()
                    self.step_fn(self.model, tok, self.views[b], self.pos[b], self._span(p))

    # -- inside --------------------------------------------------------------------------

    def _rows(self, seq: Seq):
        return self.cache.rows(seq.row, seq.row + seq.n)

    def _prefill(self, seq: Seq) -> torch.Tensor:
        """One forward over ``seq``'s window into its rows (slots 0 ..): the last logits."""
        cache = self._rows(seq) if self.cache is not None else None
        return _step(self.model, seq.window, cache, 0, seq.length)

    def _compact(self) -> None:
        """Drop the removed groups; move the rows after them down (in row order: rows only
        ever move down)."""
        if not self.removed:
            return
        row, kept = 0, []
        for seq in self.seqs:
            if seq in self.removed:
                continue
            if seq.row != row and self.cache is not None:
                for t in self.cache.k + self.cache.v:
                    t[row : row + seq.n] = t[seq.row : seq.row + seq.n].clone()
            seq.row = row
            row += seq.n
            kept.append(seq)
        self.seqs, self.removed = kept, set()

    def _span(self, filled: int) -> int:
        """How many cache slots a step reads when its rows have filled at most ``filled``."""
        return self.config.block_size if self.full_span else filled + 1

    def _step(self, pairs: list[tuple[Seq, torch.Tensor]]) -> None:
        """One token for each row of ``pairs``' groups, each at its own slot, in one forward
        over the rows in use. Rows that do not decode (refilled ones, free ones of the
        batch size) write a dummy token at a slot past their filled ones, which is written
        again before it is ever read."""
        rows = self.used
        size = next((b for b in self.sizes if b >= rows), rows)
        top = max(seq.length for seq, _ in pairs) - 1
        if len(pairs) == len(self.seqs) == 1 and size == rows:  # generate: one group, all rows
            tok, pos = pairs[0][1], None  # every row at slot top
        else:
            tok, pos = self._batch(pairs, size)
        if size in self.views:
            cache = self.views[size]
        else:  # eager: the whole cache, or the rows of the step
            cache = self.cache if size == self.rows else self.cache.rows(0, size)
        where = self.pos.get(size)
        if pos is None and not self.compile and not self.full_span:
            where = top  # every row at the same slot: written and read as a slice, no mask
        elif where is None and pos is None:  # filled on the device: no copy from the host
            # (a stream sync on CUDA) per token
            where = torch.full((size,), top, dtype=torch.long, device=self.device)
        elif where is None:
            where = torch.tensor(pos, dtype=torch.long, device=self.device)
        elif pos is None:
            where.fill_(top)  # a device-side write: no copy from the host
        else:
            where.copy_(torch.tensor(pos, dtype=torch.long))
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are used
        logits = self.step_fn(self.model, tok[:, None], cache, where, self._span(top))
        for seq, _ in pairs:
            seq.logits = logits[seq.row : seq.row + seq.n]
        self.steps += 1

    def _batch(self, pairs: list[tuple[Seq, torch.Tensor]], size: int):
        """The step's tokens (size,) and each row's slot: the new token's for the rows of
        ``pairs``, a dummy past the filled ones for the others. Slots None: all the same."""
        block = self.config.block_size
        tok = torch.full((size,), self.filler, dtype=torch.long, device=self.device)
        pos = [0] * size
        for seq in self.seqs:
            pos[seq.row : seq.row + seq.n] = [min(seq.length, block - 1)] * seq.n
        for seq, t in pairs:
            tok[seq.row : seq.row + seq.n] = t
            pos[seq.row : seq.row + seq.n] = [seq.length - 1] * seq.n  # its new token's slot
        return tok, (None if min(pos) == max(pos) else pos)


# The compiled decoders of the process, per model, by rows, device and dtype: a compiled
# step (a CUDA graph) replays at the addresses of its cache, so the cache outlives the call
# that made it (and its memory with it), and every later call with that many rows reuses it.
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared(model: torch.nn.Module, rows: int) -> Decoder:
    """The compiled ``Decoder`` of ``model`` for ``rows`` rows (stepping at ``rows`` only),
    made once per process and emptied for the caller."""
    p = next(model.parameters())
    decoders = _SHARED.setdefault(model, {})
    key = (rows, p.device, precision.inference_precision(model, p.device)[1])
    if key not in decoders:
        decoders[key] = Decoder(model, rows, compile=True, sizes=[rows])
    decoder = decoders[key]
    decoder.seqs, decoder.removed = [], set()
    return decoder
