"""Evaluate a checkpoint on every token of a text, once, in non-overlapping windows of the
model's ``block_size`` (the last, partial window is left out).

    python -m slm.evaluate ckpt=outputs/.../slm.pt data.dir=DIR    # DIR's val split
    python -m slm.evaluate ckpt=PATH text=stories.txt              # all of any text source

With ``data.dir`` (prepared on demand, like training, with the checkpoint's own tokenizer:
``data.source`` null stands for what it holds) the text is its ``val.bin``, which must be
tokens of the checkpoint's tokenizer. Without ``data.dir`` (or ``data.source``) on the
command line it is the data dir that the checkpoint's run trained on, where it records one
(``checkpoint.recorded_data_dir``), else ``data/tinystories``; stderr says which. With
``text=SRC`` (any ``data.source``: a hub name, a file or a directory) it is every story of
SRC, all its splits, tokenized with the checkpoint's tokenizer into a temporary file: no data
dir is read or written.

    python -m slm.evaluate ckpt=PATH data.dir=DIR stories=50 [judge=URL_OR_DIR]

``stories=N`` adds the story suite (``slm.stories``): N openings of held-out stories of the
same text (the val split, or all of ``text``), completed by the model and measured; the
completions go to ``stories_out`` (default ``<checkpoint name>.stories.jsonl`` beside it).

The last line printed is JSON: ``{"val_loss", "val_ppl", "val_bpb", "tokens"}``, and
``"stories"`` with the suite's numbers. Bits per byte is the tokenizer-independent figure
that compares with models of other tokenizers (llama2.c, the TinyStories paper):
``val_loss / ln 2 * tokens / utf8_bytes`` over the text.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from slm import stories
from slm.checkpoint import load_model, load_tokenizer, recorded_data_dir
from slm.config import compose, resolve_inference
from slm.data import FixedWindows, load_tokens
from slm.errors import DataError, run_cli
from slm.model import GPT
from slm.precision import eval_mode, inference_autocast
from slm.prepare import prepare, read_meta, read_tokenizer, tokenize
from slm.tokenizer import Tokenizer
from slm.weights import pack


def bits_per_byte(loss: float, tokens: int, utf8_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return loss / math.log(2) * tokens / utf8_bytes


@torch.inference_mode()
def score(
    model: GPT, path: str | Path, tokens: int, utf8_bytes: int, batch_size: int, name: str
) -> dict:
    """Token-weighted mean loss of ``model`` over the ``tokens`` uint16 tokens in ``path``
    (the encoding of ``utf8_bytes`` bytes of text; ``name`` names it in errors)."""
    device = next(model.parameters()).device
    T = model.config.block_size
    if T >= tokens:
        raise DataError(
            f"the model's block_size={T} is not smaller than the {tokens:,} tokens of {name}; "
            "evaluate on more text"
        )
    windows = FixedWindows(path, tokens, T, "all")
    autocast, _ = inference_autocast(device)
    total, n = 0.0, 0
    with eval_mode(model):
        for x, y in DataLoader(windows, batch_size=batch_size):
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item() * y.numel()
            n += y.numel()
    loss = total / n
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": bits_per_byte(loss, tokens, utf8_bytes),
        "tokens": n,
    }


def evaluate(
    model: GPT, data_dir: str | Path, batch_size: int = 32, tokenizer: Tokenizer | None = None
) -> dict:
    """``score`` over all of ``data_dir``/val.bin, which must hold tokens of ``tokenizer``
    (the model's; a one-line ``DataError`` where they are another's; not checked where None)."""
    if tokenizer is not None:
        check_tokenizer(data_dir, tokenizer)
    n = len(load_tokens(data_dir, "val"))  # checked against meta.json
    val = read_meta(data_dir)["splits"]["val"]
    path = Path(data_dir) / "val.bin"
    return score(model, path, n, val["bytes"], batch_size, str(path))


def check_tokenizer(data_dir: str | Path, tokenizer: Tokenizer) -> None:
    """A one-line ``DataError`` where ``data_dir`` holds no tokens of ``tokenizer``."""
    meta = read_meta(data_dir)
    if meta is None:
        return  # prepared on demand, with it
    held = read_tokenizer(data_dir, meta)
    if not held.same_as(tokenizer):
        raise DataError(
            f"data.dir {data_dir} holds tokens of tokenizer {held.describe()}, but the checkpoint "
            f"was trained with {tokenizer.describe()}; evaluate on a data.dir of its own "
            "(another data.dir is prepared with its tokenizer), or on text=SRC"
        )


@contextlib.contextmanager
def tokenized_text(source: str, tokenizer: Tokenizer | None = None) -> Iterator[tuple[Path, dict]]:
    """Every story of ``source`` (any ``data.source``) tokenized with ``tokenizer`` (the
    model's; gpt2 where None) into a temporary file: ``(path, {"tokens", "bytes", ...})``,
    deleted on leaving."""
    with tempfile.TemporaryDirectory(prefix="slm-evaluate-") as tmp:
        path = Path(tmp) / "text.bin"
        try:
            stats = tokenize(source, path, tokenizer)
        except DataError as e:  # load_source names the key it knows, data.source
            raise DataError(str(e).replace("data.source", "text")) from e
        yield path, stats


def with_weights(model: GPT, weights: str, measure: Callable[[GPT], dict]) -> dict:
    """``measure(model)`` with its weights in ``weights`` (``slm.weights``): another format
    than fp32 is measured beside fp32 on the same text, ``"fp32"`` holding those numbers and
    ``"bpb_change"`` the relative change in bits per byte. ``model`` is packed in place."""
    if weights == "fp32":
        return measure(model)
    fp32 = measure(model)
    result = measure(pack(model, weights))
    result["weights"] = weights
    result["fp32"] = {k: fp32[k] for k in ("val_loss", "val_ppl", "val_bpb")}
    result["bpb_change"] = result["val_bpb"] / fp32["val_bpb"] - 1
    return result


def _which_data_dir(cfg: DictConfig, argv: list[str]) -> tuple[str, str]:
    """The data dir to evaluate on, and why: ``data.dir`` where the command line names it (or
    names ``data.source``: another text, prepared there), else the one that the checkpoint's
    run trained on (``checkpoint.recorded_data_dir``), else the default."""
    given = {a.lstrip("+~").partition("=")[0] for a in argv}
    if given & {"data.dir", "data.source"}:
        return str(cfg.data.dir), "as given"
    recorded = recorded_data_dir(cfg.ckpt)
    if recorded is not None and read_meta(recorded) is not None:
        return str(recorded), f"where the run of {cfg.ckpt} trained; data.dir=DIR for another"
    gone = f"; its run's {recorded} holds no prepared data" if recorded else ""
    return str(cfg.data.dir), f"the default{gone}; data.dir=DIR for another"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = compose("evaluate", argv)
    device, _, weights = resolve_inference(cfg, "ckpt=PATH to a .ckpt or slm.pt", compiles=False)
    ckpt = cfg.ckpt
    stories.check(cfg)
    model = load_model(ckpt, device)  # a bad checkpoint fails before any tokenizing
    tok = load_tokenizer(ckpt)  # the one it was trained with
    out = Path(cfg.stories_out).expanduser() if cfg.stories_out else stories.completions_path(ckpt)

    def suite(path: Path) -> dict:
        held_out = stories.TokenStories(path, tok)
        result = stories.run(
            model, tok, held_out, cfg.stories, cfg.suite, out, cfg.judge, device=device
        )
        n = sum(result[mode]["completions"] for mode in stories.MODES if mode in result)
        print(f"wrote {n} completions of {result['openings']} openings to {out}", file=sys.stderr)
        return result

    d = cfg.data
    if cfg.text:
        with tokenized_text(str(cfg.text), tok) as (path, stats):
            name = f"text={cfg.text}"
            result = with_weights(model, weights, lambda m: score(
                m, path, stats["tokens"], stats["bytes"], d.batch_size, name
            ))  # fmt: skip
            if cfg.stories:
                result["stories"] = suite(path)
    else:
        d.dir, why = _which_data_dir(cfg, argv)
        print(f"data.dir={d.dir} ({why})", file=sys.stderr)
        if not d.overwrite:
            check_tokenizer(d.dir, tok)  # before prepare's error, which knows no checkpoint
        # A no-op when already prepared.
        prepare(d.source, d.dir, d.val_fraction, d.overwrite, tok, d.get("max_stories"))
        # its tokenizer checked just above
        result = with_weights(model, weights, lambda m: evaluate(m, d.dir, d.batch_size))
        if cfg.stories:
            result["stories"] = suite(Path(d.dir).expanduser() / "val.bin")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main, (ValueError,))  # SlmError, and torch's ValueErrors for a bad device
