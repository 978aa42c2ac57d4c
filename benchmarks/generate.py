"""Generation speed: prefill and decode tokens/s of ``slm.sample.generate``, eager and compiled.

    python benchmarks/generate.py [--model small] [--new-tokens 512] [--batch 1 8] \
        [--compile | --no-compile] [--device auto]

The same randomly initialised model (``conf/model/<model>.yaml``, seed 1337: speed does not
depend on the weights) and greedy decoding with no stop at <|endoftext|>. Per batch and mode:

- prefill: ``generate`` of 1 token from a prompt of ``block_size // 2`` tokens (one forward
  over the prompt, then one sampled token), best of 3: prompt tokens / s.
- decode: ``--new-tokens`` tokens per sample from the prompt "Once upon a time", less the time
  of the same call for 1 token (its prefill), best of 2: new tokens / s. The window slides
  past block_size as in ``slm.sample`` (a refill or a cache shift every block_size // 2).

Modes: eager (``generate``'s default: the growing cache on the CPU, the static one on CUDA)
and compiled (``compile=True``, after ``warm_up``, whose time is printed as ``compile``). The
compiled tokens are checked against the eager ones. Default: batch 1 eager on the CPU; batch 1
and 8, eager and compiled, on a GPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import cpu_name
from omegaconf import OmegaConf

from slm import tokenizer
from slm.model import GPT, GPTConfig
from slm.precision import resolve_device
from slm.sample import generate, warm_up

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


def timed(model: GPT, prompt: torch.Tensor, new_tokens: int, compile: bool, repeats: int):
    """Best wall time of ``repeats`` greedy ``generate`` calls, and their tokens."""
    device = next(model.parameters()).device
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, new_tokens, temperature=0, stop_token=None, compile=compile)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time compile=True (default: on CUDA)",
    )
    args = p.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batches = args.batch or ([1, 8] if cuda else [1])
    modes = ["eager"] + (["compiled"] if (cuda if args.compile is None else args.compile) else [])
    config = GPTConfig(
        **OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{args.model}.yaml"))
    )
    torch.manual_seed(1337)
    model = GPT(config).to(device).eval()
    where = torch.cuda.get_device_name(device) if cuda else cpu_name()
    n_prefill = config.block_size // 2
    long_prompt = (tokenizer.encode(PROMPT + ", ") * n_prefill)[:n_prefill]
    print(
        f"model={args.model} ({model.num_params()['total'] / 1e6:.1f}M parameters, "
        f"block_size={config.block_size}), prefill {n_prefill} tokens, decode "
        f"{args.new_tokens} new tokens from {PROMPT!r}"
    )
    print(
        f"device: {device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for batch in batches:
        short = torch.tensor([tokenizer.encode(PROMPT)] * batch)
        long = torch.tensor([long_prompt] * batch)
        eager_out = None
        for mode in modes:
            compile = mode == "compiled"
            t0 = time.perf_counter()
            if compile:
                warm_up(model, batch)
            else:
                generate(model, short, 8, temperature=0)  # allocator, kernels, lazy init
            setup = time.perf_counter() - t0
            t_prefill, _ = timed(model, long, 1, compile, repeats=3)
            t_first, _ = timed(model, short, 1, compile, repeats=3)
            t_all, out = timed(model, short, args.new_tokens, compile, repeats=2)
            decode = batch * (args.new_tokens - 1) / max(t_all - t_first, 1e-9)
            line = (
                f"{f'batch {batch} {mode}:':<17} prefill {batch * n_prefill / t_prefill:9,.0f} "
                f"tokens/s | "
                f"decode {decode:9,.1f} tokens/s ({t_all:6.2f} s for {args.new_tokens} tokens)"
            )
            if compile:
                same = sum(a == b for a, b in zip(out, eager_out or []))
                line += f" | compile {setup:5.1f} s | identical to eager {same}/{batch}"
            eager_out = eager_out or out
            print(line, flush=True)


if __name__ == "__main__":
    main()
