"""The callbacks' hot-path behaviour: nothing waits for the device on steps that log nothing."""

import signal
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.fabric.utilities.throughput import Throughput
from test_precision import TINY, Tokens
from torch.utils.data import DataLoader

from slm.callbacks import RunHistory, StopOnSignal, SyncFreeThroughputMonitor
from slm.module import GPTModule


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
    module = GPTModule(**TINY, warmup_steps=1, max_steps=12)
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", log_every_n_steps=4, accumulate_grad_batches=accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[monitor, history], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Tokens(), batch_size=4))
    # Optimizer steps 3, 7 and 11 log; every micro-batch's samples and tokens are counted.
    assert [u["batches"] for u in updates] == [4 * accumulate, 8 * accumulate, 12 * accumulate]
    assert [u["samples"] for u in updates] == [16 * accumulate, 32 * accumulate, 48 * accumulate]
    assert [u["lengths"] for u in updates] == [u["samples"] * 16 for u in updates]
    assert [s for s, _ in history.train] == [3, 7, 11]
    assert history.tokens == 12 * accumulate * 4 * 16


def test_stop_signal_is_announced_outside_the_handler(capsys):
    """A print from the SIGINT handler, landing while the progress bar writes to stderr, raises
    'RuntimeError: reentrant call': the handler only records the request; the next batch end
    says it, once."""
    stop = StopOnSignal("unused.ckpt")
    stop._handler(signal.SIGINT, None)
    assert stop.requested == signal.SIGINT and capsys.readouterr().err == ""
    accumulating = SimpleNamespace(fit_loop=SimpleNamespace(_should_accumulate=lambda: True))
    for _ in range(2):
        stop.on_train_batch_end(accumulating, None, None, None, 0)
    assert capsys.readouterr().err == (
        "\nSIGINT: stopping after this optimizer step (again to stop at once)\n"
    )
