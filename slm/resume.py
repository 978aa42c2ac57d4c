"""Does this checkpoint fit this run: resuming a Lightning ``.ckpt`` (``check_resume``: the
model, optimizer, schedule, strategy, tokenizer and data dir it was trained with), finding the
checkpoint to resume (``resolve_ckpt_path``), and starting from another model's weights
(``apply_init_from``). Each mismatch is a one-line ``CheckpointError`` or ``ConfigError``
that says how to go on; reading the files is ``slm.checkpoint``'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from slm.checkpoint import is_sharded_checkpoint, load_model, read
from slm.errors import CheckpointError, ConfigError
from slm.model import GPT, GPTConfig
from slm.tokenizer import Tokenizer, from_state

log = logging.getLogger(__name__)


# How a resume treats each of GPTModule's hyperparameters that differs from the checkpoint's
# (check_resume): the model and the optimizer must be the checkpoint's; the schedule too, unless
# allow_schedule_change; the other optimizer settings apply as given (GPTModule restores the
# optimizer's state under this run's settings). A run setting that is no hyperparameter
# (compile) is not in the checkpoint.
SCHEDULE = ("lr", "min_lr", "warmup_steps", "max_steps", "muon_lr")
FOLLOWS_THE_RUN = ("fused",)  # a kernel, not a number of the training: never reported
CONFIG_KEY = {"max_steps": "trainer.max_steps"}


def check_resume(
    path: str | Path,
    hparams: dict,
    allow_schedule_change: bool = False,
    tokenizer: Tokenizer | None = None,
    strategy: str = "ddp",
    data_dir: str | Path | None = None,
    allow_data_change: bool = False,
) -> None:
    """Before Lightning restores the training checkpoint ``path`` into a ``GPTModule`` built
    from ``hparams`` (its keyword arguments): the checkpoint must have been trained with
    ``tokenizer`` (the data's; not checked where None) and hold the same model (every
    ``GPTConfig`` field) and optimizer, and the same learning-rate ``SCHEDULE`` unless
    ``allow_schedule_change``; each a one-line error, instead of Lightning's state-dict
    mismatch listing or a silent lr jump. Other optimizer settings that differ (weight decay,
    betas, Muon's momentum) are applied, and listed on one warning line. The ``strategy``
    (``ddp``: the model whole on each device, or ``fsdp``: sharded) must be the checkpoint's:
    the two keep the optimizer state in different layouts. With ``data_dir``: the data dir
    too (``check_resume_data``), from the same read of the file."""
    obj = read(path, mmap=True)  # the weights are not needed: no copy of them
    stored = obj.get("hyper_parameters")
    if not isinstance(stored, dict) or "loops" not in obj:
        raise CheckpointError(
            f"ckpt_path={path} is not a Lightning training checkpoint (a slm.pt holds weights "
            "only); resume from a checkpoints/last.ckpt"
        )
    written_by = obj.get("strategy", "ddp")  # checkpoints of before FSDP: unsharded
    if written_by != strategy:
        raise CheckpointError(
            f"ckpt_path={path} was written by strategy={written_by}, not strategy={strategy}: "
            f"resume with strategy={written_by}, or start a new run from its weights with "
            f"init_from={path}"
        )
    if tokenizer is not None:
        trained_with = from_state(obj.get("tokenizer"), f"ckpt_path={path}")
        if not trained_with.same_as(tokenizer):
            raise CheckpointError(
                f"ckpt_path={path} was trained with tokenizer {trained_with.describe()}, but "
                f"data.dir holds tokens of {tokenizer.describe()}; resume with the run's "
                "data.dir and tokenizer settings"
            )
    model = {f.name for f in dataclasses.fields(GPTConfig)}
    # A key that older checkpoints lack had its default then: GPT-2's knobs, AdamW.
    defaults = {**GPTConfig().to_dict(), "optimizer": "adamw"}
    changed = {}
    for key, value in hparams.items():
        old = stored.get(key, defaults.get(key, value))
        if _plain(old) != _plain(value):
            changed[key] = old, value
    wrong = [f"model.{k}={old} (config: {new})" for k, (old, new) in changed.items() if k in model]
    if wrong:
        raise CheckpointError(
            f"ckpt_path={path} holds another model: {', '.join(wrong)}; resume with the "
            "checkpoint's model settings"
        )
    if "optimizer" in changed:
        old, new = changed["optimizer"]
        raise CheckpointError(
            f"ckpt_path={path} was trained with optim={old}, not optim={new}: its optimizer "
            f"state cannot go on in another; resume with optim={old}"
        )
    schedule = [f"{k}: {old} -> {new}" for k, (old, new) in changed.items() if k in SCHEDULE]
    if schedule and not allow_schedule_change:
        raise CheckpointError(
            f"ckpt_path={path} was trained on another schedule ({'; '.join(schedule)}): resuming "
            "would jump the learning rate; keep the run's values, or pass "
            "allow_schedule_change=true to go on with the new schedule from the checkpoint's step"
        )
    applied = [
        f"{CONFIG_KEY.get(k, 'optim.' + k)}={new} (checkpoint: {old})"
        for k, (old, new) in changed.items()
        if k not in model and k not in FOLLOWS_THE_RUN
    ]
    if applied:
        rank_zero_only(log.warning)("resuming with %s", ", ".join(applied))
    if data_dir is not None:
        _check_data_dir(obj, path, data_dir, allow_data_change)


def _plain(value):
    """Lists and tuples alike (``betas`` is either, depending on where it came from)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_resume_data(path: str | Path, data_dir: str | Path, allow_change: bool = False) -> None:
    """Resuming the training checkpoint ``path`` on another ``data.dir`` than it was trained
    on would switch the validation set and mix two sets' losses in ``best_val_loss``: a
    one-line ``CheckpointError``, unless ``allow_change``. Checkpoints that do not record
    their data dir pass."""
    # No copy of the weights (of a sharded folder: its meta.pt).
    _check_data_dir(read(path, mmap=True), path, data_dir, allow_change)


def _check_data_dir(obj: dict, path, data_dir: str | Path, allow_change: bool) -> None:
    trained_on = (obj.get("TokenDataModule") or {}).get("dir")
    here = Path(data_dir).expanduser().resolve()
    if trained_on and Path(trained_on) != here and not allow_change:
        raise CheckpointError(
            f"ckpt_path={path} was trained on data.dir={trained_on}, not {here}: the validation "
            "set would change and best_val_loss would mix the two; resume with "
            f"data.dir={trained_on}, or pass allow_data_change=true to go on with the new data"
        )


def apply_init_from(cfg: DictConfig, overrides: dict[str, str]) -> GPT | None:
    """``init_from=PATH`` (a ``slm.pt``, a Lightning ``.ckpt`` or a ``transformers``
    directory): its GPT, whose config replaces ``cfg.model`` (all but ``dropout``, a setting
    of the training run). A ``model.*`` value set on the command line (``overrides``: key ->
    the override, ``slm.config.model_overrides``) that differs is a one-line ``ConfigError``.
    With ``ckpt_path`` too (resuming a run that started from ``init_from``), the weights
    come from the checkpoint and only the config from ``init_from``."""
    path = cfg.get("init_from")
    if not path:
        return None
    try:
        model = load_model(Path(str(path)).expanduser())
    except CheckpointError as e:
        raise CheckpointError(f"init_from={path}: {e}") from e
    arch = {k: v for k, v in model.config.to_dict().items() if k != "dropout"}
    clash = [
        f"{overrides[k]} (init_from has {k}={arch[k]})"
        for k in overrides
        if k in arch and cfg.model.get(k) != arch[k]
    ]
    if clash:
        raise ConfigError(
            f"init_from={path} fixes the model, but {'; '.join(clash)}; drop the override "
            "(only model.dropout may differ)"
        )
    with open_dict(cfg):
        cfg.model.update(arch)
    return model


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume: ``ckpt_path`` (``last``: this run dir's ``last.ckpt``), or,
    in a job that SLURM requeued (preempted, or out of time under
    ``hydra/launcher=submitit_slurm``), the ``last.ckpt`` its first run left. A checkpoint is
    a file, or a sharded folder."""
    last = run_dir / "checkpoints" / "last.ckpt"
    found = last.is_file() or is_sharded_checkpoint(last)
    if not ckpt_path:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        if restarts.isdigit() and int(restarts) > 0 and found:
            rank_zero_only(log.info)(
                "SLURM requeued this job (SLURM_RESTART_COUNT=%s): resuming from %s", restarts, last
            )
            return str(last)
        return None
    if ckpt_path == "last":  # this run's own: another run's (or sweep job's) is never taken
        if not found:
            raise ConfigError(
                f"ckpt_path=last: there is no {last}; resume in the run's own directory "
                "(hydra.run.dir=outputs/DATE/TIME ckpt_path=last) or give ckpt_path=PATH"
            )
        return str(last)
    path = Path(ckpt_path).expanduser()
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise ConfigError(
            f"ckpt_path={ckpt_path}: no such checkpoint file (or sharded checkpoint folder)"
        )
    return str(path.resolve())
