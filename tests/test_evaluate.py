import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slm.evaluate import bits_per_byte, evaluate
from slm.model import GPT, GPTConfig
from slm.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    stories = [f"Anna had {n} red apples. She gave one to Sam. The end." for n in range(120)]
    src = d / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(src), d / "data", val_fraction=0.25)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    model = GPT(config)
    torch.save({"model_args": config.to_dict(), "model": model.state_dict()}, d / "slm.pt")
    return d, src, model


def test_every_val_token_once_in_non_overlapping_windows(setup):
    d, _, model = setup
    tokens = np.fromfile(d / "data" / "val.bin", dtype=np.uint16).astype(np.int64)
    T, n_windows = 32, (len(tokens) - 1) // 32
    x = torch.from_numpy(tokens[: n_windows * T]).view(n_windows, T)
    y = torch.from_numpy(tokens[1 : n_windows * T + 1]).view(n_windows, T)
    with torch.no_grad():
        _, expected = model(x, y)  # one batch: the mean over every target token
    result = evaluate(model, d / "data", batch_size=3)  # uneven last batch
    assert result["tokens"] == n_windows * T
    assert result["val_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["val_ppl"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    meta = json.loads((d / "data" / "meta.json").read_text())["splits"]["val"]
    bpb = expected.item() / math.log(2) * meta["tokens"] / meta["bytes"]
    assert result["val_bpb"] == pytest.approx(bpb, rel=1e-5)


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), tokens=1, utf8_bytes=1) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 2, tokens=100, utf8_bytes=400) == pytest.approx(0.5)


def test_cli_prints_json_last(setup):
    d, src, _ = setup
    args = [f"ckpt={d / 'slm.pt'}", f"data.source={src}", f"data.dir={d / 'data'}",
            "data.val_fraction=0.25", "device=cpu"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "slm.evaluate", *args], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result) == {"val_loss", "val_ppl", "val_bpb", "tokens"}


@pytest.mark.parametrize(
    "args, message",
    [([], "error: ckpt is required"), (["ckpt=/nope.pt"], "error: .*nope.pt")],
)
def test_cli_errors(setup, args, message):
    d, src, _ = setup
    out = subprocess.run(
        [sys.executable, "-m", "slm.evaluate", *args, f"data.source={src}",
         f"data.dir={d / 'data'}", "data.val_fraction=0.25"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert re.match(message, lines[0])
