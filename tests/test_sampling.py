"""Sampling: the logit filters (temperature, top-k, top-p) and the settings' checks."""

import torch

from slm.sampling import filter_logits


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero()[:, 0].tolist())


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert kept(filter_logits(logits, top_k=1)) == {4}
    assert kept(filter_logits(logits, top_k=2)) == {4, 0}
    assert kept(filter_logits(logits, top_k=4)) == {4, 0, 1, 2}
    assert kept(filter_logits(logits, top_k=5)) == kept(filter_logits(logits, top_k=99))
    out = filter_logits(logits, top_k=2)
    assert out[0, 0] == 2.0 and out[0, 4] == 3.0 and out[0, 1] == float("-inf")
    # A tie with the k-th largest is kept: the set never depends on how ties are ordered.
    assert kept(filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert kept(filter_logits(PROBS, top_p=0.01)) == {0}  # the top token always stays
    assert kept(filter_logits(PROBS, top_p=0.4)) == {0}
    assert kept(filter_logits(PROBS, top_p=0.7)) == {0, 1}
    assert kept(filter_logits(PROBS, top_p=0.83)) == {0, 1, 2}
    assert kept(filter_logits(PROBS, top_p=0.96)) == {0, 1, 2, 3}
    assert kept(filter_logits(PROBS, top_p=1.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(torch.zeros(1, 4), top_p=0.3)) == {0, 1, 2, 3}  # all tied
    shuffled = PROBS[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.7)) == {1, 3}


def test_top_p_cut_is_exact_over_a_gpt2_vocab():
    """Against a float64 reference, top_p just below and just above the mass of the k most
    likely of 50,257 tokens (a thousandth of a token's probability away): a float32 cumulative
    sum from the most likely token drifted enough to put tokens on the wrong side."""
    logits = torch.randn(1, 50257, generator=torch.Generator().manual_seed(0)) * 2
    probs, order = logits.double().softmax(-1)[0].sort(descending=True)
    mass = probs.cumsum(0)  # mass[k]: of the k + 1 most likely tokens
    ks = torch.searchsorted(mass, torch.linspace(0.3, 0.99, 8, dtype=torch.float64)).tolist()
    for k in ks:
        below, above = mass[k] - 1e-3 * probs[k], mass[k] + 1e-3 * probs[k + 1]
        assert kept(filter_logits(logits, top_p=float(below))) == set(order[: k + 1].tolist())
        assert kept(filter_logits(logits, top_p=float(above))) == set(order[: k + 2].tolist())


def test_top_k_then_top_p_and_temperature():
    # top-k first, then top-p on the renormalised rest: 0.5/0.95 + 0.3/0.95 = 0.84 >= 0.83.
    assert kept(filter_logits(PROBS, top_k=3, top_p=0.83)) == {0, 1}
    # A temperature below 1 sharpens (0.69, 0.25, ...), so fewer tokens reach top_p=0.9.
    assert kept(filter_logits(PROBS, temperature=1.0, top_p=0.9)) == {0, 1, 2}
    assert kept(filter_logits(PROBS, temperature=0.5, top_p=0.9)) == {0, 1}
    assert kept(filter_logits(PROBS, temperature=5.0, top_p=0.9)) == {0, 1, 2, 3}
    torch.testing.assert_close(filter_logits(PROBS, temperature=2.0), PROBS / 2)
    assert kept(filter_logits(PROBS, temperature=0)) == {0}
    rows = torch.cat([PROBS, PROBS.flip(-1)])  # rows are filtered independently
    out = filter_logits(rows, top_k=1)
    assert kept(out) == {0} and kept(out[1:]) == {3}
