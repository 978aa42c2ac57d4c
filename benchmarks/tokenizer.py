"""gpt2 against a BPE fitted to the data (``tokenizer=bpe``): the cost of preparing, and what
each buys a model for the same wall time of training.

    python benchmarks/tokenizer.py                       # tiny and small, gpt2 / bpe 4096 / 8192
    python benchmarks/tokenizer.py --models tiny --seconds 60 --vocab 4096
    python benchmarks/tokenizer.py --prepare-only

The text is the shared TinyStories pieces (both files of ../shared/data/tinystories, 3.5 MB),
5% of the stories held out as the val split. Each tokenizer prepares its own data dir from it
(the BPE learns from the train split only), so the held-out stories are the same text for all.

1. Prepare: best of ``--repeat`` runs each, interleaved: gpt2; bpe (fit + encode); bpe given
   as it is (encode only, the tokenizer already fitted); and the BPE fit alone on the text
   repeated to ``--fit-mb`` MB (its time grows with the bytes it learns from).
2. Training: for each model, one GPT per tokenizer, built as ``train.py`` builds it (the
   model's vocab is the tokenizer's), the same seed, batch and AdamW recipe, trained for the
   same wall time: steps are interleaved (a step of the config that has trained least so far
   next), so load from other processes slows all alike, and each stops when its own step
   time reaches ``--seconds``. The lr schedule runs on that clock (warmup over the first 5%,
   cosine to min_lr at the end). Reported: bytes/token of the held-out text (EOT tokens left
   out), training tokens/s and bytes/s (tokens/s x the train split's bytes per token), and
   held-out bits per byte: every val token scored once, as ``slm.evaluate`` does (loss / ln 2
   x tokens / UTF-8 bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name
from omegaconf import open_dict

from slm.config import compose, resolve_hardware, validate
from slm.data import RandomWindows
from slm.evaluate import score
from slm.optim import build_optimizer
from slm.prepare import fit_bpe, prepare, read_meta, read_tokenizer
from slm.train import build_module

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "tinystories"
PIECES = ("TinyStories-train.head-2MiB.txt", "TinyStoriesV2-GPT4-train.head-10000-lines.txt")
VAL_FRACTION = 0.05


def tokenizer_args(name: str) -> list[str]:
    return [] if name == "gpt2" else ["tokenizer=bpe", f"tokenizer.vocab_size={name[4:]}"]


def best_of(repeat: int, fns: dict) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):  # interleaved
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def bench_prepare(source: Path, work: Path, args) -> None:
    bpe = compose("train", tokenizer_args("bpe-4096")).tokenizer
    prepare(str(source), work / "given", VAL_FRACTION, tokenizer=bpe)
    given = read_tokenizer(work / "given")  # the fitted BPE, to prepare with as it is
    prepare(str(source), work / "p-gpt2", VAL_FRACTION, overwrite=True)  # warm: encoder threads
    fns = {
        "gpt2": lambda: prepare(str(source), work / "p-gpt2", VAL_FRACTION, overwrite=True),
        "bpe 4096 (fit + encode)": lambda: prepare(
            str(source), work / "p-bpe", VAL_FRACTION, overwrite=True, tokenizer=bpe
        ),
        "bpe 4096 given (encode)": lambda: prepare(
            str(source), work / "p-given", VAL_FRACTION, overwrite=True, tokenizer=given
        ),
    }
    best = best_of(args.repeat, fns)
    mb = sum((source / p).stat().st_size for p in PIECES) / 1e6
    print(f"\nprepare, {mb:.2f} MB of text, best of {args.repeat} (interleaved):\n")
    print("| tokenizer | seconds | MB/s | vs gpt2 |")
    print("| --- | ---: | ---: | ---: |")
    for name, t in best.items():
        print(f"| {name} | {t:.3f} | {mb / t:.1f} | {t / best['gpt2']:.2f}x |")

    # The fit alone on more text: the pieces repeated to --fit-mb MB (one file).
    big = work / "fit" / "big.txt"
    big.parent.mkdir()
    text = "".join((source / p).read_text(encoding="utf-8") for p in PIECES)
    with open(big, "w", encoding="utf-8") as f:
        for _ in range(max(1, round(args.fit_mb * 1e6 / len(text.encode())))):
            f.write(text)
    size = big.stat().st_size / 1e6
    t = time.perf_counter()
    _, trained = fit_bpe(str(big), {**bpe, "train_bytes": 10**12}, VAL_FRACTION)
    t = time.perf_counter() - t
    print(f"\nBPE fit alone on {size:.1f} MB ({trained['stories']:,} stories): {t:.2f} s, "
          f"{size / t:.1f} MB/s")  # fmt: skip


def lr_by_time(progress: float, lr: float, min_lr: float, warmup: float = 0.05) -> float:
    """slm's warmup-cosine schedule on the wall clock: ``progress`` is the fraction of the
    run's time spent."""
    if progress < warmup:
        return lr * max(progress / warmup, 0.01)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * p)) * (lr - min_lr)


class Run:
    """One model trained with one tokenizer's data."""

    def __init__(self, model: str, tok_name: str, data: Path, args) -> None:
        self.name = f"{model} / {tok_name}"
        self.data, self.meta = data, read_meta(data)
        tok = read_tokenizer(data, self.meta)
        batch = args.batch[model]
        cfg = compose("train", [f"model={model}", *tokenizer_args(tok_name), "hardware=cpu",
                                f"data.batch_size={batch}", "trainer.max_steps=1000000",
                                "optim.warmup_steps=0", f"seed={args.seed}"])  # fmt: skip
        cfg = resolve_hardware(cfg)
        validate(cfg)
        with open_dict(cfg):  # the model's vocab is the tokenizer's, as train.py sets it
            cfg.model.vocab_size, cfg.model.eot_id = tok.vocab_size, tok.eot_id
        torch.manual_seed(args.seed)
        self.module = build_module(cfg)
        self.model = self.module.model
        h = self.module.hparams
        self.h, self.budget = h, args.seconds[model]
        self.opt = build_optimizer(self.model, h.optimizer, h.lr, h.weight_decay,
                                   tuple(h.betas), fused=False)  # fmt: skip
        self.block = cfg.model.block_size
        stream = RandomWindows(data / "train.bin", self.block, batch, seed=args.seed)
        self.batches = iter(stream)
        self.times: list[float] = []
        self.tokens = 0
        self.params = self.model.num_params()["total"]

    @property
    def elapsed(self) -> float:
        return sum(self.times)

    def step(self) -> None:
        x, y = next(self.batches)
        lr = lr_by_time(self.elapsed / self.budget, self.h.lr, self.h.min_lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        t = time.perf_counter()
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.item()
        self.times.append(time.perf_counter() - t)
        self.tokens += x.numel()

    def evaluate(self) -> dict:
        val = self.meta["splits"]["val"]
        path = self.data / "val.bin"
        result = score(self.model, path, val["tokens"], val["bytes"], 16, str(path))
        self.model.train()
        train = self.meta["splits"]["train"]
        tokens_per_s = self.tokens / self.elapsed
        median = statistics.median(self.times)
        return {
            "bytes_per_token": val["bytes"] / (val["tokens"] - val["stories"]),
            "tokens_per_s": tokens_per_s,
            "bytes_per_s": tokens_per_s * train["bytes"] / train["tokens"],
            # The same at the median step's time: what a quiet machine gives (spikes of load
            # from other processes lengthen some steps, the short ones most in proportion).
            "median_tokens_per_s": self.tokens / len(self.times) / median,
            "val_bpb": result["val_bpb"],
            "val_loss": result["val_loss"],
            "steps": len(self.times),
            "step_ms_median": median * 1e3,
            "step_ms_spread": (max(self.times) - min(self.times)) * 1e3,
        }


def bench_training(source: Path, work: Path, args) -> None:
    names = ["gpt2", *(f"bpe-{v}" for v in args.vocab)]
    dirs = {}
    for name in names:
        dirs[name] = work / f"data-{name}"
        tok = compose("train", tokenizer_args(name)).tokenizer
        prepare(str(source), dirs[name], VAL_FRACTION, tokenizer=tok)
    rows = []
    for model in args.models:
        runs = [Run(model, name, dirs[name], args) for name in names]
        load = os.getloadavg()
        t0 = time.perf_counter()
        while True:
            todo = [r for r in runs if r.elapsed < r.budget]
            if not todo:
                break
            r = min(todo, key=lambda r: r.elapsed)  # interleaved: the least trained next
            r.step()
            if len(r.times) % 50 == 0:
                print(f"{r.name}: step {len(r.times)}, {r.elapsed:.0f} s, loss {r.loss:.3f}",
                      flush=True)  # fmt: skip
        wall = time.perf_counter() - t0
        for r in runs:
            rows.append((r, r.evaluate(), load, os.getloadavg(), wall))

    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, python {platform.python_version()}; fp32, batch "
          f"{args.batch}, wall time per run {args.seconds} s\n")  # fmt: skip
    print(
        "| model | tokenizer | params | held-out bytes/token | train tokens/s | train bytes/s "
        "| tokens/s at the median step | steps | held-out bpb | load avg (start -> end) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r, m, load, end, _ in rows:
        model, tok = r.name.split(" / ")
        print(f"| {model} | {tok} | {r.params / 1e6:.1f}M | {m['bytes_per_token']:.2f} | "
              f"{m['tokens_per_s']:,.0f} | {m['bytes_per_s']:,.0f} | "
              f"{m['median_tokens_per_s']:,.0f} | {m['steps']} | "
              f"{m['val_bpb']:.4f} | {load[0]:.1f} -> {end[0]:.1f} |")  # fmt: skip
    print("\n" + json.dumps([{"run": r.name, **m} for r, m, *_ in rows], indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "small"])
    p.add_argument("--vocab", nargs="+", type=int, default=[4096, 8192])
    p.add_argument("--seconds", nargs="+", type=float, default=[180, 480],
                   help="training wall time per run, one per model")  # fmt: skip
    p.add_argument("--batch", nargs="+", type=int, default=[16, 4], help="one per model")
    p.add_argument("--repeat", type=int, default=5, help="prepare: best of")
    p.add_argument("--fit-mb", type=float, default=35.0, help="prepare: the BPE fit on this")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--skip-prepare", action="store_true")
    args = p.parse_args()
    args.seconds = dict(zip(args.models, args.seconds))
    args.batch = dict(zip(args.models, args.batch))
    missing = [n for n in PIECES if not (SHARED / n).is_file()]
    if missing:
        raise SystemExit(f"{SHARED}: {', '.join(missing)} missing (the shared TinyStories text)")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="slm-bench-tokenizer-") as work:
        work = Path(work)
        source = work / "text"  # both pieces, as one directory source
        source.mkdir()
        for name in PIECES:
            (source / name).symlink_to(SHARED / name)
        print(f"load average at start: {os.getloadavg()}")
        if not args.skip_prepare:
            bench_prepare(source, work, args)
        if not args.prepare_only:
            bench_training(source, work, args)
        print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
