"""DDP on CPU: three processes (gloo), launched by Lightning from a real `python train.py`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS
from torch.utils.data import DataLoader

from slm.checkpoint import load_model
from slm.data import FixedWindows
from slm.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_three_process_ddp(tmp_path):
    stories = [f"Max found {n} shells on the beach. He smiled. The end." for n in range(300)]
    src = tmp_path / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    data = tmp_path / "data"
    prepare(str(src), data, val_fraction=0.1)
    run = tmp_path / "run"
    args = [
        *TINY_ARGS,
        f"data.source={src}",
        f"data.dir={data}",
        "data.val_fraction=0.1",
        "data.val_windows=8",  # 3 ranks do not divide 8 windows: 3 + 3 + 2, none repeated
        "trainer.max_steps=6",
        "val_every_n_steps=3",
        "optim.warmup_steps=1",
        "trainer.accelerator=cpu",
        "trainer.devices=3",
        "trainer.strategy=ddp",
        f"hydra.run.dir={run}",
        "stories=2",  # the story suite, on rank 0 alone, after the others are done
        "suite.max_new_tokens=4",
    ]
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote ") + out.stderr.count("wrote ") == 1  # rank 0 only

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert metrics["stories"]["openings"] == 2
    assert len((run / "slm.stories.jsonl").read_text().splitlines()) == 4
    assert metrics["tokens_seen"] == 6 * 8 * 64 * 3  # every rank's batches count
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best-step6.ckpt",
        "last.ckpt",
    ]

    # val/loss is the mean over the ranks' shares of the val windows: the same as one
    # process evaluating all 8 windows with the final weights (a padded DistributedSampler
    # would count two of them twice).
    model = load_model(run / "checkpoints" / "last.ckpt")
    n_val = json.loads((data / "meta.json").read_text())["splits"]["val"]["tokens"]
    windows = FixedWindows(data / "val.bin", n_val, 64, 8)
    with torch.no_grad():
        losses = [model(x, y)[1] for x, y in DataLoader(windows, batch_size=8)]
    assert metrics["final_val_loss"] == pytest.approx(losses[0].item(), rel=1e-4)
