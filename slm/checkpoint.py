"""Checkpoint loading, in one place for train (resume, ``init_from``), evaluate and generate.

``slm.pt`` (``{"model_args", "model", "step"}``, written by training) and Lightning ``.ckpt``
files both load as a ``GPTConfig`` and the GPT's state dict, with ``weights_only=True`` (only
tensors and primitives are unpickled); so does a Hugging Face ``transformers`` directory of
the families ``slm.export`` writes (``slm.export.read_hf``). Every problem is a one-line
``CheckpointError``. Each also carries its tokenizer (``load_tokenizer``): ``slm.pt`` and
``.ckpt`` files under ``"tokenizer"`` (``Tokenizer.state()``; gpt2 where there is none), a
``transformers`` directory as its tokenizer files.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from slm import tokenizer
from slm.errors import CheckpointError, ConfigError, first_line
from slm.model import GPT, GPTConfig
from slm.tokenizer import Tokenizer, from_state

log = logging.getLogger(__name__)


# A sharded checkpoint (strategy=fsdp, strategy.checkpoint=sharded) is a folder: each rank's
# shards in torch.distributed.checkpoint's format, and the rest of the Lightning checkpoint
# (hyperparameters, loops, callbacks) in this file, as Lightning's ModelParallelStrategy writes.
SHARDED_META = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def read(path: str | Path, mmap: bool = False) -> dict:
    """The dict inside a checkpoint file, loaded on the CPU with ``weights_only=True``
    (``mmap``: tensors are mapped, read only where they are used); of a sharded checkpoint
    folder, its ``meta.pt`` (all but the weights and optimizer state)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass a slm.pt or a Lightning .ckpt")
    if is_sharded_checkpoint(path):
        return read(path / SHARDED_META)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory (with no config.json of a transformers model, nor the "
            f"{SHARDED_META} of a sharded checkpoint); pass the slm.pt or a .ckpt in it"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise here
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and primitives; a plain pickle lands here too.
        raise CheckpointError(
            f"{path}: not loadable with weights_only=True ({first_line(e)}); "
            "it holds arbitrary Python objects or is not a PyTorch checkpoint"
        ) from e
    except Exception as e:  # zip, EOF and key errors: what a truncated or foreign file gives
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint, or truncated ({type(e).__name__}: "
            f"{first_line(e)}); pass a complete slm.pt or Lightning .ckpt"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def is_hf_dir(path: Path) -> bool:
    """A ``transformers`` model directory (what ``slm.export`` writes)."""
    return path.is_dir() and (path / "config.json").is_file()


def load_checkpoint(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The model config and GPT state dict stored in an ``slm.pt``, a Lightning ``.ckpt`` or
    a ``transformers`` directory (``config.json`` + safetensors).

    Only tensors and primitives are unpickled (``weights_only=True``)."""
    path = Path(path)
    if is_hf_dir(path):
        from slm.export import read_hf  # safetensors only where one is read (the hf extra)

        return read_hf(path)
    obj = read(path)
    if is_sharded_checkpoint(path) and "hyper_parameters" in obj:
        obj["state_dict"] = read_sharded_weights(path)
    if isinstance(obj, dict) and "model_args" in obj and "model" in obj:  # slm.pt
        args, state = obj["model_args"], obj["model"]
    elif isinstance(obj, dict) and "hyper_parameters" in obj and "state_dict" in obj:  # Lightning
        args = obj["hyper_parameters"]
        state = {
            k.removeprefix("model."): v
            for k, v in obj["state_dict"].items()
            if k.startswith("model.")
        }
    else:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: no model config inside (found {keys}); expected a slm.pt ('model_args', "
            "'model') or a Lightning .ckpt ('hyper_parameters', 'state_dict')"
        )
    if not isinstance(args, dict) or not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: the model config or weights inside are empty or malformed")
    # A compiled model's state dict carries the wrapper's prefix.
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if k not in args]
    if missing:
        raise CheckpointError(f"{path}: the stored model config lacks {', '.join(missing)}")
    try:
        config = GPTConfig(**{k: v for k, v in args.items() if k in fields})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid stored model config: {e}") from e
    return config, state


def read_sharded_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full weights (Lightning's ``state_dict``) of a sharded checkpoint folder, in one
    process, without the optimizer state: what ``slm.pt``, ``generate.py``, ``slm.evaluate``
    and ``init_from`` read of it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    try:
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(str(path)),
            planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
            no_dist=True,
        )
    except Exception as e:
        raise CheckpointError(
            f"{path}: its shards do not load ({type(e).__name__}: {first_line(e)}); the "
            "folder is incomplete or corrupt"
        ) from e
    return state.get("state_dict", {})


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer the checkpoint ``path`` was trained with, ready to encode: the one that
    an ``slm.pt`` or ``.ckpt`` embeds (``gpt2`` for a checkpoint from before tokenizers were
    stored), or a ``transformers`` directory's (``slm.export.read_hf_tokenizer``). A one-line
    ``SlmError`` for a file that is no checkpoint, or gpt2 offline without its BPE files."""
    path = Path(path)
    if is_hf_dir(path):
        from slm.export import read_hf_tokenizer

        return read_hf_tokenizer(path).load()
    try:  # mapped: the weights are not read
        obj = read(path, mmap=True)
    except CheckpointError:  # e.g. a file saved in torch's legacy (non-zip) format
        obj = read(path)
    return tokenizer.from_state(obj.get("tokenizer"), str(path)).load()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GPT:
    """The GPT in ``path`` (``slm.pt`` or Lightning ``.ckpt``), on ``device``, in eval mode.

    Raises ``CheckpointError`` (one line) for a missing, foreign, truncated or inconsistent
    file: the weights must have exactly the keys and shapes of the stored config."""
    config, state = load_checkpoint(path)
    model = GPT(config)
    expected = model.state_dict()
    wrong = [
        f"{k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    wrong += [f"{k} is missing" for k in expected if k not in state]
    wrong += [f"{k} is unexpected" for k in state if k not in expected]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        shape = ", ".join(f"{k}={getattr(config, k)}" for k in ("n_layer", "n_head", "n_embd"))
        raise CheckpointError(
            f"{path}: weights do not match the stored config ({shape}, "
            f"block_size={config.block_size}): {wrong[0]}{more}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


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
