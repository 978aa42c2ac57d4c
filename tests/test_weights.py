"""Inference weights in fewer bytes (slm.weights): each format against fp32, through every
decoding policy, eager and compiled, and on the GPU's path under CUDA's autocast rules."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import reference, template_stories

from slm import decode, precision, tokenizer, weights
from slm.checkpoint import load_model, save_slm_pt
from slm.engine import Engine, Request
from slm.errors import CheckpointError
from slm.export import export
from slm.model import GPT
from slm.sample import generate
from slm.stories import complete_batch
from slm.weights import FORMATS, PackedLinear, onednn_bf16, pack, quantize, resolve, weight_bytes

TOK = tokenizer.gpt2()
HALVES = ("bf16", "fp16", "int8")


@pytest.fixture(scope="module")
def packed(story_model) -> dict[str, GPT]:
    """The trained story model in every format (fp32 packed too: its compiled GEMVs)."""
    return {f: pack(copy.deepcopy(story_model), f) for f in ("fp32", *HALVES)}


def loss(model: GPT, ids: torch.Tensor) -> float:
    return model(ids[:, :-1], ids[:, 1:])[1].item()


@pytest.mark.parametrize("fmt, tolerance", [("fp32", 0), ("bf16", 4e-3), ("fp16", 1e-3),
                                            ("int8", 1e-2)])  # fmt: skip
def test_each_format_computes_the_fp32_model_within_its_precision(story_model, packed, fmt,
                                                                  tolerance):  # fmt: skip
    """Logits (as log-probabilities) and loss on held-out template stories, against fp32:
    the formats round the weights (bf16 keeps 8 bits, fp16 11, int8 a 1/127 step of each
    row's largest weight), not what is computed from them."""
    ids = torch.tensor(template_stories(40)[-20 * 33 :]).view(20, 33)
    want = F.log_softmax(story_model(ids[:, :-1])[0], -1)
    got = F.log_softmax(packed[fmt](ids[:, :-1])[0], -1)
    probable = want > math.log(0.01)  # the tokens the model gives some chance
    assert (got - want)[probable].abs().max() <= 30 * tolerance
    assert abs(loss(packed[fmt], ids) / loss(story_model, ids) - 1) <= tolerance


def test_packing_stores_the_bytes_it_says(story_model, packed):
    fp32 = weight_bytes(story_model)
    assert weight_bytes(packed["fp32"]) == fp32
    for fmt, ratio in (("bf16", 2), ("fp16", 2), ("int8", 4)):  # int8: + a scale per row
        assert fp32 / ratio <= weight_bytes(packed[fmt]) <= 1.15 * fp32 / ratio, fmt
        m = packed[fmt]
        table = m.transformer.wte.weight
        if m.lm_head.onednn:  # bf16 in oneDNN's layout: the embedding keeps rows
            x = torch.randn(3, m.config.n_embd)
            assert torch.equal(m.lm_head(x), F.linear(x.bfloat16(), table).float())
        else:
            assert m.lm_head.weight is table  # tied: one table
        assert table.dtype == (torch.int8 if fmt == "int8" else getattr(torch, {
            "bf16": "bfloat16", "fp16": "float16"}[fmt]))  # fmt: skip
        assert m.transformer.h[0].attn.c_attn.weight.dtype == table.dtype == m.lm_head.weight.dtype


@pytest.mark.skipif(not onednn_bf16(torch.device("cpu")), reason="oneDNN computes no bf16 here")
@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_in_onednns_layout_is_the_plain_bf16_matmul(monkeypatch, compiled):
    """bf16 weights stored in oneDNN's blocked layout (torch.ops.mkldnn's reorder and linear,
    which slm relies on) give exactly the plain bf16 matmul, eager and compiled, at decoding's
    and evaluation's shapes, with a bias; and a CPU without oneDNN's bf16 keeps the plain one."""
    w, b = torch.randn(300, 64) * 0.05, torch.randn(300)
    fast = PackedLinear(w.bfloat16(), None, b)
    monkeypatch.setattr(weights, "onednn_bf16", lambda device: False)
    plain = PackedLinear(w.bfloat16(), None, b)
    assert fast.onednn and fast.weight.is_mkldnn and not plain.onednn
    run = (
        torch.compile(lambda m, x: m(x) * 2, fullgraph=True)
        if compiled
        else (lambda m, x: m(x) * 2)
    )
    for shape in ((1, 1, 64), (8, 1, 64), (2, 17, 64)):  # decoding's and evaluation's
        x = torch.randn(shape)
        want = 2 * (F.linear(x.bfloat16(), w.bfloat16()) + b)
        assert torch.equal(run(fast, x), want) and torch.equal(run(plain, x), want), shape


def test_int8_rows_are_symmetric_per_channel():
    w = torch.randn(5, 64) * torch.tensor([1e-3, 1e-2, 0.1, 1.0, 10.0])[:, None]
    q, scale = quantize(w)
    assert q.dtype == torch.int8 and q.abs().amax(1).tolist() == [127] * 5
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-9).all()
    assert quantize(torch.zeros(2, 8))[0].abs().sum() == 0  # no division by zero


def prompts() -> list[list[int]]:
    texts = ["Tom had a", "Once upon a time there was", "Lily", "Ben and the dog went to the"]
    return [[TOK.eot_id, *TOK.encode(t)] for t in texts]


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_greedy_tokens_of_every_policy_are_the_formats_reference(packed, fmt):
    """generate (across context shifts), the story suite's ragged batch and the server's
    engine, each on the packed model, give the tokens of decoding that same packed model by
    recomputing the whole window every step."""
    model, ps = packed[fmt], prompts()
    for p in ps:
        assert generate(model, p, 60, temperature=0, stop_token=None)[0] == reference(model, p, 60)
    block = model.config.block_size
    batch = complete_batch(model, ps, 12, 0.0, None, None, None, stop_token=-1)
    assert [ids for ids, _ in batch] == [reference(model, p, min(12, block - len(p))) for p in ps]
    engine = Engine(model, TOK, max_batch=8)
    engine.start()
    try:
        texts, done = {}, threading.Semaphore(0)

        def emit(i):
            def on(event):
                assert event.kind != "error", event.text
                texts[i] = texts.get(i, "") + event.text
                if event.kind == "finish":
                    done.release()

            return on

        engine.submit([Request(p, 40, emit=emit(i), temperature=0) for i, p in enumerate(ps)])
        for _ in ps:
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    for i, p in enumerate(ps):
        ref = reference(model, p, 40)
        ref = ref[: ref.index(TOK.eot_id)] if TOK.eot_id in ref else ref
        assert texts[i] == TOK.decode(ref)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_the_compiled_step_streams_the_packed_weights(packed, fmt):
    """The compiled step (batch 1: each matmul a reduction that streams the weight) gives the
    eager step's greedy tokens, across context shifts."""
    model, p = packed[fmt], prompts()[0]
    eager = generate(model, p, 60, temperature=0, stop_token=None)
    assert generate(model, p, 60, temperature=0, stop_token=None, compile=True) == eager


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_the_gpus_path_under_cuda_autocast(cuda_autocast, monkeypatch, story_model, fmt):
    """As on a GPU: bf16 autocast and cache, every step reading all slots (static shapes),
    compiled; norms returning float32 as under CUDA autocast. A RoPE + qk_norm model, so the
    float32 keys meet the bf16 cache; its greedy tokens equal the eager static path's."""
    monkeypatch.setattr(precision, "default_precision", lambda device: "bf16-mixed")
    monkeypatch.setattr(decode, "static_shapes", lambda device: True)
    config = dataclasses.replace(story_model.config, positions="rope", norm="rmsnorm",
                                 qk_norm=True, mlp="swiglu", tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = pack(GPT(config).eval(), fmt)
    eager = generate(model, [1, 2, 3], 40, temperature=0, stop_token=None)
    assert generate(model, [1, 2, 3], 40, temperature=0, stop_token=None, compile=True) == eager
    assert decode.shared(model, 1).cache.k[0].dtype == torch.bfloat16


def test_auto_picks_a_format_the_device_has(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve("auto", cpu) in ("fp32", "bf16", "fp16")
    assert [resolve(f, cpu) for f in FORMATS[1:]] == list(FORMATS[1:])
    for capability, fmt in (((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16")):
        monkeypatch.setattr("torch.cuda.get_device_capability", lambda d=None, c=capability: c)
        assert resolve("auto", torch.device("cuda")) == fmt
    with pytest.raises(ValueError, match="weights=int4 is not one of auto, fp32"):
        resolve("int4", cpu)


def test_packed_weights_are_no_checkpoint(packed, story_model, tmp_path):
    """A state dict of packed weights saved as a slm.pt is refused in one line, by every
    command that loads one (export among them), naming what to pass instead."""
    m = packed["int8"]
    path = tmp_path / "slm.pt"
    save_slm_pt(path, m.config, m.state_dict(), 1)
    for load in (load_model, lambda p: export(p, tmp_path / "out")):
        with pytest.raises(CheckpointError, match="int8 inference weights .* pass the slm.pt") as e:
            load(path)
        assert "\n" not in str(e.value)
    save_slm_pt(tmp_path / "fp32.pt", story_model.config, story_model.state_dict(), 1)
    assert load_model(tmp_path / "fp32.pt").config == story_model.config


def test_evaluate_scores_a_format_beside_fp32(story_model, tmp_path, capsys):
    """``python -m slm.evaluate weights=int8``: the int8 model's loss and bits per byte, and
    fp32's on the same text beside them."""
    from conftest import write_txt

    from slm.evaluate import main

    stories = TOK.decode(template_stories(60)).split("<|endoftext|>")
    txt = write_txt(tmp_path / "stories.txt", [s.strip() for s in stories if s.strip()])
    save_slm_pt(tmp_path / "slm.pt", story_model.config, story_model.state_dict(), 1, TOK)
    ckpt = tmp_path / "slm.pt"
    fp32 = main([f"ckpt={ckpt}", f"text={txt}", "device=cpu"])
    int8 = main([f"ckpt={ckpt}", f"text={txt}", "device=cpu", "weights=int8"])
    assert "weights" not in fp32 and int8["weights"] == "int8"
    assert int8["fp32"] == {k: fp32[k] for k in ("val_loss", "val_ppl", "val_bpb")}
    assert int8["val_bpb"] != fp32["val_bpb"]  # it did score the int8 weights
    assert int8["bpb_change"] == pytest.approx(int8["val_bpb"] / fp32["val_bpb"] - 1)
    assert abs(int8["bpb_change"]) < 0.01
