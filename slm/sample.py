"""Generate stories: ``generate``, a policy over the one decoder (``slm.decode``): N rows of
one prompt (or N prompts of one length), sampled together from one generator, the window
shifted at its end. ``GPT.generate`` and ``generate.py`` call it.

    model, tok = load_model("outputs/run/slm.pt"), load_tokenizer("outputs/run/slm.pt")
    [ids] = generate(model, tok.encode("Once upon a time"), 200, temperature=0.8,
                     top_k=200, top_p=0.95, generator=torch.Generator().manual_seed(1337))
    print(tok.decode(ids))

(``load_model`` and ``load_tokenizer`` come from ``slm.checkpoint``.) A story starts (from an
empty prompt) and ends (``stop_token="eot"``, the default) at the model's own
``<|endoftext|>``, ``model.config.eot_id``: that of the tokenizer it was trained with (50256
for gpt2; a checkpoint stores it). Past ``block_size`` tokens the context shifts: the newest
``block_size // 2`` are kept (``slm.decode``; docs/design.md says why).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from slm import decode
from slm.sampling import check_sampling, next_token


def warm_up(model: torch.nn.Module, num_samples: int = 1) -> None:
    """Compile (and, on CUDA, capture) the decode step of ``generate(..., compile=True)`` for
    batches of ``num_samples``: what its first call would otherwise pay, once per process."""
    decode.shared(model, num_samples).warm_up()


def start_token(config) -> int:
    """The model's ``<|endoftext|>``, which starts a story; a one-line ``ValueError`` for a
    model whose vocab does not hold it."""
    if not 0 <= config.eot_id < config.vocab_size:
        raise ValueError(
            f"the model's eot_id={config.eot_id} is not in its vocab of {config.vocab_size} "
            "tokens, so it cannot start a story; give a prompt"
        )
    return config.eot_id


def _prompt_tensor(prompt, num_samples: int, config, device) -> torch.Tensor:
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
        idx = torch.full((idx.size(0), 1), start_token(config), dtype=torch.long, device=device)
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
    model: torch.nn.Module,
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
    batch size compiles: see ``warm_up``). The model is run in eval mode (its mode is
    restored)."""
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
    window = _prompt_tensor(prompt, num_samples, config, device)
    n = window.size(0)
    out: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens == 0:
        return out
    if compile and use_cache:
        decoder = decode.shared(model, n)
    else:
        decoder = decode.Decoder(model, n, cache=use_cache)
    every = 1 if on_token is not None else sync_every(device)
    with decoder.running():
        seq = decoder.add(window)  # the prefill
        done = [False] * n
        drawn: list[torch.Tensor] = []  # tokens not yet read on the host
        for step in range(max_new_tokens):
            tok = next_token(seq.logits, temperature, top_k, top_p, generator)
            drawn.append(tok)
            last = step == max_new_tokens - 1
            if len(drawn) == every or last:
                for toks in torch.stack(drawn).tolist():  # (steps, n), in order
                    for i, t in enumerate(toks):
                        if done[i]:
                            continue  # finished samples still compute (one batch), not emit
                        if t == stop_token:
                            done[i] = True
                            continue
                        out[i].append(t)
                        if on_token is not None:
                            on_token(i, t)
                drawn = []
                if all(done) or last:
                    break
            decoder.advance([(seq, tok)])
    return out


def sync_every(device: torch.device) -> int:
    """How many steps ``generate`` runs between reading its tokens on the host, when no
    ``on_token`` streams them: every step on a CPU (a read costs nothing there); every 16 on
    an accelerator, where each read waits for the device and the kernels queued behind it (a
    batch may then run up to 15 steps past its last sample's end, emitting nothing)."""
    return 1 if device.type == "cpu" else 16
