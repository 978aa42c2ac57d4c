"""The experiment trackers a run logs to, each one of Lightning's own loggers: TensorBoard (the
default), Weights & Biases, MLflow and CSV, chosen by the ``logger`` config group
(``conf/logger/*.yaml``; several at once: ``logger=[tensorboard,wandb]``, none: ``logger=[]``).

``check`` looks at the settings and the installed packages at start; ``start`` makes the
loggers and opens their runs (W&B and MLflow) before training, so that a store or a project
that does not work stops the run at start, and logs the run's config to the trackers that
compare runs by it; ``log_text`` sends a text (the sample stories) to each one that takes
text; ``finish`` finalizes every logger (and closes the runs) with the run's status. The
numbers (loss, learning rate, throughput, the story suite) reach every logger through
Lightning: ``self.log``, the monitors and ``trainer.loggers``.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from lightning.pytorch.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from slm.config import CONF_DIR
from slm.errors import ConfigError, one_line

log = logging.getLogger(__name__)
KINDS = ("tensorboard", "wandb", "mlflow", "csv")
WANDB_MODES = ("auto", "online", "offline", "disabled")
WANDB_HOST = "https://api.wandb.ai"
# What each tracker needs installed (the modules, and the extra that brings them).
PACKAGES = {"wandb": ("wandb",), "mlflow": ("mlflow",)}
SQL_PACKAGES = ("sqlalchemy", "alembic")  # MLflow's sqlite store; mlflow-skinny leaves them out
# Lightning's finalize statuses (MLflow passes any other through as its own run status).
STATUS = {"completed": "success", "interrupted": "KILLED", "failed": "failed"}
# The loggers that take text (``log_text``); CSV takes numbers only.
TEXT_LOGGERS = (TensorBoardLogger, WandbLogger, MLFlowLogger)


def chosen(cfg: DictConfig) -> dict[str, DictConfig]:
    """The trackers of ``cfg.logger`` in the order chosen, with their settings."""
    group = cfg.get("logger") or {}
    return {str(kind): group[kind] or OmegaConf.create({}) for kind in group}


# -- the checks at start ------------------------------------------------------------------------


def check(cfg: DictConfig) -> None:
    """A one-line ``ConfigError`` for a tracker that is not one, a setting it does not have
    (its settings: the keys of ``conf/logger/<kind>.yaml``; ``config.check_added_keys`` leaves
    ``+logger.*`` to this), a setting of the wrong kind, or a tracker whose package is not
    installed (with the ``pip`` line that installs it)."""
    trackers = chosen(cfg)
    for kind, settings in trackers.items():
        if kind not in KINDS:
            raise ConfigError(
                f"logger.{kind} is not a tracker; choose from {', '.join(KINDS)} "
                "(several: 'logger=[tensorboard,wandb]')"
            )
        known = list(OmegaConf.load(CONF_DIR / "logger" / f"{kind}.yaml")[kind] or {})
        unknown = [str(name) for name in settings if name not in known]
        if unknown and not known:
            raise ConfigError(f"logger.{kind} takes no settings (got {', '.join(unknown)})")
        if unknown:
            raise ConfigError(
                f"logger.{kind}.{unknown[0]} is not a setting of logger={kind}; its settings: "
                f"{', '.join(known)} (conf/logger/{kind}.yaml)"
            )
        if kind == "wandb":
            _check_wandb(settings)
        if kind == "mlflow":
            _check_mlflow(settings)
        for module in PACKAGES.get(kind, ()):
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f'logger={kind} needs the {module} package: pip install -e ".[{kind}]" '
                    f"(or pip install {module})"
                )
    if "mlflow" in trackers:
        uri = tracking_uri(trackers["mlflow"])
        missing = [m for m in SQL_PACKAGES if importlib.util.find_spec(m) is None]
        if uri.startswith("sqlite:") and missing:
            raise ConfigError(
                f"logger=mlflow's store {uri} needs {' and '.join(missing)} (mlflow-skinny "
                'leaves them out): pip install -e ".[mlflow]", or set logger.mlflow.tracking_uri'
            )


def _text(key: str, value, nullable: bool = True, limit: int | None = None) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}={value} must be a non-empty text{' or null' if nullable else ''}")
    if limit and len(value) > limit:
        raise ConfigError(f"{key} is {len(value)} characters long; at most {limit}")


def _log_model(key: str, value) -> None:
    if value not in (True, False, "all") or value in (0, 1) and not isinstance(value, bool):
        raise ConfigError(
            f"{key}={value} must be false, true (the checkpoints at the end) or all (each as it "
            "is written)"
        )


def _check_wandb(s: DictConfig) -> None:
    _text("logger.wandb.project", s.get("project"), nullable=False, limit=128)
    if any(c in s.project for c in "/\\#?%:"):
        raise ConfigError(
            f"logger.wandb.project={s.project}: a W&B project name cannot hold / \\ # ? % or :"
        )
    for key in ("entity", "name", "notes"):
        _text(f"logger.wandb.{key}", s.get(key))
    _text("logger.wandb.group", s.get("group"), limit=128)
    tags = s.get("tags")
    if not (OmegaConf.is_list(tags) and all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags)):
        raise ConfigError(
            f"logger.wandb.tags={tags} must be a list of texts of 1 to 64 characters, "
            "e.g. 'logger.wandb.tags=[baseline,rope]'"
        )
    mode = s.get("mode")
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.wandb.mode={mode} is not one of {', '.join(WANDB_MODES)}")
    _log_model("logger.wandb.log_model", s.get("log_model"))


def _check_mlflow(s: DictConfig) -> None:
    for key in ("tracking_uri", "experiment", "run_name"):
        _text(f"logger.mlflow.{key}", s.get(key))
    tags = s.get("tags")
    if not OmegaConf.is_dict(tags) or not all(
        isinstance(v, (str, int, float, bool)) for v in tags.values()
    ):
        raise ConfigError(
            f"logger.mlflow.tags={tags} must map names to values, e.g. "
            "'logger.mlflow.tags={team: nlp}'"
        )
    _log_model("logger.mlflow.log_model", s.get("log_model"))


# -- the names a run gets -----------------------------------------------------------------------


def shown(path: Path) -> str:
    """``path`` as a run's name: relative to the working directory where it is inside it
    (``outputs/2025-01-31/12-00-00``), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def sweep_name() -> str | None:
    """The sweep dir of a ``-m`` sweep's job (``multirun/2025-01-31/12-00-00``), shared by all
    its jobs, under any launcher: the W&B group and the MLflow experiment. None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return None
    return shown(Path(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None


def tracking_uri(s: Mapping) -> str:
    """``logger.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default
    store, ``sqlite:///mlflow.db``, made absolute in the directory train.py runs from: every
    run of a project in one store, where ``mlflow ui`` run there looks."""
    uri = s.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def wandb_mode(setting: str) -> tuple[str, str]:
    """The W&B mode of ``logger.wandb.mode`` and why. ``auto``: ``$WANDB_MODE`` where it is
    set; else offline without an API key (``WANDB_API_KEY``, or ``wandb login``'s entry in
    ``~/.netrc``) or when the W&B host does not answer within 3 s; else online."""
    if setting != "auto":
        return setting, f"logger.wandb.mode={setting}"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], f"WANDB_MODE={os.environ['WANDB_MODE']}"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or WANDB_HOST)
    if not (os.environ.get("WANDB_API_KEY") or _netrc_key(host.hostname)):
        return "offline", "no W&B API key: WANDB_API_KEY, or wandb login"
    try:  # a key is no use without the host: an offline run instead of a failed one
        port = host.port or (80 if host.scheme == "http" else 443)
        socket.create_connection((host.hostname, port), timeout=3).close()
    except OSError:
        return "offline", f"{host.hostname} does not answer"
    return "online", f"an API key for {host.hostname}"


def _netrc_key(host: str | None) -> str | None:
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


# -- the loggers --------------------------------------------------------------------------------


def build(kind: str, s: DictConfig, run_dir: Path) -> Logger:
    """The Lightning logger of tracker ``kind`` with settings ``s`` for ``run_dir``; its run
    is not opened yet."""
    name, sweep = shown(run_dir), sweep_name()
    if kind == "tensorboard":
        return TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False)
    if kind == "csv":
        # csv/version_N/: a resumed run starts the next version (Lightning empties a version
        # dir it writes again), so the rows before the resume are kept.
        return CSVLogger(str(run_dir), name="csv")
    if kind == "wandb":
        # rank 0 alone opens the run: the mode (a probe of the host) is found and said there
        mode, why = rank_zero_only(wandb_mode, default=(None, None))(s.mode)
        rank_zero_only(log.info)("logger=wandb: %s (%s)", mode, why)
        return WandbLogger(
            project=s.project, entity=s.entity, name=s.name or name,
            group=s.group or sweep and sweep[-128:],  # W&B's limit; the end tells sweeps apart
            tags=list(s.tags), notes=s.notes, save_dir=str(run_dir), log_model=s.log_model,
            mode=mode,
        )  # fmt: skip
    uri = tracking_uri(s)
    experiment = s.experiment or sweep or "slm"
    rank_zero_only(log.info)(
        "logger=mlflow: experiment %s in %s (mlflow ui --backend-store-uri %s)", experiment, uri,
        uri,
    )  # fmt: skip
    return MLFlowLogger(
        experiment_name=experiment, run_name=s.run_name or name, tracking_uri=uri,
        tags=dict(s.tags) or None, log_model=s.log_model, artifact_location=artifacts_of(uri),
    )  # fmt: skip


def artifacts_of(uri: str) -> str | None:
    """Where a new experiment of an MLflow store keeps its runs' artifacts: ``mlruns/`` beside
    a sqlite store's file (MLflow would take ``./mlruns`` of whatever directory the experiment
    is made from); the store's own choice for any other store (a server, a file store)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns")


def start(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers of ``cfg.logger``, their runs open (on rank 0) and the run's config logged
    to W&B, MLflow and CSV (TensorBoard keeps Lightning's ``hparams.yaml`` of the model).
    A tracker that cannot start is a one-line ``ConfigError``; those started before it are
    finished."""
    loggers: list[Logger] = []
    try:
        for kind, settings in chosen(cfg).items():
            loggers.append(_started(kind, settings, run_dir))
    except ConfigError:
        finish(loggers, "failed")
        raise
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(config)
    return loggers


def _started(kind: str, s: DictConfig, run_dir: Path) -> Logger:
    """``build``, and the run of a W&B or MLflow logger opened now: their errors (a store, a
    project, a key; MLflow's client reaches its store when it is made) come before training."""
    try:
        logger = build(kind, s, run_dir)
        if not isinstance(logger, (WandbLogger, MLFlowLogger)):
            return logger
        run = logger.experiment  # a no-op object on ranks other than 0
    except Exception as e:  # the tracker's own error, on one line
        raise ConfigError(f"logger={kind} could not start its run: {one_line(e)}") from e
    if isinstance(logger, WandbLogger) and getattr(run, "offline", None) is True:  # rank 0
        log.info("logger=wandb: upload this run later with: wandb sync %s", Path(run.dir).parent)
    return logger


def log_text(loggers: list[Logger], key: str, text: str, step: int) -> None:
    """``text`` at ``step`` to each logger that takes text: TensorBoard's Text tab, a W&B table
    (a row: step, text), an MLflow artifact ``KEY/step-000020.txt``. CSV takes numbers only."""
    for logger in (lg for lg in loggers if isinstance(lg, TEXT_LOGGERS)):
        if isinstance(logger, TensorBoardLogger):
            # Markdown: two trailing spaces keep the text's line breaks.
            logger.experiment.add_text(key, text.replace("\n", "  \n"), step)
        elif isinstance(logger, WandbLogger):
            logger.log_text(key, columns=["step", "text"], data=[[step, text]], step=step)
        else:  # MLflow
            logger.experiment.log_text(logger.run_id, text, f"{key}/step-{step:06d}.txt")


def finish(loggers: list[Logger], status: str) -> None:
    """Finalize every logger with the run's ``status`` (``completed``, ``interrupted`` or
    ``failed``: ``slm.outputs.run_status``) once all is logged, the story suite's numbers
    after ``Trainer.fit`` (whose own finalize comes before them) included, also where the
    run ended outside ``Trainer.fit``: the files written out (TensorBoard, CSV), the MLflow
    run closed. A W&B run is finished here, not by Lightning, so that the next job of a
    sweep in this process opens a run of its own."""
    for logger in loggers:
        logger.finalize(STATUS[status])
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=0 if status == "completed" else 1)
