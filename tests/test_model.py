import math

import pytest
import torch
import torch.nn.functional as F

from slm.model import GPT, GPTConfig, KVCache

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50257)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def test_shapes_and_loss(model):
    idx = torch.randint(0, TINY.vocab_size, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 50257)  # padding columns never reach the caller
    assert loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == ()
    assert model(idx, last_only=True)[0].shape == (3, 1, 50257)


def test_vocab_padded_to_multiple_of_64(model):
    assert TINY.padded_vocab_size == 50304
    assert model.lm_head.weight.shape == (50304, 32)


def test_initial_loss_is_uniform_over_vocab(model):
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 8, 16))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(50257), abs=0.05)


def test_causality(model):
    """Changing token t never changes the logits at positions before t."""
    idx = torch.randint(0, TINY.vocab_size, (1, 16))
    base, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % TINY.vocab_size
        out, _ = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t], base[:, t])


def test_tied_weights(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.lm_head.weight[7].add_(1.0)
    assert torch.equal(model.transformer.wte.weight[7], model.lm_head.weight[7])


def test_param_counts(model):
    n = model.num_params()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert n["total"] == sum(unique.values())
    assert n["embedding"] == 50304 * 32 + 16 * 32
    assert n["non_embedding"] == n["total"] - n["embedding"]
    # 2 blocks x (qkv 3C^2 + proj C^2 + mlp 8C^2 + 2 LayerNorm gains C) + final LayerNorm C
    assert n["non_embedding"] == 2 * (12 * 32 * 32 + 2 * 32) + 32


def test_gpt2_init(model):
    torch.manual_seed(0)
    big = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=16))
    proj = big.transformer.h[0].attn.c_proj.weight
    fc = big.transformer.h[0].mlp.c_fc.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)


def test_parameter_groups(model):
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params()["total"]  # every parameter once (tied counted once)
    assert len(no_decay["params"]) == 2 * 2 + 1  # LayerNorm gains, no biases


def test_bias_and_dropout_configurable():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, bias=True, dropout=0.1))
    assert m.transformer.h[0].attn.c_attn.bias is not None
    assert m.transformer.h[0].ln_1.bias is not None
    assert m.transformer.drop.p == 0.1


def test_n_embd_must_divide_by_n_head():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_layer=1, n_head=4, n_embd=30)


def test_too_long_sequence_raises(model):
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_kv_cache_matches_full_forward(model):
    """Prefill + chunks + single steps through the cache give the full forward's logits."""
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    full, _ = model(idx)
    cache = KVCache(TINY, batch=2, device="cpu", dtype=torch.float32)
    parts = [model(idx[:, :5], cache=cache, pos=0)[0], model(idx[:, 5:9], cache=cache, pos=5)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache, pos=t)[0] for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sequence of 17 tokens exceeds block_size=16"):
        model(idx[:, :2], cache=cache, pos=15)


def test_generate_appends_new_tokens_as_nanogpt_does(model):
    """The seed's example: ``model.generate(context, max_new_tokens)`` on a (1, 1) tensor of
    zeros returns the context with the new tokens appended (through ``slm.sample``)."""
    context = torch.zeros((1, 1), dtype=torch.long)
    torch.manual_seed(0)
    out = model.generate(context, max_new_tokens=20)
    assert out.shape == (1, 21) and out[0, 0] == 0 and out.dtype == torch.long
    greedy = model.generate(torch.tensor([[1, 2], [3, 4]]), 5, temperature=0, top_k=3)
    from slm.sample import generate

    assert greedy[:, 2:].tolist() == generate(
        model, torch.tensor([[1, 2], [3, 4]]), 5, temperature=0, stop_token=None
    )


def test_loss_over_padded_logits_equals_real_vocab_cross_entropy(model):
    """Same loss and gradients as the cross-entropy over the real vocab's logits."""
    idx, targets = torch.randint(0, TINY.vocab_size, (2, 3, 16))
    params = [model.lm_head.weight, model.transformer.h[0].mlp.c_fc.weight]
    logits, loss = model(idx, targets)
    grads = torch.autograd.grad(loss, params)
    logits, _ = model(idx)
    assert logits.shape == (3, 16, TINY.vocab_size) and torch.isfinite(logits).all()
    ref = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), targets.flatten())
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r)
    assert grads[0][TINY.vocab_size :].abs().sum() == 0  # padding rows learn nothing


def test_loss_makes_no_copy_of_the_logits(model):
    """The largest activation (B x T x vocab) is not copied on its way into the loss and back,
    as the cross-entropy of the sliced logits did (a contiguous copy forward, a zero-filled
    copy backward)."""
    from torch.profiler import profile

    idx, targets = torch.randint(0, TINY.vocab_size, (2, 4, 16))
    with profile(record_shapes=True) as prof:
        model(idx, targets)[1].backward()
    copies = [
        (e.name, e.input_shapes[0])
        for e in prof.events()
        if e.name in ("aten::clone", "aten::contiguous", "aten::copy_", "aten::slice_backward")
        and e.input_shapes
        and math.prod(e.input_shapes[0]) >= 4 * 16 * TINY.vocab_size
    ]
    assert copies == []


def test_padding_ids_are_never_sampled(model):
    from slm.sample import generate

    with torch.no_grad():  # make the padding rows' logits the largest by far
        model.lm_head.weight[TINY.vocab_size :] = model.lm_head.weight[:1] * 1000
    out = generate(
        model, [1, 2, 3], 12, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert len(out[0]) == 12 and max(out[0]) < TINY.vocab_size
