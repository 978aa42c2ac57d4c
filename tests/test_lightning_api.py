"""The private Lightning APIs that slm relies on, one test each, on a real fit: a Lightning
release that changes one fails here, by name (pyproject.toml bounds lightning to the minor
version these pass with; bump the bound only with them passing)."""

from datetime import timedelta

import lightning as L
import pytest
from conftest import TINY_GPT, RandomWindows
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling
from torch.utils.data import DataLoader

from slm.model import GPT, GPTConfig
from slm.module import GPTModule
from slm.optim import build_optimizer


class Spy(L.Callback):
    def __init__(self):
        self.processed, self.accumulating, self.logging = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.processed.append(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.accumulating.append(trainer.fit_loop._should_accumulate())
        self.logging.append(trainer._logger_connector.should_update_logs)


class Steps(Logger):
    """The optimizer steps Lightning logs train/loss at."""

    name, version = "steps", 0

    def __init__(self):
        super().__init__()
        self.steps = []

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if "train/loss" in metrics:
            self.steps.append(step)


@pytest.fixture(scope="module")
def fit():
    """Four optimizer steps of two micro-batches each, logging every second step."""
    spy, logger = Spy(), Steps()
    module = GPTModule(**TINY_GPT, warmup_steps=1, max_steps=4)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", accumulate_grad_batches=2, log_every_n_steps=2,
        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[spy], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(RandomWindows(), batch_size=2))
    return spy, logger


def test_fit_loop_should_accumulate(fit):
    """Callbacks act at optimizer-step boundaries (ValidateAtEnd, StopOnSignal, RunHistory)."""
    spy, _ = fit
    assert spy.accumulating == [True, False] * 4


def test_logger_connector_should_update_logs(fit):
    """RunHistory, the throughput monitor and StopOnSignal read the device on the micro-batches
    after which Lightning logs, and only on those (slm.callbacks.is_logging_step)."""
    spy, logger = fit
    ends = [i for i, a in enumerate(spy.accumulating) if not a]  # micro-batches ending a step
    assert [spy.logging[i] for i in ends] == [False, True, False, True]
    assert logger.steps == [1, 3]  # Lightning's own logging: the same steps


def test_init_dist_connection(monkeypatch):
    """slm.strategy.agree_on_start joins the process group Lightning then uses, with
    dist_timeout, before Lightning would (so a start check failing on one rank stops all)."""
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.utilities.distributed import _init_dist_connection

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "0")
    env = LightningEnvironment()
    _init_dist_connection(env, "gloo", 0, 1, timeout=timedelta(seconds=30))
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()


def test_model_parallel_strategy_data_parallel_size():
    """slm.strategy.FSDP shards over every rank of every node: it sets ModelParallelStrategy's
    data-parallel size before the device mesh is built from it."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size=1)
    assert strategy._data_parallel_size == "auto"


def test_optimizer_handles_unscaling():
    """ClippableMixedPrecision unscales for the optimizers that would unscale in their step."""
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=64))
    assert _optimizer_handles_unscaling(build_optimizer(model, "adamw", fused=True))
    assert not _optimizer_handles_unscaling(build_optimizer(model, "adamw", fused=False))
    # Muon + fused AdamW: the wrapper is unscaled by Lightning, its fused part gets no scale
    assert not _optimizer_handles_unscaling(build_optimizer(model, "muon", fused=True))
