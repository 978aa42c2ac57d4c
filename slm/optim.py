"""The optimizers: AdamW (GPT-2, nanoGPT) or Muon for the hidden matrices with AdamW for the
rest (modded-nanogpt, Kimi's Moonlight), built for a ``GPT`` from primitives.

Muon (``torch.optim.Muon``) replaces a 2-D weight's momentum-averaged gradient by the nearest
orthogonal matrix (a few Newton-Schulz iterations), so every direction of the matrix is
updated at the same rate; it is only defined for matrices that act as hidden linear maps.
The token embedding (a lookup table), the ``lm_head`` (a classifier over 50k words), the
norm gains and the biases stay on AdamW, each kind with its own learning rate.

A weight that stacks several matrices by rows (attention's ``c_attn``: q, k and v; SwiGLU's
``c_fc``: gate and up) is orthogonalised one matrix at a time, as the reference Muon
(KellerJordan/Muon, modded-nanogpt) does with its separate q, k, v and gate, up weights:
orthogonalising the stack as one matrix couples the blocks (on a random 1152 x 384 gradient
the two updates have about the same RMS, but a cosine of 0.86).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from slm.model import MLP, CausalSelfAttention

OPTIMIZERS = ("adamw", "muon")


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW stepped together, seen by Lightning as one optimizer.

    Why one optimizer: Lightning's automatic optimization takes one optimizer. Two would need
    manual optimization, where gradient accumulation, clipping, AMP loss scaling and the
    scheduler are ours to write again (and Lightning refuses ``gradient_clip_val`` there).
    This wrapper's ``param_groups`` are the two optimizers' own group dicts (Muon's first),
    and both write their per-parameter state into its ``state``: so Lightning's clipping,
    ``GradScaler.unscale_``, ``zero_grad``, the LR scheduler (each group keeps its own base
    lr; the schedule multiplies both) and ``state_dict`` / ``load_state_dict`` (exact resume)
    all go through the plain ``torch.optim.Optimizer`` machinery."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        # add_param_group keeps the dicts it is given: the groups are shared, not copied.
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})
        self._link()

    def _link(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = (
            self.param_groups[:n],
            self.param_groups[n:],
        )
        self.muon.state = self.adamw.state = self.state  # disjoint parameters: no clash

    def __setstate__(self, state: dict) -> None:
        # load_state_dict replaces param_groups and state with new objects: share them again.
        super().__setstate__(state)
        if "muon" in self.__dict__:
            self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning passes the forward + backward as a closure
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss


class BlockMuon(torch.optim.Muon):
    """``torch.optim.Muon``, with the weights in ``blocks`` (parameter -> the number of matrices
    it stacks by rows) updated one row block at a time: each block gets its own momentum-averaged
    gradient orthogonalised and its own lr scale sqrt(max(1, rows / cols)), through views, so
    the updates land in the stacked weight and the momentum buffer keeps its full shape (the
    optimizer state is that of ``torch.optim.Muon``: checkpoints are interchangeable)."""

    def __init__(self, params, blocks: dict[nn.Parameter, int], **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.blocks = blocks
        # FSDP shards the model (configure_model) before the optimizer is built.
        self.sharded = any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"])

    def _init_group(self, group, params, grads, momentum_bufs):
        # torch's Muon gathers each parameter, gradient and momentum buffer into these lists and
        # then updates every entry as one matrix: split the stacked ones into their blocks.
        has_complex = super()._init_group(group, params, grads, momentum_bufs)
        whole = list(zip(params, grads, momentum_bufs))
        for lst in (params, grads, momentum_bufs):
            lst.clear()
        for p, g, buf in whole:
            n = self.blocks.get(p, 1)
            params.extend(p.chunk(n))
            grads.extend(g.chunk(n))
            momentum_bufs.extend(buf.chunk(n))
        return has_complex

    @torch.no_grad()
    def step(self, closure=None):
        if not self.sharded:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._sharded_step(group)
        return loss

    def _sharded_step(self, group: dict) -> None:
        """torch's Muon step on FSDP2 shards (strategy=fsdp), each rank holding some rows of
        every matrix. The momentum and the weight decay are elementwise: each rank updates its
        own rows. The orthogonalisation needs whole matrices: each is done by one rank, in
        turn (matrix i by rank i mod world size), as nanochat's and modded-nanogpt's
        distributed Muon spread the work; the owner gathers the matrix's rows from every rank,
        orthogonalises it block by block and sends each rank its rows of the result. The same
        arithmetic on the same numbers as the unsharded step, so the same update."""
        from torch.optim._muon import _adjust_lr

        params, grads, bufs = [], [], []
        torch.optim.Muon._init_group(self, group, params, grads, bufs)  # whole parameters
        updates = []
        for g, buf in zip(grads, bufs):
            g, buf = g.to_local(), buf.to_local()
            buf.lerp_(g, 1 - group["momentum"])
            updates.append(g.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        orthogonal = _orthogonalise_sharded(params, updates, self.blocks, group)
        lr = group["lr"]
        for p, o in zip(params, orthogonal):
            rows, cols = p.shape
            scaled = _adjust_lr(lr, group["adjust_lr_fn"], (rows // self.blocks.get(p, 1), cols))
            local = p.to_local()
            local.mul_(1 - lr * group["weight_decay"])
            local.add_(o, alpha=-scaled)


def _shard_rows(rows: int, world: int) -> list[int]:
    """How many rows of a ``rows``-row matrix each rank holds under FSDP2, which shards by rows
    as ``torch.chunk`` does: ``ceil(rows / world)`` each, fewer (or none) at the end."""
    per = -(-rows // world)
    return [max(0, min(rows, (r + 1) * per) - r * per) for r in range(world)]


def _orthogonalise_sharded(
    params: list[DTensor], updates: list[torch.Tensor], blocks: dict, group: dict
) -> list[torch.Tensor]:
    """This rank's rows of Newton-Schulz(update) for each sharded matrix, given its rows of
    each update: matrix i is orthogonalised (block by block) on rank i mod world size
    (``BlockMuon._sharded_step``). Rows travel padded to ``ceil(rows / world)``, so that every
    rank sends and receives one shape."""
    import torch.distributed as dist
    from torch.optim._muon import _zeropower_via_newtonschulz

    if not params:
        return []
    pg = params[0].device_mesh.get_group()
    world, me = pg.size(), pg.rank()
    ns_args = group["ns_coefficients"], group["ns_steps"], group["eps"]
    gathered, works = [], []
    for i, (p, u) in enumerate(zip(params, updates)):
        counts = _shard_rows(p.shape[0], world)
        if u.size(0) != counts[me]:
            raise RuntimeError(f"unexpected FSDP shard of {tuple(p.shape)}: {u.size(0)} rows")
        padded = u.new_zeros(counts[0], p.shape[1])
        padded[: u.size(0)] = u
        bufs = [torch.empty_like(padded) for _ in range(world)] if i % world == me else None
        gathered.append(bufs)
        owner = dist.get_global_rank(pg, i % world)
        works.append(dist.gather(padded, bufs, dst=owner, group=pg, async_op=True))
    for w in works:
        w.wait()
    outs, works = [], []
    for i, (p, u, bufs) in enumerate(zip(params, updates, gathered)):
        counts = _shard_rows(p.shape[0], world)
        chunks = None
        if bufs is not None:  # this rank's matrix
            full = torch.cat([b[:n] for b, n in zip(bufs, counts)])
            result = torch.cat(
                [_zeropower_via_newtonschulz(b, *ns_args) for b in full.chunk(blocks.get(p, 1))]
            )
            chunks = [c for c in result.split(counts[0])]
            chunks = [torch.cat([c, c.new_zeros(counts[0] - c.size(0), c.size(1))]) for c in chunks]
            chunks += [result.new_zeros(counts[0], p.shape[1])] * (world - len(chunks))
        out = torch.empty(counts[0], p.shape[1], dtype=torch.bfloat16, device=u.device)
        outs.append(out)
        owner = dist.get_global_rank(pg, i % world)
        works.append(dist.scatter(out, chunks, src=owner, group=pg, async_op=True))
    for w in works:
        w.wait()
    return [out[: u.size(0)] for out, u in zip(outs, updates)]


def stacked_blocks(model: nn.Module) -> dict[nn.Parameter, int]:
    """The weights of ``model`` that stack several matrices by rows, each with how many: every
    attention's ``c_attn`` (q, k, v) and, with SwiGLU, every MLP's ``c_fc`` (gate, up)."""
    blocks = {}
    for m in model.modules():
        if isinstance(m, CausalSelfAttention):
            blocks[m.c_attn.weight] = 3
        elif isinstance(m, MLP) and m.kind == "swiglu":
            blocks[m.c_fc.weight] = 2
    return blocks


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every trainable parameter of a GPT in exactly one group (tied weights once):
    ``muon`` the 2-D weights inside the transformer blocks, ``decay`` the other >= 2-D weights
    (embeddings, ``lm_head``), ``no_decay`` the rest (norm gains, biases)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():  # yields a shared (tied) parameter once
        if not p.requires_grad:
            continue
        if name.startswith("transformer.h.") and p.dim() == 2:
            groups["muon"].append((name, p))
        elif p.dim() >= 2:
            groups["decay"].append((name, p))
        else:
            groups["no_decay"].append((name, p))
    return groups


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    muon_weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``adamw``: the GPT's own AdamW (``GPT.configure_optimizer``). ``muon``: Muon at
    ``muon_lr`` (scaled per matrix by sqrt(max(1, rows / cols)), Keller Jordan's rule; a
    stacked weight per block, ``BlockMuon``) for the blocks' matrices, AdamW at ``lr`` for the
    rest; ``fused`` is the AdamW part's."""
    if name == "adamw":
        return model.configure_optimizer(lr, weight_decay, tuple(betas), fused=fused)
    if name != "muon":
        raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
    groups = split_params(model)
    muon = BlockMuon(
        [p for _, p in groups["muon"]],
        stacked_blocks(model),
        lr=muon_lr,
        momentum=muon_momentum,
        weight_decay=muon_weight_decay,
        nesterov=True,
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [p for _, p in groups["decay"]], "weight_decay": weight_decay},
            {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=tuple(betas),
        fused=fused,
    )
    return MuonWithAdamW(muon, adamw)
