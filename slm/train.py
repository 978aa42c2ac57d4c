"""``train(cfg)``: build the data, model and Lightning Trainer from a config and fit.

Kept apart from the ``@hydra.main`` entry (``train.py``) so tests and sweepers call it with a
composed config. The checks before a run are here (``check_start``; whether a checkpoint fits
it: ``slm.resume``); what it leaves in its run dir (``checkpoints/``, ``slm.pt``,
``loss.png``, ``metrics.json``, the story suite's ``slm.stories.jsonl``) is written by
``slm.outputs``; what it logs to the trackers (TensorBoard's ``tb/``, W&B, MLflow, CSV) goes
through ``slm.trackers``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from slm import stories, trackers
from slm.callbacks import (
    RunHistory,
    SampleStories,
    StepProgressBar,
    StopOnSignal,
    SyncFreeThroughputMonitor,
    TimeToMaxSteps,
    ValidateAtEnd,
)
from slm.checkpoint import load_tokenizer
from slm.config import (
    check_added_keys,
    command_line,
    model_overrides,
    resolve_hardware,
    validate,
)
from slm.data import TokenDataModule
from slm.errors import ConfigError, SlmError, fail, one_line
from slm.model import GPT
from slm.module import GPTModule
from slm.outputs import deferred_signals, run_status, story_suite, write_outputs
from slm.precision import trainer_precision
from slm.prepare import prepare, read_tokenizer
from slm.resume import apply_init_from, check_resume, resolve_ckpt_path
from slm.rundir import remove_unused, run_dir_lock
from slm.strategy import (
    WholeCheckpointIO,
    agree_on_start,
    is_sharded,
    launched_outside,
    trainer_strategy,
    world_size,
)
from slm.sweep import FailedJob
from slm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
# Training FLOPs above which a run on a CPU takes more than about an hour (2 cores do some
# 4e10 FLOP/s): model=small's 5000 steps are 7e15, experiment=quickstart's 2e13.
GPU_SIZED = 1e14
TRAINER_ARGS = set(inspect.signature(L.Trainer.__init__).parameters)


def run_dir_of(cfg: DictConfig) -> Path:
    """``cfg.run_dir``, else Hydra's output dir, else ``outputs/<time>``."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir).expanduser().resolve()
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not inside a Hydra app
        return Path("outputs", time.strftime("%Y-%m-%d/%H-%M-%S")).resolve()


def module_args(cfg: DictConfig) -> dict:
    """``GPTModule``'s keyword arguments from the config."""
    o = cfg.optim
    return dict(
        **cfg.model,
        lr=o.lr,
        min_lr=o.min_lr,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        max_steps=cfg.trainer.max_steps,
        fused=o.fused,
        compile=cfg.compile or None,
        optimizer=o.name,
        **{k: o[k] for k in ("muon_lr", "muon_momentum", "muon_weight_decay") if k in o},
    )


def build_module(cfg: DictConfig) -> GPTModule:
    return GPTModule(**module_args(cfg))


def build_datamodule(cfg: DictConfig, tokenizer: Tokenizer) -> TokenDataModule:
    """The data of ``cfg``, made with ``tokenizer`` (``prepare_data``'s)."""
    return TokenDataModule(
        **cfg.data, block_size=cfg.model.block_size, seed=cfg.seed, tokenizer=tokenizer
    )


def prepare_data(cfg: DictConfig) -> Tokenizer:
    """Prepare ``data.dir`` before the model is built, since the model's ``vocab_size`` (and
    ``eot_id``) come from the data's tokenizer, not from the model preset: ``init_from``'s
    tokenizer where it is set, else the ``tokenizer`` config (gpt2, or a BPE trained here).
    Sets ``cfg.model.vocab_size`` and ``cfg.model.eot_id``; returns the tokenizer."""
    d, request = cfg.data, cfg.tokenizer
    if cfg.get("init_from"):
        request = load_tokenizer(Path(str(cfg.init_from)).expanduser())
        asked = command_line("tokenizer")
        if asked and not _same_request(cfg.tokenizer, request):
            raise ConfigError(
                f"init_from={cfg.init_from} fixes the tokenizer ({request.describe()}), but "
                f"{' '.join(asked)} asks for another; drop the override"
            )
    # data.overwrite: once per node (as Lightning's prepare_data), not by every process of a
    # multi-process launch, each of which comes here; the others find the dir prepared.
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    overwrite = d.overwrite and local_rank == 0
    meta = prepare(d.source, d.dir, d.val_fraction, overwrite, request, d.get("max_stories"))
    tok = read_tokenizer(d.dir, meta)
    for key, value in (("vocab_size", tok.vocab_size), ("eot_id", tok.eot_id)):
        if cfg.model.get(key) not in (None, value):
            raise ConfigError(
                f"model.{key}={cfg.model[key]}, but the data's tokenizer ({tok.describe()}) has "
                f"{key}={value}: the model's vocab comes from the data; drop model.{key} "
                "(tokenizer.vocab_size sets a BPE's size)"
            )
    with open_dict(cfg):
        cfg.model.vocab_size, cfg.model.eot_id = tok.vocab_size, tok.eot_id
        cfg.data.overwrite = False  # done: the DataModule finds the dir prepared
    return tok


def _same_request(config, tok: Tokenizer) -> bool:
    if config.get("name") != tok.name:
        return False
    return config.get("name") != "bpe" or config.get("vocab_size") == tok.vocab_size


def main(cfg: DictConfig) -> float:
    """``train.py``'s task: its command line's added keys checked (``check_added_keys``; a
    ``compose``d config is checked as it is composed) and ``train(cfg)``, with a user's
    mistake or a divergence reported on one line. In a multirun sweep the job returns a
    ``FailedJob`` (a NaN that carries the reason) instead of exiting, so the sweep goes on
    with its other jobs and ``sweep.csv`` records this one as FAILED; a sweeper that
    minimizes (Optuna) sees a NaN, a failed trial.
    A sweep that cannot work at all (``SweepError``) stops at its first job."""
    try:
        check_added_keys(cfg)  # its command line's +key=value that nothing would read
        return train(cfg)
    except (SlmError, FloatingPointError) as e:
        if not in_multirun() or isinstance(e, SweepError):
            remove_unused()  # a run dir that holds nothing of the run (sweep jobs keep theirs)
            fail(e, log)
        log.error("error: %s", one_line(e))
        return FailedJob(one_line(e))


class SweepError(ConfigError):
    """A mistake in how a ``-m`` sweep is launched: every job would fail the same way."""


def in_multirun() -> bool:
    """Whether this is a job of a Hydra ``-m`` sweep (tests set it)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not inside a Hydra app
        return False


def check_start(cfg: DictConfig) -> tuple[GPT | None, Tokenizer, Path, str | None]:
    """Every check before training, each a one-line ``SlmError``: the config (filled in where
    it says ``auto``), ``init_from``, the data (prepared if missing), the checkpoint to
    resume. Returns the ``init_from`` model (or None), the data's tokenizer, the run dir and
    the checkpoint path (or None)."""
    cfg = resolve_hardware(cfg)
    init = apply_init_from(cfg, model_overrides())  # sets cfg.model: before validate
    validate(cfg)
    stories.check(cfg)  # the suite runs at the end: its settings are checked at the start
    trackers.check(cfg)  # and the trackers' settings, and their packages
    check_trainer_args(dict(cfg.trainer))
    if in_multirun() and launched_outside(cfg) is None and (world_size(cfg) or 1) > 1:
        # Lightning's launcher starts the other ranks by running this command again: the
        # whole sweep, in every process.
        raise SweepError(
            f"trainer.devices={cfg.trainer.devices} (x {cfg.trainer.num_nodes} nodes) in a -m "
            "sweep: Lightning would start the other ranks by running the whole sweep again; "
            "sweep with trainer.devices=1, or give each job its own processes "
            "(hydra/launcher=submitit_slurm)"
        )
    run_dir = run_dir_of(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    tok = prepare_data(cfg)  # sets model.vocab_size: before the checkpoint's model is checked
    if ckpt_path:
        check_resume(
            ckpt_path, module_args(cfg), cfg.get("allow_schedule_change", False), tok,
            strategy=cfg.strategy.name, data_dir=cfg.data.dir,
            allow_data_change=cfg.get("allow_data_change", False),
        )  # fmt: skip
    return init, tok, run_dir, ckpt_path


def train(cfg: DictConfig) -> float:
    """Train as ``cfg`` says; return the best ``val/loss`` (what a sweeper minimizes)."""
    with contextlib.ExitStack() as stack:
        start, error, loggers = None, None, []
        try:
            start = check_start(cfg)
            # the run dir is this run's from here on (held by rank 0): a start check too
            stack.enter_context(run_dir_lock(start[2]))
            loggers = trackers.start(cfg, start[2])  # their runs open: a start check too
            # the trackers' runs end with this run's status, however it ends
            stack.push(lambda kind, e, tb: trackers.finish(loggers, run_status(e)[0]))
        except SlmError as e:
            error = e
        agree_on_start(cfg, error)  # under torchrun or srun: every rank stops if one failed
        return _fit(cfg, loggers, *start)


def _fit(
    cfg: DictConfig,
    loggers: list[Logger],
    init: torch.nn.Module | None,
    tok: Tokenizer,
    run_dir: Path,
    ckpt_path: str | None,
) -> float:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later

    datamodule = build_datamodule(cfg, tok)
    module = build_module(cfg)
    if init is not None and not ckpt_path:  # a resume restores its own weights
        module.model.load_state_dict(init.state_dict())  # the optimizer starts fresh
        log.info("init_from=%s: starting from its weights", cfg.init_from)
    n = module.model.num_params()
    rank_zero_only(log.info)(
        "model: %.2fM parameters (%.2fM non-embedding, %.2fM embedding)",
        n["total"] / 1e6, n["non_embedding"] / 1e6, n["embedding"] / 1e6,
    )  # fmt: skip
    # Training costs about 6 FLOPs per parameter and token (forward + backward).
    tokens = cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches
    flops = 6 * n["total"] * tokens * cfg.trainer.max_steps
    if cfg.trainer.accelerator == "cpu" and flops > GPU_SIZED:
        log.warning(
            "this run is sized for a GPU (%.1fM parameters x %s tokens a step x %s steps = "
            "%.1e FLOPs) and trains on the CPU, where that takes many hours: the estimate "
            "follows after the first steps. On a CPU, start with experiment=quickstart "
            "(README, Quick start)", n["total"] / 1e6, f"{tokens:,}",
            f"{cfg.trainer.max_steps:,}", flops,
        )  # fmt: skip

    ckpt_dir = run_dir / "checkpoints"
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-step{step}",
        auto_insert_metric_name=False,
        monitor="val/loss",
        mode="min",
    )
    # ModelCheckpoint(save_last=True) refreshes last.ckpt only when the best improves; this
    # one (no monitor) rewrites last.ckpt at every validation, so a resume loses little.
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    history = RunHistory()
    stop = StopOnSignal(str(ckpt_dir / "last.ckpt"))
    text = any(isinstance(logger, trackers.TEXT_LOGGERS) for logger in loggers)
    callbacks = [
        best,
        last,
        ValidateAtEnd(),  # first: the hooks after it see the last step as a logging step
        # Lightning's monitor refuses a run without a logger (logger=[]).
        *([LearningRateMonitor(logging_interval="step")] if loggers else []),
        # tokens/s, FLOPs/s and, on GPUs it knows (A100, H100, T4, L4, ...), MFU at the
        # bf16/fp16 peak. The clock is read on logging steps: rates over the last 2 intervals.
        SyncFreeThroughputMonitor(
            batch_size_fn=lambda b: b[0].size(0), length_fn=lambda b: b[0].numel(), window_size=3
        ),  # fmt: skip
        TimeToMaxSteps(cfg.val_every_n_steps),
        history,
        stop,  # after history: its tokens are counted
        # a greedy story at each validation, for the loggers that take text (not CSV)
        *([SampleStories(cfg.sample.prompt, cfg.sample.max_new_tokens)] if text else []),
    ]
    trainer_args = dict(cfg.trainer)
    # Validation every val_every_n_steps optimizer steps (Lightning counts micro-batches).
    trainer_args["val_check_interval"] = cfg.val_every_n_steps * cfg.trainer.accumulate_grad_batches
    if trainer_args.get("enable_progress_bar", True):
        # The bar reads the logged loss from the GPU when it refreshes: on logging steps only.
        every = max(1, trainer_args["log_every_n_steps"]) * trainer_args["accumulate_grad_batches"]
        callbacks.append(StepProgressBar(refresh_rate=every))
    trainer_args.update(trainer_precision(trainer_args.pop("precision"), cfg.trainer.accelerator))
    trainer_args["strategy"] = trainer_strategy(cfg)
    trainer_args["plugins"] = [*trainer_args.get("plugins", []), WholeCheckpointIO()]
    trainer = L.Trainer(
        **trainer_args,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=-1,  # a full validation before step 0: the curve's start
        use_distributed_sampler=False,  # each rank takes its own share (TokenDataModule)
    )
    error = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as e:
        error = e
        raise
    finally:
        # Sharded, the weights are gathered from every rank; rank 0 writes the files.
        if trainer.is_global_zero or is_sharded(module.model):
            with deferred_signals():  # a Ctrl-C now must not leave slm.pt without metrics
                try:
                    write_outputs(
                        run_dir, module, best, history, trainer, error, n, agreed_stop=stop.stopped
                    )
                except OSError as e:  # a full disk: said on one line, after the run's own error
                    why = f"{e.filename}: {(e.strerror or str(e)).lower()}"
                    if error is None:
                        raise SlmError(f"{why}, so the run's outputs were not written") from e
                    log.error("%s, so the run's outputs were not written either", why)
    if cfg.stories and trainer.is_global_zero:
        story_suite(cfg, run_dir, datamodule.dir / "val.bin", trainer, tok)
    score = best.best_model_score
    return float(score) if score is not None else math.nan


# Set by train() itself: a trainer.* override of one of these is a mistake.
OWN_TRAINER_ARGS = (
    "logger", "callbacks", "default_root_dir", "num_sanity_val_steps",
    "use_distributed_sampler", "plugins", "val_check_interval",
)  # fmt: skip


def check_trainer_args(args: dict) -> None:
    """One line for a ``trainer.*`` key that ``lightning.Trainer`` does not take, or that
    ``train()`` sets itself (instead of Lightning's TypeError traceback)."""
    for key in args:
        if key == "val_check_interval":
            raise ConfigError(
                "trainer.val_check_interval is set from val_every_n_steps (in optimizer steps); "
                "use val_every_n_steps"
            )
        if key == "logger":
            raise ConfigError(
                "trainer.logger is set by slm's train() from the logger group: choose the "
                "trackers with logger=wandb, 'logger=[tensorboard,wandb]', ..."
            )
        if key in OWN_TRAINER_ARGS:
            raise ConfigError(f"trainer.{key} is set by slm's train() and cannot be overridden")
        if key not in TRAINER_ARGS:
            raise ConfigError(
                f"trainer.{key} is not a lightning.Trainer argument; check the spelling "
                "(python train.py --cfg job lists the config)"
            )
