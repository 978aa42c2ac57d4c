"""Callbacks that Lightning does not ship: the run's loss history (kept in the checkpoint, so a
resumed run's ``loss.png`` and ``metrics.json`` count the whole run), a throughput monitor
without a sync per batch, a progress bar that shows the optimizer step, a clean stop with
``last.ckpt`` on Ctrl-C, and sample stories for the trackers.

Nothing here reads a GPU value (``.item()``, ``float(tensor)``) on every batch: that waits for
the GPU and stalls the CPU that should be queueing the next kernels. Values are read on logging
steps only (``trainer.log_every_n_steps``).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from slm import trackers

log = logging.getLogger(__name__)


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


clock = time.perf_counter  # the clock of the throughput and time estimates (tests set it)


def synced_clock(trainer: L.Trainer) -> float:
    """``clock()`` once the device has finished what was queued: a reading that waits for
    the GPU, so only where it is rare."""
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize()
    return clock()


class SyncFreeThroughputMonitor(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` (tokens/s, FLOPs/s and, on GPUs it knows, MFU), with
    the clock read on logging steps only and validation measured as a whole.

    Training: batches, samples and tokens are counted on every batch, but the clock is read
    (after a sync) only on logging steps, and each reading carries the FLOPs of every batch
    since the one before (``flops_per_batch`` each); Lightning's own monitor syncs on every
    batch and adds one batch's FLOPs per reading. Time spent outside training (validation,
    checkpoints, sample stories) is left out of the training clock.

    Validation: one point per validation, at the optimizer step it ran at: its windows over
    the time from its first to its last batch, with forward-only FLOPs
    (``val_flops_per_sample`` a window); Lightning's logs a point per val batch, at the val
    batch count as the step, with the training FLOPs."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Two readings per validation, its start and its end: a window of 2.
        self._throughputs[RunningStage.VALIDATING] = Throughput(
            available_flops=self.available_flops, world_size=trainer.world_size, window_size=2
        )
        self._flops_read = 0  # training batches whose FLOPs went into a reading
        self._paused: float | None = None  # when training last stopped for a validation

    @rank_zero_only
    def on_train_start(self, trainer, *_) -> None:
        super().on_train_start(trainer)
        self._t0s[RunningStage.TRAINING] = clock()
        self._flops_read, self._paused = 0, None

    @rank_zero_only
    def on_train_batch_start(self, trainer, *_) -> None:
        if self._paused is not None:  # back from a validation: its time is no training time
            self._t0s[RunningStage.TRAINING] += synced_clock(trainer) - self._paused
            self._paused = None

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        stage = RunningStage.TRAINING
        self._count(stage, batch)
        if not is_logging_step(trainer):
            return
        batches = self._batches[stage]
        flops = getattr(pl_module, "flops_per_batch", None)
        self._throughputs[stage].update(
            time=synced_clock(trainer) - self._t0s[stage],
            batches=batches,
            samples=self._samples[stage],
            lengths=self._lengths[stage] if self.length_fn else None,
            flops=None if flops is None else flops * (batches - self._flops_read),
        )
        self._flops_read = batches
        self._compute(trainer)

    def _count(self, stage: RunningStage, batch) -> None:
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        self._lengths[stage] += self.length_fn(batch) if self.length_fn else 0

    @rank_zero_only
    def on_validation_start(self, trainer, *_) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self._paused = synced_clock(trainer)
        stage = RunningStage.VALIDATING
        self._throughputs[stage].reset()
        self._lengths[stage] = self._samples[stage] = self._batches[stage] = 0
        self._t0s[stage] = None  # the clock starts at the first batch

    @rank_zero_only
    def on_validation_batch_start(self, trainer, *_, **__) -> None:
        stage = RunningStage.VALIDATING
        if not trainer.sanity_checking and self._t0s.get(stage) is None:
            self._t0s[stage] = synced_clock(trainer)

    @rank_zero_only
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *_, **__) -> None:
        if not trainer.sanity_checking:
            self._count(RunningStage.VALIDATING, batch)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        stage = RunningStage.VALIDATING
        if trainer.sanity_checking or not self._batches.get(stage):
            return
        throughput = self._throughputs[stage]
        lengths = self._lengths[stage] if self.length_fn else None
        throughput.update(time=0.0, batches=0, samples=0, lengths=lengths and 0, flops=0)
        flops = getattr(pl_module, "val_flops_per_sample", None)
        throughput.update(
            time=synced_clock(trainer) - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=lengths,
            flops=None if flops is None else flops * self._samples[stage],
        )
        metrics = {f"{stage.value}/{k}": v for k, v in throughput.compute().items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_end(self, trainer, *_) -> None:
        pass  # Lightning's moves the training clock by the validation: done in batch_start


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
    rank never waits on the others.

    SLURM warns a job ahead of its time limit or preemption with a signal (``--signal``) that a
    requeue handler listens to: submitit's (SIGUSR2, ``hydra/launcher=submitit_slurm``) or
    Lightning's SLURM auto-requeue (SIGUSR1). Where one is installed, its signal stops the run
    the same way and then goes on to that handler, which requeues the job; the requeued job
    resumes from this ``last.ckpt`` (``slm.resume.resolve_ckpt_path``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REQUEUE = tuple(getattr(signal, n) for n in ("SIGUSR1", "SIGUSR2") if hasattr(signal, n))

    def __init__(self, path: str) -> None:
        self.path = path
        self.requested: int | None = None
        self.stopped = False  # whether the run was stopped here, at an agreed step boundary
        self._announced = False
        self._previous: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.requested, self._announced, self.stopped = None, False, False
        if threading.current_thread() is threading.main_thread():
            requeue = [s for s in self.REQUEUE if callable(signal.getsignal(s))]
            self._previous = {s: signal.signal(s, self._handler) for s in (*self.SIGNALS, *requeue)}

    def _handler(self, signum, frame) -> None:
        if self.requested is not None:  # the second one: stop now
            self._restore()
            raise KeyboardInterrupt
        # Nothing else here: a print from a signal handler that lands while the progress bar
        # writes to stderr raises "RuntimeError: reentrant call". Said at the batch's end.
        self.requested = signum

    def _announce(self) -> None:
        if self.requested is not None and not self._announced:
            self._announced = True
            name = signal.Signals(self.requested).name
            then = ", then requeueing" if self.requested in self.REQUEUE else ""
            print(f"\n{name}: stopping after this optimizer step{then} (again to stop at once)",
                  file=sys.stderr)  # fmt: skip

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._announce()
        if trainer.fit_loop._should_accumulate():
            return
        stop = self.requested is not None
        if trainer.world_size > 1:
            if not trainer._logger_connector.should_update_logs:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.save_checkpoint(self.path)
            self.stopped = True
            then = self._previous.get(self.requested) if self.requested in self.REQUEUE else None
            self._restore()
            if then is not None:
                then(self.requested, None)  # requeue (submitit's exits on rank 0)
            raise KeyboardInterrupt  # Lightning's graceful shutdown; metrics say "interrupted"

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()


class SampleStories(L.Callback):
    """At each validation, a greedy story from a fixed prompt with the current weights, logged
    to every tracker that takes text (``slm.trackers.log_text``: TensorBoard's Text tab, a W&B
    table, MLflow artifacts), so the stories can be watched improving beside the loss."""

    def __init__(self, prompt: str = "Once upon a time", max_new_tokens: int = 64) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.max_new_tokens <= 0:
            return
        from slm import tokenizer
        from slm.sample import generate
        from slm.strategy import is_sharded

        # Sharded (strategy=fsdp), each forward gathers every rank's shards: all ranks
        # generate the same greedy story together (stopping at the same token), rank 0 logs it.
        if not (trainer.is_global_zero or is_sharded(pl_module.model)):
            return
        tok = getattr(pl_module, "tokenizer", None) or tokenizer.gpt2()  # the data's
        ids = generate(
            pl_module.model, tok.encode(self.prompt), self.max_new_tokens, temperature=0,
            stop_token=tok.eot_id,
        )[0]  # fmt: skip
        if not trainer.is_global_zero:
            return
        story = self.prompt + tok.decode(ids)
        trackers.log_text(trainer.loggers, "samples", story, trainer.global_step)


class TimeToMaxSteps(L.Callback):
    """Once the speed of training is known, one line in the log: seconds per optimizer step,
    tokens/s, and the expected time to ``trainer.max_steps`` with the validations still to
    come (and the clock time then).

    The first optimizer step of a run (or of a resumed run) is left out: it compiles and
    starts the loader workers. The steps after it are timed for ``measure_seconds`` and at
    least 3 steps, or for 30 s where steps are slower (the clock read, after a sync, at each
    of them: a few seconds once per run), time spent outside training left out. A validation
    is timed from the end of its first batch (which compiles, on a GPU) to the end of its
    last; the latest one counts, the full validation before step 0 included."""

    def __init__(self, val_every_n_steps: int, measure_seconds: float = 5.0) -> None:
        self.val_every_n_steps, self.measure_seconds = val_every_n_steps, measure_seconds
        self.val_seconds: float | None = None
        self.estimate: dict | None = None  # what was reported
        self._start: tuple[float, int, int] | None = None  # (clock, step, tokens) at the start
        self._tokens = 0
        self._val_batches, self._val_first = 0, 0.0  # of the validation under way
        self._paused: float | None = None  # when training stopped for a validation

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self.estimate = None, None

    @rank_zero_only
    def on_validation_start(self, trainer, pl_module) -> None:
        if self.estimate is None:
            self._paused, self._val_batches = clock(), 0

    @rank_zero_only
    def on_validation_batch_end(self, trainer, *_, **__) -> None:
        if self.estimate is None:
            self._val_batches += 1
            if self._val_batches == 1:
                self._val_first = synced_clock(trainer)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        n = self._val_batches
        if self.estimate is not None or n == 0:
            return
        if n > 1:  # from the end of the first batch, scaled to all of them
            self.val_seconds = (synced_clock(trainer) - self._val_first) * n / (n - 1)
        else:
            self.val_seconds = self._val_first - self._paused

    @rank_zero_only
    def on_train_batch_start(self, trainer, *_) -> None:
        if self._paused is not None:
            if self._start is not None and self.estimate is None:  # a pause is no step time
                start, step, tokens = self._start
                self._start = (start + clock() - self._paused, step, tokens)
            self._paused = None

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.estimate is not None:
            return
        self._tokens += batch[0].numel() * trainer.world_size
        if trainer.fit_loop._should_accumulate():
            return
        step, now = trainer.global_step, synced_clock(trainer)
        if self._start is None:  # the first step: what comes after it is timed
            self._start = (now, step, self._tokens)
            return
        start, first, tokens = self._start
        seconds = now - start
        enough = seconds >= self.measure_seconds and step - first >= 3 or seconds >= 30
        if enough and step < trainer.max_steps:
            self._report(trainer, seconds / (step - first), self._tokens - tokens, seconds)

    def _report(self, trainer, step_seconds: float, tokens: int, seconds: float) -> None:
        step, end, every = trainer.global_step, trainer.max_steps, self.val_every_n_steps
        vals = end // every - step // every + (end % every != 0)  # ValidateAtEnd's last one
        val_seconds = self.val_seconds or 0.0
        total = (end - step) * step_seconds + vals * val_seconds
        done = time.localtime(time.time() + total)
        at = time.strftime("%a %H:%M" if total > 20 * 3600 else "%H:%M", done)
        self.estimate = {
            "step_seconds": step_seconds, "tokens_per_second": tokens / seconds,
            "val_seconds": val_seconds, "validations": vals, "seconds": total,
        }  # fmt: skip
        log.info(
            "speed: %.3g s/step, %s tokens/s; %s steps to trainer.max_steps=%s and %d "
            "validations of ~%.3g s: about %s (until about %s)",
            step_seconds, f"{tokens / seconds:,.0f}", f"{end - step:,}", f"{end:,}", vals,
            val_seconds, duration(total), at,
        )  # fmt: skip


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3 h 05 min`` or ``2 d 4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"
