"""Precision, fused AdamW, clipping and compile: the GPU training path, run on the CPU with the
optimizer, precision plugin and compile settings built exactly as on CUDA."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from test_config import GPUS
from test_train import tiny_cfg
from torch.utils.data import DataLoader, Dataset

from slm import precision
from slm.model import GPT, GPTConfig
from slm.module import GPTModule
from slm.precision import ClippableMixedPrecision, trainer_precision
from slm.sample import _precision
from slm.train import train

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


@pytest.mark.parametrize("name, capability, expected", GPUS)
def test_one_helper_decides_for_train_generate_and_evaluate(
    monkeypatch, name, capability, expected
):
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)
    assert precision.default_precision("cuda") == expected
    dtype = torch.bfloat16 if expected == "bf16-mixed" else torch.float16
    model = GPT(GPTConfig(**TINY))
    with pytest.warns(UserWarning, match="CUDA is not available"):  # autocast("cuda") here
        assert precision.inference_autocast("cuda")[1] == dtype  # evaluate.py
        assert _precision(model, torch.device("cuda"))[1] == dtype  # generate: the KV cache


def test_cpu_runs_in_fp32():
    assert precision.default_precision("cpu") == "32-true"
    model = GPT(GPTConfig(**TINY))
    assert _precision(model, torch.device("cpu"))[1] == torch.float32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from slm.prepare import prepare

    d = tmp_path_factory.mktemp("prec")
    src = d / "stories.txt"
    src.write_text(
        "\n<|endoftext|>\n".join(f"Tom had {i % 7} red balls. He played." for i in range(200))
    )
    prepare(str(src), d / "data", val_fraction=0.1)
    return d / "data", f"data.source={src}"


@pytest.mark.slow
@pytest.mark.parametrize("prec", ["bf16-mixed", "32-true"])
def test_fused_adamw_with_clipping_trains(prepared, tmp_path, prec):
    """The crash of every GPU run: fused AdamW + gradient_clip_val=1.0 under Lightning's AMP
    plugin ('does not allow for gradient clipping'), reproduced with the CPU's fused AdamW."""
    data, source = prepared
    run = tmp_path / "run"
    cfg = tiny_cfg(data, run, source, "data.val_fraction=0.1", "trainer.max_steps=6",
                   "val_every_n_steps=3", "optim.warmup_steps=1",
                   f"trainer.precision={prec}", "optim.fused=true")  # fmt: skip
    assert cfg.trainer.gradient_clip_val == 1.0
    train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"]) == ("completed", 6)
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True


class Tokens(Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        t = torch.randint(0, 50257, (17,), generator=torch.Generator().manual_seed(i))
        return t[:-1], t[1:]


class GradNormAtStep(L.Callback):
    """The gradients that the optimizer's own step sees (a step pre-hook)."""

    def __init__(self):
        self.norms, self.scales = [], []

    def on_train_start(self, trainer, pl_module):
        def hook(opt, args, kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            self.scales.append(getattr(opt, "grad_scale", None))

        trainer.optimizers[0].register_step_pre_hook(hook)


def fit_fp16(plugin, steps=3):
    torch.manual_seed(0)
    module = GPTModule(**TINY, lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=steps, fused=True)
    spy = GradNormAtStep()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", plugins=[plugin], gradient_clip_val=0.5,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[spy], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Tokens(), batch_size=4))
    return spy, trainer


def test_fp16_loss_scaling_unscales_before_clipping():
    """16-mixed with a GradScaler and fused AdamW (the T4 profile), on the CPU's fp16 autocast:
    the gradients reach the optimizer unscaled and clipped to gradient_clip_val."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    spy, trainer = fit_fp16(ClippableMixedPrecision("16-mixed", "cpu", scaler=scaler))
    assert trainer.global_step == 3
    assert all(s is None for s in spy.scales)  # nothing left for the fused kernel to unscale
    assert all(n <= 0.5 + 1e-3 for n in spy.norms), spy.norms
    assert all(n > 0.1 for n in spy.norms)  # unscaled: not the clipped-then-divided 0.5 / 4096


def test_lightning_alone_refuses_fused_clipping():
    """What ClippableMixedPrecision is for (if Lightning ever allows it, drop the subclass)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit_fp16(MixedPrecision("16-mixed", "cpu", scaler=scaler), steps=1)


def test_trainer_precision_kwargs():
    assert trainer_precision("32-true", "cpu") == {"precision": "32-true"}
    [plugin] = trainer_precision("bf16-mixed", "gpu")["plugins"]
    assert isinstance(plugin, ClippableMixedPrecision)
    assert (plugin.precision, plugin.device, plugin.scaler) == ("bf16-mixed", "cuda", None)


@pytest.mark.slow
def test_compiled_gpt_has_no_graph_break():
    model = GPT(GPTConfig(**TINY))
    x = torch.randint(0, 50257, (2, 16))
    explanation = torch._dynamo.explain(model.forward)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def losses_of(compile_mode, steps=3):
    torch.manual_seed(0)
    module = GPTModule(**TINY, lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=steps,
                       compile=compile_mode)  # fmt: skip
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *args):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Record()], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(Tokens(), batch_size=4))
    return module, losses


@pytest.mark.slow
def test_compile_true_trains_like_eager():
    """Inductor compiles the GPT (not the LightningModule) on the CPU too."""
    eager_module, eager = losses_of(None)
    compiled_module, compiled = losses_of("default")
    assert eager_module._compiled is None and compiled_module._compiled is not None
    assert compiled == pytest.approx(eager, rel=1e-4)
    # The checkpoint keys are the GPT's own: no torch.compile wrapper prefix.
    assert all(k.startswith("model.") for k in compiled_module.state_dict())
