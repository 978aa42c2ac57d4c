"""slm.files: every writer replaces its target whole, or leaves it as it was and no temporary
behind; a failure is an OSError (each caller words its own one-line message)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import full_disk

from slm import files


def names(d) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_writers_write_whole_files(tmp_path):
    files.write_text(tmp_path / "a.txt", "héllo\n")
    files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    files.write_json(tmp_path / "c.json", {"x": [1, 2]})
    files.write_jsonl(tmp_path / "sub" / "d.jsonl", [{"t": "é"}, {"t": 2}])  # folder made
    files.save_torch(tmp_path / "e.pt", {"w": torch.ones(2)})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": [1, 2]}, indent=2) + "\n"
    assert (tmp_path / "sub" / "d.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'
    assert torch.equal(torch.load(tmp_path / "e.pt", weights_only=True)["w"], torch.ones(2))
    assert names(tmp_path) == ["a.txt", "b.bin", "c.json", "e.pt", "sub"]
    assert files.read_json(tmp_path / "c.json") == {"x": [1, 2]}
    assert files.read_json(tmp_path / "a.txt") == files.read_json(tmp_path / "none") == {}


def test_temporary_names_are_unique(tmp_path):
    names = {files.temp_name(tmp_path / "train.bin") for _ in range(100)}
    assert len(names) == 100
    assert all(n.parent == tmp_path for n in names)
    assert all(re.fullmatch(r"train\.bin\.[0-9a-f]+\.tmp", n.name) for n in names)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "slm.pt"
    path.write_bytes(b"old")

    def records():
        yield {"a": 1}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        files.write_jsonl(path, records())
    assert e.value.strerror == "No space left on device"
    with pytest.raises(OSError) as e:  # not a tensor file: torch.save's own error, as OSError
        files.save_torch(path, {"f": lambda: 0})
    assert e.value.strerror.startswith(("AttributeError", "PicklingError"))
    assert path.read_bytes() == b"old" and names(tmp_path) == ["slm.pt"]
    with pytest.raises(OSError):  # a folder where the file's folder should be
        files.write_text(path / "x.json", "{}")


def test_new_dir_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with files.NewDir(out) as tmp:
        (tmp / "a").write_text("1")
    assert names(out) == ["a"] and names(tmp_path) == ["out"]
    with pytest.raises(RuntimeError), files.NewDir(out) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("failed half way")
    assert names(out) == ["a"] and names(tmp_path) == ["out"]
    with files.NewDir(out) as tmp:
        (tmp / "b").write_text("2")
    assert names(out) == ["b"] and names(tmp_path) == ["out"]
    with pytest.raises(OSError):
        files.NewDir(tmp_path / "out" / "b" / "c")  # its parent is a file


def test_a_full_disk_is_said_of_the_file_not_its_temporary(tmp_path):
    """torch.save into a file says only "file write failed" on a full disk: save_torch writes
    serialized bytes, so the OSError is ENOSPC, and it names the file being written."""
    with full_disk(tmp_path), pytest.raises(OSError) as e:
        files.save_torch(tmp_path / "last.ckpt", {"w": torch.ones(1000)})
    assert (e.value.errno, e.value.filename) == (28, str(tmp_path / "last.ckpt"))
    assert names(tmp_path) == []  # no partial file, no temporary


def test_dirs_made_by_a_failed_step_are_removed_again(tmp_path):
    out = tmp_path / "data" / "tinystories"
    with pytest.raises(RuntimeError), files.removed_on_error(out, leftovers=[".lock"]):
        out.mkdir(parents=True)
        (out / ".lock").touch()
        raise RuntimeError("offline")
    assert names(tmp_path) == []
    with pytest.raises(RuntimeError), files.removed_on_error(out, leftovers=[".lock"]):
        (out / "train.bin").parent.mkdir(parents=True)
        (out / "train.bin").touch()  # something of the step's own: it stays
        raise RuntimeError("offline")
    assert names(out) == ["train.bin"]
    with pytest.raises(RuntimeError), files.removed_on_error(tmp_path / "data" / "x"):
        (tmp_path / "data" / "x").mkdir()
        raise RuntimeError("offline")
    assert names(tmp_path / "data") == ["tinystories"]  # made before: stays
