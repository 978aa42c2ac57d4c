import math

import lightning as L
import pytest
import torch
from conftest import RandomWindows
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from slm.module import GPTModule, lr_at
from slm.precision import ClippableMixedPrecision

LR, MIN_LR, WARMUP, MAX = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, LR / WARMUP),  # the first step already trains
        (WARMUP - 1, LR),  # end of warmup
        (WARMUP, LR),  # cosine starts at the top
        (WARMUP + (MAX - WARMUP) // 2, (LR + MIN_LR) / 2),  # midpoint of the decay
        (MAX, MIN_LR),  # the end
        (MAX + 50, MIN_LR),
    ],
)
def test_schedule_values(step, expected):
    assert lr_at(step, LR, MIN_LR, WARMUP, MAX) == pytest.approx(expected, rel=1e-12)


def test_schedule_without_warmup_and_monotone_decay():
    assert lr_at(0, LR, MIN_LR, 0, MAX) == pytest.approx(LR)
    lrs = [lr_at(s, LR, MIN_LR, WARMUP, MAX) for s in range(WARMUP, MAX + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_min_lr_above_lr_is_rejected():
    with pytest.raises(ValueError, match="min_lr=0.01 is above lr=0.001"):
        GPTModule(n_layer=1, n_head=1, n_embd=8, block_size=8, lr=1e-3, min_lr=1e-2)


class RecordLR(Callback):
    def __init__(self):
        self.lrs, self.steps = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_schedule_counts_optimizer_steps_in_trainer(accumulate, tmp_path):
    """Under Lightning, optimizer step k uses lr_at(k) whatever the gradient accumulation."""
    max_steps, warmup = 8, 3
    module = GPTModule(
        n_layer=1, n_head=1, n_embd=8, block_size=8, lr=1e-2, min_lr=1e-3,
        warmup_steps=warmup, max_steps=max_steps,
    )  # fmt: skip
    rec = RecordLR()
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=accumulate, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[rec], limit_val_batches=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(RandomWindows(block=8, n=10_000), batch_size=2))
    assert trainer.global_step == max_steps
    assert rec.steps == list(range(max_steps))
    expected = [lr_at(s, 1e-2, 1e-3, warmup, max_steps) for s in range(max_steps)]
    assert rec.lrs == pytest.approx(expected, rel=1e-9)
    assert rec.lrs[warmup - 1] == pytest.approx(1e-2)


def test_fused_adamw_only_on_cuda_and_decay_groups(tmp_path):
    module = GPTModule(n_layer=1, n_head=1, n_embd=8, block_size=8, max_steps=10)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    conf = module.configure_optimizers()
    opt = conf["optimizer"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert not opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_val_loss_is_token_weighted_mean_and_ppl(tmp_path):
    module = GPTModule(n_layer=1, n_head=1, n_embd=8, block_size=8, max_steps=10)
    logger = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", logger=logger, enable_progress_bar=False, default_root_dir=tmp_path,
        enable_model_summary=False,
    )  # fmt: skip
    data = RandomWindows(block=8, n=10_000)
    loader = DataLoader(torch.utils.data.Subset(data, range(5)), batch_size=2)  # 2, 2, 1
    trainer.validate(module, loader, verbose=False)
    with torch.no_grad():
        losses = [module(x[None], y[None])[1] for x, y in (data[i] for i in range(5))]
    expected = torch.stack(losses).mean().item()  # every window has the same token count
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-5)
    [(metrics, step)] = logger.logged
    assert step == 0  # the optimizer step the weights are from
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


class Recorder(Logger):
    def __init__(self):
        super().__init__()
        self.logged = []

    name = "recorder"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.append((metrics, step))


def test_checkpoint_hparams_are_primitives(tmp_path):
    module = GPTModule(n_layer=1, n_head=1, n_embd=8, block_size=8, betas=[0.9, 0.95])
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # no arbitrary objects inside
    assert ckpt["hyper_parameters"]["n_embd"] == 8
    loaded = GPTModule.load_from_checkpoint(path)
    assert loaded.config == module.config


def test_train_loss_is_the_mean_of_the_steps_micro_batches(tmp_path):
    """Under gradient accumulation train/loss (TensorBoard, loss.png, the divergence check) is
    the optimizer step's mean loss, not its last micro-batch's."""

    class MicroLosses(Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():  # the weights this micro-batch trains with
                self.losses.append(pl_module.model(*batch)[1].item())

    torch.manual_seed(0)
    module = GPTModule(n_layer=1, n_head=1, n_embd=8, block_size=8, warmup_steps=1, max_steps=3)
    micro, logger = MicroLosses(), Recorder()
    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1, accelerator="cpu",
        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[micro], limit_val_batches=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(RandomWindows(block=8, n=10_000), batch_size=2))
    logged = [m["train/loss"] for m, _ in logger.logged if "train/loss" in m]
    pairs = list(zip(micro.losses[::2], micro.losses[1::2]))
    assert logged == pytest.approx([(a + b) / 2 for a, b in pairs], rel=1e-6)
    assert max(abs(a - b) for a, b in pairs) > 1e-3  # so the last one alone is not the mean


class RecordGroups(Callback):
    """The step and every param group's settings at each optimizer step."""

    def __init__(self):
        self.steps, self.groups = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append(trainer.global_step)
        self.groups.append(
            [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_goes_on_with_this_runs_settings(tmp_path, optimizer):
    """A checkpoint of a CPU run (fused=False) resumed on fp16 with fused AdamW (a T4), a higher
    lr (allow_schedule_change), other weight decay, betas and Muon settings: from the first
    resumed step the lrs are the new schedule's, and every setting is this run's."""
    arch = dict(n_layer=1, n_head=2, n_embd=8, block_size=8, warmup_steps=2, optimizer=optimizer)
    old = dict(lr=3e-3, min_lr=3e-4, max_steps=4, weight_decay=0.1, betas=(0.9, 0.95),
               fused=False, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)  # fmt: skip
    new = dict(lr=1e-2, min_lr=1e-3, max_steps=8, weight_decay=0.05, betas=(0.8, 0.99),
               fused=True, muon_lr=0.05, muon_momentum=0.9, muon_weight_decay=0.01)  # fmt: skip
    loader = DataLoader(RandomWindows(block=8, n=10_000), batch_size=2)
    common = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                  gradient_clip_val=1.0)  # fmt: skip
    trainer = L.Trainer(max_steps=4, enable_checkpointing=False, **common)
    trainer.fit(GPTModule(**arch, **old), loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    rec = RecordGroups()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = ClippableMixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer = L.Trainer(max_steps=8, plugins=[plugin], callbacks=[rec], **common)
    trainer.fit(GPTModule(**arch, **new), loader, ckpt_path=tmp_path / "last.ckpt")
    assert rec.steps == [4, 5, 6, 7]
    bases = [new["lr"]] * 2 if optimizer == "adamw" else [new["muon_lr"], new["lr"], new["lr"]]
    for step, groups in zip(rec.steps, rec.groups):
        factor = lr_at(step, new["lr"], new["min_lr"], 2, 8) / new["lr"]
        assert [g["lr"] for g in groups] == pytest.approx([b * factor for b in bases], rel=1e-12)
    groups = rec.groups[0]
    adamw = groups[-2:]
    assert [g["weight_decay"] for g in adamw] == [0.05, 0.0]
    assert all(tuple(g["betas"]) == (0.8, 0.99) and g["fused"] for g in adamw)
    if optimizer == "muon":
        assert (groups[0]["momentum"], groups[0]["weight_decay"]) == (0.9, 0.01)
