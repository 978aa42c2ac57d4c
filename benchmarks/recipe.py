"""Training recipes side by side: the GPT-2 recipe vs the modern preset (or any others), on the
same data, the same batches in the same order and the same seed.

    python benchmarks/recipe.py                                   # CPU: tiny model, a few minutes
    python benchmarks/recipe.py --recipe gpt2 --recipe modern \\
        --recipe 'rope_only=model.positions=rope'                  # NAME=override,override,...
    python benchmarks/recipe.py --device cuda --model small --batch 64 --steps 2000 --compile

A recipe is a list of Hydra overrides on top of ``model=--model`` (``gpt2``: none; ``modern``:
``experiment=modern``). Each recipe's model is built by ``slm.train.build_module`` and its
optimizer by ``slm.optim.build_optimizer`` with the warmup-cosine schedule, as train.py would;
the loop is bare PyTorch (gradient clipping at 1.0, bf16 autocast on CUDA). Steps are
interleaved (step k of every recipe, then step k + 1), so a busy machine slows all recipes
alike. Prints a table: recipe, parameters, held-out val loss and bits per byte (on
``--val-windows`` evenly spaced windows of the val split), and the median time per step
(after ``--warmup-steps``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name
from torch.utils.data import DataLoader

from slm.config import compose, resolve_hardware, validate
from slm.data import FixedWindows, RandomWindows, load_tokens
from slm.module import WarmupCosine
from slm.optim import build_optimizer
from slm.prepare import prepare
from slm.train import build_module

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "tinystories" / "TinyStories-train.head-2MiB.txt"
RECIPES = {"gpt2": [], "modern": ["experiment=modern"]}


def parse_recipe(spec: str) -> tuple[str, list[str]]:
    if spec in RECIPES:
        return spec, RECIPES[spec]
    if "=" not in spec:
        raise SystemExit(f"--recipe {spec}: use gpt2, modern or NAME=override,override,...")
    name, overrides = spec.split("=", 1)
    return name, [o for o in overrides.split(",") if o]


class Recipe:
    def __init__(self, name: str, overrides: list[str], args) -> None:
        cfg = compose(
            "train",
            [f"model={args.model}", *overrides, f"trainer.max_steps={args.steps}",
             f"optim.warmup_steps={args.warmup}", f"seed={args.seed}"],
        )  # fmt: skip
        cfg = resolve_hardware(cfg)
        validate(cfg)
        self.name, self.overrides, self.cfg = name, overrides, cfg
        torch.manual_seed(args.seed)  # the same init stream for every recipe
        self.module = build_module(cfg)
        self.model = self.module.model.to(args.device)
        h = self.module.hparams
        self.opt = build_optimizer(
            self.model, h.optimizer, h.lr, h.weight_decay, tuple(h.betas),
            fused=args.device == "cuda", muon_lr=h.muon_lr, muon_momentum=h.muon_momentum,
            muon_weight_decay=h.muon_weight_decay,
        )  # fmt: skip
        self.sched = WarmupCosine(self.opt, h.lr, h.min_lr, h.warmup_steps, args.steps)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.times: list[float] = []
        self.train_loss = float("nan")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(r: Recipe, x, y, args, autocast) -> None:
    sync(args.device)
    t0 = time.perf_counter()
    with autocast:
        _, loss = r.forward(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(r.model.parameters(), 1.0)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    r.sched.step()
    r.train_loss = loss.item()  # syncs, as the Trainer's logging does
    r.times.append(time.perf_counter() - t0)


@torch.no_grad()
def val_loss(r: Recipe, windows, args, autocast) -> float:
    r.model.eval()
    total, n = 0.0, 0
    for x, y in DataLoader(windows, batch_size=args.batch):
        with autocast:
            _, loss = r.model(x.to(args.device), y.to(args.device))
        total += loss.item() * y.numel()
        n += y.numel()
    r.model.train()
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", help="gpt2, modern or NAME=overrides (repeat)")
    p.add_argument("--model", default="tiny", help="conf/model/NAME.yaml")
    p.add_argument("--block-size", type=int, default=None, help="override model.block_size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30, help="optim.warmup_steps")
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--val-windows", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--source", default=str(DEFAULT_SOURCE))
    p.add_argument("--data-dir", default="/tmp/slm-bench-recipe", help="prepared once here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if not Path(args.source).exists() and "/" in args.source:
        raise SystemExit(f"--source {args.source}: not found")
    specs = [parse_recipe(s) for s in (args.recipe or ["gpt2", "modern"])]
    size = [f"model.block_size={args.block_size}"] if args.block_size else []

    meta = prepare(args.source, args.data_dir, val_fraction=0.05)
    val = meta["splits"]["val"]
    tokens_per_byte = val["tokens"] / val["bytes"]
    recipes = [Recipe(name, [*size, *ov], args) for name, ov in specs]
    block = recipes[0].cfg.model.block_size
    stream = RandomWindows(Path(args.data_dir) / "train.bin", block, args.batch, seed=args.seed)
    windows = FixedWindows(Path(args.data_dir) / "val.bin", val["tokens"], block, args.val_windows)
    load_tokens(args.data_dir, "val")  # checks the bins
    autocast = contextlib.nullcontext()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    for step, (x, y) in enumerate(stream):
        if step == args.steps:
            break
        x, y = x.to(args.device), y.to(args.device)
        for r in recipes:  # interleaved: the same batch, one step each
            train_step(r, x, y, args, autocast)
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  " + "  ".join(f"{r.name} {r.train_loss:.3f}" for r in recipes),
                flush=True,
            )

    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(
        f"\n{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"model={args.model} block {block}, batch {args.batch}, {args.steps} steps "
        f"({args.steps * args.batch * block:,} tokens), val: {len(windows)} windows "
        f"of {Path(args.source).name}\n"
    )
    print("| recipe | overrides | parameters | val loss | val bpb | ms / step | vs first |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for r in recipes:
        loss = val_loss(r, windows, args, autocast)
        ms = statistics.median(r.times[args.warmup_steps :]) * 1e3
        base = base or ms
        n = r.model.num_params()["total"]
        print(
            f"| {r.name} | {' '.join(r.overrides) or '-'} | {n / 1e6:.2f}M | {loss:.4f} | "
            f"{loss * tokens_per_byte / 0.6931471805599453:.4f} | {ms:.1f} | {ms / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
