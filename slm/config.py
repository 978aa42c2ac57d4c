"""Compose, resolve and check the Hydra config before any work starts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from slm.errors import ConfigError, override
from slm.model import CHOICES, GPTConfig
from slm.optim import OPTIMIZERS
from slm.precision import default_precision, resolve_device
from slm.strategy import check_strategy
from slm.tokenizer import check_config as check_tokenizer_config
from slm.weights import resolve as resolve_weights

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """The config that ``@hydra.main`` would build, for code run outside a Hydra app; a
    one-line ``ConfigError`` for an override it cannot take, or one that adds a key nothing
    reads (``check_added_keys``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
            except MissingConfigException:
                raise
            except ConfigCompositionException as e:  # e.g. a key the config does not have
                raise ConfigError(_not_composed(e, config_name, overrides)) from e
            check_added_keys(cfg, overrides, config_name)
            return cfg
    except OverrideParseException as e:
        raise ConfigError(_unparsable(overrides)) from e
    except MissingConfigException as e:
        # Hydra lists the available options over several lines: keep it to one.
        text = str(e).split("Config search path")[0]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        msg = lines[0].removeprefix("In 'train': ")
        if len(lines) > 2:
            msg += f"; choose one of {', '.join(lines[2:])}"
        raise ConfigError(msg) from e


def _not_composed(e: Exception, config_name: str, overrides: Sequence[str]) -> str:
    """Hydra's several lines for an override it cannot apply, on one. For a key the config
    does not have, its hint (``+key=value``) would add a key that nothing reads: the closest
    key instead."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    head = f"{lines[0].rstrip('.')}: conf/{config_name}.yaml has no such key"
    hint = lines[1] if len(lines) > 1 else ""
    text = hint.removeprefix("To append to your config use +")
    if text == hint:  # another composition error: Hydra's hint as it is
        return head + "; check its spelling" + (f"; {hint[0].lower()}{hint[1:]}" if hint else "")
    try:
        base = _compose_base(config_name, [o for o in overrides if o != text])
        closest = _closest_hint(text, _keys(OmegaConf.to_container(base, resolve=False)))
    except Exception:  # another bad override: no suggestion
        closest = ""
    return head + (closest or "; check its spelling")


def _compose_base(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The config of ``overrides`` under the Hydra already initialized (a Hydra app's, or
    ``compose``'s)."""
    from hydra import compose as hydra_compose

    return hydra_compose(config_name=config_name, overrides=list(overrides))


# Sections whose added keys are read and checked by their owner: Lightning's Trainer arguments
# (train's check_trainer_args), the trackers' settings of the logger group (a tag map takes
# names of the user's own).
CHECKED_SECTIONS = ("trainer", "logger")


def check_added_keys(
    cfg: DictConfig, overrides: Sequence[str] | None = None, config_name: str | None = None
) -> None:
    """A one-line ``ConfigError`` for an override of ``cfg`` that adds a key nothing reads:
    ``+key=value``, or ``++key=value`` where the config has no ``key`` (Hydra's own hint for a
    key it does not know is ``+key=value``, and ``generate.py +max_tokens=10`` was taken and
    ignored). The additions that are meant stay: ``+trainer.NAME=VALUE`` where the config has
    ``trainer`` (a ``lightning.Trainer`` argument: ``train`` checks it), likewise
    ``+logger.*`` (``CHECKED_SECTIONS``), ``+model.FIELD`` for a ``GPTConfig`` field that the
    preset leaves out (``model.vocab_size``: checked against the data), ``hydra.*``, and
    config groups (``+group=option``: Hydra checks those). Without
    ``overrides``, in a Hydra app: its command line and config (``train.py``,
    ``generate.py``); outside one, nothing to check.
    """
    if overrides is None:
        overrides = _task()
        if not overrides:  # outside a Hydra app, or nothing on its command line
            return
        config_name = _config_name()
    added = []  # (text, key): Hydra has parsed them, so the key is what precedes "=" (or "@")
    for text in overrides:
        key = text.lstrip("+").partition("=")[0].partition("@")[0]
        group = Path(CONF_DIR, *key.split("/")).is_dir()
        if text.startswith("+") and not group and key.partition(".")[0].split("/")[0] != "hydra":
            added.append((text, key))
    if not added:
        return
    tree = OmegaConf.to_container(cfg, resolve=False)
    rest = _without(tree, {key for _, key in added})  # cfg but for what was added
    composed: list[dict] = []

    def base() -> dict:
        """The config without the additions, composed (once): where ``rest`` cannot tell (a
        ``++`` may name a key the config has; a section may be empty in it: logger.csv)."""
        if not composed:
            others = [t for t in overrides if t not in {text for text, _ in added}]
            composed.append(
                OmegaConf.to_container(_compose_base(config_name, others), resolve=False)
            )
        return composed[0]

    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    for text, key in added:
        if text.startswith("++") and _has_key(base(), key):
            continue  # ++key=value on a key the config has: an override
        section, _, name = key.partition(".")
        if (section in CHECKED_SECTIONS or (section == "model" and name in fields)) and (
            _has_key(rest, section) or _has_key(base(), section)
        ):
            continue  # a Trainer argument, or a GPTConfig field the preset leaves at its default
        raise ConfigError(
            f"{text} adds a key that nothing reads: conf/{config_name}.yaml has no {key}"
            + (_closest_hint(text.lstrip("+"), _keys(rest)) or "; check its spelling")
        )


def _without(tree: dict, keys: set[str], prefix: str = "") -> dict:
    """The config ``tree`` without ``keys``, nor the sections that only they make up (Hydra
    refuses ``+key=value`` where the config has ``key``: this is the config before them, but
    for a section that was empty)."""
    out = {}
    for k, v in tree.items():
        if f"{prefix}{k}" in keys:
            continue
        if isinstance(v, dict):
            rest = _without(v, keys, f"{prefix}{k}.")
            if v and not rest:
                continue
            v = rest
        out[k] = v
    return out


def _has_key(tree: dict, key: str) -> bool:
    """Whether the config ``tree`` (``OmegaConf.to_container``) has the dotted ``key``."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _keys(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key of the config ``tree``, its sections' too."""
    keys = []
    for k, v in tree.items():
        keys.append(f"{prefix}{k}")
        if isinstance(v, dict):
            keys += _keys(v, f"{prefix}{k}.")
    return keys


def _closest_hint(text: str, keys: list[str]) -> str:
    """``; did you mean KEY=VALUE?`` for the one of ``keys`` closest to the key that the
    override ``text`` (``key=value``) names, by the whole key or its last part; ``""`` where
    none is close."""
    import difflib

    key, _, value = text.partition("=")
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
    if not match:
        last = {k.rpartition(".")[2]: k for k in reversed(keys)}  # the first key of a name
        near = difflib.get_close_matches(key.rpartition(".")[2], list(last), n=1, cutoff=0.75)
        match = [last[near[0]]] if near else []
    return f"; did you mean {match[0]}={value}?" if match else ""


def _unparsable(overrides: Sequence[str]) -> str:
    """The message for an override Hydra's grammar rejects (over several lines, with a caret):
    which one, and how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for text in overrides:
        try:
            parser.parse_overrides([text])
        except OverrideParseException:
            key, _, value = text.partition("=")
            return (
                f"Hydra cannot parse the override {text}: a value with non-ASCII text, quotes, "
                "brackets, commas or '=' needs Hydra's quotes inside the shell's; write it as "
                f"{override(key, value)} (see Quoting in the README)"
            )
    return f"Hydra cannot parse the overrides {' '.join(overrides)}; check their syntax"


def typed_text(cfg: DictConfig, overrides: Sequence[str], keys: Sequence[str]) -> DictConfig:
    """``cfg`` with each of ``keys`` that an override set to a number or a boolean back as the
    text typed: Hydra reads ``api_key=12345`` as an int and ``api_key=1.50`` as the float 1.5,
    but a key or a name is text (``str(1.5)`` would not be the key the user gave)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.key_or_group in keys and not o.is_delete():
            value = o.value()
            if isinstance(value, (bool, int, float)):  # a string, null or a list stays as it is
                OmegaConf.update(cfg, o.key_or_group, o.input_line.partition("=")[2].strip())
    return cfg


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_hardware(cfg: DictConfig) -> DictConfig:
    """Fill ``trainer.accelerator``, ``trainer.precision``, ``compile`` and ``optim.fused``
    where they are ``auto``: explicit values win over the hardware group, which wins over
    detection (``slm.precision.default_precision``). ``compile`` becomes a torch.compile mode
    or false; ``optim.fused`` true or false."""
    hw = cfg.hardware
    accelerator = cfg.trainer.accelerator
    if accelerator == "auto":
        accelerator = hw.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} (hardware={_choice('hardware')}) but this "
            "machine has no CUDA GPU; use hardware=cpu or hardware=auto"
        )
    on_gpu = accelerator in ("gpu", "cuda")
    precision = str(cfg.trainer.precision)
    if precision == "auto":
        precision = str(hw.precision)
    if precision == "auto":
        precision = default_precision("cuda" if on_gpu else "cpu")
    if not on_gpu and precision.startswith("16"):
        # bf16-mixed runs on a CPU (slowly: it is there to test the mixed-precision path).
        raise ConfigError(
            f"precision {precision} was asked for on {accelerator}: fp16 with loss scaling is "
            "for GPUs; use trainer.precision=32-true or bf16-mixed on a CPU"
        )
    compile_ = cfg.compile if cfg.compile != "auto" else hw.compile
    if compile_ == "auto":
        compile_ = on_gpu
    if compile_ is True:
        compile_ = "default"
    if compile_ not in (False, None, *COMPILE_MODES):
        raise ConfigError(
            f"compile={compile_} is not auto, true, false or a torch.compile mode "
            f"({', '.join(COMPILE_MODES)})"
        )
    fused = cfg.optim.get("fused", "auto")
    if fused == "auto":
        fused = on_gpu
    if not isinstance(fused, bool):
        raise ConfigError(f"optim.fused={fused} must be auto, true or false")
    with open_dict(cfg):
        cfg.trainer.accelerator = accelerator
        cfg.trainer.precision = precision
        cfg.compile = compile_ or False
        cfg.optim.fused = fused
    return cfg


class Inference(NamedTuple):
    """Where and how an inference command runs its model."""

    device: torch.device
    compile: bool  # the decode step through torch.compile
    weights: str  # the weights' format (slm.weights): fp32, bf16, fp16 or int8


def resolve_inference(cfg: DictConfig, usage: str, compiles: bool = True) -> Inference:
    """The checks every inference command (``generate.py``, ``slm.serve``, ``slm.evaluate``)
    makes before it reads its checkpoint: ``ckpt`` is given (else ``ckpt is required:
    {usage}``), ``compile`` is auto, true or false (where the command ``compiles``), ``device``
    resolves (``slm.precision.resolve_device``) and ``weights`` is a format
    (``slm.weights.resolve``: ``auto`` becomes the device's best half precision).
    ``compile=auto`` compiles on CUDA, and on a CPU for int8 weights (whose fast matmul is
    the compiled step's)."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise ConfigError(f"ckpt is required: {usage}")
    if compiles and cfg.compile != "auto" and not isinstance(cfg.compile, bool):
        raise ConfigError(f"compile={cfg.compile} must be auto, true or false")
    device = resolve_device(cfg.device)
    weights = resolve_weights(cfg.get("weights", "fp32"), device)
    compile = cfg.compile if cfg.compile != "auto" else device.type == "cuda" or weights == "int8"
    return Inference(device, compiles and compile, weights)


def model_overrides() -> dict[str, str]:
    """The ``model.*`` keys that this run's command line sets, each with the override that
    sets it: ``model.KEY=VALUE`` itself, or a ``model=NAME`` / ``arch=NAME`` group choice for
    every key of that group's file. Empty outside a Hydra app (a config composed in code)."""
    keys: dict[str, str] = {}
    for text in _task():
        key, _, value = text.lstrip("+~").partition("=")
        if key.startswith("model."):
            keys[key.removeprefix("model.")] = text
        elif key in ("model", "arch") and (CONF_DIR / key / f"{value}.yaml").is_file():
            from omegaconf import OmegaConf

            for k in OmegaConf.load(CONF_DIR / key / f"{value}.yaml"):
                keys.setdefault(str(k), text)
    return keys


def _task() -> list[str]:
    """This run's command-line overrides; empty outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        return []


def command_line(group: str) -> list[str]:
    """The overrides on this run's command line that set the config group ``group`` or one
    of its keys (``tokenizer=bpe``, ``tokenizer.vocab_size=8192``); empty outside a Hydra
    app."""
    task = _task()
    keys = [text.lstrip("+~").partition("=")[0] for text in task]
    return [text for text, key in zip(task, keys) if key == group or key.startswith(group + ".")]


def _config_name() -> str:
    """This Hydra app's config name (``train``, ``generate``)."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().job.config_name)


def _choice(group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except ValueError:
        return "?"


def _is_number(x, integer: bool = False) -> bool:
    if isinstance(x, bool):
        return False
    if integer:
        return isinstance(x, int)
    return isinstance(x, (int, float)) and math.isfinite(x)  # nan and inf are no settings


# Every numeric knob's range: key -> (integer?, the test, what it must be). A key that the
# config does not hold (optim.muon_* under optim=adamw) is not checked.
RANGES: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    **{f"model.{k}": (True, lambda x: x >= 1, "a positive integer")
       for k in ("n_layer", "n_head", "n_embd", "block_size")},
    "model.dropout": (False, lambda x: 0 <= x < 1, "in [0, 1)"),
    "model.rope_theta": (False, lambda x: x > 0, "positive"),
    "optim.lr": (False, lambda x: x > 0, "positive"),
    "optim.min_lr": (False, lambda x: x >= 0, ">= 0"),
    "optim.weight_decay": (False, lambda x: x >= 0, ">= 0 (0: no weight decay)"),
    "optim.muon_lr": (False, lambda x: x > 0, "positive"),
    "optim.muon_momentum": (False, lambda x: 0 < x < 1, "in (0, 1)"),
    "optim.muon_weight_decay": (False, lambda x: x >= 0, ">= 0"),
    **{f"trainer.{k}": (True, lambda x: x >= 1, "a positive integer")
       for k in ("max_steps", "accumulate_grad_batches", "log_every_n_steps", "num_nodes")},
    "trainer.gradient_clip_val": (False, lambda x: x >= 0, ">= 0 (or null: no clipping)"),
    "val_every_n_steps": (True, lambda x: x >= 1, "a positive integer"),
    "seed": (True, lambda x: x >= 0, "an integer >= 0"),
    "data.batch_size": (True, lambda x: x >= 1, "a positive integer"),
    "data.num_workers": (True, lambda x: x >= 0, "an integer >= 0"),
    "data.val_fraction": (False, lambda x: 0 < x < 1, "in (0, 1)"),
    "data.max_stories": (True, lambda x: x >= 1, "a positive integer (or null: all)"),
    "sample.max_new_tokens": (True, lambda x: x >= 0, "an integer >= 0"),
}  # fmt: skip
NULLABLE = ("trainer.gradient_clip_val", "data.max_stories")


def _check_ranges(cfg: DictConfig) -> None:
    """Each knob of ``RANGES`` a number of the right kind and in its range (a one-line
    ``ConfigError`` for the first that is not); checks across knobs follow in ``validate``."""
    for key, (integer, ok, what) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=KeyError)
        if value is KeyError or (value is None and key in NULLABLE):
            continue
        if not _is_number(value, integer):
            raise ConfigError(f"{key}={value} must be {what if integer else 'a number'}")
        if not ok(value):
            raise ConfigError(f"{key}={value} must be {what}")
    betas = cfg.optim.get("betas")
    if not (
        isinstance(betas, Sequence)
        and len(betas) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. [0.9,0.95]")
    vw = cfg.data.val_windows
    if not (vw == "all" or (_is_number(vw, integer=True) and vw >= 1)):
        raise ConfigError(f"data.val_windows={vw} must be a positive integer or 'all'")
    if cfg.get("tokenizer") is not None:
        check_tokenizer_config(cfg.tokenizer)


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first invalid value or combination of values; fill
    ``optim.warmup_steps=auto`` (``min(200, max_steps // 10)``: short runs warm up too)."""
    m, o, t = cfg.model, cfg.optim, cfg.trainer
    _check_ranges(cfg)
    broken = GPTConfig.broken_rule(m, prefix="model.")
    if broken is not None:
        key, message = broken
        if key in CHOICES:  # how to pick one on the command line
            message += f"; set model.{key}= one of them (or arch=gpt2 / arch=modern)"
        raise ConfigError(message)
    if o.warmup_steps == "auto":
        with open_dict(cfg):
            o.warmup_steps = min(200, t.max_steps // 10)
    if not _is_number(o.warmup_steps, integer=True) or o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be auto or an integer >= 0")
    for key in ("qk_norm", "tie_embeddings"):
        if not isinstance(m.get(key), bool):
            raise ConfigError(f"model.{key}={m.get(key)} must be true or false")
    if o.name not in OPTIMIZERS:
        raise ConfigError(
            f"optim.name={o.name} is not one of {', '.join(OPTIMIZERS)}; "
            "use optim=adamw or optim=muon"
        )
    if o.min_lr > o.lr:
        raise ConfigError(
            f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: the schedule would rise "
            "instead of decay; set min_lr <= lr"
        )
    if o.warmup_steps > t.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} exceeds trainer.max_steps={t.max_steps}; "
            "lower the warmup or train longer"
        )
    check_strategy(cfg)
