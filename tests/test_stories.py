"""The story suite (slm.stories): the openings, EOT and length counting through the real
sampler, the ragged batch against generate(), the continuation loss and the suite's checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cfg_with

from slm import precision
from slm import stories as st
from slm.errors import ConfigError
from slm.model import GPT, GPTConfig
from slm.tokenizer import gpt2

# -- openings --------------------------------------------------------------------------------


def test_split_opening():
    # A quote's "!" followed by "said" ends no sentence.
    assert st.split_opening('"Look!" said Tim. He ran.') == ('"Look!" said Tim.', " He ran.")
    assert st.split_opening("Mr. Brown had a cat. It was black.") == (
        "Mr. Brown had a cat.", " It was black."
    )  # fmt: skip
    assert st.split_opening("One day.\nTom smiled.") == ("One day.", "\nTom smiled.")
    assert st.split_opening("Only one sentence here.") is None
    assert st.split_opening("Tom and Sue went home.", 3) == ("Tom and Sue", " went home.")
    assert st.split_opening("Tom and Sue", 3) is None


def test_openings_come_from_the_token_file_and_are_seed_stable(tmp_path):
    stories = [f"Story {i} begins here. Then Tom saw {i} birds." for i in range(30)]
    stories[3] = "A story of one sentence only."  # no continuation: never an opening
    tok = gpt2()
    path = tmp_path / "val.bin"
    tok.encode_stories(stories).tofile(path)
    held_out = st.TokenStories(path, tok)
    assert list(held_out) == stories
    a = st.pick_openings(held_out, 29, seed=5)
    assert a == st.pick_openings(held_out, 29, seed=5)
    assert a != st.pick_openings(held_out, 29, seed=6)
    assert sorted(o.story for o in a) == [i for i in range(30) if i != 3]
    for o in a:
        assert o.text + o.continuation == stories[o.story]
        assert o.text == f"Story {o.story} begins here."
    assert len(st.pick_openings(held_out, 50, seed=5)) == 29  # all there are, with a warning
    first = st.pick_openings(held_out, 3, seed=5)
    assert first == a[:3]  # N openings are the first N of the same order


# -- generation: EOT and length counting through the real sampler ----------------------------


def counting_model(word: int, eot: int, P: int) -> GPT:
    """A GPT that writes ``word`` while predicting from positions < P, then the end of text:
    its residual stream is its position's embedding (one-hot), the blocks add nothing."""
    c = GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=64, tie_embeddings=False)
    model = GPT(c).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
        model.transformer.wpe.weight.copy_(10 * torch.eye(64))
        model.lm_head.weight[word, :P] = 10.0
        model.lm_head.weight[eot, P:] = 10.0
    return model


def test_eot_and_length_counting():
    tok = gpt2()
    the = tok.encode(" the")[0]
    model = counting_model(the, tok.eot_id, P=20)
    short, long = "Tom ran.", "Tom ran to the big old tree in the park."
    L_short, L_long = 1 + len(tok.encode(short)), 1 + len(tok.encode(long))  # + the EOT start
    openings = [st.Opening(0, short, " Home."), st.Opening(1, long, " Home.")]
    # The prediction for position L - 1 + k is the k-th new token: " the" while < P.
    n_short, n_long = 20 - L_short + 1, 20 - L_long + 1
    assert n_long < 12 < n_short
    s = st.Settings(samples=2, max_new_tokens=12, seed=0)
    records = st.complete(model, tok, openings, s)
    assert [(r["mode"], r["opening_index"], r["sample"]) for r in records] == [
        ("greedy", 0, 0), ("greedy", 1, 0),
        ("sampled", 0, 0), ("sampled", 0, 1), ("sampled", 1, 0), ("sampled", 1, 1),
    ]  # fmt: skip
    for r in records:
        n = 12 if r["opening_index"] == 0 else n_long  # the first hits the limit
        assert r["completion"] == " the" * n
        assert (r["tokens"], r["words"], r["ended"]) == (n, n, r["opening_index"] == 1)
    summary = st.summarize(records, [(1.0, 3), (2.0, 1)])
    assert summary["continuation_loss"] == pytest.approx((1.0 * 3 + 2.0 * 1) / 4)
    for mode in ("greedy", "sampled"):
        assert summary[mode]["eot_rate"] == 0.5
        assert summary[mode]["words"] == (12 + n_long) / 2
        assert summary[mode]["repeat_4gram"] == pytest.approx(
            ((12 - 3 - 1) / (12 - 3) + (n_long - 3 - 1) / (n_long - 3)) / 2
        )  # "the the the ..." of m words: m - 3 4-grams, one distinct
        words = (12 + n_long) * (1 if mode == "greedy" else 2)
        assert summary[mode]["distinct_1"] == pytest.approx(1 / words)  # all "the"


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_ragged_batch_under_cuda_like_autocast(monkeypatch):
    """The GPU path on the CPU: bf16 autocast and a bf16 cache, with rms_norm returning
    float32 as it does under CUDA autocast (CPU autocast does not): the prefill and the
    decode steps write float32 keys into the bf16 cache rows."""
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: rms_norm(*a, **k).float())
    bf16 = (torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16)
    monkeypatch.setattr(precision, "inference_precision", lambda model, device: bf16)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, norm="rmsnorm",
                       qk_norm=True, positions="rope")  # fmt: skip
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    out = st.complete_batch(GPT(config), prompts, 12, 0.8, 50, None, None, stop_token=-1)
    assert [len(ids) for ids, _ in out] == [12, 10]  # the window: 16 - 3, 16 - 6 -> at most 12


def test_unwritable_completions_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the completions to .* stories_out=PATH"):
        st.write_jsonl(tmp_path / "file" / "s.jsonl", [{"a": 1}])


def test_continuation_loss_is_the_models_loss_on_the_true_rest():
    tok = gpt2()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    o = st.Opening(0, "Sam had a kite.", " It flew high. Sam was happy.")
    head = [tok.eot_id, *tok.encode(o.text)]
    ids = head + tok.encode(o.continuation) + [tok.eot_id]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    expected = F.cross_entropy(logits[0, len(head) - 1 :], torch.tensor(ids[len(head) :]))
    [(loss, n)] = st.continuation_loss(model, tok, [o])
    assert n == len(ids) - len(head)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    # Cut at block_size: a long rest is scored on the first 64 + 1 - len(head) tokens.
    long = st.Opening(0, o.text, " It flew high." * 40)
    assert st.continuation_loss(model, tok, [long])[0][1] == 65 - len(head)


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stories=-1"], r"^stories=-1 must be an integer >= 0"),
        (["suite.opening=0"], r"^suite.opening=0 must be sentence or a number of words"),
        (["suite.top_p=2"], r"^suite.top_p=2 must be in \(0, 1\]"),
        (["suite.temperature=0"], r"^suite.temperature=0 makes the sampled completions greedy"),
        (["judge=/no/such/dir"], r"^judge=/no/such/dir is neither an http\(s\):// URL"),
        (["judge=http://h/v1", "suite.judge_timeout=0"], r"^suite.judge_timeout=0 must be"),
        (["judge=http://h/v1", "suite.rubric=/no/rubric.txt"], r"^suite.rubric=/no/rubric.txt"),
    ],
)
def test_check_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        st.check(cfg_with(*overrides))
