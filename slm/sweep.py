"""A Hydra callback that collects a multirun sweep into ``<sweep dir>/sweep.csv``: one row per
job with its overrides, the best ``val/loss`` that ``train(cfg)`` returned, its status and, for
a failed job, the one-line reason; then the story suite's numbers (``slm.stories.COLUMNS``),
read from the job's ``metrics.json`` (empty where the job has none)."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from slm.errors import one_line

# Hydra builds this callback before every run, before train.py takes the run dir's lock: the
# modules that import torch (Lightning's rank, slm.stories) are imported where they are used.
FIELDS = ["job", "overrides", "best_val_loss", "status", "error", "dir"]
log = logging.getLogger(__name__)
_failed: list[int] = []  # the failed jobs of the sweep that ended last in this process


class FailedJob(float):
    """What a failed job returns in a sweep: NaN to a sweeper (Optuna counts the trial as
    failed), with the one-line ``reason`` for ``sweep.csv``."""

    reason: str

    def __new__(cls, reason: str) -> FailedJob:
        job = super().__new__(cls, math.nan)
        job.reason = reason
        return job


def story_scores(path: Path) -> dict[str, float]:
    """The story suite's numbers in the job's ``metrics.json`` (none: no file, no suite)."""
    try:
        summary = json.loads(path.read_text()).get("stories")
    except (OSError, ValueError, AttributeError):
        return {}
    from slm.stories import flat

    return flat(summary) if isinstance(summary, dict) else {}


class SweepSummary(Callback):
    """Writes ``sweep.csv`` as each job ends and counts its failures when the sweep ends.

    Under any launcher: the basic one (jobs one after another in this process), joblib (jobs
    in worker processes at once) or submitit (each job its own SLURM job, maybe of several
    ranks, on other machines). So a row is written by the job's rank 0 only, each row (and the
    header, by whichever job finds the file empty) in one write under an exclusive lock on the
    file, and the failures are counted from the file, where every job's row is."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from lightning.pytorch.utilities import rank_zero_only

        hc = config.hydra
        if hc.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        value, error = "", ""
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            if isinstance(value, FailedJob):
                value, error = "", value.reason
        else:  # an exception that train() does not report itself (a bug): Hydra kept it
            error = one_line(job_return._return_value)
        row = {
            "job": hc.job.num,
            "overrides": " ".join(job_return.overrides or []),
            "best_val_loss": value,
            "status": "FAILED" if error else "COMPLETED",
            "error": error,
            "dir": os.path.relpath(hc.runtime.output_dir, hc.sweep.dir),
            **story_scores(Path(hc.runtime.output_dir) / "metrics.json"),
        }
        append_row(Path(hc.sweep.dir) / "sweep.csv", row)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / "sweep.csv"
        failed = failed_jobs(path)
        _failed[:] = failed
        if failed:
            log.warning("%d job(s) failed (%s): see %s", len(failed), failed, path)


def exit_status() -> int:
    """``train.py``'s exit status once Hydra is done: 1 where the ``-m`` sweep that ended in
    this process had a failed job (after all its jobs ran), so that scripts and CI see it;
    else 0. Not raised from ``on_multirun_end``: the other callbacks' ends still run."""
    return 1 if _failed else 0


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the csv at ``path`` (its header first, if the file is empty): one
    write under an exclusive ``flock``, so that jobs ending at once neither interleave nor
    both write the header."""
    from slm.stories import COLUMNS

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*FIELDS, *COLUMNS])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        if os.fstat(f.fileno()).st_size == 0:
            writer.writeheader()
        writer.writerow(row)
        f.write(buf.getvalue())


def failed_jobs(path: Path) -> list[int]:
    """The job numbers of the FAILED rows of ``sweep.csv`` at ``path``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    return [int(r["job"]) for r in rows if r.get("status") == "FAILED"]
