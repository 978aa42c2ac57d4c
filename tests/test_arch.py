"""The architecture knobs: RoPE, RMSNorm, SwiGLU / ReLU^2, QK-norm, untied head; the KV cache
with RoPE across a context shift; old checkpoints still load."""

import contextlib
import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from slm import decode, precision
from slm.checkpoint import load_model
from slm.config import ConfigError, compose, validate
from slm.model import GPT, MLP, GPTConfig, KVCache, RMSNorm, apply_rope, rope_cache
from slm.module import GPTModule
from slm.sample import generate

BASE = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50257)
KNOBS = {
    "positions": ["learned", "rope"],
    "norm": ["layernorm", "rmsnorm"],
    "mlp": ["gelu", "swiglu", "relu2"],
    "qk_norm": [False, True],
    "tie_embeddings": [True, False],
}
COMBOS = [dict(zip(KNOBS, values)) for values in itertools.product(*KNOBS.values())]
MODERN = dict(positions="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False)


def make(vocab_size: int = 50257, **knobs) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(BASE, vocab_size=vocab_size, **knobs)).eval()


@pytest.mark.parametrize("knobs", COMBOS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_every_combination_shapes_causality_and_cache(knobs):
    model = make(vocab_size=500, **knobs)  # a small vocab: 48 combinations stay fast
    idx = torch.randint(0, 500, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 500) and loss.shape == ()
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 500
    out, _ = model(changed)
    torch.testing.assert_close(out[:, :9], logits[:, :9])  # the past never sees the future
    assert not torch.allclose(out[:, 9], logits[:, 9])
    # prefill, a chunk, then one position per step through the cache == the full forward
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    parts = [model(idx[:, :5], cache=cache)[0], model(idx[:, 5:9], cache=cache, pos=5)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache, pos=t)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), logits, atol=1e-5, rtol=1e-5)
    # the static step: a position tensor, every cache slot read, masked to those <= pos
    static = KVCache(model.config, 2, "cpu", torch.float32)
    model(idx[:, :9], cache=static)
    steps = [step(model, idx[:, t : t + 1], torch.tensor([t]), static) for t in range(9, 16)]
    torch.testing.assert_close(torch.stack(steps, 1), logits[:, 9:], atol=1e-5, rtol=1e-5)


def step(model: GPT, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The decoder's step: one token per row at its slot ``pos``, all block_size slots read."""
    return model(idx, cache=cache, pos=pos, last_only=True)[0][:, -1]


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_decode_with_a_position_per_row(positions):
    """Rows at different cache slots in one step (a server's batch): row b at pos[b] gets the
    logits of its own sequence's next position, and writes only its own slot."""
    model = make(vocab_size=500, positions=positions, qk_norm=True)
    idx = torch.randint(0, 500, (2, 16))
    full, _ = model(idx)
    static = KVCache(model.config, 2, "cpu", torch.float32)
    model(idx[:, :9], cache=static)  # both rows filled up to slot 8
    for t in range(9, 11):  # row 1 moves two slots ahead; row 0 rewrites its slot 9
        step(model, idx[:, t : t + 1], torch.tensor([9, t]), static)
    got = step(model, torch.stack([idx[0, 9], idx[1, 11]])[:, None], torch.tensor([9, 11]), static)
    torch.testing.assert_close(got[0], full[0, 9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], full[1, 11], atol=1e-5, rtol=1e-5)


FAMILIES = {
    "gpt2": {},
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu"),
    "qwen3": dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
    "modern": MODERN,
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_or_fp16_cache_under_fp32_activations(family, dtype, monkeypatch):
    """Every write into a cache casts into its dtype: a bf16/fp16 cache takes the fp32
    activations (a server's half-size cache; CUDA autocast's float32 qk_norm keys), through
    the growing cache, the static decode step and generate."""
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(BASE, block_size=8, **FAMILIES[family])).eval()
    idx = torch.randint(0, 50257, (2, 8))
    expected = model(idx)[0]
    growing, static = (KVCache(model.config, 2, "cpu", dtype) for _ in range(2))
    got = [model(idx[:, :5], cache=growing)[0]]
    got += [model(idx[:, t : t + 1], cache=growing, pos=t)[0] for t in range(5, 8)]
    model(idx[:, :5], cache=static)
    steps = [step(model, idx[:, t : t + 1], torch.tensor([t]), static) for t in range(5, 8)]
    assert growing.k[1].dtype == static.v[1].dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # the cache's rounding
    torch.testing.assert_close(torch.cat(got, 1), expected, atol=tol, rtol=0)
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, 5:], atol=tol, rtol=0)
    # generate with such a cache, eager and with static shapes, across context shifts
    monkeypatch.setattr(
        precision, "inference_precision", lambda *_: (contextlib.nullcontext(), dtype)
    )
    for static in (False, True):
        monkeypatch.setattr(decode, "static_shapes", lambda device, s=static: s)
        assert len(generate(model, [1, 2, 3], 12, temperature=0, stop_token=None)[0]) == 12


def test_defaults_are_gpt2():
    assert (BASE.positions, BASE.norm, BASE.mlp) == ("learned", "layernorm", "gelu")
    assert not BASE.qk_norm and BASE.tie_embeddings
    model = make()
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.LayerNorm)
    assert model.lm_head.weight is model.transformer.wte.weight


# GPT-2 at n_embd=32, 2 layers: 2 x (qkv 3C^2 + proj C^2 + mlp 8C^2 + 2 norm gains C) + ln_f C
GPT2_NON_EMB = 2 * (12 * 32 * 32 + 2 * 32) + 32  # 24,736
WTE, WPE = 50304 * 32, 16 * 32


@pytest.mark.parametrize(
    "knobs, embedding, non_embedding",
    [
        ({}, WTE + WPE, GPT2_NON_EMB),
        ({"positions": "rope"}, WTE, GPT2_NON_EMB),  # no wpe; the rotation has no weights
        ({"norm": "rmsnorm"}, WTE + WPE, GPT2_NON_EMB),  # a gain, like bias-free LayerNorm
        ({"mlp": "relu2"}, WTE + WPE, GPT2_NON_EMB),
        # SwiGLU: 3 matrices of width 8C/3 -> 88 (a multiple of 8): 3 x 32 x 88 vs 8 x 32^2
        ({"mlp": "swiglu"}, WTE + WPE, GPT2_NON_EMB + 2 * (3 * 32 * 88 - 8 * 32 * 32)),
        ({"qk_norm": True}, WTE + WPE, GPT2_NON_EMB + 2 * 2 * 16),  # q and k gains per layer
        ({"tie_embeddings": False}, WTE + WPE, GPT2_NON_EMB + 50304 * 32),  # lm_head
        (MODERN, WTE, GPT2_NON_EMB + 2 * 2 * 16 + 50304 * 32),
    ],
)
def test_param_counts(knobs, embedding, non_embedding):
    n = make(**knobs).num_params()
    assert (n["embedding"], n["non_embedding"]) == (embedding, non_embedding)


def test_swiglu_width_matches_gelu_params_at_gpt2_sizes():
    for c in (384, 768):
        cfg = GPTConfig(n_embd=c, n_head=c // 64, mlp="swiglu")
        assert 3 * c * cfg.mlp_hidden == 8 * c * c


def test_rmsnorm_against_hand_computed_values():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 1.0, 2.0, 0.5]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # rms = sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5) = 2.7386128
    expected = torch.tensor([[0.3651484, 0.7302967, 2.1908902, 0.7302967]])
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)


def test_mlp_variants_against_hand_written_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    for kind in ("swiglu", "relu2", "gelu"):
        mlp = MLP(GPTConfig(n_layer=1, n_head=1, n_embd=8, mlp=kind))
        h = x @ mlp.c_fc.weight.T
        if kind == "swiglu":
            gate, up = h[:, : h.size(1) // 2], h[:, h.size(1) // 2 :]
            h = gate / (1 + torch.exp(-gate)) * up
        elif kind == "relu2":
            h = torch.where(h > 0, h * h, torch.zeros_like(h))
        else:
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        torch.testing.assert_close(mlp(x), h @ mlp.c_proj.weight.T)
    assert MLP(GPTConfig(n_embd=8, n_head=1, mlp="swiglu")).c_fc.weight.shape == (2 * 24, 8)


def test_rope_rotates_pairs_by_position_times_frequency():
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=8, rope_theta=100.0)
    cos, sin = rope_cache(cfg)
    assert cos.shape == (8, 2)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0])  # pairs (x0, x2) = (1, 0) and (x1, x3) = (0, 1)
    out = apply_rope(x, cos[3], sin[3])
    # pair 0 turns by 3 rad, pair 1 by 3 / sqrt(100) = 0.3 rad
    expected = torch.tensor([math.cos(3), -math.sin(0.3), math.sin(3), math.cos(0.3)])
    torch.testing.assert_close(out, expected)


def test_rope_scores_depend_on_relative_position_only():
    cfg = dataclasses.replace(BASE, positions="rope", block_size=64)
    cos, sin = rope_cache(cfg)
    q, k = torch.randn(2, 16)
    score = [
        apply_rope(q, cos[p], sin[p]) @ apply_rope(k, cos[p - 5], sin[p - 5]) for p in (5, 20, 63)
    ]
    torch.testing.assert_close(score[0], score[1])
    torch.testing.assert_close(score[0], score[2])
    assert not torch.allclose(
        score[0], apply_rope(q, cos[9], sin[9]) @ apply_rope(k, cos[3], sin[3])
    )


@pytest.mark.parametrize("knobs", [{"positions": "rope"}, MODERN])
def test_rope_cache_shift_equals_sliding_window_recompute(knobs, monkeypatch):
    """Decoding through a cache that is shifted (kept, not refilled) whenever it is full equals
    a from-scratch forward over the whole sequence in which each token attends to exactly the
    tokens its cached step saw (a band mask), at absolute positions beyond block_size."""
    model = make(**knobs)
    block, keep, n = 16, 7, 45
    idx = torch.randint(0, BASE.vocab_size, (2, n))
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    first_seen, parts, oldest = [], [], 0  # first_seen[i]: the oldest token token i sees
    parts.append(model(idx[:, :5], cache=cache)[0])
    first_seen += [0] * 5
    filled = 5
    for t in range(5, n):
        if filled == block:  # full: keep the newest `keep` positions
            model.shift_cache(cache, filled, keep)
            filled, oldest = keep, t - keep
        parts.append(model(idx[:, t : t + 1], cache=cache, pos=filled)[0])
        first_seen.append(oldest)
        filled += 1
    assert oldest > 0  # the cache was shifted (twice)

    # The reference: the same weights, a block_size that holds the whole sequence, and SDPA
    # given the band mask in place of the causal one.
    big = GPT(dataclasses.replace(model.config, block_size=64)).eval()
    big.load_state_dict(model.state_dict())
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = (j <= i) & (j >= torch.tensor(first_seen)[:, None])
    sdpa = F.scaled_dot_product_attention

    def banded(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
        return sdpa(q, k, v, attn_mask=band)

    monkeypatch.setattr(F, "scaled_dot_product_attention", banded)
    expected, _ = big(idx)
    torch.testing.assert_close(torch.cat(parts, 1), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("knobs", [{}, MODERN], ids=["gpt2", "modern"])
def test_static_decode_masks_the_stale_slots(knobs):
    """After a context shift (RoPE) or a refill (learned positions) the slots past ``pos``
    still hold the keys of dropped tokens: a step with a position tensor reads all block_size
    slots, so only its mask keeps them out. It must equal the slice of the filled slots, which
    never reads them."""
    model = make(**knobs)
    idx = torch.randint(0, BASE.vocab_size, (2, 27))
    growing, static = (KVCache(model.config, 2, "cpu", torch.float32) for _ in range(2))
    for cache in (growing, static):
        model(idx[:, :16], cache=cache)  # full: block_size=16
        if model.config.positions == "rope":
            model.shift_cache(cache, 16, 5)
        else:
            model(idx[:, 11:16], cache=cache)
    for t in range(16, 27):  # slots 5..15 are stale until this loop writes them
        slot = t - 11
        expected = model(idx[:, t : t + 1], cache=growing, pos=slot, last_only=True)[0][:, -1]
        got = step(model, idx[:, t : t + 1], torch.tensor([slot]), static)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_shift_cache_keeps_nothing_of_a_full_cache():
    """keep=0 on a full cache (d == block_size, one past RoPE's table) empties it: what comes
    next is a fresh start."""
    model = make(**MODERN)
    idx = torch.randint(0, BASE.vocab_size, (1, 20))
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    model(idx[:, :16], cache=cache)
    model.shift_cache(cache, 16, 0)
    fresh = KVCache(model.config, 1, "cpu", torch.float32)
    after = model(idx[:, 16:], cache=cache)[0]
    torch.testing.assert_close(after, model(idx[:, 16:], cache=fresh)[0])


@pytest.mark.parametrize("block_size", [2, 3])
def test_generate_with_rope_and_a_tiny_block(block_size, monkeypatch):
    """block_size 2 or 3 keeps one token at each shift (block_size // 2 - 1 of the cache)."""
    model = GPT(dataclasses.replace(BASE, block_size=block_size, **MODERN)).eval()
    for static in (False, True):
        monkeypatch.setattr(decode, "static_shapes", lambda device, s=static: s)
        assert len(generate(model, [1, 2], 9, temperature=0, stop_token=None)[0]) == 9


def test_shift_cache_needs_rope():
    model = make()
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="shift_cache needs positions=rope"):
        model.shift_cache(cache, 4, 2)


def test_generate_with_rope_keeps_the_cache(monkeypatch):
    """With RoPE a context shift costs one position, not a refill; before the first shift the
    cached tokens are those of the full recompute."""
    model = make(**MODERN)
    lengths, forward = [], model.forward

    def spy(idx, *args, **kwargs):
        lengths.append(idx.size(1))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    out = generate(model, [1, 2, 3], 40, temperature=0, stop_token=None)[0]
    assert lengths == [3] + [1] * 39  # no refill at the shifts (after 13 and then 8 tokens)
    monkeypatch.undo()
    ref = generate(model, [1, 2, 3], 13, temperature=0, stop_token=None, use_cache=False)[0]
    assert out[:13] == ref


# -- checkpoints and config --------------------------------------------------------------------

# The state dict of the seed's model (before these knobs) for n_layer=1: the names must stay.
OLD_KEYS = [
    "transformer.wte.weight", "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.weight",
    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
    "transformer.ln_f.weight", "lm_head.weight",
]  # fmt: skip
OLD_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50257, dropout=0.0,
                bias=False)  # fmt: skip


def test_old_checkpoints_still_load(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**OLD_ARGS))
    state = model.state_dict()
    assert list(state) == OLD_KEYS
    pt = tmp_path / "slm.pt"
    torch.save({"model_args": OLD_ARGS, "model": state, "step": 1}, pt)
    loaded = load_model(pt)
    assert loaded.config == GPTConfig(**OLD_ARGS) and loaded.config.positions == "learned"
    idx = torch.randint(0, 50257, (1, 8))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    # A Lightning checkpoint whose hyper_parameters predate the knobs and the optimizer choice.
    module = GPTModule(**OLD_ARGS, max_steps=10)
    hparams = {k: v for k, v in module.hparams.items() if k in OLD_ARGS or k == "lr"}
    ckpt = tmp_path / "old.ckpt"
    meta = {"pytorch-lightning_version": "2.6.0", "global_step": 1, "epoch": 0}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, **meta}, ckpt)
    assert GPTModule.load_from_checkpoint(ckpt).hparams.optimizer == "adamw"
    assert load_model(ckpt).config == GPTConfig(**OLD_ARGS)


def test_new_fields_round_trip_through_slm_pt(tmp_path):
    model = make(**MODERN)
    pt = tmp_path / "slm.pt"
    torch.save({"model_args": model.config.to_dict(), "model": model.state_dict()}, pt)
    loaded = load_model(pt)
    assert loaded.config == model.config
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    idx = torch.randint(0, 50257, (1, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_arch_composes_with_every_size():
    for size in ("tiny", "small", "medium", "gpt2"):
        cfg = compose("train", [f"model={size}", "arch=modern"])
        validate(cfg)
        assert cfg.model.positions == "rope" and not cfg.model.tie_embeddings
        GPTConfig(**cfg.model)  # every model.* key is a GPTConfig field
    assert compose("train").model.positions == "learned"  # arch=gpt2 is the default
    preset = compose("train", ["experiment=modern", "model=small"])
    assert preset.model.positions == "rope" and preset.optim.name == "muon"
    assert preset.model.n_embd == 384


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.positions=alibi"], "model.positions=alibi is not one of learned, rope"),
        (["model.norm=batchnorm"], "model.norm=batchnorm is not one of layernorm, rmsnorm"),
        (["model.mlp=relu"], "model.mlp=relu is not one of gelu, swiglu, relu2"),
        (["model.qk_norm=yes"], "model.qk_norm=yes must be true or false"),
        (["arch=modern", "model.n_head=64", "model.n_embd=192"], "head size .*=3 must be even"),
        (["optim.name=sgd"], "optim.name=sgd is not one of adamw, muon; use optim="),
        (["optim=muon", "optim.muon_lr=0"], "optim.muon_lr=0 must be positive"),
    ],
)
def test_bad_arch_and_optim_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("train", overrides))


def test_unknown_arch_option():
    with pytest.raises(ConfigError, match="arch"):
        compose("train", ["arch=llama"])
