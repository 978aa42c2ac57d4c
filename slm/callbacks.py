"""Callbacks that Lightning does not ship: the run's loss history (kept in the checkpoint, so a
resumed run's ``loss.png`` and ``metrics.json`` count the whole run), a throughput monitor
without a sync per batch, a progress bar that shows the optimizer step, ``last.ckpt`` on
Ctrl-C, and sample stories in TensorBoard.

Nothing here reads a GPU value (``.item()``, ``float(tensor)``) on every batch: that waits for
the GPU and stalls the CPU that should be queueing the next kernels. Values are read on logging
steps only (``trainer.log_every_n_steps``).
"""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether the micro-batch that just ran ends an optimizer step that Lightning logs."""
    accumulating = trainer.fit_loop._should_accumulate()
    return not accumulating and trainer._logger_connector.should_update_logs


class RunHistory(L.Callback):
    """Train loss on logging steps, val loss per validation, tokens seen and wall time.

    Reading the loss is where it is checked: a non-finite train loss stops the run with a
    ``FloatingPointError`` (within ``log_every_n_steps`` steps of the divergence)."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def _stop_clock(self) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_clock()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_clock()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the optimizer step this micro-batch belongs to

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += batch[0].numel() * trainer.world_size
        if not is_logging_step(trainer):
            return
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss} at step {self._step}: training diverged; "
                "lower optim.lr or raise optim.warmup_steps"
            )
        self.train.append((self._step, loss))

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking:  # the full val pass before step 0: the starting point
            loss = getattr(pl_module, "last_val_loss", None)
            if trainer.global_step > 0 or self.val:
                return
        if loss is not None:
            self.val.append((trainer.global_step, float(loss)))

    @property
    def wall_seconds(self) -> float:
        running = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return self.seconds + running

    def state_dict(self) -> dict:
        return {
            "train": self.train, "val": self.val, "tokens": self.tokens,
            "seconds": self.wall_seconds,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.train = [tuple(x) for x in state["train"]]
        self.val = [tuple(x) for x in state["val"]]
        self.tokens, self.seconds = state["tokens"], state["seconds"]


class SyncFreeThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (tokens/s, MFU), without its
    ``torch.cuda.synchronize()`` after every batch: batches, samples and tokens are counted on
    every batch, but the clock is read (after a sync) only on logging steps. The rates are
    differences over the window of clock readings, so they come out the same."""

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        if is_logging_step(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
            return
        stage = trainer.state.stage
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        if self.length_fn is not None:
            self._lengths[stage] += self.length_fn(batch)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, plus the optimizer step (the bar itself counts micro-batches)."""

    def get_metrics(self, trainer, pl_module) -> dict:
        return {"step": trainer.global_step, **super().get_metrics(trainer, pl_module)}


class LastOnException(L.Callback):
    """Ctrl-C or a crash still leaves ``last.ckpt`` for what was done. (Lightning's
    ``OnExceptionCheckpoint`` deletes its file at teardown, and ``ModelCheckpoint``'s
    ``save_on_exception`` names the file like a best checkpoint.)"""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception) -> None:
        # After a divergence the weights are not worth resuming from: keep the last.ckpt of
        # the last validation.
        diverged = isinstance(exception, FloatingPointError)
        if not trainer.sanity_checking and trainer.global_step > 0 and not diverged:
            trainer.save_checkpoint(self.path)


class SampleStories(L.Callback):
    """At each validation, a greedy story from a fixed prompt with the current weights,
    logged as TensorBoard text, so the stories can be watched improving beside the loss."""

    def __init__(self, prompt: str = "Once upon a time", max_new_tokens: int = 64) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.max_new_tokens <= 0:
            return
        from slm import tokenizer
        from slm.sample import generate

        ids = generate(
            pl_module.model, tokenizer.encode(self.prompt), self.max_new_tokens, temperature=0
        )[0]
        story = self.prompt + tokenizer.decode(ids)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Markdown: two trailing spaces keep the story's line breaks.
                text = story.replace("\n", "  \n")
                logger.experiment.add_text("samples", text, trainer.global_step)
