"""Precision, fused AdamW, clipping and compile: the GPU training path, run on the CPU with the
optimizer, precision plugin and compile settings built exactly as on CUDA."""

import json
import math

import lightning as L
import pytest
import torch
from conftest import GPUS, TINY_GPT, RandomWindows, tiny_cfg
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from slm import decode, precision, sample
from slm.evaluate import score
from slm.model import GPT, GPTConfig, KVCache
from slm.module import GPTModule
from slm.precision import ClippableMixedPrecision, trainer_precision
from slm.train import train


@pytest.mark.parametrize("name, capability, expected", GPUS)
def test_one_helper_decides_for_train_generate_and_evaluate(
    monkeypatch, name, capability, expected
):
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)
    assert precision.default_precision("cuda") == expected
    dtype = torch.bfloat16 if expected == "bf16-mixed" else torch.float16
    model = GPT(GPTConfig(**TINY_GPT))
    with pytest.warns(UserWarning, match="CUDA is not available"):  # autocast("cuda") here
        assert precision.inference_autocast("cuda")[1] == dtype  # evaluate.py
        # generate: the KV cache
        assert precision.inference_precision(model, torch.device("cuda"))[1] == dtype


def test_cpu_runs_in_fp32():
    assert precision.default_precision("cpu") == "32-true"
    model = GPT(GPTConfig(**TINY_GPT))
    assert precision.inference_precision(model, torch.device("cpu"))[1] == torch.float32


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
    module = GPTModule(
        **TINY_GPT, lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=steps, fused=True
    )
    spy = GradNormAtStep()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", plugins=[plugin], gradient_clip_val=0.5,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[spy], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(RandomWindows(), batch_size=4))
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
    model = GPT(GPTConfig(**TINY_GPT))
    x = torch.randint(0, 50257, (2, 16))
    explanation = torch._dynamo.explain(model.forward)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def losses_of(compile_mode, steps=3):
    torch.manual_seed(0)
    module = GPTModule(**TINY_GPT, lr=1e-3, min_lr=1e-4, warmup_steps=1, max_steps=steps,
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
    trainer.fit(module, DataLoader(RandomWindows(), batch_size=4))
    return module, losses


@pytest.mark.slow
def test_compile_true_trains_like_eager(monkeypatch):
    """Inductor compiles the GPT (not the LightningModule) on the CPU too."""
    compiled_fns, real_compile = [], torch.compile

    def spy(fn, *args, **kwargs):
        compiled_fns.append(fn)
        return real_compile(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    _, eager = losses_of(None)
    assert compiled_fns == []
    compiled_module, compiled = losses_of("default")
    assert compiled_fns == [compiled_module.model.forward]  # the GPT's, once
    assert compiled == pytest.approx(eager, rel=1e-4)
    # The checkpoint keys are the GPT's own: no torch.compile wrapper prefix.
    assert all(k.startswith("model.") for k in compiled_module.state_dict())


# -- CUDA's autocast rules on the CPU (conftest.cuda_autocast) --------------------------------
# On a GPU, generate() and SampleStories decode through the static cache in the autocast dtype,
# evaluation runs under autocast, and training under bf16-mixed or 16-mixed; and CUDA autocast
# keeps the norms in float32. Here the CPU is made to decide as a GPU does (default_precision,
# the static decode path) and given CUDA's float32 rule: the GPU's path, with the device changed.

FAMILIES = {
    "gpt2": {},
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu"),
    "qwen3": dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
    "modern": dict(positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True,
                   tie_embeddings=False),
}  # fmt: skip
MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
FAMILY_TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=8)


def family_model(family: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**FAMILY_TINY, **FAMILIES[family])).eval()


@pytest.fixture
def like_a_gpu(monkeypatch):
    """Make the CPU decide as a GPU whose precision is ``precision`` does."""

    def set_precision(prec: str) -> None:
        monkeypatch.setattr(precision, "default_precision", lambda device: prec)
        monkeypatch.setattr(decode, "static_shapes", lambda device: True)

    return set_precision


@pytest.mark.parametrize("prec", MIXED)
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_and_generate_under_cuda_autocast(
    cuda_autocast, like_a_gpu, monkeypatch, family, prec
):
    """The static decode step writes the float32 keys of qk_norm into a bf16/fp16 cache (what
    crashed generate.py and SampleStories on every GPU), and its logits are those of the fp32
    forward within the autocast dtype's precision; generate takes that path as on CUDA."""
    dtype = MIXED[prec]
    model = family_model(family)
    idx = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = model(idx)[0]  # fp32, no autocast
    like_a_gpu(prec)
    with torch.autocast("cpu", dtype=dtype):
        if model.config.qk_norm:  # the rule is in force: the norm returns float32, as on CUDA
            k = model.transformer.h[0].attn.k_norm(torch.ones(2, 8, dtype=dtype))
            assert k.dtype == torch.float32
        cache = KVCache(model.config, 2, "cpu", dtype)
        model(idx[:, :5], cache=cache)  # prefill: a slice of the cache written
        steps = [  # the static step: a position tensor, every slot read, masked
            model(idx[:, t : t + 1], cache=cache, pos=torch.tensor([t]), last_only=True)[0][:, -1]
            for t in range(5, 8)
        ]
    assert cache.k[0].dtype == cache.v[1].dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(torch.stack(steps, 1).float(), expected[:, 5:], atol=tol, rtol=0)
    # generate on the static path (eager, as on CUDA), across two context shifts
    decoded, forward = [], model.forward

    def spy(idx, targets=None, cache=None, pos=0, **kw):
        if torch.is_tensor(pos):  # a step, at a position tensor
            decoded.append(cache.k[0].dtype)
        return forward(idx, targets, cache, pos, **kw)

    monkeypatch.setattr(model, "forward", spy)
    out = sample.generate(model, idx[0, :3].tolist(), 12, temperature=0, stop_token=None)
    shifts = 0 if model.config.positions == "rope" else 2  # learned: refilled, not decoded
    assert len(out[0]) == 12 and decoded == [dtype] * (11 - shifts)


@pytest.mark.parametrize("family, prec", [("qwen3", "bf16-mixed"), ("gpt2", "16-mixed")])
def test_compiled_generate_under_cuda_autocast(cuda_autocast, like_a_gpu, family, prec):
    """The compiled decode step (generate.py's compile=auto on a GPU) under CUDA's rules: the
    A100/H100 case (bf16) with qk_norm, and the T4 case (fp16). Each compiles for a few
    seconds: the other families and dtypes share the eager test's code."""
    like_a_gpu(prec)
    model = family_model(family)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = sample.generate(model, [1, 2, 3], 12, temperature=0, stop_token=None, compile=True)
    assert len(out[0]) == 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # compiled
    assert decode.shared(model, 1).cache.k[0].dtype == MIXED[prec]


@pytest.mark.parametrize("prec", MIXED)
@pytest.mark.parametrize("family", FAMILIES)
def test_training_validation_and_evaluation_under_cuda_autocast(
    cuda_autocast, like_a_gpu, tmp_path, family, prec
):
    """Two optimizer steps and a validation under ClippableMixedPrecision with fused AdamW,
    as train() sets them up for a GPU of ``prec``; then slm.evaluate's score under the
    autocast that default_precision picks, against the fp32 score."""
    torch.manual_seed(0)
    arch = dict(**FAMILY_TINY, **FAMILIES[family], vocab_size=256)
    module = GPTModule(**arch, lr=1e-3, warmup_steps=1, max_steps=2, fused=True)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", gradient_clip_val=1.0, val_check_interval=2,
        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_precision(prec, "cpu"),
    )  # fmt: skip
    loader = DataLoader(RandomWindows(FAMILY_TINY["block_size"], 256), batch_size=2)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 2 and math.isfinite(module.last_val_loss)
    assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before))

    tokens = tmp_path / "tokens.bin"
    torch.randint(0, 256, (40,)).numpy().astype("uint16").tofile(tokens)
    expected = score(module.model, tokens, 40, 100, batch_size=4, name="tokens")["val_loss"]
    like_a_gpu(prec)
    got = score(module.model, tokens, 40, 100, batch_size=4, name="tokens")["val_loss"]
    assert got == pytest.approx(expected, abs=2e-2 if prec == "bf16-mixed" else 4e-3)


# -- fp16 loss scaling: an overflowed step, a skipped backward -------------------------------


class Overflow(L.Callback):
    """An inf in one gradient after the backward of micro-batch ``at`` (an fp16 overflow, where
    GradScaler must find it); the weights, the optimizer's state (moments, momentum, step
    counts) and the loss scale around every optimizer step."""

    def __init__(self, at: int):
        self.at, self.micro = at, 0
        self.before, self.after, self.scales, self.states = [], [], [], []

    def _weights(self, pl_module):
        return [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.before.append(self._weights(pl_module))
            self.scales.append(trainer.precision_plugin.scaler.get_scale())
            state = trainer.optimizers[0].state.values()
            self.states.append([t.clone() for s in state for t in s.values()])

    def on_after_backward(self, trainer, pl_module):
        if self.micro == self.at:
            pl_module.model.lm_head.weight.grad[0, 0] = float("inf")
        self.micro += 1

    def on_train_end(self, trainer, pl_module):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        state = trainer.optimizers[0].state.values()
        self.states.append([t.clone() for s in state for t in s.values()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.after.append(self._weights(pl_module))


def fit_fp16_steps(module, callbacks, steps=3, accumulate=1):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", accumulate_grad_batches=accumulate,
        plugins=[ClippableMixedPrecision("16-mixed", "cpu", scaler=scaler)],
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(RandomWindows(), batch_size=2))
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_overflowed_fp16_step_is_skipped(optimizer, accumulate):
    """16-mixed with fused AdamW (alone, or beside Muon): an inf gradient in the first
    micro-batch of step 1 skips that step (weights and optimizer state unchanged) and halves
    the loss scale; the steps before and after train, and nothing turns NaN."""
    torch.manual_seed(0)
    module = GPTModule(**TINY_GPT, warmup_steps=1, max_steps=3, fused=True, optimizer=optimizer)
    spy = Overflow(at=accumulate)
    fit_fp16_steps(module, [spy], accumulate=accumulate)
    assert spy.scales == [2.0**10, 2.0**10, 2.0**9, 2.0**9]
    for step, (before, after) in enumerate(zip(spy.before, spy.after)):
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
        assert unchanged == (step == 1), step
    s1, s2, end = spy.states[1:]
    assert len(s1) == len(s2) > 0 and all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert all(torch.isfinite(t).all() for t in end + spy.after[-1])


def test_a_skipped_backward_is_not_unscaled():
    """A training_step that returns None (Lightning skips the backward and the step) under
    16-mixed with fused AdamW: nothing is unscaled, so the next step's unscale is allowed."""

    class SkipSecond(GPTModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx == 1 else loss

    torch.manual_seed(0)
    module = SkipSecond(**TINY_GPT, warmup_steps=1, max_steps=3, fused=True)
    spy = Overflow(at=-1)
    trainer = fit_fp16_steps(module, [spy])
    assert trainer.global_step == 3
    moved = [not all(torch.equal(a, b) for a, b in zip(*w)) for w in zip(spy.before, spy.after)]
    assert moved == [True, False, True]
