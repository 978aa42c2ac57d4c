"""Evaluate a checkpoint on the whole validation split: every token once, in non-overlapping
windows of the model's ``block_size``.

    python -m slm.evaluate ckpt=outputs/.../slm.pt data.source=SRC data.dir=DIR

The last line printed is JSON: ``{"val_loss", "val_ppl", "val_bpb", "tokens"}``. Bits per byte
is the tokenizer-independent figure that compares with models of other tokenizers (llama2.c,
the TinyStories paper): ``val_loss / ln 2 * tokens / utf8_bytes`` over the val text.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf.errors import MissingMandatoryValue
from torch.utils.data import DataLoader

from slm.config import compose
from slm.data import FixedWindows, load_tokens
from slm.errors import ConfigError, DataError, run_cli
from slm.model import GPT
from slm.precision import inference_autocast
from slm.prepare import prepare, read_meta
from slm.sample import load_model, resolve_device


def bits_per_byte(loss: float, tokens: int, utf8_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the text those tokens encode."""
    return loss / math.log(2) * tokens / utf8_bytes


@torch.inference_mode()
def evaluate(model: GPT, data_dir: str | Path, batch_size: int = 32) -> dict:
    """Token-weighted mean loss of ``model`` over all of ``data_dir``/val.bin."""
    device = next(model.parameters()).device
    tokens = load_tokens(data_dir, "val")
    T = model.config.block_size
    if T >= len(tokens):
        raise DataError(f"block_size={T} is not smaller than the {len(tokens):,} val tokens")
    windows = FixedWindows(Path(data_dir) / "val.bin", len(tokens), T, "all")
    autocast, _ = inference_autocast(device)
    total, n = 0.0, 0
    model.eval()
    for x, y in DataLoader(windows, batch_size=batch_size):
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.item() * y.numel()
        n += y.numel()
    val = read_meta(data_dir)["splits"]["val"]
    loss = total / n
    return {
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": bits_per_byte(loss, val["tokens"], val["bytes"]),
        "tokens": n,
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = compose("evaluate", sys.argv[1:] if argv is None else argv)
    try:
        ckpt = cfg.ckpt
    except MissingMandatoryValue:
        raise ConfigError("ckpt is required: ckpt=PATH to a .ckpt or slm.pt") from None
    device = resolve_device(cfg.device)
    d = cfg.data
    prepare(d.source, d.dir, d.val_fraction, d.overwrite)  # a no-op when already prepared
    model = load_model(ckpt, device)
    result = evaluate(model, d.dir, d.batch_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_cli(main, (ValueError,))  # SlmError, and torch's ValueErrors for a bad device
