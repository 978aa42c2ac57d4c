"""slm.prepare: sources -> train.bin / val.bin / meta.json, exactly, safely, with clear errors."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    EOT,
    LOCK,
    REPO,
    assert_bins,
    assert_one_line,
    expected_bins,
    held_out,
    make_stories,
    parse_stories,
    read_bin,
    snapshot,
    story_tokens,
    write_txt,
)

from slm import files, tokenizer
from slm import prepare as P
from slm.errors import ConfigError
from slm.prepare import DataError, prepare

# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def v1_prepared(v1_txt, tmp_path_factory):
    out = tmp_path_factory.mktemp("v1")
    return out, prepare(str(v1_txt), out, val_fraction=0.01)


def test_real_v1_piece_is_tokenized_exactly(v1_txt, v1_prepared):
    out, meta = v1_prepared
    stories = parse_stories(v1_txt.read_text(encoding="utf-8"))
    assert len(stories) == 2317  # 2,316 whole + the one cut off at the end of the 2 MiB
    tokens = story_tokens(stories)
    assert sum(len(t) for t in tokens) == 502_779

    held = [i for i in range(len(stories)) if (i + 1) % 100 == 0]  # 1% = every 100th story
    assert len(held) == math.floor(2317 * 0.01) == 23
    train = [t for i, ids in enumerate(tokens) if i not in held for t in ids]
    val = [t for i in held for t in tokens[i]]
    assert read_bin(out / "train.bin") == train
    assert read_bin(out / "val.bin") == val

    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["source"] == str(v1_txt.resolve())
    assert meta["tokenizer"] == "gpt2"
    assert meta["vocab_size"] == 50257
    assert meta["eot_token"] == 50256
    assert meta["dtype"] == "uint16"
    assert meta["val_split"] == "held-out"
    assert meta["val_fraction"] == 0.01
    nbytes = [len(s.encode("utf-8")) for s in stories]
    assert meta["splits"] == {
        "train": {
            "tokens": len(train),
            "stories": 2317 - 23,
            "bytes": sum(b for i, b in enumerate(nbytes) if i not in held),
        },
        "val": {"tokens": len(val), "stories": 23, "bytes": sum(nbytes[i] for i in held)},
    }
    assert len(train) + len(val) == 502_779
    assert (out / "train.bin").stat().st_size == 2 * len(train)
    assert sorted(p.name for p in out.iterdir()) == [
        ".prepare.lock",
        "meta.json",
        "train.bin",
        "val.bin",
    ]


def test_real_v2_piece_is_tokenized_exactly(v2_txt, tmp_path):
    stories = parse_stories(v2_txt.read_text(encoding="utf-8"))
    assert len(stories) == 1728
    meta = prepare(str(v2_txt), tmp_path, val_fraction=0.05)
    assert_bins(tmp_path, *expected_bins(stories, 0.05))
    assert meta["splits"]["val"]["stories"] == math.floor(1728 * 0.05)


# ----------------------------------------------------------------------------- a bounded slice


def test_another_slice_of_a_prepared_dir_is_an_error(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out, max_stories=100)
    before = snapshot(out)
    with pytest.raises(DataError) as e:
        prepare(str(small_txt), out, max_stories=200)
    assert_one_line(e)
    assert "max_stories=100), not of" in str(e.value) and "max_stories=200); " in str(e.value)
    with pytest.raises(DataError, match="max_stories=None\\); "):  # all of it, asked for by name
        prepare(str(small_txt), out)
    assert snapshot(out) == before
    # Unset source and slice: what the dir holds, as it is; the truncation fix keeps the slice.
    assert prepare(None, out)["max_stories"] == 100
    with open(out / "val.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(
        DataError, match=r"data.val_fraction=0.01 data.max_stories=100 data.overwrite"
    ):
        prepare(None, out)


# ----------------------------------------------------------------------------- re-runs


def test_rerun_is_a_no_op(small_txt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    meta = prepare(str(small_txt), out)
    before = snapshot(out)
    assert set(before) == {"meta.json", "train.bin", "val.bin"}

    def must_not_load(*args, **kwargs):
        raise AssertionError("a matching data dir was prepared again")

    monkeypatch.setattr(P, "load_source", must_not_load)
    assert prepare(str(small_txt), out) == meta
    assert prepare(str(small_txt.parent / ".." / "src" / small_txt.name), out) == meta  # same path
    assert snapshot(out) == before


def test_mismatched_dir_is_an_error_unless_overwrite(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    other = write_txt(tmp_path / "other.txt", make_stories(200, seed=99))
    before = snapshot(out)

    with pytest.raises(DataError, match=r"holds tokens of .*stories\.txt.*overwrite=true") as e:
        prepare(str(other), out)
    assert_one_line(e)
    with pytest.raises(DataError, match=r"val_fraction=0\.01\).*val_fraction=0\.2") as e:
        prepare(str(small_txt), out, val_fraction=0.2)
    assert_one_line(e)
    assert snapshot(out) == before

    meta = prepare(str(other), out, overwrite=True)
    assert meta["source"] == str(other.resolve())
    assert_bins(out, *expected_bins(make_stories(200, seed=99), 0.01))
    after = snapshot(out)
    assert all(after[name] != before[name] for name in before)  # every file replaced


def test_meta_of_another_tokenizer_is_an_error(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "tokenizer": "llama"}))
    with pytest.raises(DataError, match=r"\(llama, .*not of .*\(gpt2") as e:
        prepare(str(small_txt), out)
    assert_one_line(e)
    prepare(str(small_txt), out, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_bins_without_meta_are_an_error_unless_overwrite(small_txt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(DataError, match=r"holds \.bin files but no meta\.json") as e:
        prepare(str(small_txt), out)
    assert_one_line(e)
    prepare(str(small_txt), out, overwrite=True)
    assert_bins(out, *expected_bins(make_stories(300), 0.01))


def test_missing_bin_is_prepared_again(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    (out / "val.bin").unlink()
    prepare(str(small_txt), out)
    assert_bins(out, *expected_bins(make_stories(300), 0.01))


def suggested_command(message: str) -> list[str]:
    """The overrides of the ``python -m slm.prepare ...`` command an error suggests, split as
    the shell would."""
    m = re.search(r"`python -m slm\.prepare ([^`]*)`", message)
    assert m, f"no prepare command in: {message}"
    return shlex.split(m[1])


def assert_command(e: pytest.ExceptionInfo, source: Path, out: Path) -> None:
    """The error's command prepares ``out`` again from ``source``, whatever the quoting."""
    from slm.config import compose

    d = compose("train", suggested_command(str(e.value))).data
    assert (d.source, d.dir, d.overwrite) == (str(source), str(out), True)


def follow(e: pytest.ExceptionInfo, capsys) -> str:
    """Run the command that the error ``e`` suggests, literally; its output."""
    assert_one_line(e)
    capsys.readouterr()
    P.main(suggested_command(str(e.value)))
    return capsys.readouterr().out


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", "{}", '{"splits": {"train": {}}}'])
def test_invalid_meta_json_error_gives_a_command_that_works(small_txt, tmp_path, capsys, bad):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    (out / "meta.json").write_text(bad)
    with pytest.raises(DataError, match=r"meta\.json is not .*prepare it again") as e:
        prepare(str(small_txt), out)
    assert_command(e, small_txt, out)
    assert "wrote" in follow(e, capsys)  # the bug: overwrite read the bad meta.json first
    assert_bins(out, *expected_bins(make_stories(300), 0.01))


def test_overwrite_does_not_read_an_invalid_meta_json(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    (out / "meta.json").write_text("{not json")
    prepare(str(small_txt), out, overwrite=True)
    assert_bins(out, *expected_bins(make_stories(300), 0.01))


def test_invalid_meta_json_without_a_source_asks_for_it(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    (out / "meta.json").write_text("{not json")
    for overwrite in (False, True):  # the source is unknown either way
        with pytest.raises(DataError, match=r"data\.source=SOURCE .*SOURCE being the text") as e:
            prepare(None, out, overwrite=overwrite)
        assert_one_line(e)
    assert (out / "meta.json").read_text() == "{not json"  # nothing touched


@pytest.mark.parametrize("name", ["out", "my data", "Zoë's café"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_bin_error_gives_a_command_that_works(small_txt, tmp_path, capsys, name, split):
    """A bin cut short (a full disk, a partial copy) is never taken as prepared, with or
    without data.source; the error's command (quoted for Hydra and the shell, whatever the
    path) prepares it again from the recorded source."""
    out = tmp_path / name
    prepare(str(small_txt), out)
    good = (out / f"{split}.bin").read_bytes()
    (out / f"{split}.bin").write_bytes(good[:-6])
    for source in (str(small_txt), None):
        with pytest.raises(DataError, match=rf"{split}\.bin has [\d,]+ bytes but meta\.json") as e:
            prepare(source, out)
        assert_one_line(e)
    assert_command(e, small_txt, out)
    assert "wrote" in follow(e, capsys)
    assert (out / f"{split}.bin").read_bytes() == good


def test_truncated_bin_with_overwrite_is_prepared_again(small_txt, tmp_path):
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    prepare(None, out, overwrite=True)  # the recorded source
    assert_bins(out, *expected_bins(make_stories(300), 0.01))


def test_data_dir_alone_is_its_recorded_source(small_txt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    meta = prepare(str(small_txt), out, val_fraction=0.05)
    before = snapshot(out)
    monkeypatch.setattr(P, "load_source", lambda *a, **k: pytest.fail("prepared again"))
    assert P.resolve_source(None, out) == str(small_txt.resolve())
    assert prepare(None, out) == meta  # as it was prepared: val_fraction is not compared
    assert P.main([f"data.dir={out}"]) == meta
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"{out} already holds these tokens of {small_txt.resolve()}; nothing written"
    assert snapshot(out) == before
    assert P.resolve_source(None, tmp_path / "empty") == "roneneldan/TinyStories"


def _prepare_when_released(source: str, out: str, barrier, results) -> None:
    """A second process's prepare: it starts when the other one does, and reports whether
    it wrote the bins."""
    real, wrote = files.write_json, []  # meta.json, written last (this process is its own)
    files.write_json = lambda path, obj: wrote.append(True) or real(path, obj)
    barrier.wait()
    try:
        prepare(source, out)
        results.put(("ok", bool(wrote)))
    except BaseException as e:
        results.put((f"{type(e).__name__}: {e}", bool(wrote)))


def test_two_concurrent_prepares_into_one_dir(tmp_path):
    """Two nodes on a shared filesystem (or evaluate beside train) prepare one dir at once:
    one writes, the other waits for it and finds the dir prepared."""
    stories = make_stories(1500, seed=12)
    src = write_txt(tmp_path / "s.txt", stories)
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(src), str(out), barrier, results)
    procs = [ctx.Process(target=_prepare_when_released, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    reports = sorted(results.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert reports == [("ok", False), ("ok", True)]
    assert_bins(out, *expected_bins(stories, 0.01))
    assert leftovers(out) == ["meta.json", "train.bin", "val.bin"]  # no temporary files


def test_stale_temporary_files_are_removed(small_txt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train.bin.tmp", "train.bin.0123abcd.tmp", "meta.json.feed.tmp"):
        (out / name).write_bytes(b"left by a killed prepare")
    (out / "notes.tmp").write_text("not ours")
    prepare(str(small_txt), out)
    assert leftovers(out) == ["meta.json", "notes.tmp", "train.bin", "val.bin"]


# ----------------------------------------------------------------------------- interruptions


def leftovers(out: Path) -> list[str]:
    """The files a prepare left in ``out``, but for the lock file, which stays (none where
    ``out`` is gone: a failed prepare removes the dir it made)."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK)


@pytest.fixture
def small_batches(monkeypatch):
    """load_source in batches of 8 stories, so that a source is many batches."""
    real = P.load_source
    monkeypatch.setattr(P, "load_source", lambda source, batch=0, **kw: real(source, 8, **kw))


def test_encoder_failure_mid_stream_leaves_nothing(small_txt, tmp_path, monkeypatch, small_batches):
    calls = []
    real = tokenizer.encode_stories

    def flaky(stories):
        calls.append(len(stories))
        if len(calls) == 2:
            raise RuntimeError("encoder died")
        return real(stories)

    monkeypatch.setattr(tokenizer, "encode_stories", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="encoder died"):
        prepare(str(small_txt), out)
    assert leftovers(out) == []


def test_interrupt_from_the_source_leaves_nothing(tmp_path, monkeypatch):
    def stories():
        yield make_stories(50)
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "load_source", lambda *a, **k: {"train": [stories()], "val": []})
    out = tmp_path / "out"
    src = write_txt(tmp_path / "s.txt", ["x"])
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), out)
    assert leftovers(out) == []


def test_failed_overwrite_leaves_no_trusted_bins(small_txt, tmp_path, monkeypatch, small_batches):
    from slm.data import TokenDataModule, load_tokens

    out = tmp_path / "out"
    prepare(str(small_txt), out)
    assert len(load_tokens(out, "train")) > 0

    real = tokenizer.encode_stories
    calls = []

    def flaky(stories):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(stories)

    monkeypatch.setattr(tokenizer, "encode_stories", flaky)
    other = write_txt(tmp_path / "other.txt", make_stories(100, seed=3))
    with pytest.raises(OSError, match="No space left"):
        prepare(str(other), out, overwrite=True)
    monkeypatch.setattr(tokenizer, "encode_stories", real)

    # The old bins may remain, but nothing vouches for them any more.
    assert "meta.json" not in leftovers(out)
    assert not [n for n in leftovers(out) if n.endswith(".tmp")]
    with pytest.raises(DataError, match=r"meta\.json is missing") as e:
        load_tokens(out, "train")
    assert_one_line(e)
    with pytest.raises(DataError, match=r"no meta\.json"):
        prepare(str(small_txt), out)
    dm = TokenDataModule(dir=str(out), block_size=8, source=str(small_txt), num_workers=0)
    with pytest.raises(DataError, match=r"meta\.json is missing"):
        dm.setup()

    prepare(str(other), out, overwrite=True)
    assert_bins(out, *expected_bins(make_stories(100, seed=3), 0.01))


def test_offline_the_hub_error_names_data_source_and_leaves_no_dir(monkeypatch, tmp_path):
    """The quick start offline: the error named no key ("give a local path"), and the data dir
    it had made (with its parents) stayed behind, holding only the lock. A data dir that was
    there before stays."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'roneneldan/TinyStories' on the Hub (Offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    out = tmp_path / "data" / "tinystories-20k-bpe4k"
    with pytest.raises(DataError) as e:
        prepare(data_dir=out, max_stories=20000)
    assert_one_line(e)
    assert str(e.value).startswith(
        "data.source roneneldan/TinyStories: could not load it from the Hugging Face hub "
    )
    assert str(e.value).endswith(
        "or prepare from local files with data.source=PATH (README: Offline)"
    )
    assert list(tmp_path.iterdir()) == []
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match="data.source=PATH"):
        prepare(data_dir=mine / "notes")
    assert (mine / "notes").is_dir()


def test_bad_structured_source_does_not_touch_existing_data(small_txt, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    prepare(str(small_txt), out)
    before = snapshot(out)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"story": ["a", "b"]}), bad)
    with pytest.raises(DataError, match=r"has no 'text' column"):
        prepare(str(bad), out, overwrite=True)
    assert snapshot(out) == before  # meta.json and bins still there, untouched


# ----------------------------------------------------------------------------- bad input


def check_error(source, out, pattern, **kwargs) -> None:
    with pytest.raises(DataError, match=pattern) as e:
        prepare(str(source), out, **kwargs)
    assert_one_line(e)
    assert not out.exists() or not [n for n in leftovers(out) if n != "meta.json"]


@pytest.mark.parametrize(
    "source", ["/nonexistent/stories.txt", "missing.txt", "./data/nope", "~/no/such/dir"]
)
def test_missing_source_path(source, tmp_path):
    check_error(source, tmp_path / "out", r"no such file or directory; check the path")


@pytest.mark.parametrize(
    "text", ["", "\n\n", f"{EOT}\n{EOT}\n", f"   \n{EOT}\n\t\n{EOT}\n  "], ids=repr
)
def test_source_without_text(text, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(text, encoding="utf-8")
    check_error(path, tmp_path / "out", r"holds no text")


def test_source_with_too_few_stories_for_a_held_out_split(tmp_path):
    path = write_txt(tmp_path / "few.txt", make_stories(5))
    check_error(path, tmp_path / "out", r"no validation stories.*raise data\.val_fraction")


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_val_fraction_out_of_range(fraction, small_txt, tmp_path):
    check_error(small_txt, tmp_path / "out", r"must be in \(0, 1\)", val_fraction=fraction)


def test_parquet_without_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"story": ["a"], "id": [1]}), path)
    check_error(path, tmp_path / "out", r"s\.parquet has no 'text' column \(columns: story, id\)")


def test_jsonl_without_text_column(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"content": "a"}\n{"content": "b"}\n')
    check_error(path, tmp_path / "out", r"s\.jsonl has no 'text' column \(columns: content\)")


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    check_error(path, tmp_path / "out", r"s\.jsonl could not be read as json \(")


def test_not_utf8_text(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(f"Caf\xe9 story\n{EOT}\n".encode("latin-1"))
    check_error(path, tmp_path / "out", r"latin1\.txt is not UTF-8 text")


def test_unsupported_file_and_empty_dirs(tmp_path):
    csv = tmp_path / "s.csv"
    csv.write_text("text\na\n")
    check_error(csv, tmp_path / "out", r"is a \.csv file; give a .*\.txt file or a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    check_error(empty, tmp_path / "out", r"holds no .* files")
    only_val = tmp_path / "only_val"
    write_txt(only_val / "TinyStories-valid.txt", ["a"])
    check_error(only_val, tmp_path / "out", r"holds only validation files")


def test_data_dir_under_a_file_is_not_writable(small_txt, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    check_error(small_txt, afile / "sub", r"data\.dir .* is not writable \(Not a directory\)")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_data_dir_without_write_permission(small_txt, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        check_error(small_txt, ro / "sub", r"is not writable \(Permission denied\)")
        check_error(small_txt, ro, r"is not writable \(Permission denied\)")
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- command line


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slm.prepare", *overrides],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_prepares_and_prints_counts(small_txt, tmp_path):
    out = tmp_path / "out"
    r = run_cli(f"data.source={small_txt}", f"data.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stories = make_stories(300)
    train, val = expected_bins(stories, 0.01)
    assert_bins(out, train, val)
    nbytes = [len(s.encode()) for s in stories]
    val_bytes = sum(b for b, h in zip(nbytes, held_out(300, 0.01)) if h)
    assert r.stdout.splitlines() == [
        f"train: 297 stories, {len(train):,} tokens, {sum(nbytes) - val_bytes:,} bytes",
        f"val: 3 stories, {len(val):,} tokens, {val_bytes:,} bytes",
        f"wrote {out}/{{train.bin,val.bin,meta.json}}",
    ]


@pytest.mark.slow
def test_cli_missing_source_is_a_one_line_error(tmp_path):
    r = run_cli("data.source=/no/such/stories.txt", f"data.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: data.source /no/such/stories.txt: no such file or directory; check the path"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_suggested_command_works_pasted_into_a_shell(small_txt, tmp_path):
    out = tmp_path / 'Zoë\'s "best" café'
    prepare(str(small_txt), out)
    (out / "val.bin").write_bytes(b"")
    with pytest.raises(DataError) as e:
        prepare(None, out)
    command = re.search(r"`(python -m slm\.prepare [^`]*)`", str(e.value))[1]
    shell = subprocess.run(
        ["bash", "-c", f"{shlex.quote(sys.executable)}{command.removeprefix('python')}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shell.returncode == 0, shell.stderr
    assert_bins(out, *expected_bins(make_stories(300), 0.01))


@pytest.mark.slow
def test_cli_unquoted_non_ascii_path_is_a_one_line_error_with_the_fix(tmp_path):
    src = write_txt(tmp_path / "Zoë's stories.txt", make_stories(300))
    r = run_cli(f"data.source={src}", f"data.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()  # not Hydra's 31-line traceback
    quoted = f"""'data.source="{tmp_path}/Zoë'\\''s stories.txt"'"""
    assert line == (
        f"error: Hydra cannot parse the override data.source={src}: a value with non-ASCII "
        "text, quotes, brackets, commas or '=' needs Hydra's quotes inside the shell's; write "
        f"it as {quoted} (see Quoting in the README)"
    )
    P.main([*shlex.split(quoted), f"data.dir={tmp_path / 'out'}"])
    assert_bins(tmp_path / "out", *expected_bins(make_stories(300), 0.01))


@pytest.mark.slow
def test_cli_without_the_bpe_files_offline_is_a_one_line_error(small_txt, tmp_path):
    """tiktoken downloads the BPE files on first use: offline with an empty cache, the error
    says how to get them (the proxy makes the download fail at once, never hang)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    proxy = "http://127.0.0.1:9"  # the discard port: connection refused
    env.update(TIKTOKEN_CACHE_DIR=str(empty), HTTPS_PROXY=proxy, HTTP_PROXY=proxy,
               https_proxy=proxy, http_proxy=proxy, PYTHONPATH=str(REPO))  # fmt: skip
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "slm.prepare", f"data.source={small_txt}", f"data.dir={out}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("error: tiktoken could not load the gpt2 BPE files (")
    assert f"TIKTOKEN_CACHE_DIR is {empty})" in line
    assert "run `python -m slm.tokenizer seed --from FOLDER` (see Offline in the README)" in line
    assert "shared" not in line  # nothing a user has not got
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- tokenizer=bpe


def bpe_config(vocab_size: int = 512, train_bytes: int = 10**8) -> dict:
    return {"name": "bpe", "vocab_size": vocab_size, "train_bytes": train_bytes}


def test_bpe_prepare_writes_its_tokenizer_and_bins(small_txt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    meta = P.main([f"data.source={small_txt}", f"data.dir={out}", "tokenizer=bpe",
                   "tokenizer.vocab_size=512"])  # fmt: skip
    assert snapshot(out).keys() == {"meta.json", "train.bin", "val.bin", "tokenizer.json"}
    tok = tokenizer.BPETokenizer.from_file(out / "tokenizer.json")
    raw = (out / "tokenizer.json").read_bytes()
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("bpe", 512, tok.eot_id)
    assert meta["tokenizer_sha256"] == hashlib.sha256(raw).hexdigest() == tok.sha256
    stories = make_stories(300)
    mask = held_out(300, 0.01)
    train = tok.encode_stories([s for s, v in zip(stories, mask) if not v])
    val = tok.encode_stories([s for s, v in zip(stories, mask) if v])
    assert_bins(out, train.tolist(), val.tolist())  # an EOT at every story's end
    train_bytes = sum(len(s.encode()) for s, v in zip(stories, mask) if not v)
    assert meta["tokenizer_training"] == {"vocab_size": 512, "train_bytes": 10**8,
                                          "stories": 297, "bytes": train_bytes}  # fmt: skip

    before = snapshot(out)  # the same settings again: nothing trained, nothing written
    monkeypatch.setattr(P, "load_source", lambda *a, **k: pytest.fail("prepared again"))
    assert prepare(str(small_txt), out, tokenizer=bpe_config()) == meta
    assert prepare(None, out, tokenizer=tok) == meta  # the same tokenizer, given as it is
    assert snapshot(out) == before

    bad = np.fromfile(out / "val.bin", dtype=np.uint16)
    bad[3] = 600  # a gpt2 id, but none of this 512-token BPE
    bad.tofile(out / "val.bin")
    from slm.data import load_tokens

    with pytest.raises(
        DataError, match=r"val\.bin holds token id 600, beyond the bpe vocab of 512"
    ):
        load_tokens(out, "val")


def test_bpe_learns_from_the_train_split_only_up_to_train_bytes(tmp_path):
    """A word only in the held-out val stories, or only after the first train_bytes of the
    train split, is never learned (were it, 200 repeats would make it one token)."""
    stories = make_stories(300)
    secret = " Zyxwvutsrq" * 200
    stories[99] += secret  # 100th story: held out with val_fraction=0.01
    stories[250] += secret.replace("Z", "Q")  # after the cap below
    src = write_txt(tmp_path / "s.txt", stories)
    cap = sum(len(s.encode()) for i, s in enumerate(stories[:200]) if i != 99)  # 0..199
    meta = prepare(str(src), tmp_path / "a", tokenizer=bpe_config(train_bytes=cap))
    tok = tokenizer.BPETokenizer.from_file(tmp_path / "a" / "tokenizer.json")
    assert meta["tokenizer_training"]["stories"] == 199  # 200 less the held-out one
    assert len(tok.encode(" Zyxwvutsrq")) > 3 and len(tok.encode(" Qyxwvutsrq")) > 3

    # The control: the same word in the train split, within the cap, becomes one token.
    prepare(str(src), tmp_path / "b", val_fraction=0.015, tokenizer=bpe_config())  # 99 in train
    tok = tokenizer.BPETokenizer.from_file(tmp_path / "b" / "tokenizer.json")
    assert len(tok.encode(" Zyxwvutsrq")) == 1 == len(tok.encode(" Qyxwvutsrq"))

    with pytest.raises(DataError, match=r"tokenizer\.train_bytes=10 is less than the first"):
        prepare(str(src), tmp_path / "c", tokenizer=bpe_config(train_bytes=10))
    assert leftovers(tmp_path / "c") == []


def test_data_dir_of_another_tokenizer_is_an_error_with_the_fix(small_txt, tmp_path, capsys):
    out = tmp_path / "out"
    prepare(str(small_txt), out)  # gpt2
    before = snapshot(out)
    with pytest.raises(DataError) as e:
        prepare(str(small_txt), out, tokenizer=bpe_config())
    assert_one_line(e)
    assert "(gpt2, val_fraction=0.01), not of" in str(e.value)
    assert "(bpe vocab_size=512 train_bytes=100000000, val_fraction=0.01)" in str(e.value)
    assert "pass tokenizer=gpt2 to use them, or prepare it again with `" in str(e.value)
    assert snapshot(out) == before
    assert "wrote" in follow(e, capsys)  # the command prepares it with the BPE asked for
    meta = prepare(str(small_txt), out, tokenizer=bpe_config())
    assert (meta["tokenizer"], meta["vocab_size"]) == ("bpe", 512)

    for other in (None, bpe_config(1024)):  # back to gpt2, or another BPE: the same error
        with pytest.raises(DataError, match=r"pass tokenizer=bpe tokenizer\.vocab_size=512 "):
            prepare(str(small_txt), out, tokenizer=other)
        assert_one_line(e)

    (out / "tokenizer.json").write_text("{}")  # not the one meta.json records
    with pytest.raises(DataError, match=r"tokenizer\.json is not the one meta\.json records") as e:
        prepare(None, out, tokenizer=bpe_config())
    assert "wrote" in follow(e, capsys)
    assert prepare(None, out, tokenizer=bpe_config()) == meta  # the same file again


def test_oversized_bpe_vocab_is_a_one_line_error(small_txt, tmp_path):
    out = tmp_path / "out"
    args = [f"data.source={small_txt}", f"data.dir={out}", "tokenizer=bpe"]
    fits = r"^tokenizer\.vocab_size=65,537 does not fit the uint16 bins \(ids up to 65,535\)"
    with pytest.raises(ConfigError, match=fits + "; choose at most 65,536$") as e:
        P.main([*args, "tokenizer.vocab_size=65537"])
    assert_one_line(e)
    assert not out.exists()
