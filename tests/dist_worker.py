"""One rank of tests/test_strategy.py's multi-process runs, started by torchrun: the runs of a
JSON plan, one after another in the same processes (a process group, once formed, serves every
run: what makes many 2-rank runs affordable in CI), each through ``slm.train.train``.

    python -m torch.distributed.run ... tests/dist_worker.py PLAN.json OUT_DIR

A run is ``{"name", "overrides", "rank_overrides": {rank: [...]}, "stop_at": step,
"static_decode": bool, "record_dtypes": bool, "full_disk": bool}``; ``stop_at`` stops it as a
Ctrl-C would (after that optimizer step, with ``last.ckpt``), ``static_decode`` emulates CUDA's
generation path (``GPT.decode`` with a static cache), ``record_dtypes`` records the dtype of the
weights a Block computes with, ``full_disk`` fills the disk of its checkpoints (conftest).
After the runs, ``checks`` compare sharded and unsharded Muon steps and optimizer groups on
this process group. Each rank writes ``OUT_DIR/rank<r>.json``: per run ``{"error": one line or
null, "seconds", ...}``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import full_disk  # noqa: E402 (tests/, this script's folder, is on the path)

from slm import callbacks, decode, strategy  # noqa: E402
from slm.checkpoint import read  # noqa: E402
from slm.config import compose  # noqa: E402
from slm.errors import one_line  # noqa: E402
from slm.train import train  # noqa: E402


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def stop_at(step: int):
    """StopOnSignal as if SIGINT had arrived during optimizer step ``step``."""
    original = callbacks.StopOnSignal.on_train_batch_end

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == step and self.requested is None:
            self.requested = signal.SIGINT
        original(self, trainer, *args)

    return patched(callbacks.StopOnSignal, "on_train_batch_end", on_train_batch_end)


def record_dtypes(seen: list):
    """FSDP.shard, plus a hook that records the dtype of the first Block's gathered c_attn
    weight at each forward."""
    original = strategy.FSDP.shard

    def shard(self, model):
        original(self, model)
        attn = model.transformer.h[0].attn.c_attn
        attn.register_forward_pre_hook(lambda m, args: seen.append(str(m.weight.dtype)))

    return patched(strategy.FSDP, "shard", shard)


def run(spec: dict, rank: int) -> dict:
    overrides = [*spec["overrides"], *spec.get("rank_overrides", {}).get(str(rank), [])]
    result: dict = {"error": None}
    seen: list[str] = []
    t0 = time.perf_counter()
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
    with contextlib.ExitStack() as stack:
        if spec.get("stop_at") is not None:
            stack.enter_context(stop_at(spec["stop_at"]))
        if spec.get("static_decode"):
            stack.enter_context(patched(decode, "static_shapes", lambda device: True))
        if spec.get("record_dtypes"):
            stack.enter_context(record_dtypes(seen))
        if spec.get("full_disk"):
            stack.enter_context(full_disk(Path(run_dir) / "checkpoints"))
        try:
            result["best"] = train(compose("train", overrides))
        except (Exception, KeyboardInterrupt, SystemExit) as e:  # Ctrl-C: Lightning exits
            result["error"] = f"{type(e).__name__}: {one_line(e)}"
    result["seconds"] = round(time.perf_counter() - t0, 2)
    last = Path(run_dir or ".") / "checkpoints" / "last.ckpt"
    if run_dir and last.exists():
        result["last_step"] = read(last)["global_step"]
    if seen:
        result["dtypes"] = sorted(set(seen))
    return result


def checks(rank: int) -> dict:
    """On the process group the runs formed: BlockMuon's sharded step against the unsharded
    one on the same gradients (SwiGLU: stacked gate and up), and the optimizer groups of a
    sharded GPT against those of the unsharded model (names, weight decay)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from slm.model import GPT, GPTConfig
    from slm.optim import build_optimizer

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=24, block_size=8, vocab_size=64, mlp="swiglu")
    ref = GPT(config)
    sharded = copy.deepcopy(ref)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}

    def groups(model, optimizer):
        ids = {id(p): n for n, p in model.named_parameters()}
        return [(sorted(ids[id(p)] for p in g["params"]), g["weight_decay"])
                for g in optimizer.param_groups]  # fmt: skip

    out = {"adamw_groups": groups(ref, build_optimizer(ref, "adamw"))}
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    out["adamw_groups_sharded"] = groups(sharded, build_optimizer(sharded, "adamw"))
    kwargs = dict(weight_decay=0.1, muon_weight_decay=0.05)
    o_ref = build_optimizer(ref, "muon", **kwargs)
    o_sharded = build_optimizer(sharded, "muon", **kwargs)
    out["muon_groups"] = groups(ref, o_ref)
    out["muon_groups_sharded"] = groups(sharded, o_sharded)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for (_, p), (_, q) in zip(ref.named_parameters(), sharded.named_parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad = grad.clone()
            q.grad = distribute_tensor(grad, mesh, [Shard(0)])
        o_ref.step()
        o_sharded.step()
    full = {n: q.full_tensor() for n, q in sharded.named_parameters()}
    ref_now = dict(ref.named_parameters())
    out["muon_max_diff"] = max((full[n] - p).abs().max().item() for n, p in ref_now.items())
    out["muon_moved"] = min((ref_now[n] - p).abs().max().item() for n, p in before.items())
    return out


def main() -> None:
    plan, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    results = {}
    for spec in plan["runs"]:  # {"name": "checks"}: the checks, on the group formed so far
        results[spec["name"]] = checks(rank) if spec["name"] == "checks" else run(spec, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
