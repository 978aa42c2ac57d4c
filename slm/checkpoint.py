"""Checkpoint files, read and written in one place: ``slm.pt`` (written at the end of
training, ``save_slm_pt``), Lightning ``.ckpt`` files and sharded checkpoint folders, for
train (resume, ``init_from``), evaluate, generate, serve and export.

Each loads as a ``GPTConfig`` and the GPT's state dict, with ``weights_only=True`` (only
tensors and primitives are unpickled); so does a Hugging Face ``transformers`` directory of
the families ``slm.hf`` reads. Every problem is a one-line ``CheckpointError``. Each also
carries its tokenizer (``load_tokenizer``): ``slm.pt`` and ``.ckpt`` files under
``"tokenizer"`` (``Tokenizer.state()``; gpt2 where there is none), a ``transformers``
directory as its tokenizer files. Whether a checkpoint fits a run is ``slm.resume``'s.
"""

from __future__ import annotations

import dataclasses
import errno
import pickle
import warnings
from pathlib import Path

import torch

from slm import files, tokenizer
from slm.errors import CheckpointError, describe, first_line
from slm.hf import read_hf, read_hf_tokenizer
from slm.model import GPT, GPTConfig
from slm.tokenizer import Tokenizer

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
        return read_hf(path)
    return model_of(read(path), path)


def model_of(obj: dict, path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The model config and GPT state dict in ``obj``, what ``read(path)`` returned: for a
    caller that takes more of the file than the model (``load_checkpoint`` takes only it)."""
    path = Path(path)
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


def run_dir_of(ckpt: Path) -> Path:
    """The training run a checkpoint belongs to: slm.pt's folder, or the one above
    ``checkpoints/`` for a Lightning .ckpt."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def recorded_data_dir(path: str | Path) -> Path | None:
    """The data dir that the run of the checkpoint ``path`` trained on, where it is recorded:
    a Lightning ``.ckpt`` (or sharded folder) records it (``TokenDataModule``'s ``dir``);
    else its run (``run_dir_of``) does, in ``checkpoints/last.ckpt`` or ``.hydra/config.yaml``
    (``data.dir``, relative to where ``train.py`` ran: ``.hydra/hydra.yaml``'s
    ``hydra.runtime.cwd``). None where none of them does."""
    path = Path(path).expanduser()
    if is_hf_dir(path) or not path.exists():
        return None
    found = _datamodule_dir(path)
    if found is None and path.is_file():
        run = run_dir_of(path)
        found = _datamodule_dir(run / "checkpoints" / "last.ckpt") or _hydra_data_dir(run)
    return found


def _datamodule_dir(path: Path) -> Path | None:
    try:
        state = read(path, mmap=True).get("TokenDataModule")
    except CheckpointError:  # absent, or not a checkpoint: nothing recorded here
        return None
    return Path(state["dir"]) if isinstance(state, dict) and state.get("dir") else None


def _hydra_data_dir(run: Path) -> Path | None:
    from omegaconf import OmegaConf

    try:
        data_dir = OmegaConf.select(OmegaConf.load(run / ".hydra/config.yaml"), "data.dir")
        hydra = OmegaConf.load(run / ".hydra/hydra.yaml")
        cwd = OmegaConf.select(hydra, "hydra.runtime.cwd", default=None)
    except Exception:  # no such files, or not Hydra's
        return None
    if not data_dir or not cwd:
        return None
    return Path(str(cwd)) / Path(str(data_dir)).expanduser()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer the checkpoint ``path`` was trained with, ready to encode: the one that
    an ``slm.pt`` or ``.ckpt`` embeds (``gpt2`` for a checkpoint from before tokenizers were
    stored), or a ``transformers`` directory's (``slm.hf.read_hf_tokenizer``). A one-line
    ``SlmError`` for a file that is no checkpoint, or gpt2 offline without its BPE files."""
    path = Path(path)
    if is_hf_dir(path):
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
    packed = [k for k, v in state.items() if k.endswith(".scale") or v.dtype == torch.int8]
    if packed:  # a state dict of slm.weights.pack's: weights for inference, not a checkpoint
        raise CheckpointError(
            f"{path}: holds int8 inference weights ({packed[0]}), which slm makes from a "
            "checkpoint when it loads one (weights=int8) and never saves; pass the slm.pt or "
            ".ckpt that training wrote"
        )
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


def not_written(path: str | Path, e: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint file or folder ``path`` that ``e`` kept from being
    written, where nothing of it is left (it is written under a temporary name): a full disk
    says ``no space left on device``; where the run dir has a ``last.ckpt``, how to resume."""
    last = Path(path).parent / "last.ckpt"
    resume = f"; then resume with ckpt_path={last}" if last.exists() else ""
    if _no_space(e):
        return CheckpointError(
            f"{path}: no space left on device, so the checkpoint was not written (nothing of "
            f"it is left); free space on that disk{resume}"
        )
    return CheckpointError(
        f"{path}: the checkpoint could not be written ({describe(e)}); nothing of it is "
        f"left{resume}"
    )


def _no_space(e: BaseException | None) -> bool:
    """Whether ``e`` (or an error it carries: its causes, or the ranks' errors that
    torch.distributed.checkpoint gathers) is a full disk."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (error, trace)}
        if isinstance(failures, dict):
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
        todo += [e.__cause__, e.__context__]
    return False


def save_slm_pt(
    path: str | Path,
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    step: int,
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write ``slm.pt``: ``{"model_args", "model", "step", "tokenizer"}`` (the model config,
    the GPT's state dict, the optimizer step of those weights and ``Tokenizer.state()``: all
    that generate, evaluate and export need), whole or not at all (``slm.files``)."""
    obj = {"model_args": config.to_dict(), "model": state, "step": step}
    if tokenizer is not None:
        obj["tokenizer"] = tokenizer.state()
    files.save_torch(path, obj)
