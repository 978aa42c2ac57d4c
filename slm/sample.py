"""Story generation from a trained GPT: logit filtering and a batched sampler with a key/value
cache (checkpoints load through ``slm.checkpoint``).

    model, tok = load_model("outputs/run/slm.pt"), load_tokenizer("outputs/run/slm.pt")
    [ids] = generate(model, tok.encode("Once upon a time"), 200, temperature=0.8,
                     top_k=200, top_p=0.95, generator=torch.Generator().manual_seed(1337))
    print(tok.decode(ids))

A story starts (from an empty prompt) and ends (``stop_token="eot"``, the default) at the
model's own ``<|endoftext|>``, ``model.config.eot_id``: that of the tokenizer it was trained
with (50256 for gpt2; a checkpoint stores it).

The context window: while prompt + generated tokens fit in ``block_size``, the cache grows by
one position per step. When the next token would not fit, the oldest half of the window is
dropped (the newest ``block_size // 2`` tokens are kept, like llama.cpp's context shift).

- Learned absolute positions (GPT-2): the cache is refilled from the kept tokens in one
  forward pass, then generation goes on one position per step (the same tokens with and
  without the cache). Why not nanoGPT's "always the last ``block_size`` tokens": after a
  one-token slide every cached key sits at the wrong position and is invalid; each new token
  would cost a full forward over ``block_size`` tokens. The half shift costs one refill per
  ``block_size // 2`` tokens.
- RoPE: attention scores depend on relative positions only, so the cache is kept: the kept
  half moves to the front of the cache (``GPT.shift_cache``) and the new token is its next
  position, with no refill. The kept keys were computed when the dropped tokens were still
  visible and keep what the layers below read from them (as in llama.cpp); the reference
  ``use_cache=False`` recomputes the kept window from scratch instead, so the two agree up
  to the first shift.

The fast path (``compile=True``, or any CUDA device): after the prefill, each new token goes
through ``GPT.decode``, a step whose shapes never change (a static cache of ``block_size``
slots, attention masked to the filled ones), so the kernels are the same at every step. On a
GPU the eager growing cache is slow for that reason: cuDNN attention plans anew for every
new key length (~5.5 ms a call on an H100). Compiled, the step is one CUDA graph
(``torch.compile(mode="reduce-overhead")``, as in gpt-fast) replayed per token; the compile
is paid once per process (``warm_up``). Prefill and a refill stay normal forwards; sampling
and streaming stay in Python, outside the graph.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import torch

from slm.checkpoint import (  # noqa: F401  (the public API here)
    load_checkpoint,
    load_model,
    load_tokenizer,
)
from slm.model import GPT, GPTConfig, KVCache
from slm.precision import inference_precision

# -- arguments -------------------------------------------------------------------------------


def check_sampling(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    num_samples: int = 1,
) -> None:
    """Raise ``ValueError`` with a one-line message for the first invalid argument."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be an integer >= 0")
    if not is_num(temperature) or not temperature >= 0:  # `not >=` also catches NaN
        raise ValueError(f"temperature={temperature} must be a number >= 0 (0 = greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k} must be an integer >= 1, or null for no top-k")
    if top_p is not None and (not is_num(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p} must be in (0, 1], or null for no nucleus filter")
    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be an integer >= 1")


# -- sampling --------------------------------------------------------------------------------


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """``logits`` (..., V) scaled by ``1 / temperature``, then top-k, then top-p (nucleus) on
    what top-k left, as float32 with the removed entries at ``-inf``.

    top-k keeps the ``k`` largest logits; top-p keeps the smallest set of most likely tokens
    whose probabilities sum to at least ``top_p``. The most likely token is always kept, and
    a token tied with the last one kept is kept too (the kept set never depends on how ties
    are ordered). ``temperature == 0`` keeps the argmax only (greedy)."""
    logits = logits.float()
    if temperature == 0:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(-1, keepdim=True), True)
        return logits.masked_fill(~keep, float("-inf"))
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if top_k is not None and top_k < logits.size(-1) and logits.device.type == "cpu":
            # Only what top-k kept (ties included) can pass: sort those, not the whole vocab
            # (sorting 50k logits per row per token was half of this filter's time on a CPU).
            # Not on an accelerator, where counting them would wait for the device (a host
            # sync per token) and the sort is cheap: the same kept set either way.
            kept = int((logits > float("-inf")).sum(-1).max())
            sorted_logits = torch.topk(logits, kept, dim=-1).values.flip(-1)  # ascending
        else:
            sorted_logits, _ = torch.sort(logits, dim=-1)  # ascending: the least likely first
        # The cut is decided on cumulative sums taken from the least likely token, in float64
        # (MPS has none: float32 there): a float32 sum from the most likely one drifts by
        # ~1e-5 over 50k probabilities, enough to put tokens on the wrong side of top_p.
        dtype = torch.float32 if logits.device.type == "mps" else torch.float64
        tail = sorted_logits.to(dtype).softmax(-1).cumsum(-1)  # a token and every less likely
        # Drop a token once the more likely ones reach top_p: once it and every less likely
        # one hold at most 1 - top_p. The most likely token is always kept.
        drop = tail <= 1 - top_p
        drop[..., -1] = False
        cut = sorted_logits.masked_fill(drop, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < cut, float("-inf"))
    return logits


def _next_token(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    """(N, V) logits of the last position -> (N,) next tokens."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(
            logits.device
        )
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -- the static decode step ------------------------------------------------------------------

# One compiled GPT.decode per torch.compile mode for the whole process (dynamo adds a graph
# per model config and batch size); and per model, its static caches by (batch, device,
# dtype). A CUDA graph replays at fixed addresses: a new cache for every generate() call
# would be recaptured every time, so the cache outlives the call (and its memory with it).
_COMPILED: dict[str, Callable] = {}
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_step(device: torch.device, compile: bool) -> Callable:
    """``GPT.decode``, compiled if ``compile``: CUDA graphs on CUDA (``reduce-overhead``), the
    default inductor mode elsewhere (the CPU tests). Eager, the model's own bound
    ``decode``: a sharded GPT (strategy=fsdp) gathers its weights around that one."""
    if not compile:
        return lambda model, *args: model.decode(*args)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(GPT.decode, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[mode]


def uses_static_cache(device: torch.device, compile: bool) -> bool:
    """Whether ``generate`` decodes through the static cache (``GPT.decode``): when compiled,
    and on CUDA also eager, where the growing cache plans its attention anew at every length."""
    return compile or device.type == "cuda"


def _static_cache(model: GPT, batch: int, device, dtype, compile: bool) -> KVCache:
    """An empty cache for ``GPT.decode``: the model's own, kept for the process, if compiled;
    a new one otherwise."""
    if not compile:
        return KVCache(model.config, batch, device, dtype)
    caches = _STATIC_CACHES.setdefault(model, {})
    if (batch, device, dtype) not in caches:
        cache = KVCache(model.config, batch, device, dtype)
        for t in cache.k + cache.v:  # written in place by the graph, never reallocated
            torch._dynamo.mark_static_address(t)
        caches[batch, device, dtype] = cache
    cache = caches[batch, device, dtype]
    cache.pos = 0  # stale slots are masked out until they are written again
    return cache


def _decode(model: GPT, step: Callable, tok: torch.Tensor, cache: KVCache, pos: torch.Tensor):
    """(N,) tokens -> (N, V) logits of their position through ``step`` (``GPT.decode``)."""
    pos.fill_(cache.pos)  # a device-side write: no sync, and the graph's input stays a tensor
    torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
    logits = step(model, tok[:, None], pos, cache)
    cache.pos += 1
    return logits


@torch.inference_mode()
def warm_up(model: GPT, num_samples: int = 1) -> None:
    """Compile (and, on CUDA, capture) the decode step of ``generate(..., compile=True)`` for
    batches of ``num_samples``: what its first call would otherwise pay, once per process.
    Three steps: dynamo and inductor compile on the first, CUDA graphs record on the second
    and replay from the third."""
    device = next(model.parameters()).device
    autocast, dtype = inference_precision(model, device)
    step = _decode_step(device, compile=True)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            cache = _static_cache(model, num_samples, device, dtype, compile=True)
            c = model.config  # any token compiles the step: the model's story start if it has one
            start = c.eot_id if c.eot_id < c.vocab_size else 0
            tok = torch.full((num_samples,), start, dtype=torch.long, device=device)
            pos = torch.zeros(1, dtype=torch.long, device=device)
            for _ in range(3):
                _decode(model, step, tok, cache, pos)
    finally:
        model.train(was_training)


def _start_token(config: GPTConfig) -> int:
    """The model's ``<|endoftext|>``, which starts a story; a one-line ``ValueError`` for a
    model whose vocab does not hold it."""
    if not 0 <= config.eot_id < config.vocab_size:
        raise ValueError(
            f"the model's eot_id={config.eot_id} is not in its vocab of {config.vocab_size} "
            "tokens, so it cannot start a story; give a prompt"
        )
    return config.eot_id


def slide(window: torch.Tensor, tok: torch.Tensor, block_size: int) -> tuple[torch.Tensor, bool]:
    """``window`` (N, T) with the new tokens ``tok`` (N,) appended, and whether that was a
    context shift: past ``block_size`` tokens only the newest ``block_size // 2`` are kept
    (the rule of the module docstring; ``slm.engine`` follows it per request)."""
    window = torch.cat([window, tok[:, None]], dim=1)
    if window.size(1) <= block_size:
        return window, False
    return window[:, -max(1, block_size // 2) :], True


def _prompt_tensor(prompt, num_samples: int, config: GPTConfig, device) -> torch.Tensor:
    """(N, T) prompt ids, T <= block_size: empty -> [EOT] (a story start); too long -> its
    last ``block_size`` tokens, with a warning."""
    block_size = config.block_size
    idx = torch.as_tensor(prompt, dtype=torch.long).to(device)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.dim() != 2:
        raise ValueError(f"prompt must be a list of ids or a (N, T) tensor, got {idx.dim()}-D")
    if idx.size(0) == 1:
        idx = idx.expand(num_samples, -1)
    elif num_samples not in (1, idx.size(0)):
        raise ValueError(f"num_samples={num_samples} but the prompt tensor has {idx.size(0)} rows")
    if idx.size(1) == 0:
        idx = torch.full((idx.size(0), 1), _start_token(config), dtype=torch.long, device=device)
    if idx.size(1) > block_size:
        warnings.warn(
            f"the prompt has {idx.size(1)} tokens, more than block_size={block_size}: "
            f"keeping its last {block_size}",
            stacklevel=4,  # the caller of generate (torch.inference_mode adds a frame)
        )
        idx = idx[:, -block_size:]
    return idx.contiguous()


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
    stop_token: int | str | None = "eot",
    compile: bool = False,
) -> list[list[int]]:
    """The new token ids of ``num_samples`` continuations of ``prompt``, sampled as one batch.

    ``prompt``: token ids (empty = start a story from the model's ``<|endoftext|>``,
    ``model.config.eot_id``), or an (N, T) tensor of N prompts (one sample each).
    ``temperature == 0`` is greedy; otherwise tokens are drawn with ``torch.multinomial`` from
    ``filter_logits(...)`` using ``generator`` (seed it for reproducible samples). A sample
    ends at ``stop_token`` (not included in its ids; ``"eot"``: the model's ``eot_id``; None =
    never) or after ``max_new_tokens``; the batch stops when every sample has ended.
    ``on_token(sample_index, token_id)`` is called for each new token as it is produced.
    ``use_cache=False`` recomputes the whole context window every step (the reference).
    ``compile=True`` runs the one-token steps through ``torch.compile`` (the first call per
    batch size compiles: see ``warm_up``); on CUDA they take the static cache even eager.
    The model is run in eval mode under ``torch.inference_mode`` (its mode is restored)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    config = model.config
    if stop_token == "eot":  # never met where the vocab lacks it (a toy model's)
        stop_token = config.eot_id if config.eot_id < config.vocab_size else None
    if stop_token is not None and (
        not isinstance(stop_token, int) or not 0 <= stop_token < config.vocab_size
    ):
        raise ValueError(
            f"stop_token={stop_token} is not a token of the model's vocab of {config.vocab_size}; "
            "pass the tokenizer's eot_id, \"eot\" (the model's) or None"
        )
    device = next(model.parameters()).device
    block = config.block_size
    window = _prompt_tensor(prompt, num_samples, config, device)
    n = window.size(0)
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return out
    rope = config.positions == "rope"
    autocast, dtype = inference_precision(model, device)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            cache = decode = pos = None
            if use_cache and uses_static_cache(device, compile):  # the fast path
                cache = _static_cache(model, n, device, dtype, compile)
                decode = _decode_step(device, compile)
                pos = torch.zeros(1, dtype=torch.long, device=device)
            elif use_cache:
                cache = KVCache(config, n, device, dtype)
            logits = model(window, cache=cache, last_only=True)[0][:, -1]  # prefill
            done = [False] * n
            for step in range(max_new_tokens):
                tok = _next_token(logits, temperature, top_k, top_p, generator)
                for i, t in enumerate(tok.tolist()):
                    if done[i]:
                        continue  # finished samples still compute (one batch), not emit
                    if t == stop_token:
                        done[i] = True
                        continue
                    out[i].append(t)
                    if on_token is not None:
                        on_token(i, t)
                if all(done) or step == max_new_tokens - 1:
                    break
                window, shift = slide(window, tok, block)
                if cache is None:  # reference: the same window, recomputed in full
                    logits = model(window, last_only=True)[0][:, -1]
                elif shift and not rope:  # learned positions: refill the cache
                    cache.pos = 0
                    logits = model(window, cache=cache, last_only=True)[0][:, -1]
                else:  # one new position (RoPE at a shift: all but tok kept in the cache, then tok)
                    if shift:
                        model.shift_cache(cache, window.size(1) - 1)
                    if decode is not None:  # static shapes
                        logits = _decode(model, decode, tok, cache, pos)
                    else:  # the cache grows
                        logits = model(tok[:, None], cache=cache, last_only=True)[0][:, -1]
    finally:
        model.train(was_training)
    return out
