"""A Hydra callback that collects a multirun sweep into ``<sweep dir>/sweep.csv``: one row per
job with its overrides and the best ``val/loss`` that ``train(cfg)`` returned."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

FIELDS = ["job", "overrides", "best_val_loss", "status", "dir"]


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = config.hydra
        if hc.mode != RunMode.MULTIRUN:
            return
        ok = job_return.status == JobStatus.COMPLETED
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
                    "best_val_loss": job_return.return_value if ok else "",
                    "status": job_return.status.name,
                    "dir": os.path.relpath(hc.runtime.output_dir, hc.sweep.dir),
                }
            )
