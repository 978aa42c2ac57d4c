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
        self._val_sum: list[torch.Tensor] = []
        self.val_tokens_per_byte: float | None = None  # for val/bpb, from the data's meta.json
        # The data's tokenizer (set in setup), stored in every checkpoint so that a checkpoint
        # alone generates, evaluates and exports (slm.checkpoint.load_tokenizer).
        self.tokenizer: Tokenizer | None = None

    def configure_model(self) -> None:
        # Compile the GPT, not this LightningModule: Lightning's hooks and logging stay plain
        # Python around one graph for the GPT's forward and one for its backward. Only the
        # training and validation forward is compiled: generation (SampleStories, generate.py)
        # calls the eager GPT with a KV cache whose length changes every step.
        if self.compile_mode and self._compiled is None:
            self._compiled = torch.compile(self.model.forward, mode=self.compile_mode)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return (self._compiled or self.model)(idx, targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        # No host sync here (no .item(), no isfinite branch): RunHistory reads the loss, and
        # checks that it is finite, on logging steps only.
        self.log("train/loss", loss, prog_bar=True)
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
            self.flops_per_batch = self.count_flops(datamodule.batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.tokenizer is None:  # load_from_checkpoint: the one it was trained with
            self.tokenizer = from_state(checkpoint.get("tokenizer"))

    def count_flops(self, batch_size: int) -> int:
        """FLOPs of one training step (forward + backward) on a batch, counted by PyTorch on
        the meta device (no memory, no compute): what ThroughputMonitor turns into MFU."""
        with torch.device("meta"):
            model = GPT(self.config)
            x = torch.randint(0, self.config.vocab_size, (batch_size, self.config.block_size))
        return measure_flops(model, lambda: model(x, x)[1], loss_fn=lambda loss: loss)

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
        # LambdaLR multiplies the base lr; Lightning steps it once per optimizer step
        # ("interval": "step"), so gradient accumulation does not stretch the schedule.
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, h.lr, h.min_lr, h.warmup_steps, max_steps) / h.lr
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
