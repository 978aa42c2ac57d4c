"""Files written whole or not at all: text, bytes, JSON, JSONL, ``torch.save`` and whole
directories; and directories that a failed step made, removed again (``removed_on_error``).

One mechanism: write under a temporary name in the target's own directory
(``NAME.<random>.tmp``: no two writers share one, and a crashed writer's leftovers are
recognizable), then ``os.replace`` it onto the target, which readers see either as it was or
complete. On any error the temporary is removed and the error is raised as an ``OSError``, so
each caller turns it into its own one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from slm.errors import first_line


def temp_name(path: Path) -> Path:
    """A name beside ``path`` that no other writer uses (``train.bin.<random>.tmp``)."""
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_with(path: str | Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` writes the file under a temporary name, renamed onto ``path`` once it
    is whole (its folder made where missing): each writer here, and one that wants a path of
    its own (a ``.gguf``)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename in (None, str(tmp)):  # a write's: name the file
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:  # e.g. torch.save's RuntimeError on a full disk
        raise OSError(errno.EIO, f"{type(e).__name__}: {first_line(e)}") from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) into ``path``, atomically."""
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    write_with(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON with a final newline (``metrics.json``, ``meta.json``)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """One JSON object a line, non-ASCII text as it is (``*.stories.jsonl``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    write_with(path, write)


def save_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` into ``path``, atomically (``slm.pt``, Lightning's ``.ckpt``).
    Serialized in memory first, as Lightning does: a full disk is then Python's
    ``OSError(ENOSPC)``, where ``torch.save`` into a file says only "file write failed"."""
    import io

    import torch  # not for the commands that never write tensors (prepare, tokenizer seed)

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        tmp.write_bytes(buffer.getbuffer())

    write_with(path, write)


def read_json(path: str | Path) -> dict:
    """The JSON object in ``path``; ``{}`` where it is absent, unreadable or no object: for
    files that are read for what they may add (a run's ``metrics.json`` for a model card)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def missing_dirs(path: str | Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: the directories
    that ``mkdir(parents=True)`` would create (and ``remove_dirs`` removes again)."""
    path = Path(path).absolute()
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_dirs(dirs: Iterable[Path], leftovers: Iterable[str] = ()) -> None:
    """Remove ``dirs`` (deepest first, as ``missing_dirs`` lists them), each with what it holds
    where that is only ``leftovers`` (names: a lock file, Hydra's ``.hydra/``), up to the
    first that holds anything else: the directories that a failed step made, and nothing
    that another run or step has put there."""
    keep = set(leftovers)
    for d in dirs:
        try:
            entries = list(d.iterdir())
        except FileNotFoundError:
            continue
        except OSError:
            return
        if any(p.name not in keep for p in entries):
            return
        with contextlib.suppress(OSError):
            for p in entries:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            d.rmdir()


@contextlib.contextmanager
def removed_on_error(path: str | Path, leftovers: Iterable[str] = ()) -> Iterator[None]:
    """Where the block fails, the directories of ``path`` that did not exist before it are
    removed again, if they hold only ``leftovers`` (``remove_dirs``): a failed step leaves no
    empty directory behind."""
    made = missing_dirs(path)
    try:
        yield
    except BaseException:
        remove_dirs(made, leftovers)
        raise


class NewDir:
    """A directory built under a temporary name beside ``path`` that replaces ``path`` whole
    when the ``with`` block ends without an error (an old ``path`` is swapped out, then
    deleted, so nothing is ever half-replaced); after an error ``path`` is as it was and the
    temporary directory is gone. Creating it raises ``OSError`` where ``path``'s parent
    cannot be written; a failed swap raises ``OSError`` too.

        with NewDir(out) as tmp:
            (tmp / "config.json").write_text(...)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix, parent = f".{self.path.name}.", self.path.parent
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(publish=exc_type is None)

    def close(self, publish: bool) -> None:
        """What leaving the ``with`` block does, for a directory that is written outside one
        (by several processes): ``publish`` it onto ``path``, or not; the temporary directory
        is gone either way."""
        try:
            if publish:
                self._publish()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _publish(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for p in [self.tmp, *self.tmp.iterdir()]:  # mkdtemp (and e.g. save_pretrained) make
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)  # them private
        if not self.path.exists():
            os.replace(self.tmp, self.path)
            return
        old = self.tmp.with_suffix(".old")  # swap, then delete the old one
        os.replace(self.path, old)
        try:
            os.replace(self.tmp, self.path)
        except OSError:
            os.replace(old, self.path)  # the old one back: nothing half-replaced
            raise
        shutil.rmtree(old, ignore_errors=True)
