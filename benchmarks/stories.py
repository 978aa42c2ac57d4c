"""Time of the story suite (``slm.stories``): N openings completed greedily and sampled.

    python benchmarks/stories.py --data DIR [--model small] [--n 50] [--ckpt PATH] [--device auto]

The held-out stories are ``DIR/val.bin`` (a prepared data dir, e.g. ``python -m slm.prepare
data.source=TinyStories-train.txt data.dir=DIR``). The model is ``--ckpt`` or, by default, a
randomly initialised ``conf/model/<model>.yaml`` (seed 1337): it never writes the end of
text, so every completion runs to the token limit (block_size): the suite's worst case.
The suite runs with ``conf/train.yaml``'s ``suite.*`` settings (greedy + 1 sample per
opening); the time of each part and the generated tokens per second are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name

from slm import stories
from slm.checkpoint import load_model, load_tokenizer
from slm.config import compose
from slm.model import GPT, GPTConfig
from slm.precision import resolve_device
from slm.tokenizer import gpt2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a prepared data dir (its val.bin)")
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--ckpt", default=None, help="a checkpoint instead of a random model")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("overrides", nargs="*", help="suite.* overrides, e.g. suite.samples=2")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = compose("train", [f"model={args.model}", f"stories={args.n}", *args.overrides])
    stories.check(cfg)
    if args.ckpt:
        model, tok = load_model(args.ckpt, device), load_tokenizer(args.ckpt)
    else:
        torch.manual_seed(1337)
        model, tok = GPT(GPTConfig(**cfg.model)).to(device).eval(), gpt2()
    held_out = stories.TokenStories(Path(args.data) / "val.bin", tok)
    load = os.getloadavg()
    name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    print(f"device: {device} ({name}, {threads} threads); load average before: {load[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        t0, cpu = time.perf_counter(), time.process_time()
        summary = stories.run(model, tok, held_out, args.n, cfg.suite, Path(tmp) / "s.jsonl")
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu
        records = [json.loads(x) for x in (Path(tmp) / "s.jsonl").read_text().splitlines()]
    tokens = sum(r["tokens"] for r in records)
    print(
        f"model: {args.ckpt or args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
        f" parameters, block_size {model.config.block_size}); {summary['openings']} openings, "
        f"{len(records)} completions (one batch per mode)"
    )
    print(
        f"suite: {total:.1f} s wall, {cpu:.1f} s CPU (generation and continuation loss "
        f"{summary['generate_seconds']:.1f} s); {tokens} tokens generated, "
        f"{tokens / summary['generate_seconds']:.0f} tokens/s; load average after: "
        f"{os.getloadavg()[0]:.2f}"
    )
    print(json.dumps(stories.flat(summary)))


if __name__ == "__main__":
    main()
