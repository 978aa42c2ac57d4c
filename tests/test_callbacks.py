"""The callbacks' hot-path behaviour: nothing waits for the device on steps that log nothing."""

import logging
import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import TINY_GPT, RandomWindows
from lightning.fabric.utilities.throughput import Throughput, measure_flops
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, Subset

from slm import callbacks
from slm.callbacks import RunHistory, StopOnSignal, SyncFreeThroughputMonitor, TimeToMaxSteps
from slm.model import GPT, GPTConfig
from slm.module import GPTModule


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_throughput_clock_and_loss_are_read_on_logging_steps_only(monkeypatch, accumulate):
    updates = []
    real_update = Throughput.update

    def update(self, **kwargs):  # where Lightning's monitor syncs the GPU first
        updates.append(kwargs)
        real_update(self, **kwargs)

    monkeypatch.setattr(Throughput, "update", update)
    monitor = SyncFreeThroughputMonitor(lambda b: b[0].size(0), lambda b: b[0].numel())
    history = RunHistory()
    module = GPTModule(**TINY_GPT, warmup_steps=1, max_steps=12)
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", log_every_n_steps=4, accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor, history], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(RandomWindows(), batch_size=4))
    # Optimizer steps 3, 7 and 11 log; every micro-batch's samples and tokens are counted.
    assert [u["batches"] for u in updates] == [4 * accumulate, 8 * accumulate, 12 * accumulate]
    assert [u["samples"] for u in updates] == [16 * accumulate, 32 * accumulate, 48 * accumulate]
    assert [u["lengths"] for u in updates] == [u["samples"] * 16 for u in updates]
    assert [s for s, _ in history.train] == [3, 7, 11]
    assert history.tokens == 12 * accumulate * 4 * 16


class FakeClock(L.Callback):
    """A clock that runs only when told: each training micro-batch takes ``train`` seconds
    (``step0`` for the first, which compiles), each val batch ``val`` seconds, and every
    validation ends with ``after_val`` seconds of other work (checkpoints, sample stories).
    Placed after the monitors, so that they read the clock as a batch starts, before its time
    passes."""

    def __init__(self, train=0.5, step0=30.0, val=0.25, after_val=7.0):
        self.now, self.train, self.step0, self.val, self.after_val = (
            100.0,
            train,
            step0,
            val,
            after_val,
        )

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, *args):
        self.now += self.step0 if trainer.global_step == 0 else self.train

    def on_validation_batch_start(self, trainer, *args, **kwargs):
        self.now += self.val

    def on_validation_end(self, trainer, *args):
        self.now += self.after_val


class Windows(L.LightningDataModule):
    batch_size = 4

    def train_dataloader(self):
        return DataLoader(RandomWindows(), batch_size=self.batch_size)

    def val_dataloader(self):  # 10 windows: batches of 4, 4 and 2
        return DataLoader(Subset(RandomWindows(), range(10)), batch_size=self.batch_size)


class Recorder(Logger):
    """Every logged metric with its step."""

    def __init__(self):
        super().__init__()
        self.logged: dict[str, list[tuple[int, float]]] = {}

    name, version = "recorder", "0"

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.logged.setdefault(k, []).append((step, v))

    def log_hyperparams(self, *args, **kwargs):
        pass


@pytest.mark.slow
def test_throughput_flops_mfu_and_time_to_max_steps_against_a_clock(monkeypatch, caplog):
    """Tokens/s, FLOPs/s and MFU of training and of validation against a clock and against
    measure_flops, one validation point per validation at its step; the time to max_steps
    from the step time (the first step left out) and the validation time."""
    peak = 1e12  # the device's FLOP/s, as Lightning would look it up for a GPU it knows
    monkeypatch.setattr(
        "lightning.pytorch.callbacks.throughput_monitor.get_available_flops", lambda *a: peak
    )
    fake = FakeClock()
    monkeypatch.setattr(callbacks, "clock", fake)
    reads, read = [], callbacks.synced_clock  # where the clock is read after a sync (on a GPU)

    def clock(trainer):
        reads.append((trainer.global_step, "val" if trainer.validating else "train"))
        return read(trainer)

    monkeypatch.setattr(callbacks, "synced_clock", clock)
    caplog.set_level(logging.INFO, logger="slm")
    monitor = SyncFreeThroughputMonitor(
        lambda b: b[0].size(0), lambda b: b[0].numel(), window_size=3
    )
    eta = TimeToMaxSteps(val_every_n_steps=4, measure_seconds=2.0)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", log_every_n_steps=2, val_check_interval=4,
        check_val_every_n_epoch=None, num_sanity_val_steps=-1, logger=recorder,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor, eta, fake],
    )  # fmt: skip
    trainer.fit(GPTModule(**TINY_GPT, warmup_steps=1, max_steps=12), datamodule=Windows())

    # measure_flops by itself: a training batch forward and backward, a val window forward.
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY_GPT))
        x = torch.zeros(4, 16, dtype=torch.long)
        train_flops = measure_flops(model, lambda: model(x, x)[1], loss_fn=lambda loss: loss)
        val_flops = measure_flops(model, lambda: model(x[:1], x[:1])[1])
    assert train_flops > 2.5 * val_flops * 4  # backward costs about twice the forward

    logged = recorder.logged
    # Training: every batch 0.5 s on the clock; the 30 s first step, the validations and the
    # 7 s after each are outside the windows of the readings from step 5 on.
    train = dict(logged["train/device/items_per_sec"])
    assert {s: train[s] for s in (5, 7, 9, 11)} == {s: 4 * 16 / 0.5 for s in (5, 7, 9, 11)}
    flops = dict(logged["train/device/flops_per_sec"])
    assert flops[7] == pytest.approx(train_flops / 0.5, rel=1e-12)
    assert dict(logged["train/device/mfu"])[7] == pytest.approx(train_flops / 0.5 / peak)
    # Validation: one point per validation (not at step 0, the sanity check), at its step:
    # 10 windows of 16 tokens in 3 batches of 0.25 s, forward only.
    for key, value in [
        ("validate/device/items_per_sec", 10 * 16 / 0.75),
        ("validate/device/flops_per_sec", 10 * val_flops / 0.75),
        ("validate/device/mfu", 10 * val_flops / 0.75 / peak),
    ]:
        assert [s for s, _ in logged[key]] == [4, 8, 12]
        assert [v for _, v in logged[key]] == pytest.approx([value] * 3, rel=1e-12)

    # Time to max_steps: measured from step 1 over 2 s of steps (0.5 s each), validations
    # of 0.75 s; reported at step 5 (the pause of the step-4 validation left out): 7 steps
    # and 2 validations (8 and 12) to go.
    assert eta.estimate == pytest.approx({
        "step_seconds": 0.5, "tokens_per_second": 4 * 16 / 0.5, "val_seconds": 0.75,
        "validations": 2, "seconds": 7 * 0.5 + 2 * 0.75,
    })  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("speed:")]
    assert (
        len(lines) == 1 and "0.5 s/step, 128 tokens/s; 7 steps to trainer.max_steps=12" in lines[0]
    )
    assert "2 validations of ~0.75 s: about 5 s (until about " in lines[0]
    # Once the estimate is made, the clock waits for the device on logging steps only (every
    # 2nd step), once as training resumes after a validation, and 3 times in a validation.
    assert [r for r in reads if r[0] >= 6] == [
        (6, "train"), (8, "train"), *[(8, "val")] * 3, (8, "train"), (10, "train"),
        (12, "train"), *[(12, "val")] * 3,
    ]  # fmt: skip


def test_stop_signal_is_announced_outside_the_handler(capsys):
    """A print from the SIGINT handler, landing while the progress bar writes to stderr, raises
    'RuntimeError: reentrant call': the handler only records the request; the next batch end
    says it, once."""
    stop, before = StopOnSignal("unused.ckpt"), signal.getsignal(signal.SIGINT)
    stop.on_train_start(None, None)  # its handlers installed, as in a fit
    try:
        signal.raise_signal(signal.SIGINT)  # the handler runs before this returns
        assert stop.requested == signal.SIGINT and capsys.readouterr().err == ""
    finally:
        stop.on_train_end(None, None)  # the previous handlers back
    assert signal.getsignal(signal.SIGINT) is before
    accumulating = SimpleNamespace(fit_loop=SimpleNamespace(_should_accumulate=lambda: True))
    for _ in range(2):
        stop.on_train_batch_end(accumulating, None, None, None, 0)
    assert capsys.readouterr().err == (
        "\nSIGINT: stopping after this optimizer step (again to stop at once)\n"
    )
