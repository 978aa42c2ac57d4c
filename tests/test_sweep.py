"""A real Hydra multirun (``python train.py -m``) of four jobs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_train import TINY_ARGS

from slm.config import compose
from slm.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multirun_summary_with_good_invalid_and_diverging_jobs(tmp_path):
    """One real multirun of four jobs: an invalid one (lr < 0), two good ones and one that
    diverges (lr = 1e9). The good jobs train with their own values, the sweep goes on past
    the failures, and sweep.csv has a row for each, the failures with their one-line reason."""
    stories = [f"Tim saw {n} birds. He was happy. The end." for n in range(200)]
    src = tmp_path / "stories.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(src), tmp_path / "data", val_fraction=0.1)
    sweep = tmp_path / "sweep"
    # stories=2: the story suite's numbers become sweep.csv columns.
    args = [*TINY_ARGS, f"data.source={src}", f"data.dir={tmp_path / 'data'}",
            "data.val_fraction=0.1", "trainer.max_steps=4", "val_every_n_steps=2",
            "optim.warmup_steps=1", "trainer.log_every_n_steps=1",
            "optim.lr=-1,1e-3,3e-3,1e9", f"hydra.sweep.dir={sweep}",
            "stories=2", "suite.max_new_tokens=6"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "train.py", "-m", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [
        ("0", "FAILED"), ("1", "COMPLETED"), ("2", "COMPLETED"), ("3", "FAILED"),
    ]  # fmt: skip
    for r, lr in zip(rows, ["-1", "0.001", "0.003", "1000000000.0"]):
        assert f"optim.lr={lr}" in r["overrides"].split()
    assert rows[0]["error"] == "optim.lr=-1 must be positive" and rows[0]["best_val_loss"] == ""
    for r in rows[1:3]:
        metrics = json.loads((sweep / r["dir"] / "metrics.json").read_text())
        assert float(r["best_val_loss"]) == metrics["best_val_loss"] < 11 and r["error"] == ""
        assert (sweep / r["dir"] / "checkpoints" / "last.ckpt").exists()
        suite = metrics["stories"]
        assert float(r["continuation_loss"]) == suite["continuation_loss"]
        for mode in ("greedy", "sampled"):
            for key in ("distinct_1", "distinct_2", "distinct_3", "repeat_4gram", "eot_rate",
                        "words", "carryover"):  # fmt: skip
                value = suite[mode][key]  # None (empty) where no completion had a word
                assert r[f"{mode}_{key}"] == ("" if value is None else str(value)), (mode, key)
            assert r[f"{mode}_judge_mean"] == ""  # no judge: empty columns
    lrs = [OmegaConf.load(sweep / r["dir"] / ".hydra/config.yaml").optim.lr for r in rows[1:3]]
    assert lrs == [1e-3, 3e-3]  # each job trained with its own value
    assert rows[3]["error"].startswith(("train/loss is nan at step", "train/loss is inf at step"))
    failed = json.loads((sweep / rows[3]["dir"] / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("FloatingPointError")
    assert "2 job(s) failed ([0, 3])" in out.stdout + out.stderr


def test_experiment_config_composes():
    cfg = compose("train", ["experiment=small_lr_sweep"])
    assert cfg.model.n_embd == 384 and cfg.trainer.max_steps == 2000
    assert cfg.optim.min_lr <= cfg.optim.lr
