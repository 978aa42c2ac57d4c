"""Callbacks that Lightning does not ship: the run's loss history (kept in the checkpoint, so a
resumed run's ``loss.png`` and ``metrics.json`` count the whole run), a throughput monitor
without a sync per batch, a progress bar that shows the optimizer step, a clean stop with
``last.ckpt`` on Ctrl-C, and sample stories in TensorBoard.

Nothing here reads a GPU value (``.item()``, ``float(tensor)``) on every batch: that waits for
the GPU and stalls the CPU that should be queueing the next kernels. Values are read on logging
steps only (``trainer.log_every_n_steps``).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
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
        diverged = not math.isfinite(loss)
        if trainer.world_size > 1:  # every rank stops together: none waits in a collective
            diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
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


class ValidateAtEnd(L.Callback):
    """A validation (and so ``last.ckpt`` and the final point of the curve) at
    ``trainer.max_steps``, also when it is no multiple of ``val_every_n_steps``: Lightning
    validates a stream without end only every ``val_check_interval`` batches, or when asked
    to stop."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.fit_loop._should_accumulate() and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


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


class StopOnSignal(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption): finish the optimizer step under
    way, write ``last.ckpt`` there, and stop; a second signal stops at once (Lightning's own
    handling), leaving the ``last.ckpt`` of the last validation.

    Why not save where the signal lands: a checkpoint taken inside a step (or between the
    micro-batches of an accumulated step) does not say which micro-batches the optimizer has
    seen, and the resumed run drifted one micro-batch ahead. Saved at an optimizer-step
    boundary, in ``on_train_batch_end`` (where Lightning's own step checkpoints are taken),
    the resumed run is the uninterrupted one. A crash (an exception) saves nothing: the last
    validation's ``last.ckpt`` is the state to go back to. With several processes the stop is
    agreed on logging steps (a signal may reach the ranks at different steps); a crash on one
    rank never waits on the others."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, path: str) -> None:
        self.path = path
        self.requested: int | None = None
        self._previous: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

    def _handler(self, signum, frame) -> None:
        if self.requested is not None:  # the second one: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this optimizer step "
            "(again to stop at once)",
            file=sys.stderr,
        )

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        stop = self.requested is not None
        if trainer.world_size > 1:
            if not trainer._logger_connector.should_update_logs:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.path)
            self._restore()
            raise KeyboardInterrupt  # Lightning's graceful shutdown; metrics say "interrupted"

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


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

        tok = getattr(pl_module, "tokenizer", None) or tokenizer.gpt2()  # the data's
        ids = generate(
            pl_module.model, tok.encode(self.prompt), self.max_new_tokens, temperature=0,
            stop_token=tok.eot_id,
        )[0]  # fmt: skip
        story = self.prompt + tok.decode(ids)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Markdown: two trailing spaces keep the story's line breaks.
                text = story.replace("\n", "  \n")
                logger.experiment.add_text("samples", text, trainer.global_step)
