import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from slm import tokenizer
from slm.checkpoint import recorded_data_dir
from slm.errors import DataError
from slm.evaluate import bits_per_byte, evaluate, main
from slm.model import GPT, GPTConfig
from slm.prepare import main as prepare_main
from slm.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    stories = [f"Anna had {n} red apples. She gave one to Sam. The end." for n in range(120)]
    src = d / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(src), d / "data", val_fraction=0.25)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    model = GPT(config)
    torch.save({"model_args": config.to_dict(), "model": model.state_dict()}, d / "slm.pt")
    return d, src, model


def test_every_val_token_once_in_non_overlapping_windows(setup):
    d, _, model = setup
    tokens = np.fromfile(d / "data" / "val.bin", dtype=np.uint16).astype(np.int64)
    T, n_windows = 32, (len(tokens) - 1) // 32
    x = torch.from_numpy(tokens[: n_windows * T]).view(n_windows, T)
    y = torch.from_numpy(tokens[1 : n_windows * T + 1]).view(n_windows, T)
    with torch.no_grad():
        _, expected = model(x, y)  # one batch: the mean over every target token
    result = evaluate(model, d / "data", batch_size=3)  # uneven last batch
    assert result["tokens"] == n_windows * T
    assert result["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    meta = json.loads((d / "data" / "meta.json").read_text())["splits"]["val"]
    bpb = expected.item() / math.log(2) * meta["tokens"] / meta["bytes"]
    assert result["val_bpb"] == pytest.approx(bpb, rel=1e-5)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), tokens=1, utf8_bytes=1) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 2, tokens=100, utf8_bytes=400) == pytest.approx(0.5)


@pytest.mark.slow
def test_cli_prints_json_last(setup):
    d, src, _ = setup
    args = [f"ckpt={d / 'slm.pt'}", f"data.source={src}", f"data.dir={d / 'data'}",
            "data.val_fraction=0.25", "device=cpu"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "slm.evaluate", *args], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"val_loss", "val_ppl", "val_bpb", "tokens"}


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [([], "error: ckpt is required"), (["ckpt=/nope.pt"], "error: .*nope.pt")],
)
def test_cli_errors(setup, args, message):
    d, src, _ = setup
    out = subprocess.run(
        [sys.executable, "-m", "slm.evaluate", *args, f"data.source={src}",
         f"data.dir={d / 'data'}", "data.val_fraction=0.25"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert re.match(message, lines[0])


def test_text_scores_every_story_without_touching_data_dir(setup, tmp_path, capsys):
    d, src, model = setup
    stories = [f"Anna had {n} red apples. She gave one to Sam. The end." for n in range(120)]
    tokens = np.array(
        [t for s in stories for t in tiktoken.get_encoding("gpt2").encode_ordinary(s) + [50256]]
    )
    T, n_windows = 32, (len(tokens) - 1) // 32
    x = torch.from_numpy(tokens[: n_windows * T]).view(n_windows, T)
    y = torch.from_numpy(tokens[1 : n_windows * T + 1]).view(n_windows, T)
    with torch.no_grad():
        _, expected = model(x, y)
    utf8_bytes = sum(len(s.encode()) for s in stories)

    data_dir = tmp_path / "data"  # never created: text= reads no data dir
    result = main([f"ckpt={d / 'slm.pt'}", f"text={src}", f"data.dir={data_dir}", "device=cpu"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["tokens"] == n_windows * T  # all 120 stories, not a held-out fraction
    assert result["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["val_bpb"] == pytest.approx(
        expected.item() / math.log(2) * len(tokens) / utf8_bytes, rel=1e-5
    )
    assert not data_dir.exists()


def test_text_errors_name_the_text_key(setup, tmp_path):
    d, _, _ = setup
    with pytest.raises(DataError, match=r"^text /no/such\.txt: no such file or directory"):
        main([f"ckpt={d / 'slm.pt'}", "text=/no/such.txt", "device=cpu"])
    few = tmp_path / "few.txt"
    few.write_text("Hi.\n<|endoftext|>\n")
    with pytest.raises(DataError, match=r"block_size=32 is not smaller than the 3 tokens of text="):
        main([f"ckpt={d / 'slm.pt'}", f"text={few}", "device=cpu"])


def test_data_dir_alone_and_the_fix_for_a_truncated_bin(setup, tmp_path, capsys):
    d, src, _ = setup
    data = Path(shutil.copytree(d / "data", tmp_path / "data"))
    args = [f"ckpt={d / 'slm.pt'}", f"data.dir={data}", "device=cpu"]
    expected = main(args)  # no data.source: the one data.dir's meta.json records
    with open(data / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"val\.bin has 10 bytes") as e:
        main(args)
    assert "\n" not in str(e.value)
    command = re.search(r"`python -m slm\.prepare ([^`]*)`", str(e.value))[1]
    prepare_main(shlex.split(command))  # the source and val_fraction it was prepared with
    assert main(args) == expected


# -- tokenizer=bpe ---------------------------------------------------------------------------


def test_a_bpe_checkpoint_scores_text_with_its_own_tokenizer(bpe_run, setup, capsys):
    """text=: the stories are tokenized with the checkpoint's BPE, and bits per byte are the
    loss over those tokens per UTF-8 byte of the stories: exact, whatever the tokenizer."""
    from slm.checkpoint import load_model, load_tokenizer

    d, src, _ = setup
    pt = bpe_run[0] / "slm.pt"
    model, tok = load_model(pt), load_tokenizer(pt)
    stories = [f"Anna had {n} red apples. She gave one to Sam. The end." for n in range(120)]
    tokens = tok.encode_stories(stories).astype(np.int64)
    T, n_windows = 64, (len(tokens) - 1) // 64
    x = torch.from_numpy(tokens[: n_windows * T]).view(n_windows, T)
    y = torch.from_numpy(tokens[1 : n_windows * T + 1]).view(n_windows, T)
    with torch.no_grad():
        _, expected = model(x, y)
    utf8_bytes = sum(len(s.encode()) for s in stories)
    result = main([f"ckpt={pt}", f"text={src}", "device=cpu"])
    assert result["tokens"] == n_windows * T
    assert result["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["val_bpb"] == pytest.approx(
        expected.item() / math.log(2) * len(tokens) / utf8_bytes, rel=1e-5
    )


def test_a_data_dir_of_another_tokenizer_is_a_one_line_error(bpe_run, setup):
    d, _, model = setup
    pt = bpe_run[0] / "slm.pt"
    with pytest.raises(DataError) as e:
        main([f"ckpt={pt}", f"data.dir={d / 'data'}", "device=cpu"])  # a gpt2 data dir
    assert str(e.value).startswith(
        f"data.dir {d / 'data'} holds tokens of tokenizer gpt2, but the checkpoint was trained "
        "with bpe (4,096 tokens, sha256 "
    )
    assert "\n" not in str(e.value) and "text=SRC" in str(e.value)
    with pytest.raises(DataError, match=r"holds tokens of tokenizer bpe \(4,096 tokens"):
        evaluate(model, bpe_run[1], tokenizer=tokenizer.gpt2())  # a gpt2 model, a bpe dir
    result = main([f"ckpt={pt}", f"data.dir={bpe_run[1]}", "device=cpu"])  # its own
    assert result["tokens"] > 0


# -- the data dir a run recorded -------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No network (the hub's loader fails as offline) and a working dir without data/."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (Offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)


def test_a_run_s_checkpoint_is_scored_on_the_data_dir_its_run_recorded(
    bpe_run, offline_hub, tmp_path, capsys
):
    """``ckpt=RUN/slm.pt`` without data.dir went to the hub for the default data/tinystories
    (offline: an error). Now the run's own data dir, from its .ckpt (the DataModule's state),
    the checkpoints beside an slm.pt, or its .hydra/config.yaml; stderr says which."""
    run, data = bpe_run
    # A run dir as train.py leaves it (.hydra/, data.dir relative to where it ran), no .ckpt.
    hydra_run = tmp_path / "outputs" / "run"
    (hydra_run / ".hydra").mkdir(parents=True)
    shutil.copy(run / "slm.pt", hydra_run / "slm.pt")
    (hydra_run / ".hydra" / "config.yaml").write_text(f"data:\n  dir: {data.name}\n")
    (hydra_run / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  runtime:\n    cwd: {data.parent}\n"
    )
    for ckpt in (run / "slm.pt", run / "checkpoints" / "last.ckpt", hydra_run / "slm.pt"):
        expected = main([f"ckpt={ckpt}", f"data.dir={data}", "device=cpu"])
        assert f"data.dir={data} (as given)" in capsys.readouterr().err
        assert main([f"ckpt={ckpt}", "device=cpu"]) == expected
        said = f"data.dir={data} (where the run of {ckpt} trained; data.dir=DIR for another)"
        assert said in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_ckpt_in_checkpoints_without_the_datamodule_s_state_takes_its_run_s_hydra(tmp_path):
    """RUN/checkpoints/best.ckpt that records no data dir: its run is RUN (not checkpoints/),
    whose .hydra/config.yaml records data.dir."""
    run = tmp_path / "outputs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    torch.save({"hyper_parameters": {}, "state_dict": {}}, run / "checkpoints" / "best.ckpt")
    (run / ".hydra" / "config.yaml").write_text("data:\n  dir: data/mine\n")
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {tmp_path}\n")
    assert recorded_data_dir(run / "checkpoints" / "best.ckpt") == tmp_path / "data" / "mine"


def test_a_checkpoint_that_records_no_data_dir_takes_the_default(
    setup, offline_hub, tmp_path, capsys
):
    d, _, _ = setup  # a bare slm.pt: no run dir around it
    with pytest.raises(DataError, match=r"Hugging Face hub .* data\.source=PATH"):
        main([f"ckpt={d / 'slm.pt'}", "device=cpu"])
    said = "data.dir=data/tinystories (the default; data.dir=DIR for another)"
    assert said in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the data dir that prepare made is gone again
