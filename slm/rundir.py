"""A run directory belongs to one live run: a lock file in it (``.train.lock``, an exclusive
``flock``), taken by ``train.py`` before Hydra writes ``.hydra/`` and ``train.log`` into it
(``RunDirLock``, a Hydra callback) and by ``train(cfg)`` itself (``run_dir_lock``).

A second ``train.py`` with the same ``hydra.run.dir`` stops with one line instead of
overwriting the first one's checkpoints, ``slm.pt``, ``metrics.json``, logs and TensorBoard
events. The lock goes with its process (``flock``), so a killed run leaves no lock that
blocks the next. Light on imports (no torch): a second run fails in a second. A run that
stops at its start leaves no run dir that it created (``remove_unused``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from slm import files
from slm.errors import ConfigError, fail

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked
    fcntl = None

LOCK = ".train.lock"
_held: set[Path] = set()  # the run dirs this process holds
_made: dict[Path, list[Path]] = {}  # run dir -> the dirs that taking it created (it, parents)
# What a run dir holds before its run has written anything: Hydra's config copy, the log, the lock.
BEFORE_THE_RUN = (".hydra", "train.log", LOCK)
# Where launchers put a process's global rank (those Lightning reads): torchrun, SLURM, ...
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _rank() -> int:
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir`` for this run, or raise a one-line ``ConfigError`` naming the run that
    holds it. Taken by rank 0 only (the other ranks of a run share its dir), and again by the
    same process for free; on a filesystem without locks the run goes on unlocked."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or fcntl is None or _rank() != 0:
        yield
        return
    made = files.missing_dirs(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if made:
        _made[run_dir] = made
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"{run_dir} is the run directory of a run still going on (pid {owner}); give this "
            "run its own (leave hydra.run.dir unset, or pick another), or stop that one first"
        ) from None
    except OSError:  # e.g. ENOLCK: a network filesystem without locks
        os.close(fd)
        yield
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held.add(run_dir)
    try:
        yield
    finally:
        _held.discard(run_dir)
        _made.pop(run_dir, None)  # only a run dir of a run under way is removed unused
        os.close(fd)  # releases the lock


def remove_unused() -> None:
    """Remove the run dirs that this process created and that hold nothing of a run (only
    ``BEFORE_THE_RUN``), with the parents made for them (``outputs/DATE``): a run that stops at
    its start (a config error, data it cannot read) leaves no empty run dir behind; its error
    was said on the console."""
    for made in _made.values():
        files.remove_dirs(made, BEFORE_THE_RUN)


class RunDirLock(Callback):
    """For ``train.py`` (conf/train.yaml, ``hydra.callbacks``): the run dir is locked before
    Hydra writes into it, until the run ends; a second run on it exits with one line."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._lock = run_dir_lock(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            self._lock.__enter__()
        except ConfigError as e:
            fail(e)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._lock.__exit__(None, None, None)
