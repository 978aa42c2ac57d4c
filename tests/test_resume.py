"""Resume: a run of N steps equals a run of N/2 steps resumed to N."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from test_train import TINY_ARGS, tiny_cfg

from slm.prepare import prepare
from slm.train import train

ROOT = Path(__file__).resolve().parents[1]


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


class StopAt(L.Callback):
    """Ctrl-C right after optimizer step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_run_equals_uninterrupted(data, tmp_path, monkeypatch):
    data_dir, source = data
    args = [source, "data.val_fraction=0.1", "trainer.max_steps=8", "val_every_n_steps=4",
            "optim.warmup_steps=2", "data.val_windows=8", "data.num_workers=2",
            "trainer.log_every_n_steps=1"]  # fmt: skip
    train(tiny_cfg(data_dir, tmp_path / "a", *args))

    real_init = L.Trainer.__init__

    def init(self, *a, callbacks=(), **k):
        real_init(self, *a, callbacks=[*callbacks, StopAt(5)], **k)

    monkeypatch.setattr(L.Trainer, "__init__", init)
    with pytest.raises(SystemExit):
        train(tiny_cfg(data_dir, tmp_path / "b", *args))
    monkeypatch.setattr(L.Trainer, "__init__", real_init)
    assert torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5
    train(tiny_cfg(data_dir, tmp_path / "b", *args, "ckpt_path=last"))  # finds b's last.ckpt

    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    ha, hb = a["callbacks"]["RunHistory"], b["callbacks"]["RunHistory"]
    assert [s for s, _ in hb["train"]] == list(range(8))
    assert [v for _, v in hb["train"]] == pytest.approx([v for _, v in ha["train"]], rel=1e-5)
    assert [s for s, _ in hb["val"]] == [s for s, _ in ha["val"]] == [0, 4, 8]
    assert [v for _, v in hb["val"]] == pytest.approx([v for _, v in ha["val"]], rel=1e-5)
    for k, w in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], w, rtol=1e-5, atol=1e-6)
    for s in b["optimizer_states"][0]["state"].values():  # optimizer state resumed too
        assert s["step"].item() == 8
    ma, mb = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab")
    assert mb["steps"] == ma["steps"] == 8 and mb["tokens_seen"] == ma["tokens_seen"]
    assert mb["final_val_loss"] == pytest.approx(ma["final_val_loss"], rel=1e-5)


def _step_of(path):
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except Exception:  # not there yet, or being written
        return -1


def test_sigkill_resumes_from_last_checkpoint(data, tmp_path):
    data_dir, source = data
    run = tmp_path / "run"
    args = [
        source,
        "data.val_fraction=0.1",
        "val_every_n_steps=2",
        "data.val_windows=4",
        "optim.warmup_steps=2",
        "trainer.log_every_n_steps=1",
    ]
    command = [sys.executable, "train.py", *TINY_ARGS, *args, "trainer.max_steps=400"]
    proc = subprocess.Popen(
        [*command, f"data.dir={data_dir}", f"hydra.run.dir={run}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while _step_of(last) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _step_of(last)
    assert 4 <= killed_at < 400, "the run should have been killed mid-way"
    assert not (run / "metrics.json").exists()  # it never got to write its outputs

    cfg = tiny_cfg(data_dir, run, *args, "trainer.max_steps=12", "ckpt_path=last")
    if killed_at >= 12:
        pytest.skip(f"the machine was too fast: killed at step {killed_at}")
    train(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    history = torch.load(last, weights_only=True)["callbacks"]["RunHistory"]
    assert metrics["steps"] == 12
    assert [s for s, _ in history["train"]] == list(range(12))  # nothing lost, nothing twice
    assert metrics["tokens_seen"] == 12 * 8 * 64
