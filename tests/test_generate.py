"""generate(): prompts, stopping, compiled decoding, checkpoint loading and generate.py (the
decoder's own tests, cache against recomputation, are in test_decode.py)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import torch
from conftest import STORY_BLOCK, generate_cli, greedy, reference, template_stories

from slm import sample, tokenizer
from slm.checkpoint import load_checkpoint, load_model
from slm.config import compose
from slm.errors import CheckpointError
from slm.model import GPT, GPTConfig, KVCache
from slm.module import GPTModule
from slm.precision import resolve_device
from slm.sample import generate, warm_up
from slm.sampling import check_sampling
from slm.tokenizer import EOT_ID

REPO = Path(__file__).resolve().parents[1]
BLOCK = STORY_BLOCK


@pytest.fixture(scope="module")
def ckpts(story_model, tmp_path_factory) -> dict[str, Path]:
    """The story_model model as slm.pt and as a Lightning-format .ckpt."""
    d = tmp_path_factory.mktemp("ckpts")
    pt = d / "slm.pt"
    config = story_model.config.to_dict()
    torch.save({"model_args": config, "model": story_model.state_dict(), "step": 200}, pt)
    module = GPTModule(**story_model.config.to_dict(), max_steps=200)
    module.model.load_state_dict(story_model.state_dict())
    ckpt = d / "last.ckpt"  # what Lightning stores, less the optimizer and loop states
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "global_step": 200,
            "epoch": 0,
            "pytorch-lightning_version": "2.6.0",
        },
        ckpt,
    )
    return {"pt": pt, "ckpt": ckpt}


def test_long_prompt_keeps_last_block_size_tokens(story_model):
    prompt = tokenizer.encode(" ".join(["Ben had a dog."] * 12))
    assert len(prompt) > BLOCK
    with pytest.warns(UserWarning, match="keeping its last 32"):
        out = greedy(story_model, prompt, 40, stop_token=None)
    assert out == greedy(story_model, prompt[-BLOCK:], 40, stop_token=None)  # no warning there
    assert out == reference(story_model, prompt, 40)
    with pytest.warns(UserWarning):
        assert out == greedy(story_model, prompt, 40, stop_token=None, use_cache=False)


def test_prompt_of_exactly_block_size(story_model):
    prompt = template_stories(3)[:BLOCK]
    assert greedy(story_model, prompt, 20, stop_token=None) == reference(story_model, prompt, 20)


def test_batch_of_prompts_equals_one_by_one(story_model):
    a, b = tokenizer.encode("Ben had a"), tokenizer.encode("Sam had a")
    assert len(a) == len(b)
    both = generate(story_model, torch.tensor([a, b]), 30, temperature=0)
    assert both == [greedy(story_model, a, 30), greedy(story_model, b, 30)]


# -- the compiled decode step (inductor on the CPU; CUDA graphs need a GPU) ----------------------
# Each new (config, batch size) compiles for ~5-15 s on 2 CPU cores: the tests share batch 1
# and batch 3 of the story_model model and batch 1 of one RoPE model.


@pytest.mark.slow
def test_compiled_greedy_equals_eager_across_context_shifts(story_model):
    prompt = tokenizer.encode("Tom had a")
    n = 100  # 5 context shifts (refills: learned positions)
    compiled = greedy(story_model, prompt, n, stop_token=None, compile=True)
    assert compiled == greedy(story_model, prompt, n, stop_token=None)
    assert compiled == reference(story_model, prompt, n)


@pytest.mark.slow
def test_compiled_with_rope_keeps_the_cache_across_shifts():
    """RoPE: the compiled decoder's cache is shifted in place (no refill) and its compiled
    step goes on, giving eager's tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, positions="rope"))
    model.eval()
    prompt = tokenizer.encode("Tom had a")
    eager = greedy(model, prompt, 80, stop_token=None)  # 4 shifts
    assert greedy(model, prompt, 80, stop_token=None, compile=True) == eager


@pytest.mark.slow
def test_compiled_long_prompt(story_model):
    prompt = tokenizer.encode(" ".join(["Ben had a dog."] * 12))
    assert len(prompt) > BLOCK
    with pytest.warns(UserWarning, match="keeping its last 32"):
        out = greedy(story_model, prompt, 40, stop_token=None, compile=True)
    assert out == reference(story_model, prompt, 40)


@pytest.mark.slow
def test_compiled_batch_with_samples_ending_at_different_steps(story_model):
    prompts = [tokenizer.encode(p) for p in ("was happy. The", "Mia and the", "Tom had a dog")]
    eager = generate(story_model, torch.tensor(prompts), 50, temperature=0)
    assert len({len(s) for s in eager}) == 3 and max(map(len, eager)) < 50  # EOT, 3 times
    streamed = []
    compiled = generate(
        story_model,
        torch.tensor(prompts),
        50,
        temperature=0,
        compile=True,
        on_token=lambda i, t: streamed.append((i, t)),
    )
    assert compiled == eager
    assert sorted(streamed) == sorted((i, t) for i, s in enumerate(eager) for t in s)


@pytest.mark.slow
def test_compiled_seeded_sampling_equals_eager(story_model):
    def sample(seed: int, compile: bool) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        prompt = tokenizer.encode("Lily had")
        kw = dict(temperature=1.0, top_k=20, top_p=0.9, num_samples=3, stop_token=None)
        return generate(story_model, prompt, 60, generator=g, compile=compile, **kw)

    first = sample(1337, compile=True)
    assert first == sample(1337, compile=False) == sample(1337, compile=True)
    assert first != sample(1338, compile=True)


@pytest.mark.slow
def test_compile_is_paid_once(story_model):
    """warm_up compiles the step for a batch size; later generate() calls, with any model of
    the same config, compile nothing more (dynamo traces no new frame)."""
    warm_up(story_model, 1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0  # (the counter that dynamo keeps: frames/ok is no longer counted)
    greedy(story_model, tokenizer.encode("Sam had a"), 40, stop_token=None, compile=True)
    other = GPT(story_model.config).eval()
    greedy(other, tokenizer.encode("Sam had a"), 40, stop_token=None, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# -- sampling --------------------------------------------------------------------------------


def test_same_seed_same_samples(story_model):
    def sample(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        prompt = tokenizer.encode("Lily had")
        return generate(story_model, prompt, 30, temperature=1.0, num_samples=3, generator=g)

    first = sample(1337)
    assert first == sample(1337)
    assert first != sample(1338)
    assert len({tuple(s) for s in first}) > 1  # the batch's samples are drawn independently


# -- stopping --------------------------------------------------------------------------------


def test_stops_at_eot(story_model):
    prompt = tokenizer.encode("Tom had a")
    out = greedy(story_model, prompt, 100)
    assert tokenizer.decode(out).endswith("was happy. The end.")
    assert greedy(story_model, prompt, 100, stop_token=None)[len(out)] == EOT_ID
    assert greedy(story_model, prompt, 5) == out[:5]  # or at max_new_tokens


class Scripted(torch.nn.Module):
    """A stand-in model: sample i greedily emits ``scripts[i]``, then its EOT."""

    def __init__(self, scripts: list[list[int]], **config) -> None:
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64, **config)
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.scripts, self.inputs = scripts, []

    def new_cache(self, batch: int, dtype=None) -> KVCache:
        return KVCache(self.config, batch, "cpu", torch.float32)

    def forward(self, idx, targets=None, cache=None, pos=0, span=None, last_only=False):
        step = len(self.inputs)
        self.inputs.append(idx.tolist())
        c = self.config
        logits = torch.zeros(idx.size(0), 1, c.vocab_size)
        end = c.eot_id if c.eot_id < c.vocab_size else 0
        for i, s in enumerate(self.scripts):
            logits[i, 0, s[step] if step < len(s) else end] = 1.0
        return logits, None


def test_batch_stops_when_every_sample_has_ended():
    model = Scripted([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    streamed = []
    out = generate(
        model, [], 100, temperature=0, num_samples=3, on_token=lambda i, t: streamed.append((i, t))
    )
    assert out == [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    assert len(model.inputs) == 6  # the 6th step's EOT ends the last sample
    assert model.inputs[0] == [[EOT_ID]] * 3  # an empty prompt starts a story
    assert model.inputs[2] == [[2], [EOT_ID], [6]]  # an ended sample is fed on, not emitted
    assert streamed[:4] == [(0, 1), (1, 4), (2, 5), (0, 2)]
    assert sorted(streamed) == sorted((i, t) for i, s in enumerate(out) for t in s)


def test_a_model_of_another_tokenizer_starts_and_stops_at_its_own_eot():
    """A bpe model (vocab 512, <|endoftext|> id 0): an empty prompt starts from its EOT and a
    story ends there, not at GPT-2's 50256, which is no token of it."""
    model = Scripted([[1, 2, 3], [4]], vocab_size=512, eot_id=0)
    assert generate(model, [], 100, temperature=0, num_samples=2) == [[1, 2, 3], [4]]
    assert model.inputs[0] == [[0], [0]] and len(model.inputs) == 4
    assert generate(Scripted([[7, 0, 8]], vocab_size=512, eot_id=0), [5], 9, stop_token=None,
                    temperature=0)[0][:3] == [7, 0, 8]  # fmt: skip
    with pytest.raises(ValueError, match=r"stop_token=50256 is not a token of the model's vocab"):
        generate(model, [5], 3, stop_token=50256)
    toy = Scripted([[1]], vocab_size=256)  # eot_id 50256 (GPT-2's) outside a 256-token vocab
    assert generate(toy, [5], 3, temperature=0) == [[1, 0, 0]]  # "eot": never met
    with pytest.raises(ValueError, match=r"eot_id=50256 is not in its vocab of 256 .* a prompt"):
        generate(toy, [], 3)


@pytest.mark.parametrize("every", [3, 16])
def test_tokens_read_every_few_steps_give_the_same_stories(story_model, monkeypatch, every):
    """As on an accelerator (``sync_every``): the tokens read on the host every few steps, not
    every step. The same stories, ended at the same tokens (EOT and max_new_tokens), the
    greedy ones and the seeded samples."""
    prompt = tokenizer.encode("Tom had a")
    cases = [dict(temperature=0, num_samples=2), dict(temperature=1.0, top_k=20, num_samples=3)]

    def stories() -> list:
        return [
            generate(story_model, prompt, n, generator=torch.Generator().manual_seed(7), **kw)
            for kw in cases
            for n in (5, 100)
        ]

    expected = stories()
    assert any(len(s) < 100 for batch in expected for s in batch)  # some end at EOT
    monkeypatch.setattr(sample, "sync_every", lambda device: every)
    assert stories() == expected


def test_empty_prompt_starts_from_eot(story_model):
    assert greedy(story_model, [], 30) == greedy(story_model, [EOT_ID], 30)
    assert generate(story_model, [], 0) == [[]]


def test_model_mode_is_restored(story_model):
    story_model.train()
    try:
        greedy(story_model, [EOT_ID], 3)
        assert story_model.training
    finally:
        story_model.eval()


# -- checkpoints -----------------------------------------------------------------------------


def test_loads_slm_pt_and_lightning_ckpt(story_model, ckpts):
    prompt = tokenizer.encode("Tom had a")
    expected = greedy(story_model, prompt, 20)
    for path in ckpts.values():
        model = load_model(path)
        assert not model.training and model.config == story_model.config
        assert model.lm_head.weight is model.transformer.wte.weight
        for k, v in story_model.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
        assert greedy(model, prompt, 20) == expected


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


class Arbitrary:
    pass


def test_bad_checkpoints(story_model, ckpts, tmp_path):
    good = ckpts["pt"].read_bytes()
    state = story_model.state_dict()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "object.pkl").write_bytes(pickle.dumps(Arbitrary()))
    wide = story_model.config.to_dict() | {"n_embd": 64}
    cases = {
        tmp_path / "missing.pt": "no such file",
        tmp_path: "is a directory",
        tmp_path / "truncated.pt": "truncated",
        tmp_path / "empty.pt": "truncated",
        tmp_path / "notes.txt": "not a PyTorch checkpoint",
        tmp_path / "object.pkl": "weights_only",
        _save(tmp_path / "nocfg.pt", {"weights": state}): "no model config",
        _save(tmp_path / "shape.pt", {"model_args": wide, "model": state}): "shape",
        _save(
            tmp_path / "key.pt",
            {
                "model_args": story_model.config.to_dict(),
                "model": {k: v for k, v in state.items() if "ln_f" not in k},
            },
        ): "transformer.ln_f.weight is missing",
        _save(
            tmp_path / "heads.pt",
            {"model_args": story_model.config.to_dict() | {"n_head": 3}, "model": state},
        ): "not divisible",
    }
    for path, reason in cases.items():
        with pytest.raises(CheckpointError, match=reason) as e:
            load_model(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message, message


def test_load_checkpoint_reads_lightning_hparams(ckpts, story_model):
    config, state = load_checkpoint(ckpts["ckpt"])
    assert config == story_model.config
    assert not any(k.startswith("model.") for k in state)


# -- arguments and the command line ----------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(max_new_tokens=-1), "max_new_tokens=-1 must be"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be"),
        (dict(temperature=-0.1), "temperature=-0.1 must be"),
        (dict(temperature=float("nan")), "temperature=nan must be"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(top_k=0), "top_k=0 must be an integer >= 1"),
        (dict(num_samples=0), "num_samples=0 must be"),
    ],
)
def test_bad_sampling_arguments(args, message):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=None, top_p=None, num_samples=1) | args
    with pytest.raises(ValueError, match=message):
        check_sampling(**kw)
    with pytest.raises(ValueError, match=message):  # the library checks them too
        generate(Scripted([[1]]), [1], **kw)


def test_good_sampling_arguments():
    check_sampling(0, 0, 1, 1.0, 1)
    check_sampling(200, 0.8, None, None, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match="device=cuda but this machine has no CUDA GPU"):
        resolve_device("cuda")


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="device=tpu is not one of"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "ckpt is required"),
        (["ckpt=null"], "ckpt is required"),
        (["ckpt={pt}", "max_new_tokens=-1"], "max_new_tokens=-1"),
        (["ckpt={pt}", "temperature=-1"], "temperature=-1"),
        (["ckpt={pt}", "top_p=0"], "top_p=0"),
        (["ckpt={pt}", "top_p=1.01"], "top_p=1.01"),
        (["ckpt={pt}", "top_k=0"], "top_k=0"),
        (["ckpt={pt}", "seed=abc"], "seed=abc"),
        (["ckpt={pt}", "device=nope"], "device=nope"),
        (["ckpt={pt}", "compile=maybe"], "compile=maybe must be auto, true or false"),
        (["ckpt={pt}", "compile=1"], "compile=1 must be"),
        (["ckpt={bad}"], "not a PyTorch checkpoint"),
        (["ckpt={bad}", "top_k=0"], "top_k=0"),  # arguments are checked before the file
    ]
    + ([(["ckpt={pt}", "device=cuda"], "no CUDA GPU")] if not torch.cuda.is_available() else []),
)
def test_cli_errors(overrides, message, ckpts, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("hello")
    cfg = compose("generate", [o.format(pt=ckpts["pt"], bad=bad) for o in overrides])
    assert generate_cli().run(cfg) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_cli_without_the_bpe_files_offline(ckpts, monkeypatch, capsys):
    def no_network(name):
        raise ConnectionError("Max retries exceeded\n(100 more lines)")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    tokenizer.get_encoding.cache_clear()
    try:
        assert generate_cli().run(compose("generate", [f"ckpt={ckpts['pt']}"])) == 1
    finally:
        monkeypatch.undo()
        tokenizer.get_encoding.cache_clear()
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: tiktoken could not load the gpt2 BPE files (ConnectionError")
    assert err.count("\n") == 1


def test_cli_generates(ckpts, story_model, capsys):
    cfg = compose(
        "generate",
        [
            f"ckpt={ckpts['ckpt']}",
            "prompt=Tom had a",
            "temperature=0",
            "num_samples=2",
            "weights=fp32",
        ],  # the fp32 model's stories
    )
    assert generate_cli().run(cfg) == 0
    out, err = capsys.readouterr()
    story = "Tom had a" + tokenizer.decode(greedy(story_model, tokenizer.encode("Tom had a"), 200))
    assert out == f"--- sample 1/2 ---\n{story}\n--- sample 2/2 ---\n{story}\n"
    assert "tokens/s" in err and "compile" not in err  # compile=auto: on CUDA only


def test_cli_says_how_much_of_a_long_prompt_the_model_sees(ckpts, story_model, capsys):
    """A prompt longer than block_size: one warning, before the text, with the tokens and
    characters kept; the stories continue from those tokens."""
    prompt = "Ben had a dog. " * 12
    ids = tokenizer.encode(prompt)
    kept = tokenizer.decode(ids[-BLOCK:])
    cfg = compose("generate", [f"ckpt={ckpts['pt']}", f'prompt="{prompt}"', "temperature=0",
                               "num_samples=1", "max_new_tokens=8", "weights=fp32"])  # fmt: skip
    assert generate_cli().run(cfg) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == (
        f"warning: the prompt has {len(ids)} tokens, more than the model's context "
        f"(block_size={BLOCK}): the stories continue from its last {BLOCK} tokens only, "
        f"{len(kept)} of its {len(prompt)} characters, from {kept[:24]!r}"
    )
    assert len(err.splitlines()) == 2  # and the summary line
    story = tokenizer.decode(greedy(story_model, ids[-BLOCK:], 8))
    assert out == prompt + story + "\n"


@pytest.mark.slow
def test_cli_compiled(ckpts, story_model, capsys):
    overrides = [f"ckpt={ckpts['pt']}", "prompt=Tom had a", "temperature=0", "num_samples=3",
                 "weights=fp32"]  # fmt: skip
    assert generate_cli().run(compose("generate", overrides)) == 0
    eager, _ = capsys.readouterr()
    assert generate_cli().run(compose("generate", overrides + ["compile=true"])) == 0
    out, err = capsys.readouterr()
    assert out == eager
    assert "tokens/s) on cpu, fp32 weights, compiled (compile " in err
    assert "s, once per process)" in err


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "generate.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_process(ckpts, tmp_path):
    """The real entry point: one-line errors with exit code 1, a run that writes no files."""
    missing = _run([], tmp_path)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error: ckpt is required") and missing.stderr.count("\n") == 1
    bad = _run([f"ckpt={ckpts['pt']}", "temperature=-1"], tmp_path)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "temperature=-1" in bad.stderr
    ok = _run([f"ckpt={ckpts['pt']}", "prompt=", "max_new_tokens=12", "num_samples=1"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "---" not in ok.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file


def test_cli_streams_multibyte_characters(monkeypatch, capsys):
    """A character split over several tokens is printed whole, once its last byte arrives."""
    text = " a 🦜 and 漢字."
    ids = tokenizer.encode(text)
    cli = generate_cli()
    written = []
    monkeypatch.setattr(cli, "load_model", lambda path, device: Scripted([ids]))
    monkeypatch.setattr(cli, "pack", lambda model, weights: model)  # a stand-in, not a GPT
    monkeypatch.setattr(cli, "load_tokenizer", lambda path: tokenizer.gpt2())
    monkeypatch.setattr(sys.stdout, "write", lambda s: written.append(s) or len(s))
    cfg = compose("generate", ["ckpt=any.pt", "prompt=Look:", "num_samples=1", "temperature=0"])
    assert cli.run(cfg) == 0
    assert "".join(written) == "Look:" + text + "\n"
    assert "🦜" in written and "\ufffd" not in "".join(written)
    assert len(written) > 5  # streamed piece by piece
