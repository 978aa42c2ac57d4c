"""Story generation from a trained GPT: logit filtering and a batched sampler with a key/value
cache (checkpoints load through ``slm.checkpoint``).

    model = load_model("outputs/run/slm.pt")
    [ids] = generate(model, tokenizer.encode("Once upon a time"), 200, temperature=0.8,
                     top_k=200, top_p=0.95, generator=torch.Generator().manual_seed(1337))
    print(tokenizer.decode(ids))

The context window (the same with and without the cache, so both give the same tokens):
while prompt + generated tokens fit in ``block_size``, the cache grows by one position per
step. When the next token would not fit, the oldest half of the window is dropped (the newest
``block_size // 2`` tokens are kept, like llama.cpp's context shift), the cache is refilled
from those in one forward pass, and generation goes on one position per step. Why not
nanoGPT's "always the last ``block_size`` tokens": the position embeddings are learned and
absolute, so after a one-token slide every cached key sits at the wrong position and is
invalid; each new token would cost a full forward over ``block_size`` tokens. The half shift
costs one refill per ``block_size // 2`` tokens, at the price of a context that drops to
``block_size // 2`` tokens after each shift.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from slm.checkpoint import load_checkpoint, load_model  # noqa: F401  (the public API here)
from slm.errors import first_line
from slm.model import GPT, KVCache
from slm.precision import inference_autocast
from slm.tokenizer import EOT_ID

DEVICES = ("auto", "cpu", "cuda", "mps")


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


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a
    ``ValueError`` when the machine does not have it."""
    name = str(name)
    kind = name.split(":")[0]
    if kind not in DEVICES or (":" in name and kind != "cuda"):
        raise ValueError(f"device={name} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but this machine has no CUDA GPU; use device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name} but MPS is not available here; use device=cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name}: {first_line(e)}") from e
    if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name} but there are {torch.cuda.device_count()} CUDA devices")
    return device


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
        sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        # Drop a token once the tokens before it already reach top_p; the first never is.
        cut = sorted_logits.masked_fill(before >= top_p, float("inf")).amin(-1, keepdim=True)
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


def _precision(model: GPT, device: torch.device):
    """Autocast context and KV-cache dtype, as ``slm.precision`` decides for ``device``
    (autocast off on the CPU: the parameters' dtype)."""
    autocast, dtype = inference_autocast(device)
    return autocast, dtype or next(model.parameters()).dtype


def _prompt_tensor(prompt, num_samples: int, block_size: int, device) -> torch.Tensor:
    """(N, T) prompt ids, T <= block_size: empty -> [EOT] (a story start); too long -> its
    last ``block_size`` tokens, with a warning."""
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
        idx = torch.full((idx.size(0), 1), EOT_ID, dtype=torch.long, device=device)
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
    stop_token: int | None = EOT_ID,
) -> list[list[int]]:
    """The new token ids of ``num_samples`` continuations of ``prompt``, sampled as one batch.

    ``prompt``: token ids (empty = start a story from ``<|endoftext|>``), or an (N, T) tensor
    of N prompts (one sample each). ``temperature == 0`` is greedy; otherwise tokens are drawn
    with ``torch.multinomial`` from ``filter_logits(...)`` using ``generator`` (seed it for
    reproducible samples). A sample ends at ``stop_token`` (not included in its ids; None =
    never) or after ``max_new_tokens``; the batch stops when every sample has ended.
    ``on_token(sample_index, token_id)`` is called for each new token as it is produced.
    ``use_cache=False`` recomputes the whole context window every step (the reference).
    The model is run in eval mode under ``torch.inference_mode`` (its mode is restored)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    config = model.config
    if EOT_ID >= config.vocab_size:
        raise ValueError(f"the model's vocab_size={config.vocab_size} lacks the GPT-2 EOT token")
    device = next(model.parameters()).device
    block = config.block_size
    window = _prompt_tensor(prompt, num_samples, block, device)
    n = window.size(0)
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return out
    keep = max(1, block // 2)  # tokens kept by a context shift
    autocast, dtype = _precision(model, device)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            cache = KVCache(config, n, device, dtype) if use_cache else None
            logits, _ = model(window, cache=cache, last_only=True)  # prefill
            done = [False] * n
            for step in range(max_new_tokens):
                tok = _next_token(logits[:, -1], temperature, top_k, top_p, generator)
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
                window = torch.cat([window, tok[:, None]], dim=1)
                if window.size(1) > block:  # context shift: keep the newest half, refill
                    window = window[:, -keep:]
                    if cache is not None:
                        cache.pos = 0
                    logits, _ = model(window, cache=cache, last_only=True)
                elif cache is not None:  # one new position
                    logits, _ = model(tok[:, None], cache=cache, last_only=True)
                else:  # reference: the same window, recomputed in full
                    logits, _ = model(window, last_only=True)
    finally:
        model.train(was_training)
    return out
