"""Training tokens/s through the Lightning Trainer vs. a bare PyTorch loop: Lightning's overhead.

    python benchmarks/train_throughput.py --model tiny --batch 8 --steps 40    # CPU
    python benchmarks/train_throughput.py --model gpt2 --batch 16 --compile    # GPU, + MFU

Both sides train the same GPT (same init), on the same random-window batches (slm's own
RandomWindows over a token file), with the same AdamW, schedule, clipping and precision. The
Trainer is configured as train.py configures it (precision plugin, fused AdamW on CUDA, the
GPT compiled in configure_model, TensorBoard logger, LR and throughput monitors, run history),
minus checkpointing and the progress bar. Both sides read the loss back on logging steps only
(every 10 steps). Warm-up steps (and compile time) are excluded from the timing.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from common import cpu_name
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from slm.callbacks import RunHistory, SyncFreeThroughputMonitor
from slm.config import compose
from slm.data import RandomWindows
from slm.module import GPTModule, lr_at
from slm.precision import autocast_dtype, default_precision, trainer_precision

LOG_EVERY = 10


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer(L.Callback):
    """Wall time of the optimizer steps after the warm-up."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device, self.t0, self.t1 = warmup, device, None, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            sync(self.device)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        sync(self.device)
        self.t1 = time.perf_counter()


def make_module(args, compile_mode: str | None = None) -> GPTModule:
    torch.manual_seed(0)
    m = compose("train", [f"model={args.model}"]).model
    return GPTModule(
        **m, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=args.total,
        fused=args.device == "cuda", compile=compile_mode,
    )  # fmt: skip


def loader(args, tokens: Path) -> DataLoader:
    stream = RandomWindows(tokens, args.block_size, args.batch, seed=0)
    return DataLoader(stream, batch_size=None, num_workers=2, pin_memory=args.device == "cuda")


def bare_loop(args, tokens: Path) -> float:
    module = make_module(args).to(args.device)
    model = torch.compile(module.model) if args.compile else module.model
    opt = module.model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), fused=args.device == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_at(s, 1e-3, 1e-4, 10, args.total) / 1e-3
    )
    autocast = contextlib.nullcontext()
    if dtype := autocast_dtype(args.precision):
        autocast = torch.autocast(args.device, dtype=dtype)
    scaler = torch.amp.GradScaler(enabled=args.precision == "16-mixed")
    model.train()
    for step, (x, y) in enumerate(loader(args, tokens)):
        if step == args.warmup:
            sync(args.device)
            t0 = time.perf_counter()
        if step == args.total:
            break
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        with autocast:
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (step + 1) % LOG_EVERY == 0:
            loss.item()  # the Trainer reads the loss on logging steps (logging, progress)
    sync(args.device)
    return time.perf_counter() - t0


def lightning_loop(args, tokens: Path, log_dir: Path) -> float:
    module = make_module(args, "default" if args.compile else None)
    module.flops_per_batch = module.count_flops(args.batch)  # train.py's datamodule does this
    timer = Timer(args.warmup, args.device)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = L.Trainer(
        max_steps=args.total,
        accelerator=accelerator,
        devices=1,
        **trainer_precision(args.precision, accelerator),
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=TensorBoardLogger(str(log_dir), name="tb"),
        callbacks=[
            LearningRateMonitor("step"),
            SyncFreeThroughputMonitor(
                lambda b: b[0].size(0), lambda b: b[0].numel(), window_size=3
            ),
            RunHistory(),
            timer,
        ],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=LOG_EVERY,
    )
    trainer.fit(module, loader(args, tokens))
    return timer.t1 - timer.t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="conf/model/NAME.yaml")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="best of N, alternating sides")
    p.add_argument(
        "--precision", default=None, help="default: bf16 on A100/H100, fp16 on T4, else fp32"
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.precision is None:
        args.precision = default_precision(args.device)
    args.total = args.warmup + args.steps
    args.block_size = compose("train", [f"model={args.model}"]).model.block_size
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, 50257, 4_000_000, dtype=np.uint16).tofile(tokens)
        bare, light = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(args, tokens))
            light.append(lightning_loop(args, tokens, Path(tmp) / f"logs{r}"))
    tokens_per_step = args.batch * args.block_size
    tps_bare = args.steps * tokens_per_step / min(bare)
    tps_light = args.steps * tokens_per_step / min(light)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({cpu_name()})"
    print(f"device: {device}  model={args.model}  batch={args.batch}x{args.block_size}  "
          f"precision={args.precision}  compile={args.compile}  steps={args.steps}")  # fmt: skip
    print(f"bare PyTorch loop : {tps_bare:12,.0f} tokens/s")
    print(f"Lightning Trainer : {tps_light:12,.0f} tokens/s")
    ratio = tps_bare / tps_light
    print(f"Lightning overhead: {(ratio - 1) * 100:+.1f}%  (bare / Lightning = {ratio:.3f})")
    peak = get_available_flops(torch.device(args.device), _dtype(args.precision))
    if peak:
        flops_per_token = make_module(args).count_flops(args.batch) / tokens_per_step
        for name, tps in (("bare", tps_bare), ("Lightning", tps_light)):
            mfu = flops_per_token * tps / peak * 100
            print(f"MFU {name}: {mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s")


def _dtype(precision: str) -> torch.dtype:
    return autocast_dtype(precision) or torch.float32


if __name__ == "__main__":
    main()
