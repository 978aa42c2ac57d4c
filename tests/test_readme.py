"""The README's door, as written: the quick start's commands (shortened, see QUICK_START_IN_CI)
and the snippets that use what they produce (generate.py, the export and its transformers
Python snippet)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import generate_cli

from slm.config import compose

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")

# The quick start as CI runs it: the same command, plus overrides that (1) read the stories
# from the TinyStories piece next to the repo, as CI reaches no hub (the preset streams the
# hub's first stories), and (2) shorten it to 6 optimizer steps of 4 windows, validating
# every 3 steps on 8 windows. Everything else (model, context, learning rate, data slice
# and dir, loader) is the preset's.
QUICK_START_IN_CI = [
    "trainer.max_steps=6",
    "val_every_n_steps=3",
    "data.batch_size=4",
    "data.val_windows=8",
]


def section(title: str) -> str:
    """The README's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"the README has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def commands(block: str, program: str) -> list[list[str]]:
    """The lines of a bash block that run ``program``, as argv (comments dropped)."""
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [argv for argv in lines if argv[:2] == ["python", program]]


@pytest.fixture(scope="module")
def quick_start_run(v1_txt, tmp_path_factory) -> Path:
    """``python train.py ...`` of the README's quick start, run where a user would (the data
    dir and outputs/ land in the current directory)."""
    cwd = tmp_path_factory.mktemp("user")
    [block] = code_blocks(section("Quick start"), "bash")[:1]
    [train] = commands(block, "train.py")
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *train[2:], f"data.source={v1_txt}",
         *QUICK_START_IN_CI],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = (cwd / "outputs").glob("*/*")
    return run


@pytest.mark.slow
def test_quick_start_trains_and_generates_as_written(quick_start_run, capsys):
    run = quick_start_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"]) == ("completed", 6)
    assert metrics["parameters"]["total"] < 10e6  # a model for a CPU
    log = (run / "train.log").read_text()
    # 6 blocks of 6 x 192: a 4,096-token BPE (fitted to the text here) makes 0.79M of it.
    assert "model: 3.44M parameters (2.66M non-embedding, 0.79M embedding)" in log
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "sized for a GPU" not in log  # the preset trains on a CPU in minutes
    assert (run / "slm.pt").is_file() and (run / "loss.png").is_file()
    [block] = code_blocks(section("Quick start"), "bash")[:1]
    [generate] = commands(block, "generate.py")
    args = [a.replace("outputs/DATE/TIME", str(run)) for a in generate[2:]]
    assert generate_cli().run(compose("generate", args)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("--- sample 1/3 ---\nOnce upon a time") and "tokens/s" in err


@pytest.mark.slow
def test_python_generate_snippet_as_written(quick_start_run, capsys):
    """The Generate section's Python snippet, nanoGPT's ``model.generate`` on a (1, 1) tensor
    of zeros and on a prompt, on the quick start's model."""
    [snippet] = code_blocks(section("Generate"), "python")
    torch.manual_seed(0)
    exec(compile(snippet.replace("outputs/DATE/TIME", str(quick_start_run)), "README", "exec"), {})
    out = capsys.readouterr().out
    assert "Once upon a time" in out and len(out) > 200  # two stories of 100 new tokens


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run dir with the slm.pt of a model=tiny (GPT-2 family, 64 positions; untrained)."""
    import torch

    from slm.model import GPT, GPTConfig

    config = GPTConfig(**compose("train", ["model=tiny"]).model)
    run = tmp_path / "tiny-run"
    run.mkdir()
    state = GPT(config).state_dict()
    torch.save({"model_args": config.to_dict(), "model": state, "step": 1}, run / "slm.pt")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("which", ["quick_start_run", "tiny_run"])
def test_hugging_face_snippets_as_written(which, request, tmp_path, monkeypatch, capsys):
    """The export command and the transformers snippet (the README's and the model card's) on
    the quick start's model (Qwen 3 with its BPE, context 256) and on a model=tiny (GPT-2, 64
    positions): the prompt and its new tokens must fit in the context."""
    pytest.importorskip("transformers")
    from slm import export

    run = request.getfixturevalue(which)
    share = section("Share to Hugging Face")
    lines = code_blocks(share, "bash")[0].splitlines()
    [args] = [
        argv[3:] for argv in (shlex.split(line, comments=True) for line in lines)
        if argv[:3] == ["python", "-m", "slm.export"]
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    export.main([a.replace("outputs/DATE/TIME", str(run)) for a in args])
    card = (tmp_path / "my-model" / "README.md").read_text()
    for where, text in [("README.md", share), ("my-model/README.md", card)]:  # and the card's
        [snippet] = code_blocks(text, "python")
        capsys.readouterr()
        torch.manual_seed(0)  # the snippet samples: the same story at every run
        exec(compile(snippet, where, "exec"), {})
        story = capsys.readouterr().out
        # the new tokens, up to the 200 asked for or to a sampled <|endoftext|> (a model of a
        # few steps may end its story at once)
        ended = story.rstrip().endswith("<|endoftext|>")
        assert story.startswith("Once upon a time") and (len(story) > 100 or ended), where


def test_the_tracker_commands_compose_as_written():
    """Research comforts' tracker commands (logger=wandb, several, none) pick the trackers
    they say."""
    from slm.trackers import chosen

    [block] = [b for b in code_blocks(section("Research comforts"), "bash") if "logger=" in b]
    picked = [list(chosen(compose("train", argv[2:]))) for argv in commands(block, "train.py")]
    assert picked == [["wandb"], ["mlflow"], ["tensorboard", "wandb", "csv"], []]


@pytest.mark.slow
def test_gguf_commands_as_written(tiny_run, tmp_path, monkeypatch):
    """The Run with llama.cpp section's export commands (f32, q8_0) on a model=tiny; the
    Modelfile names the file they write; llama.cpp (where installed) loads it and continues
    the README's prompt."""
    pytest.importorskip("gguf")
    from slm import export

    text = section("Run with llama.cpp and Ollama")
    [block] = code_blocks(text, "bash")[:1]
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    runs = [argv[3:] for argv in lines if argv[:3] == ["python", "-m", "slm.export"]]
    assert len(runs) == 2
    monkeypatch.chdir(tmp_path)
    ckpt = str(tiny_run / "slm.pt")
    for args in runs:  # ckpt=outputs/DATE/TIME/slm.pt, then ckpt=...
        export.main([re.sub(r"^ckpt=.*", f"ckpt={ckpt}", a) for a in args])
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == [
        "my-model-q8_0.gguf",
        "my-model.gguf",
    ]
    [modelfile] = code_blocks(text, "modelfile")
    assert modelfile.startswith("FROM ./my-model.gguf\n")
    llama_cpp = pytest.importorskip("llama_cpp")
    [llama] = [argv for argv in lines if argv[:1] == ["llama-completion"]]
    prompt = llama[llama.index("-p") + 1]
    llm = llama_cpp.Llama("my-model.gguf", n_ctx=0, n_threads=1, verbose=False)
    try:
        out = llm(prompt, max_tokens=8, temperature=0)
        assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] > 0
    finally:
        llm.close()
