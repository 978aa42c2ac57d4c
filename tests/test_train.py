"""End-to-end: train(cfg) on CPU with model=tiny fills its run directory."""

import json
import logging
import math
import os
import re
import signal
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_ARGS, full_disk, generate_cli, tiny_cfg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slm.config import ConfigError, compose
from slm.errors import CheckpointError
from slm.model import GPT, GPTConfig
from slm.module import GPTModule
from slm.prepare import DataError, prepare
from slm.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory, v1_txt):
    d = tmp_path_factory.mktemp("v1")
    prepare(str(v1_txt), d, val_fraction=0.02)
    return d


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """Text the test writes itself: 200 short stories, prepared once."""
    d = tmp_path_factory.mktemp("small")
    names = ["Tom", "Lily", "Ben", "Mia"]
    things = ["a red ball", "a big dog", "a small cat", "a blue kite"]
    stories = [
        f"{names[i % 4]} had {things[(i // 4) % 4]}. They played all day. The end."
        for i in range(200)
    ]
    src = d / "stories.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(src), d / "data", val_fraction=0.1)
    return d / "data", str(src)


@pytest.mark.slow
def test_fit_on_real_tinystories_fills_run_dir(v1_dir, v1_txt, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="slm")
    run = tmp_path / "run"
    # The story suite on 2 openings, with a judge that is not there: recorded, not fatal.
    closed = socket.create_server(("127.0.0.1", 0))
    judge = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()
    suite = ["stories=2", "suite.max_new_tokens=8", f"judge={judge}", "suite.judge_model=m",
             "suite.judge_retries=0"]  # fmt: skip
    cfg = tiny_cfg(v1_dir, run, f"data.source={v1_txt}", "data.val_fraction=0.02", *suite)
    best = train(cfg)

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {
        "status", "best_val_loss", "final_val_loss", "final_val_step", "steps", "tokens_seen",
        "wall_seconds", "tokens_per_second", "parameters", "stories",
    }  # fmt: skip
    # model=tiny: the tied 50304 x 64 embedding, 64 x 64 positions, 2 blocks of 12 x 64^2
    # weights plus their two norms' 2 x 64 and the final norm's 64 (no biases).
    blocks = 2 * (12 * 64 * 64 + 2 * 64) + 64
    assert metrics["parameters"] == {
        "total": 50304 * 64 + 64 * 64 + blocks, "embedding": 50304 * 64 + 64 * 64,
        "non_embedding": blocks,
    }  # fmt: skip
    assert "sized for a GPU" not in caplog.text
    # The suite on slm.pt: 2 held-out openings, greedy and sampled; its completions beside.
    suite = metrics["stories"]
    assert suite["openings"] == 2 and suite["settings"]["max_new_tokens"] == 8
    assert 0 < suite["continuation_loss"] < math.log(50257)
    assert set(suite["greedy"]) == set(suite["sampled"]) == {
        "completions", "distinct_1", "distinct_2", "distinct_3", "repeat_4gram", "eot_rate",
        "words", "carryover",
    }  # fmt: skip
    assert suite["judge"]["error"].startswith(f"judge {judge} (m): no answer from {judge}")
    records = [json.loads(x) for x in (run / "slm.stories.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["tokens"] <= 8 for r in records)
    held_out = v1_txt.read_text()
    assert all(r["opening"] in held_out for r in records)  # real stories' first sentences
    assert metrics["final_val_step"] == 40
    assert metrics["status"] == "completed"
    assert metrics["steps"] == 40
    assert metrics["tokens_seen"] == 40 * 8 * 64
    assert metrics["best_val_loss"] == pytest.approx(best)
    # The loss starts at ~ln(50257) = 10.8 and must fall well below it.
    assert best < math.log(50257) - 3

    # The run dir, exactly: TensorBoard (the default tracker) alone, in tb/.
    assert {p.name for p in run.iterdir()} == {
        ".train.lock", "checkpoints", "slm.pt", "loss.png", "metrics.json", "slm.stories.jsonl",
        "tb",
    }  # fmt: skip
    assert {p.name for p in (run / "tb").iterdir() if not p.name.startswith("events.out")} == {
        "hparams.yaml"
    }  # fmt: skip
    # TensorBoard: real event files with the curves.
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/ppl", "val/bpb"} <= set(tags)
    assert any(t.startswith("lr-") for t in tags)
    assert "train/device/items_per_sec" in tags  # tokens/s (and MFU on GPUs Lightning knows)
    story = acc.Scalars("stories/greedy_distinct_2")
    assert [e.step for e in story] == [40]
    assert story[0].value == pytest.approx(suite["greedy"]["distinct_2"], rel=1e-6)
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [20, 40]  # one story per validation
    story = samples[-1].tensor_proto.string_val[0].decode()
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time")
    val = [e.value for e in acc.Scalars("val/loss")]
    # At the steps of the checkpoints and loss.png, from the step-0 validation on.
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 20, 40]
    assert [e.step for e in acc.Scalars("val/bpb")] == [0, 20, 40]
    # The validation history reaches the run's log (train.log under Hydra) too.
    assert re.search(r"step 0: val/loss 10\.\d+", caplog.text)
    assert re.search(r"step 40: val/loss \d+\.\d+, val/ppl", caplog.text)
    assert val[-1] == pytest.approx(metrics["final_val_loss"], rel=1e-5)

    # Checkpoints: best by val/loss and last, both loadable without Hydra.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-step") for n in ckpts)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 40
    GPTModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")

    # slm.pt: the best weights and the model config.
    pt = torch.load(run / "slm.pt", weights_only=True)
    model = GPT(GPTConfig(**pt["model_args"]))
    model.load_state_dict(pt["model"])
    assert pt["model_args"]["n_embd"] == 64

    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow
def test_run_history_starts_with_step0_val(small_dir, tmp_path):
    data, src = small_dir
    run = tmp_path / "run"
    train(tiny_cfg(data, run, f"data.source={src}", "data.val_fraction=0.1", "trainer.max_steps=7",
                   "val_every_n_steps=2", "optim.warmup_steps=1",
                   "trainer.log_every_n_steps=3"))  # fmt: skip
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 7
    history = ckpt["callbacks"]["RunHistory"]
    # From step 0, and at the last step too, though 7 is no multiple of val_every_n_steps.
    assert [s for s, _ in history["val"]] == [0, 2, 4, 6, 7]
    assert history["val"][0][1] == pytest.approx(math.log(50257), abs=0.3)
    # The train loss is read from the device on logging steps only (no sync per step).
    assert [s for s, _ in history["train"]] == [2, 5, 6]


@pytest.mark.slow
def test_non_finite_loss_stops_with_step(small_dir, tmp_path, monkeypatch):
    data, src = small_dir
    real = GPTModule.forward

    def poisoned(self, idx, targets=None):
        logits, loss = real(self, idx, targets)
        if self.training and self.global_step == 3:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPTModule, "forward", poisoned)
    run = tmp_path / "run"
    cfg = tiny_cfg(data, run, f"data.source={src}", "data.val_fraction=0.1",
                   "trainer.log_every_n_steps=2")  # fmt: skip
    # Checked where the loss is read anyway: on the next logging step (step 3 of 0, 1, 2, 3).
    with pytest.raises(FloatingPointError, match="train/loss is nan at step 3: .*optim.lr"):
        train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("FloatingPointError: train/loss is nan at step 3")
    assert metrics["steps"] == 4  # the poisoned step was taken before the loss was read


class CtrlC(L.Callback):
    """A real SIGINT to this process while step 7 is under way."""

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 6:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_and_leaves_outputs(small_dir, tmp_path, monkeypatch):
    data, src = small_dir
    run = tmp_path / "run"
    real_init = L.Trainer.__init__

    def init(self, *args, callbacks=(), **kwargs):
        real_init(self, *args, callbacks=[*callbacks, CtrlC()], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)
    # Python's own SIGINT handler, also where pytest runs in the background (SIG_IGN there).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits with status 1
            train(tiny_cfg(data, run, f"data.source={src}", "data.val_fraction=0.1"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["steps"], metrics["status"]) == (7, "interrupted")
    assert (metrics["final_val_step"], metrics["tokens_seen"]) == (0, 7 * 8 * 64)
    assert (run / "slm.pt").exists() and (run / "loss.png").exists()


def test_failure_before_first_step_writes_no_weights(small_dir, tmp_path, monkeypatch, caplog):
    """A run that crashes at step 0 (as fused AdamW + clipping did on every GPU) leaves
    metrics.json saying so, and no slm.pt that generate.py would take for a model."""
    data, src = small_dir
    run = tmp_path / "run"

    def crash(self, batch, batch_idx):
        raise RuntimeError("the optimizer does not allow for gradient clipping\nsecond line")

    monkeypatch.setattr(GPTModule, "training_step", crash)
    with caplog.at_level(logging.INFO, logger="slm"), pytest.raises(RuntimeError, match="clip"):
        train(tiny_cfg(data, run, f"data.source={src}", "data.val_fraction=0.1"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["steps"] == 0
    assert metrics["error"] == "RuntimeError: the optimizer does not allow for gradient clipping"
    assert not (run / "slm.pt").exists() and not (run / "loss.png").exists()
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == [".train.lock", "metrics.json"]
    # What the log says it wrote is what is there.
    assert f"wrote {run}/metrics.json: " in caplog.text and "slm.pt" not in caplog.text


def test_a_full_disk_stops_the_run_on_one_line_and_leaves_no_partial_checkpoint(
    small_dir, tmp_path
):
    """The disk fills after step 2's checkpoints: the run stopped with "best-step4.ckpt: not a
    PyTorch checkpoint, or truncated" (slm.pt read the truncated file it had left). Now it says
    why, and names the file; nothing partial is left, step 2's checkpoints are whole."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    cfg = tiny_cfg(small_dir[0], run, "trainer.max_steps=6", "val_every_n_steps=2")
    with full_disk(ckpts, after=2) as written, pytest.raises(CheckpointError) as e:
        train(cfg)
    assert len(written) == 3  # best-step2, last at step 2, then the one that failed
    msg = str(e.value)
    failed = re.match(rf"{re.escape(str(ckpts))}/(best-step4|last)\.ckpt: (.*)", msg)
    assert failed and "\n" not in msg, msg
    assert failed[2] == (
        "no space left on device, so the checkpoint was not written (nothing of it is left); "
        f"free space on that disk; then resume with ckpt_path={ckpts / 'last.ckpt'}"
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-step2.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "no space left on device" in metrics["error"]


def test_block_size_larger_than_split(small_dir, tmp_path):
    data, src = small_dir
    n_val = json.loads((data / "meta.json").read_text())["splits"]["val"]["tokens"]
    cfg = tiny_cfg(data, tmp_path / "run", f"data.source={src}", "data.val_fraction=0.1",
                   f"model.block_size={n_val}")  # fmt: skip
    with pytest.raises(DataError, match=f"model.block_size={n_val} is not smaller than the"):
        train(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_head=3", "not divisible by model.n_head=3"),
        ("optim.lr=-1", "optim.lr=-1 must be positive"),
        ("optim.warmup_steps=41", "warmup_steps=41 exceeds trainer.max_steps=40"),
        ("trainer.precision=16-mixed", "precision 16-mixed was asked for on cpu"),
        ("ckpt_path=/nope.ckpt", "ckpt_path=/nope.ckpt: no such checkpoint file"),
        ("ckpt_path=last", "ckpt_path=last: there is no .*/run/checkpoints/last.ckpt"),
        ("optim.lr=abc", "optim.lr=abc must be a number"),
        ("+trainer.bogus=1", "trainer.bogus is not a lightning.Trainer argument"),
        ("+trainer.val_check_interval=5", "use val_every_n_steps"),
        ("+trainer.logger=false", "trainer.logger is set by slm's train"),
        ("val_every_n_steps=0", "val_every_n_steps=0 must be a positive integer"),
        # Every numeric knob's range.
        ("optim.weight_decay=-1", r"optim.weight_decay=-1 must be >= 0 \(0: no weight decay\)"),
        ("optim.lr=nan", "optim.lr=nan must be a number"),
        ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
        ("optim.min_lr=-1e-4", "optim.min_lr=-0.0001 must be >= 0"),
        ("model.dropout=1.0", r"model.dropout=1.0 must be in \[0, 1\)"),
        ("model.n_embd=64.5", "model.n_embd=64.5 must be a positive integer"),
        ("trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val=-1 must be >= 0 \(or null"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be a positive integer"),
        ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
        ("data.val_fraction=1.5", r"data.val_fraction=1.5 must be in \(0, 1\)"),
        ("data.max_stories=0", "data.max_stories=0 must be a positive integer"),
        ("sample.max_new_tokens=-1", "sample.max_new_tokens=-1 must be an integer >= 0"),
        ("seed=-1", "seed=-1 must be an integer >= 0"),
    ],
)
def test_invalid_config_fails_before_training(override, message, tmp_path):
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run", override)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_last_ckpt_follows_training_when_val_gets_worse(small_dir, tmp_path, monkeypatch):
    """last.ckpt is refreshed at every validation, not only when val/loss improves."""
    data, src = small_dir
    real = GPTModule.forward

    def worse_each_time(self, idx, targets=None):
        logits, loss = real(self, idx, targets)
        if not self.training:  # a validation: val/loss grows with the step
            loss = loss + self.global_step * 10.0
        return logits, loss

    monkeypatch.setattr(GPTModule, "forward", worse_each_time)
    run = tmp_path / "run"
    train(tiny_cfg(data, run, f"data.source={src}", "data.val_fraction=0.1", "trainer.max_steps=6",
                   "val_every_n_steps=2", "optim.warmup_steps=1"))  # fmt: skip
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best-step2.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    assert torch.load(run / "slm.pt", weights_only=True)["step"] == 2  # the best weights


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [("optim.lr=abc", "optim.lr=abc must be a number"),
     ("+trainer.bogus=1", "trainer.bogus is not a lightning.Trainer argument")],
)  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, override, message):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "train.py", *TINY_ARGS, override, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and f"error: {message}" in lines[0], lines
    assert not (tmp_path / "run").exists()  # stopped at its start: no run dir left behind


@pytest.mark.slow
def test_the_quick_start_offline_names_data_source_and_leaves_no_dirs(tmp_path):
    """Offline, experiment=quickstart stops at the hub: its error said "give a local path"
    and it left outputs/DATE/TIME (Hydra's files, the log, the lock) and an empty data dir."""
    import subprocess
    import sys

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "experiment=quickstart"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 1
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "could not load it from the Hugging Face hub" in lines[0], lines
    assert "prepare from local files with data.source=PATH" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_short_runs_warm_up_without_an_error():
    """The default warmup (auto) scales to runs shorter than 200 steps."""
    from slm.config import validate

    cfg = compose("train", ["trainer.max_steps=40"])
    validate(cfg)
    assert cfg.optim.warmup_steps == 4
    cfg = compose("train", ["trainer.max_steps=5000"])
    validate(cfg)
    assert cfg.optim.warmup_steps == 200


# -- tokenizer=bpe ---------------------------------------------------------------------------


def test_bpe_fit_loss_falls_resumes_exactly_and_generates(bpe_run, v2_txt, tmp_path, capsys):
    """model=tiny tokenizer=bpe on real text: the model's vocab is the data's BPE (not the
    preset's), the loss falls, every checkpoint carries the tokenizer, a run stopped at step 6
    and resumed ends as the 12-step run, and slm.pt alone generates (no data dir)."""
    import shutil

    from conftest import BPE_ARGS

    from slm.checkpoint import load_model, load_tokenizer
    from slm.prepare import read_tokenizer

    run, data = bpe_run
    tok = read_tokenizer(data)
    meta = json.loads((data / "meta.json").read_text())
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("bpe", 4096, 0) == (
        meta["tokenizer"], meta["vocab_size"], meta["eot_token"],
    )  # fmt: skip
    a = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["hyper_parameters"]["vocab_size"], a["hyper_parameters"]["eot_id"]) == (4096, 0)
    assert a["state_dict"]["model.transformer.wte.weight"].shape == (4096, 64)
    val = a["callbacks"]["RunHistory"]["val"]
    assert [s for s, _ in val] == [0, 6, 12]
    assert val[0][1] == pytest.approx(math.log(4096), abs=0.3)
    assert val[-1][1] < val[0][1] - 1.2  # the loss falls (8.3 -> 6.6)
    for path in (run / "slm.pt", run / "checkpoints" / "last.ckpt"):
        assert load_tokenizer(path).sha256 == tok.sha256 == meta["tokenizer_sha256"]

    # Stopped at step 6 (the constant lr makes its schedule the 12-step run's), then resumed.
    b = tmp_path / "b"
    args = [f"data.source={v2_txt}", *BPE_ARGS]
    train(tiny_cfg(data, b, *args, "trainer.max_steps=6"))
    train(tiny_cfg(data, b, *args, "trainer.max_steps=12", "ckpt_path=last",
                   "allow_schedule_change=true"))  # fmt: skip
    resumed = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 12 and resumed["tokenizer"] == a["tokenizer"]
    val_b = resumed["callbacks"]["RunHistory"]["val"]
    assert [s for s, _ in val_b] == [0, 6, 12]
    assert [v for _, v in val_b] == pytest.approx([v for _, v in val], rel=1e-5)
    for k, w in a["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], w, rtol=1e-5, atol=1e-6)

    # slm.pt alone: the data dir is gone, generate.py tokenizes with the checkpoint's BPE.
    pt = shutil.copy(run / "slm.pt", tmp_path / "slm.pt")
    shutil.rmtree(b)
    cli = generate_cli()
    moved = tmp_path / "data-moved"
    shutil.move(data, moved)
    try:
        cfg = compose("generate", [f"ckpt={pt}", "prompt=Once upon a time", "temperature=0",
                                   "num_samples=1", "max_new_tokens=20",
                                   "weights=fp32"])  # fmt: skip
        assert cli.run(cfg) == 0
    finally:
        shutil.move(moved, data)
    out = capsys.readouterr().out
    from slm.sample import generate

    ids = generate(load_model(pt), tok.encode("Once upon a time"), 20, temperature=0)[0]
    assert out == "Once upon a time" + tok.decode(ids) + "\n" and len(ids) > 0
    assert all(t < 4096 for t in ids)


def test_gpu_sized_run_on_a_cpu_is_warned(tmp_path, caplog):
    """model=small's 5000 steps (7e15 FLOPs) on a CPU: a plain warning at the start, pointing
    to the CPU quick start (the run then stops before any step: its val split is shorter than
    model=small's 256-token context)."""
    src = tmp_path / "stories.txt"
    src.write_text("\n<|endoftext|>\n".join(f"Tom had {n} cats. The end." for n in range(30)))
    where = [f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}"]
    cfg = compose("train", ["model=small", "hardware=cpu", *where, f"data.source={src}",
                            "data.val_fraction=0.1"])  # fmt: skip
    with (
        caplog.at_level(logging.INFO, logger="slm"),
        pytest.raises(DataError, match="block_size=256 is not smaller than"),
    ):
        train(cfg)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith(
        "this run is sized for a GPU (30.0M parameters x 8,192 tokens a step x 5,000 steps = "
        "7.4e+15 FLOPs) and trains on the CPU"
    )
    assert "experiment=quickstart" in warning.getMessage()


@pytest.mark.slow
def test_a_run_dir_belongs_to_one_live_run(small_dir, tmp_path):
    """Two real train.py on one hydra.run.dir: the second stops with one line before writing
    anything there (not .hydra/, not train.log); the first one's lock dies with it."""
    import subprocess
    import sys

    from slm.rundir import run_dir_lock

    data, src = small_dir
    run = tmp_path / "run"
    command = [sys.executable, "train.py", *TINY_ARGS, f"data.dir={data}", f"data.source={src}",
               "data.val_fraction=0.1", f"hydra.run.dir={run}"]  # fmt: skip
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [*command, "trainer.max_steps=100000"], cwd=REPO, stdout=log, stderr=log
        )
    try:
        for _ in range(1200):  # it holds the lock once it has written its config
            if (run / ".hydra" / "overrides.yaml").exists():
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.1)
        time.sleep(0.2)  # the file written whole
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        second = subprocess.run(
            [*command, "seed=7"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1
        lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {run} is the run directory of a run still going on "
                                   f"(pid {first.pid}); give this run its own")  # fmt: skip
        assert first.poll() is None  # the first goes on, its files untouched by the second
        assert (run / ".hydra" / "overrides.yaml").read_text() == overrides
        assert "seed=7" not in (run / "train.log").read_text()
    finally:
        first.kill()
        first.wait()
    with run_dir_lock(run):  # the killed run's lock file is there, and blocks nothing
        assert (run / ".train.lock").read_text().strip() == str(os.getpid())
