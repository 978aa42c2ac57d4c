"""A real Hydra multirun (``python train.py -m``) of four jobs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_ARGS
from omegaconf import OmegaConf

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
    assert out.returncode == 1, out.stderr[-2000:]  # after every job ran: scripts see it
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


# -- sweep.csv under any launcher ---------------------------------------------------------------


def job_end(sweep: Path, num: int, value: float, overrides=()) -> None:
    """What Hydra calls as job ``num`` of a multirun ends with ``value``, in this process."""
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode

    from slm.sweep import SweepSummary

    out = sweep / str(num)
    cfg = OmegaConf.create(
        {"hydra": {"mode": RunMode.MULTIRUN, "job": {"num": num},
                   "sweep": {"dir": str(sweep)}, "runtime": {"output_dir": str(out)}}}
    )  # fmt: skip
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)
    SweepSummary().on_job_end(cfg, ret)


def test_only_rank_0_of_a_job_writes_its_row(tmp_path, monkeypatch):
    """A job of several ranks (submitit: one SLURM task per GPU) runs the callback on every
    rank: one row, not one per rank."""
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    job_end(tmp_path, 0, 1.5)
    assert not (tmp_path / "sweep.csv").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    job_end(tmp_path, 0, 1.5)
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["job"], r["best_val_loss"], r["status"]) for r in rows] == [
        ("0", "1.5", "COMPLETED")
    ]


def test_failures_are_counted_from_sweep_csv(tmp_path, caplog):
    """Under joblib or submitit the jobs end in other processes: the launching process's
    callback, which saw none of them, still counts the failed ones at the end, and train.py
    exits with 1 (it exited with 0: scripts and CI saw no failure)."""
    from slm.sweep import FailedJob, SweepSummary, exit_status

    job_end(tmp_path, 0, FailedJob("optim.lr=-1 must be positive"))
    job_end(tmp_path, 1, 2.0)
    job_end(tmp_path, 2, FailedJob("train/loss is nan at step 3"))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with caplog.at_level("WARNING", logger="slm.sweep"):
        SweepSummary().on_multirun_end(cfg)
    assert f"2 job(s) failed ([0, 2]): see {tmp_path / 'sweep.csv'}" in caplog.text
    assert exit_status() == 1
    job_end(tmp_path / "ok", 0, 2.0)
    SweepSummary().on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "ok")}}})
    )
    assert exit_status() == 0


def _race(sweep: str, job: int, barrier) -> None:
    barrier.wait()
    for i in range(10):
        job_end(Path(sweep), job * 10 + i, float(job))


def test_jobs_ending_at_once_write_one_header_and_whole_rows(tmp_path):
    """joblib's workers end their jobs at the same time: one header, every row whole."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(10):
        sweep = tmp_path / str(trial)
        sweep.mkdir()
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_race, args=(str(sweep), j, barrier)) for j in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * 4
        lines = (sweep / "sweep.csv").read_text().splitlines()
        assert lines[0].startswith("job,overrides,best_val_loss") and len(lines) == 41
        rows = list(csv.DictReader(lines))
        assert sorted(int(r["job"]) for r in rows) == list(range(40))
        assert all(float(r["best_val_loss"]) == int(r["job"]) // 10 for r in rows)


def test_multirun_with_several_devices_under_the_basic_launcher_is_refused(tmp_path, monkeypatch):
    """Lightning would start rank 1 by running the command again: the whole sweep, twice,
    each row written twice. Refused at the first job, on one line."""
    import pytest

    from slm import train as train_module

    monkeypatch.setattr(train_module, "in_multirun", lambda: True)
    cfg = compose("train", [*TINY_ARGS, f"data.dir={tmp_path}", "trainer.devices=2"])
    with pytest.raises(SystemExit):
        train_module.main(cfg)
    with pytest.raises(train_module.SweepError) as e:
        train_module.check_start(cfg)
    assert str(e.value).startswith("trainer.devices=2 (x 1 nodes) in a -m sweep: Lightning")
    assert "\n" not in str(e.value)


def test_the_slurm_launcher_takes_its_tasks_from_the_trainer():
    """hydra/launcher=submitit_slurm: one SLURM job per sweep job, of trainer.num_nodes nodes
    with one task (a Lightning rank) per device, requeued when its time runs out."""
    import pytest

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate

    from slm.config import CONF_DIR

    overrides = ["hydra/launcher=submitit_slurm", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("train", overrides, return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    p = launcher.params
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (2, 4, 4)
    assert p["max_num_timeout"] > 0 and p["signal_delay_s"] > 0
