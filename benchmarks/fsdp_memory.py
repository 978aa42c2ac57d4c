"""Per-rank memory of the weights, gradients and AdamW state: DDP against FSDP (strategy=fsdp).

    python benchmarks/fsdp_memory.py                      # model=small at 2 and 4 ranks
    python benchmarks/fsdp_memory.py --model gpt2 --ranks 2 4 8

Each configuration starts its ranks as processes on this machine (CPU, gloo), builds the GPT of
``conf/model/<model>.yaml`` with the same seed on every rank, wraps it as training does (DDP:
``DistributedDataParallel``; FSDP: ``slm.strategy.shard_gpt``, each Block a unit), takes one
AdamW step (``slm.optim.build_optimizer``, as ``GPTModule`` builds it) on a batch of random
tokens, and counts the bytes of the tensors each rank then holds: its parameters (FSDP: its
shards), their gradients and the optimizer state. The numbers are exact byte counts, not
timings: they do not depend on the machine's load. Activations and DDP's gradient buckets are
not counted (the first scales with the batch under either strategy, the second is DDP's own
extra copy of the gradients).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slm.config import compose  # noqa: E402
from slm.model import GPT, GPTConfig  # noqa: E402
from slm.optim import build_optimizer  # noqa: E402

MIB = 2**20


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes of ``t`` on this rank (a DTensor: its local shard)."""
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def rank_main(rank: int, world: int, port: int, model_name: str, strategy: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = compose("train", [f"model={model_name}"])
        config = GPTConfig(**cfg.model)
        torch.manual_seed(0)
        model = GPT(config)
        if strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            from slm.strategy import shard_gpt

            shard_gpt(model, init_device_mesh("cpu", (world,)))
            wrapped = model
        else:
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(model, "adamw", lr=1e-4)
        x = torch.randint(0, config.vocab_size, (1, 32))
        wrapped(x, x)[1].backward()
        optimizer.step()
        params = sum(local_bytes(p) for p in model.parameters())
        grads = sum(local_bytes(p.grad) for p in model.parameters())
        state = sum(
            local_bytes(v)
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        counts = torch.tensor([params, grads, state], dtype=torch.float64)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # the rank that holds the most
        if rank == 0:
            out.put(counts.tolist())
    finally:
        dist.destroy_process_group()


def measure(model_name: str, strategy: str, world: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        rank_main, args=(world, port, model_name, strategy, out), nprocs=world, start_method="spawn"
    )
    return out.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", help="a conf/model group value")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(f"model={args.model}: per-rank MiB (the largest rank), one AdamW step, fp32, CPU gloo")
    print("| ranks | strategy | params | grads | AdamW state | total | FSDP / DDP |")
    print("|---|---|---|---|---|---|---|")
    for world in args.ranks:
        ddp = measure(args.model, "ddp", world)
        fsdp = measure(args.model, "fsdp", world)
        for name, counts in (("ddp", ddp), ("fsdp", fsdp)):
            ratio = f"{sum(fsdp) / sum(ddp):.3f}" if name == "fsdp" else ""
            cells = " | ".join(f"{c / MIB:.1f}" for c in (*counts, sum(counts)))
            print(f"| {world} | {name} | {cells} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
