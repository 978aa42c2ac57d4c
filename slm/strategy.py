"""How training spreads over processes, in one place: the ``strategy`` config group, the
process-group timeout, and the checks every rank agrees on before training starts.

``strategy=ddp`` (the default): each device holds the whole model, its gradients and optimizer
state, and gradients are averaged across devices (Lightning's ``DDPStrategy``).

``strategy=fsdp``: each ``Block``'s weights, gradients and optimizer state are sharded over the
devices (FSDP2, ``torch.distributed.fsdp.fully_shard``, through Lightning's
``ModelParallelStrategy``: docs/design.md says why), and a Block's full weights are gathered
just for its forward and backward. Per-rank memory for the weights, gradients and AdamW state
falls as ``1 / devices``: the way to a model that does not fit one GPU with DDP.
"""

from __future__ import annotations

import logging
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig

from slm import files
from slm.checkpoint import not_written
from slm.errors import CheckpointError, ConfigError, first_line, one_line

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
CHECKPOINTS = ("sharded", "full")


def device_count(accelerator: str, devices) -> int | None:
    """How many devices ``trainer.devices`` means on ``accelerator``, as Lightning parses it
    (``auto``, ``-1``, a count or a list); None where Lightning would refuse it (its own
    error follows when the Trainer is built)."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    acc = CUDAAccelerator if accelerator in ("gpu", "cuda") else CPUAccelerator
    try:
        if devices == "auto":
            devices = acc.auto_device_count()
        return len(acc.get_parallel_devices(acc.parse_devices(devices)))
    except Exception:
        return None


def world_size(cfg: DictConfig) -> int | None:
    """The processes training takes: ``trainer.devices`` x ``trainer.num_nodes``."""
    n = device_count(cfg.trainer.accelerator, cfg.trainer.devices)
    nodes = cfg.trainer.get("num_nodes", 1)
    return None if n is None or not isinstance(nodes, int) else n * nodes


def dist_timeout(cfg: DictConfig) -> timedelta:
    """``dist_timeout`` (minutes): how long a rank waits for the others, to meet at start or in
    a collective, before it fails."""
    return timedelta(minutes=float(cfg.get("dist_timeout", 10)))


def check_strategy(cfg: DictConfig) -> None:
    """``ConfigError`` for a ``strategy`` group value, ``dist_timeout`` or combination with
    ``trainer.*`` that cannot work (after ``resolve_hardware``: the precision is decided)."""
    s, flag = cfg.strategy, str(cfg.trainer.strategy)
    minutes = cfg.get("dist_timeout")
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0:
        raise ConfigError(f"dist_timeout={minutes} must be a positive number of minutes")
    if s.name not in STRATEGIES:
        raise ConfigError(
            f"strategy.name={s.name} is not one of {', '.join(STRATEGIES)}; "
            "use strategy=ddp or strategy=fsdp"
        )
    if flag == "fsdp" or (s.name == "fsdp" and flag != "auto"):
        raise ConfigError(
            f"trainer.strategy={flag} with strategy={s.name}: the strategy group decides; "
            "drop trainer.strategy and use strategy=fsdp (FSDP2) or strategy=ddp"
        )
    if s.name != "fsdp":
        return
    if s.checkpoint not in CHECKPOINTS:
        raise ConfigError(
            f"strategy.checkpoint={s.checkpoint} is not one of {', '.join(CHECKPOINTS)}"
        )
    if not isinstance(s.reshard_after_forward, bool):
        raise ConfigError(
            f"strategy.reshard_after_forward={s.reshard_after_forward} must be true or false"
        )
    if str(cfg.trainer.precision) not in ("32-true", "bf16-mixed"):
        raise ConfigError(
            f"strategy=fsdp trains in bf16-mixed or 32-true, not trainer.precision="
            f"{cfg.trainer.precision}: fp16 loss scaling over sharded gradients is not "
            "supported; on GPUs without bf16 (T4, V100) use strategy=ddp"
        )


def trainer_strategy(cfg: DictConfig):
    """``lightning.Trainer``'s ``strategy`` argument for the ``strategy`` group: ``FSDP``, or
    ``DDPStrategy`` with ``dist_timeout`` when more than one process trains; else
    ``trainer.strategy`` as given (``auto`` on one device: no process group at all)."""
    timeout = dist_timeout(cfg)
    if cfg.strategy.name == "fsdp":
        s = cfg.strategy
        return FSDP(s.reshard_after_forward, s.checkpoint == "sharded", timeout)
    flag = str(cfg.trainer.strategy)
    if flag == "ddp" or (flag == "auto" and (world_size(cfg) or 1) > 1):
        return DDPStrategy(timeout=timeout)
    return flag


class FSDP(ModelParallelStrategy):
    """Data parallel over all ranks with each ``Block`` (and then the rest of the GPT)
    sharded by FSDP2: ``ModelParallelStrategy`` on a 1-D mesh of every rank (its default
    would be tensor parallel within a node)."""

    def __init__(
        self,
        reshard_after_forward: bool = True,
        sharded_checkpoint: bool = True,
        timeout: timedelta | None = None,
    ) -> None:
        """``reshard_after_forward``: free each Block's gathered weights after its forward and
        gather them again for its backward (ZeRO-3, least memory); False keeps them until the
        backward (ZeRO-2: less communication, more memory). ``sharded_checkpoint``: a
        checkpoint is a folder in which each rank writes its shards; False gathers one
        ``.ckpt`` file on rank 0 (the model and optimizer must fit its CPU memory)."""
        kwargs = {"timeout": timeout} if timeout is not None else {}
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=sharded_checkpoint,
            **kwargs,
        )
        self.reshard_after_forward = reshard_after_forward
        self.sharded_checkpoint = sharded_checkpoint

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        # Two warnings that say nothing here: the GPT returns its logits as a view (never
        # written in place), and last.ckpt is a folder that each validation rewrites.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint in")
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded checkpoint folder, written whole or not at all: every rank writes its
        shards (torch.distributed.checkpoint) and rank 0 the rest (``meta.pt``) into a new
        folder beside ``filepath`` (``slm.files.NewDir``), which replaces ``filepath`` once
        every rank has written. Where any rank fails (a full disk), the folder that was there
        stays as it was and every rank stops with one line (``checkpoint.not_written``). A
        full checkpoint (one file, rank 0) goes through ``WholeCheckpointIO``."""
        if not self.sharded_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        new = files.NewDir(path) if self.global_rank == 0 else None
        tmp = self.broadcast(str(new.tmp) if new is not None else "")  # rank 0's, for all
        error: BaseException | None = None
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is one
            error = e
        written = self.reduce_boolean_decision(error is None, all=True)
        if new is not None:
            try:
                new.close(publish=written)
            except OSError as e:  # the swap itself failed: the old folder is back
                error, written = e, False
        if not self.reduce_boolean_decision(written, all=True):  # every rank learns of it
            if error is not None:
                raise not_written(path, error) from error
            raise CheckpointError(
                f"{path}: another rank could not write its part of the checkpoint (see its "
                "error); nothing of it is left"
            )

    def shard(self, model: nn.Module) -> None:
        """Shard ``model`` (a ``GPT``) in place over every rank (``shard_gpt``), in bf16 under
        ``bf16-mixed``."""
        bf16 = getattr(self.precision_plugin, "precision", None) == "bf16-mixed"
        shard_gpt(model, self.device_mesh["data_parallel"], bf16, self.reshard_after_forward)


class WholeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files (``best-stepN.ckpt``, ``last.ckpt``), each written whole
    or not at all: under a temporary name beside it, then renamed (``slm.files``). Lightning's
    own writer could leave a truncated file on a full disk, which the next read called "not a
    PyTorch checkpoint, or truncated". A write that fails is one line that names the file and
    why (``no space left on device``: ``checkpoint.not_written``)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        try:
            files.save_torch(path, checkpoint)
        except OSError as e:
            raise not_written(path, e) from e


def shard_gpt(model: nn.Module, mesh, bf16: bool = False, reshard_after_forward: bool = True):
    """Shard ``model`` (a ``GPT``) in place with FSDP2 over ``mesh``: each Block is one unit
    (its weights are gathered together, one Block at a time), the embeddings, final norm and
    ``lm_head`` the root's. With ``bf16`` the gathered weights and the compute are bf16 while
    the shards (the master weights the optimizer updates) and the gradient reduction stay
    fp32 (FSDP2's ``MixedPrecisionPolicy``); Lightning's autocast still runs the norms,
    softmax and loss in fp32 on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for block in model.transformer.h:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # generation's steps are forwards too: gathered alike
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (``FSDP.shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full weights on the CPU. Sharded, every rank must call it (a gather): rank 0
    gets the weights, the others an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# -- the start, agreed -------------------------------------------------------------------------


def launched_outside(cfg: DictConfig):
    """Lightning's cluster environment of this process where torchrun or srun started it as
    one of several ranks (each rank then runs train()'s checks before any process group
    exists), else None: one process, or Lightning's own launcher (which starts the other
    ranks of a machine itself, after its checks)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    elif SLURMEnvironment.detect() and SLURMEnvironment.job_name() not in ("bash", "interactive"):
        # Lightning lets SLURM manage the ranks only when its tasks are the requested devices.
        if int(os.environ["SLURM_NTASKS"]) != world_size(cfg):
            return None
        env = SLURMEnvironment()
    else:
        return None
    return env if env.world_size() > 1 else None


def agree_on_start(cfg: DictConfig, error: BaseException | None) -> None:
    """Raise ``error`` (this rank's failed start check, or None) on every rank.

    Under torchrun or srun a check that fails on one node only (``ckpt_path=last`` where the
    run dirs are not on a shared filesystem, a data dir missing there) would leave the other
    nodes waiting for it in ``init_process_group`` until the timeout. Here every rank first
    joins the process group (the one Lightning then uses) and the ranks exchange their
    results: all stop at once, each with the failing rank's one line."""
    env = launched_outside(cfg)
    if env is None:
        if error is not None:
            raise error
        return
    import torch.distributed as dist
    from lightning.fabric.utilities.distributed import _init_dist_connection

    rank, world = env.global_rank(), env.world_size()
    if not dist.is_initialized():
        kwargs: dict = {"timeout": _safe_timeout(cfg)}
        backend = "gloo"
        if torch.cuda.is_available() and str(cfg.trainer.accelerator) != "cpu":
            # As Lightning's strategies set it up: NCCL bound to this rank's GPU.
            device = torch.device("cuda", env.local_rank())
            torch.cuda.set_device(device)
            backend, kwargs["device_id"] = "nccl", device
        try:
            _init_dist_connection(env, backend, rank, world, **kwargs)
        except dist.DistError as e:
            minutes = kwargs["timeout"].total_seconds() / 60
            raise ConfigError(
                f"rank {rank} of {world}: the ranks did not all meet at {env.main_address}:"
                f"{env.main_port} within dist_timeout={minutes:g} minutes ({first_line(e)}); "
                "start every node with the same command and check that they reach that address"
            ) from e
    reports: list[str | None] = [None] * world
    dist.all_gather_object(reports, None if error is None else one_line(error))
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m]
    if failed:
        r, message = failed[0]
        raise ConfigError(f"rank {r} stopped before training, so every rank does: {message}")


def _safe_timeout(cfg: DictConfig) -> timedelta:
    """``dist_timeout``, or its default where the value itself failed the checks."""
    try:
        timeout = dist_timeout(cfg)
        return timeout if timeout.total_seconds() > 0 else timedelta(minutes=10)
    except (TypeError, ValueError):
        return timedelta(minutes=10)
