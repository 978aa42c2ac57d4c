"""Tokenize a TinyStories source into ``train.bin`` / ``val.bin`` / ``meta.json``.

    python -m slm.prepare data.source=roneneldan/TinyStories data.dir=data/tinystories

``data.source`` is a Hugging Face dataset name (loaded with ``datasets.load_dataset``) or a
local path: the dataset's own text format (stories separated by lines holding only
``<|endoftext|>``), ``.jsonl``/``.json``/``.parquet`` files with a ``text`` column, or a
directory of such files (files whose name holds ``val``, ``valid`` or ``validation`` as a
word, like ``TinyStories-valid.txt``, form the validation split).
Structured local files go through ``datasets.load_dataset`` too, the same code path as the hub.

Tokens are streamed to disk in batches (memory stays flat however large the source), batches
are encoded in parallel threads (each with its own copy of the encoding, see
``tokenizer.thread_encoding``), and each bin is written under a temporary name and renamed
only when complete, so a failed or interrupted run never leaves a bin that a later run trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from slm import tokenizer
from slm.errors import DataError, describe, run_cli

DEFAULT_SOURCE = "roneneldan/TinyStories"
SPLITS = ("train", "val")
META_VERSION = 1
STRUCTURED = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SUFFIXES = {".txt", *STRUCTURED}
# A file belongs to the validation split when its name says so (TinyStories-valid.txt).
VAL_NAME = re.compile(r"(^|[-_.])(val|valid|validation)([-_.]|$)", re.IGNORECASE)
# The dataset's own text files separate stories by a line holding only <|endoftext|>.
SEPARATOR = re.compile(r"^[ \t]*<\|endoftext\|>[ \t\r]*\n", re.MULTILINE)


Batches = Iterable[list[str]]  # a split's stories, in batches


# ----------------------------------------------------------------------------- sources


def _split_stories(text: str) -> list[str]:
    """``SEPARATOR.split(text)`` for text of whole lines, up to whitespace at the ends of the
    pieces (which are stripped). The dataset's own files write every separator as a bare
    ``\n<|endoftext|>\n``: when each marker in ``text`` is one of those, ``str.split`` gives
    the same stories 5x faster than the regex."""
    bare = f"\n{tokenizer.EOT}\n"
    if text.count(tokenizer.EOT) == text.count(bare):
        return text.split(bare)
    return SEPARATOR.split(text)


def _txt_stories(path: Path, batch: int) -> Iterator[list[str]]:
    """Stories of a TinyStories-format text file, read in blocks (never whole into RAM)."""
    carry, out = "", []
    with open(path, encoding="utf-8") as f:
        while True:
            try:  # small blocks: the encoder threads start on the first while more is read
                block = f.read(1 << 18)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data.source {path} is not UTF-8 text ({e.reason}); "
                    "convert it to UTF-8 or give jsonl/parquet files"
                ) from e
            if not block:
                break
            carry += block
            cut = carry.rfind("\n") + 1  # split complete lines only
            if cut == 0:
                continue
            parts = _split_stories(carry[:cut])
            carry = parts.pop() + carry[cut:]
            out.extend(s for s in (p.strip() for p in parts) if s)
            while len(out) >= batch:
                yield out[:batch]
                out = out[batch:]
    # The last line may be a separator with no newline after it.
    out.extend(s for s in (p.strip() for p in _split_stories(carry + "\n")) if s)
    for i in range(0, len(out), batch):
        yield out[i : i + batch]


def _dataset_stories(ds, name: str, batch: int) -> Iterator[list[str]]:
    """Stories of a ``datasets.Dataset``'s ``text`` column. The column is checked here, when
    the source is loaded, so that a bad source fails before an existing data dir is touched."""
    if "text" not in ds.column_names:
        raise DataError(
            f"data.source {name} has no 'text' column (columns: {', '.join(ds.column_names)}); "
            "give files whose stories are in a column named 'text'"
        )
    rows = ds.select_columns(["text"]).iter(batch_size=batch)
    return ([s for s in (t.strip() for t in r["text"] if t) if s] for r in rows)


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(
                f"data.source {path} is a {path.suffix or 'suffix-less'} file; "
                f"give a {'/'.join(sorted(SUFFIXES))} file or a directory of them"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(
            f"data.source {path} holds no {'/'.join(sorted(SUFFIXES))} files; "
            "point it at TinyStories text, jsonl, json or parquet files"
        )
    return files


def _check_not_a_missing_path(source: str) -> None:
    """Tell a mistyped local path from a hub name (``owner/name``) before going online."""
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if not path.exists() and (looks_local or path.suffix in SUFFIXES):
        raise DataError(f"data.source {source}: no such file or directory; check the path")


def load_source(source: str, batch: int = 1024) -> dict[str, list[Batches]]:
    """The source's stories by split: ``{"train": [...], "val": [...]}`` (val may be empty)."""
    path = Path(source).expanduser()
    if not path.exists():
        _check_not_a_missing_path(source)
        import datasets  # heavy import (~0.6 s): only where it is used

        try:  # a dataset on the Hugging Face hub, e.g. roneneldan/TinyStories
            dd = datasets.load_dataset(source)
        except Exception as e:
            raise DataError(
                f"data.source {source}: could not load it from the Hugging Face hub "
                f"({describe(e)}); check the name and your network, or give a local path"
            ) from e
        splits: dict[str, list[Batches]] = {"train": [], "val": []}
        for name, ds in dd.items():
            split = "val" if name in ("validation", "valid", "val") else "train"
            if name in ("train", "validation", "valid", "val"):
                splits[split].append(_dataset_stories(ds, f"{source}[{name}]", batch))
        if not splits["train"]:
            raise DataError(f"data.source {source} has no 'train' split (splits: {list(dd)})")
        return splits

    splits = {"train": [], "val": []}
    for f in _local_files(path):
        split = "val" if VAL_NAME.search(f.stem) else "train"
        if f.suffix == ".txt":
            splits[split].append(_txt_stories(f, batch))
        else:
            import datasets

            fmt = STRUCTURED[f.suffix]
            try:
                ds = datasets.load_dataset(fmt, data_files=str(f), split="train")
            except Exception as e:
                raise DataError(
                    f"data.source {f} could not be read as {fmt} ({describe(e)}); check the file"
                ) from e
            splits[split].append(_dataset_stories(ds, str(f), batch))
    if not splits["train"]:
        raise DataError(f"data.source {source} holds only validation files; add training text")
    return splits


def canonical_source(source: str) -> str:
    """The source as recorded in meta.json: an absolute path for local files."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


# ----------------------------------------------------------------------------- writing


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, threads, pool)


def _encoder_pool() -> tuple[int, ThreadPoolExecutor]:
    """The encoding threads, kept for the life of the process: each builds its own copy of
    the encoding once (``tokenizer.thread_encoding``), so later prepares pay nothing for it.
    A forked child (a dataloader worker) gets a pool of its own, as the parent's threads are
    not in it."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        threads = max(1, min(8, os.cpu_count() or 1))
        _pool = (os.getpid(), threads, ThreadPoolExecutor(threads, thread_name_prefix="slm-encode"))
    return _pool[1], _pool[2]


def _encode_in_parallel(batches: Iterable[list[str]]) -> Iterator[tuple]:
    """``(stories, tokens)`` per batch, in order, with at most 2 x threads batches in flight."""
    threads, pool = _encoder_pool()
    pending: deque = deque()
    try:
        for stories in batches:
            pending.append((stories, pool.submit(tokenizer.encode_stories, stories)))
            if len(pending) >= 2 * threads:
                stories, fut = pending.popleft()
                yield stories, fut.result()
        while pending:
            stories, fut = pending.popleft()
            yield stories, fut.result()
    finally:  # stopped early (an error): drop the batches not yet started, finish the rest
        for _, fut in pending:
            fut.cancel()
        wait([fut for _, fut in pending])


def held_out_mask(index: np.ndarray, fraction: float) -> np.ndarray:
    """Which stories (by index in the source) form the held-out val split: exactly
    floor(n * fraction) of the first n, spread evenly through the source (deterministic)."""
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def _write_splits(splits: dict[str, list[Batches]], out: Path, val_fraction: float) -> dict:
    held_out = not splits["val"]
    if held_out and not 0 < val_fraction < 1:
        raise DataError(
            f"data.val_fraction={val_fraction} must be in (0, 1): the source has no "
            "validation split, so one is held out of its stories"
        )
    stats = {s: {"tokens": 0, "stories": 0, "bytes": 0} for s in SPLITS}
    tmp = {s: out / f"{s}.bin.tmp" for s in SPLITS}
    story_index = 0  # over the train stream, for the held-out split
    try:
        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(open(tmp[s], "wb")) for s in SPLITS}
            for split in ("train", "val"):
                bar = stack.enter_context(
                    tqdm(desc=f"tokenizing {split}", unit=" stories", disable=None, file=sys.stderr)
                )
                for stream in splits[split]:
                    for stories, ids in _encode_in_parallel(stream):
                        if held_out and split == "train":
                            # Route whole stories: story k's tokens end with its EOT.
                            ends = np.flatnonzero(ids == tokenizer.EOT_ID)
                            lengths = np.diff(ends, prepend=-1)
                            index = story_index + np.arange(len(stories))
                            to_val = held_out_mask(index, val_fraction)
                            token_to_val = np.repeat(to_val, lengths)
                            story_bytes = np.array([len(s.encode("utf-8")) for s in stories])
                            for dest, mask, token_mask in (
                                ("val", to_val, token_to_val),
                                ("train", ~to_val, ~token_to_val),
                            ):
                                ids[token_mask].tofile(files[dest])
                                st = stats[dest]
                                st["tokens"] += int(lengths[mask].sum())
                                st["stories"] += int(mask.sum())
                                st["bytes"] += int(story_bytes[mask].sum())
                            story_index += len(stories)
                        else:
                            ids.tofile(files[split])
                            st = stats[split]
                            st["tokens"] += len(ids)
                            st["stories"] += len(stories)
                            st["bytes"] += sum(len(s.encode("utf-8")) for s in stories)
                        bar.update(len(stories))
                        total = stats["train"]["tokens"] + stats["val"]["tokens"]
                        bar.set_postfix(tokens=f"{total:,}")
        # The bins are closed (flushed) here, before they are checked and renamed.
        for split in SPLITS:
            if stats[split]["stories"] == 0:
                what = "no text" if split == "train" else "no validation stories"
                hint = (
                    "check the files"
                    if split == "train"
                    else "raise data.val_fraction or give more stories"
                )
                raise DataError(f"data.source holds {what} after tokenizing; {hint}")
        for split in SPLITS:
            os.replace(tmp[split], out / f"{split}.bin")
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return stats


# ----------------------------------------------------------------------------- prepare


def read_meta(data_dir: str | Path) -> dict | None:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); re-run prepare with data.overwrite=true"
        ) from e
    if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict):
        raise DataError(f"{path} is not a slm meta.json; re-run prepare with data.overwrite=true")
    return meta


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DataError(
            f"data.dir {out} is not writable ({e.strerror}); choose a directory you can write"
        ) from e


def prepare(
    source: str = DEFAULT_SOURCE,
    data_dir: str | Path = "data/tinystories",
    val_fraction: float = 0.01,
    overwrite: bool = False,
) -> dict:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` into ``data_dir``; return the meta.

    A no-op when ``meta.json`` already records this source and tokenizer. Bins from another
    source or tokenizer (or bins with no ``meta.json``) are an error unless ``overwrite``.
    """
    out = Path(data_dir).expanduser().resolve()
    _check_not_a_missing_path(source)
    src = canonical_source(source)
    meta = read_meta(out) if out.is_dir() else None
    if meta is not None and not overwrite:
        same = (
            meta.get("source") == src
            and meta.get("tokenizer") == tokenizer.NAME
            and (meta.get("val_fraction") is None or meta.get("val_fraction") == val_fraction)
        )
        if not same:
            raise DataError(
                f"data.dir {out} holds tokens of {meta.get('source')!r} "
                f"({meta.get('tokenizer')}, val_fraction={meta.get('val_fraction')}), not of "
                f"{src!r} (gpt2, val_fraction={val_fraction}); pass data.source="
                f"{meta.get('source')} to use them, data.overwrite=true to replace them, "
                "or choose another data.dir"
            )
        if all((out / f"{s}.bin").exists() for s in SPLITS):
            return meta
    elif meta is None and not overwrite and any((out / f"{s}.bin").exists() for s in SPLITS):
        raise DataError(
            f"data.dir {out} holds .bin files but no meta.json, so their origin is unknown; "
            "pass data.overwrite=true to prepare them again"
        )
    _check_writable(out)
    # Batches of 256 stories keep every encoder thread busy even on a small source.
    splits = load_source(source, batch=256)  # fails before anything existing is touched
    (out / "meta.json").unlink(missing_ok=True)  # old bins are untrusted from here on
    stats = _write_splits(splits, out, val_fraction)
    held_out = not splits["val"]
    meta = {
        "version": META_VERSION,
        "source": src,
        "tokenizer": tokenizer.NAME,
        "vocab_size": tokenizer.VOCAB_SIZE,
        "eot_token": tokenizer.EOT_ID,
        "dtype": "uint16",
        "val_split": "held-out" if held_out else "validation",
        "val_fraction": val_fraction if held_out else None,
        "splits": stats,
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def main(argv: list[str] | None = None) -> dict:
    """``python -m slm.prepare [hydra overrides]``: the ``data`` keys of the training config."""
    from slm.config import compose

    cfg = compose("train", sys.argv[1:] if argv is None else argv)
    d = cfg.data
    meta = prepare(d.source, d.dir, d.val_fraction, d.overwrite)
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"{split}: {s['stories']:,} stories, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    print(f"wrote {Path(d.dir).resolve()}/{{train.bin,val.bin,meta.json}}")
    return meta


if __name__ == "__main__":
    run_cli(main)
