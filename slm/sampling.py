"""Turning logits into tokens: the sampling settings' checks, the logit filters (temperature,
top-k, top-p) and the draw. Every decoding policy samples through ``next_token``."""

from __future__ import annotations

import torch


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


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(N, V) logits of the last position -> (N,) next tokens: the argmax at
    ``temperature == 0``, else one draw per row from ``filter_logits(...)`` with
    ``generator`` (on its own device, where it is another than the logits')."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(
            logits.device
        )
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
