"""Throughput of ``slm.prepare.prepare`` against a naive story-by-story tokenizing loop.

    python benchmarks/prepare.py [--source FILE] [--repeat 5]

Both tokenize the same TinyStories text file (by default the 2 MiB piece of the V1 train
split in ../shared/data/tinystories) into train.bin / val.bin with the same held-out split,
and must write byte-identical bins. Both parse stories with the same function
(``slm.sources.split_stories``) and use the same, already loaded, tiktoken gpt2 encoding; the
naive loop then calls ``encode_ordinary`` once per story, appends the ids and an EOT to a
Python list, and writes ``np.array(ids, np.uint16).tofile``. Each is timed end to end (read,
parse, encode, write) ``--repeat`` times; the best time is reported, and prepare's first call
(which builds its encoder threads' copies of the encoding) is reported on its own.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "tinystories" / "TinyStories-train.head-2MiB.txt"


def naive_prepare(source: Path, out: Path, val_fraction: float = 0.01) -> None:
    """The straightforward way: one ``encode_ordinary`` call per story, ids in a list."""
    from slm import tokenizer
    from slm.sources import split_stories  # the same story parsing as prepare

    enc = tokenizer.get_encoding()
    text = source.read_text(encoding="utf-8")
    stories = [s for s in (p.strip() for p in split_stories(text + "\n")) if s]
    ids: dict[str, list[int]] = {"train": [], "val": []}
    for i, story in enumerate(stories):
        held_out = math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
        dest = ids["val" if held_out else "train"]
        dest.extend(enc.encode_ordinary(story))
        dest.append(tokenizer.EOT_ID)
    out.mkdir(parents=True, exist_ok=True)
    for split, split_ids in ids.items():
        np.array(split_ids, dtype=np.uint16).tofile(out / f"{split}.bin")


def slm_prepare(source: Path, out: Path, val_fraction: float = 0.01) -> None:
    from slm.prepare import prepare

    prepare(str(source), out, val_fraction=val_fraction, overwrite=True)


def timed(fn, source: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    fn(source, out)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not args.source.is_file():
        sys.exit(
            f"error: benchmark text {args.source} is missing; give --source FILE, a TinyStories "
            "text file (the benchmark's: the first 2 MiB of the hub's TinyStories-train.txt)"
        )

    from slm import tokenizer

    tokenizer.get_encoding()  # loading gpt2's ranks is the same for both: not timed
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cold = timed(slm_prepare, args.source, tmp / "slm")  # first call in this process
        times: dict[str, list[float]] = {"naive": [], "slm": []}
        for _ in range(args.repeat):  # interleaved, so that load changes hit both alike
            times["naive"].append(timed(naive_prepare, args.source, tmp / "naive"))
            times["slm"].append(timed(slm_prepare, args.source, tmp / "slm"))
        for split in ("train", "val"):
            a = (tmp / "naive" / f"{split}.bin").read_bytes()
            b = (tmp / "slm" / f"{split}.bin").read_bytes()
            assert a == b, f"{split}.bin differs between the naive loop and prepare"
        from slm.prepare import read_meta

        meta = read_meta(tmp / "slm")

    splits = meta["splits"].values()
    stories = sum(s["stories"] for s in splits)
    tokens = sum(s["tokens"] for s in splits)
    mb = args.source.stat().st_size / 1e6
    print(f"source: {args.source.name} ({mb:.2f} MB, {stories:,} stories, {tokens:,} tokens)")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"best of {args.repeat} runs; bins identical: yes")
    print(f"{'':28}{'seconds':>9}{'stories/s':>12}{'tokens/s':>13}{'MB/s':>8}")
    rows = [
        ("naive encode_ordinary loop", min(times["naive"])),
        ("slm.prepare.prepare", min(times["slm"])),
        ("slm.prepare (first call)", cold),
    ]
    for name, t in rows:
        print(f"{name:28}{t:9.4f}{stories / t:12,.0f}{tokens / t:13,.0f}{mb / t:8.1f}")
    print(
        f"speed-up of prepare over the naive loop: {min(times['naive']) / min(times['slm']):.2f}x"
    )


if __name__ == "__main__":
    main()
