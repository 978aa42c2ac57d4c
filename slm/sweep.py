"""A Hydra callback that collects a multirun sweep into ``<sweep dir>/sweep.csv``: one row per
job with its overrides, the best ``val/loss`` that ``train(cfg)`` returned, its status and, for
a failed job, the one-line reason; then the story suite's numbers (``slm.stories.COLUMNS``),
read from the job's ``metrics.json`` (empty where the job has none)."""

from __future__ import annotations

import csv
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
from slm.stories import COLUMNS, flat

FIELDS = ["job", "overrides", "best_val_loss", "status", "error", "dir", *COLUMNS]
log = logging.getLogger(__name__)


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
    return flat(summary) if isinstance(summary, dict) else {}


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.failed: list[int] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = config.hydra
        if hc.mode != RunMode.MULTIRUN:
            return
        value, error = "", ""
        if job_return.status == JobStatus.COMPLETED:
            value = job_return.return_value
            if isinstance(value, FailedJob):
                value, error = "", value.reason
        else:  # an exception that train() does not report itself (a bug): Hydra kept it
            error = one_line(job_return._return_value)
        status = "FAILED" if error else "COMPLETED"
        if error:
            self.failed.append(hc.job.num)
        path = Path(hc.sweep.dir) / "sweep.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:  # jobs of the basic launcher run one by one
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(
                {
                    "job": hc.job.num,
                    "overrides": " ".join(job_return.overrides or []),
                    "best_val_loss": value,
                    "status": status,
                    "error": error,
                    "dir": os.path.relpath(hc.runtime.output_dir, hc.sweep.dir),
                    **story_scores(Path(hc.runtime.output_dir) / "metrics.json"),
                }
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.failed:
            path = Path(config.hydra.sweep.dir) / "sweep.csv"
            log.warning("%d job(s) failed (%s): see %s", len(self.failed), self.failed, path)
