"""Resume: a run interrupted at an arbitrary step (Ctrl-C, or killed), then resumed, ends as the
uninterrupted run ends: the same step, weights, validation steps and losses."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS, tiny_cfg

from slm.errors import CheckpointError, ConfigError
from slm.prepare import prepare
from slm.train import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    stories = [
        f"Story {i}: the {['cat', 'dog', 'bird', 'fish'][i % 4]} ran home." for i in range(300)
    ]
    src = d / "stories.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(src), d / "data", val_fraction=0.1)
    return d / "data", f"data.source={src}"


def args_of(source, accumulate):
    return [source, "data.val_fraction=0.1", f"trainer.max_steps={STEPS}", "val_every_n_steps=8",
            "optim.warmup_steps=2", "data.val_windows=8", "data.batch_size=4",
            f"trainer.accumulate_grad_batches={accumulate}",
            "trainer.log_every_n_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The reference run of each accumulation setting, trained once."""
    runs = {}

    def get(accumulate):
        if accumulate not in runs:
            run = tmp_path_factory.mktemp(f"whole{accumulate}")
            train(tiny_cfg(data[0], run, *args_of(data[1], accumulate)))
            runs[accumulate] = run
        return runs[accumulate]

    return get


def _step_of(path):
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except Exception:  # not there yet, or being written
        return -1


def interrupt(data_dir, args, run, how):
    """Start `python train.py` and send it ``how`` at a random moment after step 8."""
    command = [sys.executable, "train.py", *TINY_ARGS, *args, f"data.dir={data_dir}",
               f"hydra.run.dir={run}"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while _step_of(last) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.3))
    proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    stopped_at = _step_of(last)
    if how == "SIGINT":
        assert proc.returncode == 1, err.decode()[-2000:]  # Lightning's graceful shutdown
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["status"], metrics["steps"]) == ("interrupted", stopped_at)
    if not 8 <= stopped_at < STEPS:
        pytest.skip(f"the run was not interrupted mid-way (last.ckpt at step {stopped_at})")
    return stopped_at


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, accumulate", [("SIGINT", 1), ("SIGINT", 2), ("SIGKILL", 2)]
)  # fmt: skip
def test_interrupted_run_resumes_exactly(data, uninterrupted, tmp_path, how, accumulate):
    data_dir, source = data
    args = args_of(source, accumulate)
    run = tmp_path / "run"
    stopped_at = interrupt(data_dir, args, run, how)
    if how == "SIGKILL":
        assert stopped_at in (8, 16)  # the last validation's last.ckpt
    train(tiny_cfg(data_dir, run, *args, "ckpt_path=last"))  # resumes this run's last.ckpt

    a = torch.load(uninterrupted(accumulate) / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert b["global_step"] == a["global_step"] == STEPS
    ha, hb = a["callbacks"]["RunHistory"], b["callbacks"]["RunHistory"]
    assert [s for s, _ in hb["train"]] == [s for s, _ in ha["train"]] == list(range(STEPS))
    assert [v for _, v in hb["train"]] == pytest.approx([v for _, v in ha["train"]], rel=1e-5)
    assert [s for s, _ in hb["val"]] == [s for s, _ in ha["val"]] == [0, 8, 16, 24]
    assert [v for _, v in hb["val"]] == pytest.approx([v for _, v in ha["val"]], rel=1e-5)
    for k, w in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], w, rtol=1e-5, atol=1e-6)
    for s in b["optimizer_states"][0]["state"].values():  # optimizer state resumed too
        assert s["step"].item() == STEPS
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        p.name for p in (uninterrupted(accumulate) / "checkpoints").iterdir()
    )
    ma, mb = (
        json.loads((r / "metrics.json").read_text()) for r in (uninterrupted(accumulate), run)
    )
    assert mb["status"] == "completed" and mb["steps"] == STEPS
    assert mb["tokens_seen"] == ma["tokens_seen"] == STEPS * accumulate * 4 * 64
    assert mb["final_val_loss"] == pytest.approx(ma["final_val_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_refuses_another_schedule_or_model(data, uninterrupted, tmp_path, caplog):
    data_dir, source = data
    ckpt = uninterrupted(1) / "checkpoints/last.ckpt"
    args = [*args_of(source, 1), f"ckpt_path={ckpt}"]
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(data_dir, tmp_path / "a", *args, "trainer.max_steps=48"))
    assert "max_steps: 24 -> 48" in str(e.value) and "allow_schedule_change=true" in str(e.value)
    with pytest.raises(
        CheckpointError, match=r"holds another model: model.n_layer=2 \(config: 3\)"
    ):
        train(tiny_cfg(data_dir, tmp_path / "b", *args, "model.n_layer=3"))
    with pytest.raises(CheckpointError, match="trained with optim=adamw, not optim=muon"):
        train(tiny_cfg(data_dir, tmp_path / "d", *args, "optim=muon"))
    # Opted in: the run goes on from step 24 to 30 on the new schedule (a higher lr too), with
    # the new weight decay, and says what changed (and that the global batch did).
    run = tmp_path / "c"
    caplog.set_level(logging.WARNING, logger="slm")
    train(tiny_cfg(data_dir, run, *args, "trainer.max_steps=30", "allow_schedule_change=true",
                   "optim.lr=6e-3", "optim.weight_decay=0.05", "data.batch_size=8"))  # fmt: skip
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 30
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [6e-3, 6e-3]
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-4])  # min_lr at max_steps
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert (
        "resuming with optim.lr=0.006 (checkpoint: 0.003), optim.weight_decay=0.05 (checkpoint: "
        "0.1), trainer.max_steps=30 (checkpoint: 24)"
    ) in caplog.text
    assert (
        "resuming at a global batch of 8 sequences (data.batch_size=8 x 1 devices x accumulate "
        "1), where the checkpoint's run trained at 4 (4 x 1 x 1)"
    ) in caplog.text


@pytest.mark.slow
def test_resume_refuses_another_data_dir(data, uninterrupted, tmp_path):
    """Another data.dir would switch the validation set under best_val_loss: one line, unless
    allow_data_change=true."""
    data_dir, source = data
    ckpt = uninterrupted(1) / "checkpoints/last.ckpt"
    other = tmp_path / "other"
    prepare(source.removeprefix("data.source="), other, val_fraction=0.1)
    args = [*args_of(source, 1), f"ckpt_path={ckpt}"]
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(other, tmp_path / "a", *args))
    assert str(e.value) == (
        f"ckpt_path={ckpt} was trained on data.dir={data_dir}, not {other}: the validation set "
        "would change and best_val_loss would mix the two; resume with "
        f"data.dir={data_dir}, or pass allow_data_change=true to go on with the new data"
    )
    assert not (tmp_path / "a").exists()
    more = ["trainer.max_steps=26", "allow_schedule_change=true"]
    train(tiny_cfg(other, tmp_path / "b", *args, *more, "allow_data_change=true"))
    last = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 26 and last["TokenDataModule"]["dir"] == str(other)


@pytest.mark.slow
def test_ckpt_path_last_looks_in_this_run_only(data, uninterrupted, tmp_path):
    """Never another run's (or sweep job's) last.ckpt, even one in the same outputs tree."""
    uninterrupted(1)
    data_dir, source = data
    run = tmp_path / "fresh"
    with pytest.raises(ConfigError, match=f"ckpt_path=last: there is no {run}/checkpoints"):
        train(tiny_cfg(data_dir, run, *args_of(source, 1), "ckpt_path=last"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signal_while_writing_outputs_is_held(tmp_path, monkeypatch):
    """A Ctrl-C during write_outputs lands after both slm.pt and metrics.json are written."""
    from slm import outputs

    written = []

    def slow_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the writing
        written.append("slm.pt")
        written.append("metrics.json")

    monkeypatch.setattr(outputs, "write_outputs", slow_write)
    with pytest.raises(KeyboardInterrupt), outputs.deferred_signals():
        outputs.write_outputs()
    assert written == ["slm.pt", "metrics.json"]
