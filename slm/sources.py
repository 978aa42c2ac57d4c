"""The story sources that ``data.source`` names, read as batches of stories by split.

``load_source`` reads a Hugging Face dataset name (``datasets.load_dataset``; with
``max_stories``, a streamed slice, so that only it is downloaded) or a local path: the
dataset's own text format (stories separated by lines holding only ``<|endoftext|>``),
``.jsonl``/``.json``/``.parquet`` files with a ``text`` column (through
``datasets.load_dataset`` too, the same code path as the hub), or a directory of such files
(files whose name holds ``val``, ``valid`` or ``validation`` as a word, like
``TinyStories-valid.txt``, form the validation split). ``slm.prepare`` tokenizes what it reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from slm import tokenizer
from slm.errors import DataError, describe

DEFAULT_SOURCE = "roneneldan/TinyStories"
STRUCTURED = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SUFFIXES = {".txt", *STRUCTURED}
# A file belongs to the validation split when its name says so (TinyStories-valid.txt).
VAL_NAME = re.compile(r"(^|[-_.])(val|valid|validation)([-_.]|$)", re.IGNORECASE)
# The dataset's own text files separate stories by a line holding only <|endoftext|>.
SEPARATOR = re.compile(r"^[ \t]*<\|endoftext\|>[ \t\r]*\n", re.MULTILINE)


Batches = Iterable[list[str]]  # a split's stories, in batches


def split_stories(text: str) -> list[str]:
    """``SEPARATOR.split(text)`` for text of whole lines, up to whitespace at the ends of the
    pieces (which are stripped). The dataset's own files write every separator as a bare
    ``\n<|endoftext|>\n``: when each marker in ``text`` is one of those, ``str.split`` gives
    the same stories 5x faster than the regex."""
    bare = f"\n{tokenizer.EOT}\n"
    if text.count(tokenizer.EOT) == text.count(bare):
        return text.split(bare)
    return SEPARATOR.split(text)


def txt_stories(path: Path, batch: int) -> Iterator[list[str]]:
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
            parts = split_stories(carry[:cut])
            carry = parts.pop() + carry[cut:]
            out.extend(s for s in (p.strip() for p in parts) if s)
            while len(out) >= batch:
                yield out[:batch]
                out = out[batch:]
    # The last line may be a separator with no newline after it.
    out.extend(s for s in (p.strip() for p in split_stories(carry + "\n")) if s)
    for i in range(0, len(out), batch):
        yield out[i : i + batch]


def _dataset_stories(ds, name: str, batch: int) -> Iterator[list[str]]:
    """Stories of a ``datasets.Dataset``'s (or a streamed ``IterableDataset``'s) ``text``
    column. The column is checked here, when the source is loaded, so that a bad source fails
    before an existing data dir is touched."""
    if ds.column_names is not None and "text" not in ds.column_names:
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


def check_not_a_missing_path(source: str) -> None:
    """Tell a mistyped local path from a hub name (``owner/name``) before going online."""
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if not path.exists() and (looks_local or path.suffix in SUFFIXES):
        raise DataError(f"data.source {source}: no such file or directory; check the path")


def _first(streams: list[Batches], n: int | None) -> list[Batches]:
    """The first ``n`` stories of a split (all of them where ``n`` is None), in batches."""
    if n is None or not streams:
        return streams

    def take() -> Iterator[list[str]]:
        left = n
        for stream in streams:
            for stories in stream:
                yield stories[:left]
                left -= min(left, len(stories))
                if left == 0:
                    return

    return [take()]


def load_source(
    source: str, batch: int = 1024, max_stories: int | None = None
) -> dict[str, list[Batches]]:
    """The source's stories by split: ``{"train": [...], "val": [...]}`` (val may be empty);
    with ``max_stories``, the first ``max_stories`` of each split only. From the hub such a
    slice is streamed, so that only what it holds is downloaded."""
    path = Path(source).expanduser()
    if not path.exists():
        check_not_a_missing_path(source)
        import datasets  # heavy import (~0.6 s): only where it is used

        try:  # a dataset on the Hugging Face hub, e.g. roneneldan/TinyStories
            if max_stories is None:
                dd = datasets.load_dataset(source)
            else:
                dd = datasets.load_dataset(source, streaming=True)
                dd = {name: ds.take(max_stories) for name, ds in dd.items()}
        except Exception as e:
            raise DataError(
                f"data.source {source}: could not load it from the Hugging Face hub "
                f"({describe(e)}); check the name and your network, or prepare from local "
                "files with data.source=PATH (README: Offline)"
            ) from e
        splits: dict[str, list[Batches]] = {"train": [], "val": []}
        for name, ds in dd.items():
            split = "val" if name in ("validation", "valid", "val") else "train"
            if name in ("train", "validation", "valid", "val"):
                splits[split].append(_dataset_stories(ds, f"{source}[{name}]", batch))
        if not splits["train"]:
            raise DataError(f"data.source {source} has no 'train' split (splits: {list(dd)})")
        return {split: _first(streams, max_stories) for split, streams in splits.items()}

    splits = {"train": [], "val": []}
    for f in _local_files(path):
        split = "val" if VAL_NAME.search(f.stem) else "train"
        if f.suffix == ".txt":
            splits[split].append(txt_stories(f, batch))
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
    return {split: _first(streams, max_stories) for split, streams in splits.items()}


def canonical_source(source: str) -> str:
    """The source as recorded in meta.json: an absolute path for local files."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
