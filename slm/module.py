"""The LightningModule: the GPT, its next-token loss, AdamW (or Muon + AdamW) and the
warmup-cosine schedule."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from lightning.fabric.utilities.throughput import measure_flops

from slm.model import GPT, GPTConfig
from slm.optim import build_optimizer
from slm.strategy import is_sharded
from slm.tokenizer import Tokenizer, from_state

log = logging.getLogger(__name__)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps`` steps, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # step 0 already trains (nanoGPT)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """``lr_at``: each param group's lr times ``lr_at(step) / lr``, stepped once per optimizer
    step. Restored from a checkpoint, it takes the step count only and keeps this run's lrs
    (LambdaLR's own state would bring back the checkpoint's): a resume with another schedule
    (``allow_schedule_change``) trains on the new one from its first step."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup_steps: int, max_steps: int):
        super().__init__(optimizer, lambda s: lr_at(s, lr, min_lr, warmup_steps, max_steps) / lr)

    def load_state_dict(self, state_dict: dict) -> None:
        base_lrs = self.base_lrs
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        self._last_lr = [lr * f(self.last_epoch) for lr, f in zip(base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def keep_this_runs_settings(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict | None:
    """An ``Optimizer.load_state_dict`` pre-hook: the checkpoint brings the optimizer's state
    (moments, momentum buffers, step counts), this run its settings. torch would take every
    param-group setting from the checkpoint: a new ``weight_decay``, ``betas`` or Muon
    ``momentum`` ignored, and a ``fused=False`` checkpoint resumed with fused AdamW under fp16
    loss scaling crashing at its first step. (The lr is the schedule's: ``WarmupCosine``.)"""
    saved = state_dict["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        return None  # another optimizer: torch's own error
    groups = [
        {**old, **{k: v for k, v in new.items() if k != "params"}}
        for old, new in zip(saved, optimizer.param_groups)
    ]
    return {**state_dict, "param_groups": groups}


class GPTModule(L.LightningModule):
    """Built from primitives only (``save_hyperparameters``), so a checkpoint loads with
    ``GPTModule.load_from_checkpoint(path)`` and no Hydra."""

    def __init__(
        self,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        block_size: int = 256,
        vocab_size: int = 50257,
        dropout: float = 0.0,
        bias: bool = False,
        positions: str = "learned",
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
        tie_embeddings: bool = True,
        rope_theta: float = 10000.0,
        eot_id: int = 50256,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 200,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        max_steps: int | None = None,
        fused: bool | None = None,
        compile: str | None = None,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
    ) -> None:
        """``fused``: fused AdamW (None: on CUDA). ``compile``: a ``torch.compile`` mode for
        the GPT ("default", "max-autotune", ...), or None for eager; a setting of this run,
        not of the model, so it is not saved in checkpoints."""
        super().__init__()
        if min_lr > lr:
            raise ValueError(f"min_lr={min_lr} is above lr={lr}: the schedule would rise")
        self.save_hyperparameters(ignore=["compile"])
        self.config = GPTConfig(
            n_layer, n_head, n_embd, block_size, vocab_size, dropout, bias,
            positions, norm, mlp, qk_norm, tie_embeddings, rope_theta, eot_id,
        )  # fmt: skip
        self.model = GPT(self.config)
        self.compile_mode = compile
        self._compiled = None  # the GPT's compiled forward, made in configure_model
        self._step_loss = None  # (sum, count) over the optimizer step's micro-batches
        self._val_sum: list[torch.Tensor] = []
        self.val_tokens_per_byte: float | None = None  # for val/bpb, from the data's meta.json
        # The data's tokenizer (set in setup), stored in every checkpoint so that a checkpoint
        # alone generates, evaluates and exports (slm.checkpoint.load_tokenizer).
        self.tokenizer: Tokenizer | None = None

    def configure_model(self) -> None:
        # strategy=fsdp (slm.strategy.FSDP) shards the GPT here, where Lightning's
        # ModelParallelStrategy expects it: before the optimizer is built, so the optimizer
        # holds the shards. FSDP2 keeps every parameter's name and full shape (a DTensor), so
        # configure_optimizers splits the groups as on the unsharded model.
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer else None
        if shard is not None and not is_sharded(self.model):
            shard(self.model)
        # Compile the GPT, not this LightningModule: Lightning's hooks and logging stay plain
        # Python around one graph for the GPT's forward and one for its backward. Only the
        # training and validation forward is compiled: generation (SampleStories, generate.py)
        # calls the eager GPT with a KV cache whose length changes every step.
        if self.compile_mode and self._compiled is None:
            # Sharded, through the module's call: FSDP2's hooks (which gather each Block's
            # weights) run around its forward, eagerly (dynamo's skip_fsdp_hooks), between
            # the compiled pieces.
            call = self.model.__call__ if is_sharded(self.model) else self.model.forward
            self._compiled = torch.compile(call, mode=self.compile_mode)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return (self._compiled or self.model)(idx, targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        # train/loss is the optimizer step's mean over its micro-batches: a running mean, reset
        # at the step's first micro-batch (Lightning's own test: batch_idx % accumulate == 0),
        # logged at every micro-batch; Lightning writes it out at the step's last.
        # No host sync here (no .item(), no isfinite branch): RunHistory reads the loss, and
        # checks that it is finite, on logging steps only.
        first = batch_idx % self.trainer.accumulate_grad_batches == 0
        if first or self._step_loss is None:
            self._step_loss = loss.detach(), 1
        else:
            self._step_loss = self._step_loss[0] + loss.detach(), self._step_loss[1] + 1
        total, n = self._step_loss
        self.log("train/loss", total if n == 1 else total / n, prog_bar=True)
        return loss

    # -- validation: token-weighted mean loss over all val windows, then ppl and bpb from it.
    def on_validation_epoch_start(self) -> None:
        self._val_sum = []

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        _, loss = self(x, y)
        n = loss.new_tensor(float(y.numel()))
        self._val_sum.append(torch.stack([loss.float() * n, n]))

    def on_validation_epoch_end(self) -> None:
        # Every rank takes part in the all_gather, also one whose share of windows is empty.
        total = torch.stack(self._val_sum).sum(0) if self._val_sum else self._zero_sum()
        total = self.all_gather(total).reshape(-1, 2).sum(0)  # every rank's windows
        loss = total[0] / total[1]
        self.last_val_loss = float(loss)  # also seen during the sanity check, when logs are not
        metrics = {"val/loss": self.last_val_loss, "val/ppl": math.exp(self.last_val_loss)}
        if self.val_tokens_per_byte:
            metrics["val/bpb"] = self.last_val_loss * self.val_tokens_per_byte / math.log(2)
        # For ModelCheckpoint and the progress bar (the value is already global).
        self.log("val/loss", loss, prog_bar=True, logger=False, sync_dist=True)
        trainer = self.trainer
        first = trainer.sanity_checking and trainer.global_step == 0  # the curve's start
        if trainer.is_global_zero and (first or not trainer.sanity_checking):
            # At the optimizer step the weights are from: Lightning's own logging would put
            # it one step earlier (it counts the step after validation) and skip step 0.
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            log.info(
                "step %d: %s", trainer.global_step,
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            )  # fmt: skip

    def _zero_sum(self) -> torch.Tensor:
        return torch.zeros(2, device=self.device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        meta = getattr(datamodule, "meta", None)
        if meta:
            val = meta["splits"]["val"]
            self.val_tokens_per_byte = val["tokens"] / val["bytes"]
        self.tokenizer = getattr(datamodule, "tokenizer", None) or self.tokenizer
        if stage == "fit" and datamodule is not None:
            # What SyncFreeThroughputMonitor turns into FLOPs/s and MFU.
            self.flops_per_batch = self.count_flops(datamodule.batch_size)
            self.val_flops_per_sample = self.count_flops(1, backward=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state()
        # Sharded (fsdp) or not (one device, ddp): the optimizer state's layout, which a
        # resume must share (slm.resume.check_resume).
        checkpoint["strategy"] = "fsdp" if is_sharded(self.model) else "ddp"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is None:  # load_from_checkpoint: the one it was trained with
            self.tokenizer = from_state(checkpoint.get("tokenizer"))

    def count_flops(self, batch_size: int, backward: bool = True) -> int:
        """FLOPs of the loss on a batch of ``batch_size`` windows, forward and backward (a
        training micro-batch) or forward only (validation), counted by PyTorch on the meta
        device (no memory, no compute)."""
        with torch.device("meta"):
            model = GPT(self.config)
            x = torch.randint(0, self.config.vocab_size, (batch_size, self.config.block_size))
        loss_fn = (lambda loss: loss) if backward else None
        return measure_flops(model, lambda: model(x, x)[1], loss_fn=loss_fn)

    def configure_optimizers(self):
        h = self.hparams
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else h.max_steps
        if not max_steps:
            raise ValueError("trainer.max_steps must be set: the cosine schedule ends there")
        # Fused AdamW (one kernel for all parameters) is the fastest step on CUDA; it is
        # correct with clipping and loss scaling under slm.precision.ClippableMixedPrecision.
        fused = h.fused if h.get("fused") is not None else self.device.type == "cuda"
        # optimizer="muon": one optimizer wrapping Muon and AdamW (slm/optim.py says why).
        optimizer = build_optimizer(
            self.model, h.optimizer, h.lr, h.weight_decay, tuple(h.betas), fused=fused,
            muon_lr=h.muon_lr, muon_momentum=h.muon_momentum, muon_weight_decay=h.muon_weight_decay,
        )  # fmt: skip
        # A resume restores the state, but keeps this run's settings and schedule.
        optimizer.register_load_state_dict_pre_hook(keep_this_runs_settings)
        # Lightning steps the schedule once per optimizer step ("interval": "step"), so
        # gradient accumulation does not stretch it.
        scheduler = WarmupCosine(optimizer, h.lr, h.min_lr, h.warmup_steps, max_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
