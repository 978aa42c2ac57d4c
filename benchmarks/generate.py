"""Generation speed: tokens/s with the KV cache against recomputing the context each step.

    python benchmarks/generate.py [--model small] [--new-tokens 512] [--batch 1 8] [--device auto]

Both runs use the same randomly initialised model (``conf/model/<model>.yaml``, seed 1337:
speed does not depend on the weights), the prompt "Once upon a time" and greedy decoding with
no stop at <|endoftext|>, so each produces exactly ``--new-tokens`` tokens per sample, and
they must produce the same tokens. The reference (``use_cache=False``) runs a full forward over
the current context window for every new token; the cached run prefills the prompt once, then
feeds one position per step (both slide the window the same way, see ``slm.sample``). One
timed run each, after a short warm-up. Batch default: 1 on CPU, 1 and 8 on a GPU.
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
from slm.sample import generate, resolve_device

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


def timed(model: GPT, batch: int, new_tokens: int, use_cache: bool) -> tuple[float, list]:
    prompt = torch.tensor([tokenizer.encode(PROMPT)] * batch)
    kw = dict(temperature=0, stop_token=None, use_cache=use_cache)
    generate(model, prompt, 8, **kw)  # warm-up: allocator, kernels, lazy init
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, new_tokens, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    device = resolve_device(args.device)
    batches = args.batch or ([1, 8] if device.type == "cuda" else [1])
    config = GPTConfig(
        **OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{args.model}.yaml"))
    )
    torch.manual_seed(1337)
    model = GPT(config).to(device).eval()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"model={args.model} ({model.num_params()['total'] / 1e6:.1f}M parameters, "
        f"block_size={config.block_size}), {args.new_tokens} new tokens, prompt {PROMPT!r}"
    )
    print(
        f"device: {device} ({where}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for batch in batches:
        t_cache, out_cache = timed(model, batch, args.new_tokens, use_cache=True)
        t_full, out_full = timed(model, batch, args.new_tokens, use_cache=False)
        n = batch * args.new_tokens
        same = sum(a == b for a, b in zip(out_cache, out_full))
        print(
            f"batch {batch}: KV cache {n / t_cache:8.1f} tokens/s ({t_cache:6.2f} s) | "
            f"recompute {n / t_full:8.1f} tokens/s ({t_full:6.2f} s) | "
            f"speed-up {t_full / t_cache:5.1f}x | identical samples {same}/{batch}"
        )


if __name__ == "__main__":
    main()
