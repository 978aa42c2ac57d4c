"""What the weight formats cost in quality: held-out loss and bits per byte beside fp32, and the
share of greedy tokens that agree with fp32's, for a trained checkpoint.

    python benchmarks/weights.py --ckpt outputs/DATE/TIME/slm.pt --data-dir DIR \
        [--formats bf16 fp16 int8] [--openings 20] [--tokens 256] [--device cpu]

Loss: ``slm.evaluate``'s, every token of DIR's val split once, each format beside fp32 on the
same windows. Greedy agreement: from ``--openings`` held-out story openings (the story suite's,
``suite.seed``), ``--tokens`` greedy tokens with each format and with fp32 (no stop at
<|endoftext|>; the context shifts past block_size); the share of positions whose token equals
fp32's, and the mean number of tokens before the first that differs. A format that only
rounds differently departs from fp32 at a near-tie and then writes another, equally likely
story, so the second number says more than the first.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from omegaconf import OmegaConf

from slm import stories
from slm.checkpoint import load_model, load_tokenizer
from slm.evaluate import evaluate
from slm.precision import resolve_device
from slm.sample import generate
from slm.weights import pack, weight_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-dir", required=True, help="a prepared data dir of the ckpt's tokenizer")
    p.add_argument("--formats", nargs="+", default=["bf16", "fp16", "int8"])
    p.add_argument("--openings", type=int, default=20)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    model, tok = load_model(args.ckpt, device), load_tokenizer(args.ckpt)
    held_out = stories.TokenStories(f"{args.data_dir}/val.bin", tok)
    suite = OmegaConf.load("conf/train.yaml").suite
    openings = stories.pick_openings(held_out, args.openings, suite.seed)
    prompts = [[tok.eot_id, *tok.encode(o.text)] for o in openings]

    def greedy(m) -> list[list[int]]:
        return [generate(m, q, args.tokens, temperature=0, stop_token=None)[0] for q in prompts]

    fp32 = evaluate(model, args.data_dir)
    reference = greedy(model)
    rows = [("fp32", weight_bytes(model), fp32, 1.0, float(args.tokens))]
    for fmt in args.formats:
        m = pack(copy.deepcopy(model), fmt)
        result = evaluate(m, args.data_dir)
        out = greedy(m)
        same = [sum(a == b for a, b in zip(x, y)) / len(y) for x, y in zip(out, reference)]
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y))
                 for x, y in zip(out, reference)]  # fmt: skip
        rows.append((fmt, weight_bytes(m), result, statistics.mean(same), statistics.mean(first)))
    print(f"{args.ckpt}: {model.num_params()['total'] / 1e6:.1f}M parameters, val split of "
          f"{args.data_dir} ({fp32['tokens']:,} tokens), {len(prompts)} openings x "
          f"{args.tokens} greedy tokens")  # fmt: skip
    print("| weights | bytes/token | val loss | val bpb | bpb vs fp32 | greedy tokens as fp32 "
          "| tokens before the first difference |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fmt, nbytes, r, same, first in rows:
        change = r["val_bpb"] / fp32["val_bpb"] - 1
        print(f"| {fmt} | {nbytes / 1e6:.1f} MB | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | "
              f"{change:+.3%} | {same:.1%} | {first:.0f} |")  # fmt: skip
    print(json.dumps({fmt: r for fmt, _, r, _, _ in rows}))


if __name__ == "__main__":
    main()
