"""The one decoder (slm.decode) and its three policies: generate (one group of N rows, the
window shifted at its end), the story suite (a row per prompt, ragged, rows ending), the
server's engine (a group per request, joining and leaving, each with its own generator)."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from conftest import greedy, reference

from slm import decode, tokenizer
from slm.decode import Decoder, buckets, slide
from slm.engine import Engine, Request
from slm.model import GPT
from slm.sample import generate
from slm.stories import complete_batch

TOK = tokenizer.gpt2()
EOT = TOK.eot_id


@pytest.fixture(scope="module")
def rope_model(story_model) -> GPT:
    """The story model's shape with RoPE, random weights: it runs on past block_size."""
    torch.manual_seed(1)
    return GPT(dataclasses.replace(story_model.config, positions="rope")).eval()


@pytest.fixture(params=["learned", "rope"])
def model(request, story_model, rope_model) -> GPT:
    return story_model if request.param == "learned" else rope_model


# -- the cache against recomputing the window --------------------------------------------------


def test_greedy_cache_equals_recompute_across_context_shifts(story_model):
    """Learned positions: at each shift the rows are refilled from the kept tokens, so the
    cached decoder gives exactly the tokens of recomputing the whole window every step."""
    prompt = TOK.encode("Tom had a")
    n = 100  # the window passes block_size=32 at 33 tokens, then every 16: 5 context shifts
    cached = greedy(story_model, prompt, n, stop_token=None)
    assert len(cached) == n
    assert cached == greedy(story_model, prompt, n, stop_token=None, use_cache=False)
    assert cached == reference(story_model, prompt, n)
    stories = TOK.decode(cached).split("<|endoftext|>")
    assert len(stories) >= 4 and "went to the" in stories[1]  # it tells its stories


def test_sampled_cache_equals_recompute(story_model):
    prompt = TOK.encode("Sue had a")
    kw = dict(temperature=1.0, top_k=20, num_samples=2, stop_token=None)
    a = generate(story_model, prompt, 70, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(
        story_model, prompt, 70, generator=torch.Generator().manual_seed(3), use_cache=False, **kw
    )
    assert a == b


def test_one_prefill_then_one_position_per_step(model, monkeypatch):
    """One forward over the prompt, then one position per step; at a context shift a refill
    of the kept half (learned positions) or nothing more (RoPE: the cache is shifted)."""
    lengths = []
    forward = model.forward

    def spy(idx, *args, **kwargs):
        lengths.append(idx.size(1))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    greedy(model, TOK.encode("Tom had a"), 60, stop_token=None)
    # 3 prompt tokens + 29 one-token steps fill 32 positions; the 33rd token shifts to 16.
    if model.config.positions == "learned":
        assert lengths == [3] + [1] * 29 + [16] + [1] * 16 + [16] + [1] * 12
    else:
        assert lengths == [3] + [1] * 59
    monkeypatch.undo()
    # RoPE: the kept keys remember what the refill would forget: equal up to the first shift
    assert greedy(model, TOK.encode("Tom had a"), 29, stop_token=None) == reference(
        model, TOK.encode("Tom had a"), 29
    )


def test_static_shapes_equal_the_filled_slots(model, monkeypatch):
    """The CUDA path on the CPU: every step reads all block_size slots, masked per row, and
    its positions come as a tensor; the same tokens as reading the filled slots only."""
    prompts = [TOK.encode(p) for p in ("Tom had a", "Ben and the dog went")]
    eager = [greedy(model, p, 50, stop_token=None) for p in prompts]
    ragged = complete_batch(model, prompts, 20, 0.0, None, None, None, stop_token=-1)
    monkeypatch.setattr(decode, "static_shapes", lambda device: True)
    assert [greedy(model, p, 50, stop_token=None) for p in prompts] == eager
    assert complete_batch(model, prompts, 20, 0.0, None, None, None, stop_token=-1) == ragged


# -- one decoder, three policies: the gate -----------------------------------------------------


class Collect:
    """An engine request's ``emit``: each sample's text, and whether all have finished."""

    def __init__(self, n: int = 1) -> None:
        self.text, self.finished = [""] * n, [False] * n
        self.done = threading.Event()

    def __call__(self, event) -> None:
        assert event.kind != "error", event.text
        self.text[event.index] += event.text
        if event.kind == "finish":
            self.finished[event.index] = True
            if all(self.finished):
                self.done.set()


def test_one_decoder_under_three_policies(model):
    """The same prompts through generate (each alone), the story suite's ragged batch (rows
    leaving as they end) and the server's engine (requests decoded together, each with its
    own settings and generator, past block_size): each prompt gets the same tokens."""
    texts = ["Tom had a", "Once upon a time there was", "Lily", "Ben and the dog went to the"]
    prompts = [[EOT, *TOK.encode(t)] for t in texts]
    block = model.config.block_size
    # The story suite: greedy to the end of the window (no shift); a stop token ends row 1.
    free = complete_batch(model, prompts, 12, 0.0, None, None, None, stop_token=-1)
    stop = free[1][0][2]
    batch = complete_batch(model, prompts, 12, 0.0, None, None, None, stop_token=stop)
    assert batch[1] == (free[1][0][: free[1][0].index(stop)], True)
    assert not all(ended for _, ended in batch)  # the others went on without row 1
    for p, (ids, ended) in zip(prompts, batch):
        room = min(12, block - len(p))
        assert ids == greedy(model, p, room, stop_token=stop)
        assert ended == (len(ids) < room)
    # The engine: greedy and sampled requests together, 50 tokens each: past block_size.
    cases = [
        (prompts[0], dict(temperature=0)),
        (prompts[1], dict(temperature=1.0, top_k=20, seed=3, n=2)),
        ([EOT], dict(temperature=0.8, top_p=0.9, seed=5)),
        (prompts[3], dict(temperature=0, n=3)),
    ]
    engine = Engine(model, TOK, max_batch=8)
    engine.start()
    try:
        runs = [(Collect(kw.get("n", 1)), p, kw) for p, kw in cases]
        engine.submit([Request(p, 50, emit=c, **kw) for c, p, kw in runs])
        for c, _, _ in runs:
            assert c.done.wait(60), "the engine did not finish"
        assert engine.peak_rows == 7  # all in one batch
    finally:
        engine.close()
    for c, p, kw in runs:
        seed = kw.pop("seed", None)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        alone = generate(model, p, 50, num_samples=kw.pop("n", 1), generator=gen,
                         stop_token=EOT, **kw)  # fmt: skip
        assert c.text == [TOK.decode(s) for s in alone]


# -- the decoder's own rules -----------------------------------------------------------------


def test_slide_keeps_the_newest_half():
    window = torch.arange(8)[None]
    out, shifted = slide(window[:, :3], torch.tensor([9]), 4)
    assert not shifted and out.tolist() == [[0, 1, 2, 9]]
    out, shifted = slide(window[:, :4], torch.tensor([9]), 4)
    assert shifted and out.tolist() == [[3, 9]]
    assert slide(window[:, :2], torch.tensor([9]), 2)[0].tolist() == [[9]]  # at least one


def test_buckets():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6]


def test_rows_are_compacted_and_bounded(story_model):
    """A removed group's rows are freed; the rows after it move down with their cache."""
    decoder = Decoder(story_model, rows=3)
    with decoder.running():
        a = decoder.add(torch.tensor([TOK.encode("Tom had a")]))
        b = decoder.add(torch.tensor([TOK.encode("Sam had a dog")] * 2))
        with pytest.raises(ValueError, match="1 rows do not fit: 3 of 3 are in use"):
            decoder.add(torch.tensor([[1]]))
        decoder.remove(a)
        decoder.advance([(b, b.logits.argmax(-1))])
    assert (b.row, decoder.used) == (0, 2)
    alone = greedy(story_model, TOK.encode("Sam had a dog"), 2, stop_token=None)
    assert b.window[0, -1].item() == alone[0]
    assert b.logits[0].argmax().item() == alone[1]  # its moved rows kept their cache
    assert not story_model.training  # its mode restored
