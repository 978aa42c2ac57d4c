"""slm.sources: each story source (text files, jsonl, json, parquet, directories, the hub,
a bounded slice of them) read into exactly the stories it holds, as prepare writes them."""

from __future__ import annotations

import json

import pytest
from conftest import (
    EOT,
    assert_bins,
    assert_one_line,
    expected_bins,
    make_stories,
    parse_stories,
    snapshot,
    write_txt,
)

from slm import sources as S
from slm.errors import DataError
from slm.prepare import prepare

# ----------------------------------------------------------------------------- text format


def test_txt_separator_variants(tmp_path):
    text = (
        f"{EOT}\n"  # a separator on the first line: no empty story
        "First story.\nSecond paragraph.\n"
        f"  {EOT}  \n"  # spaces around the marker
        "Second story mentions <|endoftext|> inline, which stays text.\n"
        f"{EOT}\r\n"  # a CRLF line
        f"\t{EOT}\n"  # consecutive separators: no empty story
        "\n\n   Third story, padded with blank lines.   \n\n"
        f"{EOT}\n"
        "A <|endoftext|> line that is not only the marker.\n"
        f"{EOT}<|endoftext|>\n"  # two markers on a line: not a separator
        "Last story.\n"
        f"{EOT}"  # a last separator with no newline after it
    )
    path = tmp_path / "odd.txt"
    path.write_bytes(text.encode("utf-8"))
    stories = parse_stories(text.replace("\r\n", "\n"))
    assert stories == [
        "First story.\nSecond paragraph.",
        "Second story mentions <|endoftext|> inline, which stays text.",
        "Third story, padded with blank lines.",
        f"A <|endoftext|> line that is not only the marker.\n{EOT}<|endoftext|>\nLast story.",
    ]
    assert [s for b in S.txt_stories(path, batch=2) for s in b] == stories
    meta = prepare(str(path), tmp_path / "out", val_fraction=0.5)
    assert_bins(tmp_path / "out", *expected_bins(stories, 0.5))
    assert meta["splits"]["val"]["stories"] == 2


def test_txt_without_final_separator_keeps_the_last_story(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_text(f"One.\n{EOT}\nTwo.\n{EOT}\nThree, cut off mid", encoding="utf-8")
    assert [s for b in S.txt_stories(path, batch=10) for s in b] == [
        "One.",
        "Two.",
        "Three, cut off mid",
    ]


def test_txt_read_in_blocks_matches_a_whole_file_parse(tmp_path):
    """Over 2 MiB, so stories and separators straddle the read blocks; mixed separator
    styles, so both the fast split and the regex split are used."""
    stories = make_stories(8000, seed=1, words=(40, 90))
    seps = [f"{EOT}\n", f" {EOT}\n", f"{EOT}\t\n", f"{EOT}\n{EOT}\n"]
    parts = []
    for i, s in enumerate(stories):
        # the mixed styles only in the second half: the first blocks take the fast path
        parts.append(f"{s}\n{seps[i % 4] if i > 4000 else seps[0]}")
    path = tmp_path / "big.txt"
    path.write_text("".join(parts), encoding="utf-8")
    assert path.stat().st_size > 2 * (1 << 20)
    batches = list(S.txt_stories(path, batch=333))
    assert [len(b) for b in batches[:-1]] == [333] * (len(batches) - 1)
    assert [s for b in batches for s in b] == stories


@pytest.mark.parametrize("text", ["", "\n\n", f"{EOT}\n{EOT}\n", f"  \n{EOT}\n \t \n{EOT}\n"])
def test_split_stories_fast_path_agrees_with_regex(text):
    a = [p.strip() for p in S.split_stories(text + "\n")]
    b = [p.strip() for p in S.SEPARATOR.split(text + "\n")]
    assert [s for s in a if s] == [s for s in b if s] == []


# ----------------------------------------------------------------------------- other sources


def test_jsonl_source(tmp_path):
    rows = [{"text": s, "id": i} for i, s in enumerate(make_stories(120))]
    rows += [{"text": "", "id": -1}, {"text": None, "id": -2}, {"text": "  padded  ", "id": -3}]
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stories = make_stories(120) + ["padded"]
    meta = prepare(str(path), tmp_path / "out", val_fraction=0.05)
    assert_bins(tmp_path / "out", *expected_bins(stories, 0.05))
    assert meta["splits"]["train"]["stories"] + meta["splits"]["val"]["stories"] == 121


def test_json_source(tmp_path):
    stories = make_stories(80, seed=2)
    path = tmp_path / "stories.json"
    path.write_text(json.dumps([{"text": s} for s in stories]), encoding="utf-8")
    prepare(str(path), tmp_path / "out", val_fraction=0.1)
    assert_bins(tmp_path / "out", *expected_bins(stories, 0.1))


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    stories = make_stories(150, seed=3)
    path = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"id": list(range(150)), "text": stories}), path)
    meta = prepare(str(path), tmp_path / "out", val_fraction=0.02)
    assert_bins(tmp_path / "out", *expected_bins(stories, 0.02))
    assert meta["source"] == str(path.resolve())


def test_directory_with_train_and_valid_files(tmp_path):
    train, valid = make_stories(60, seed=4), make_stories(7, seed=5)
    src = tmp_path / "TinyStories"
    write_txt(src / "TinyStories-train.txt", train)
    write_txt(src / "TinyStories-valid.txt", valid)
    (src / "README.md").write_text("not a source file")
    meta = prepare(str(src), tmp_path / "out", val_fraction=0.5)
    assert_bins(tmp_path / "out", *expected_bins(train, None, val=valid))
    assert meta["val_split"] == "validation"
    assert meta["val_fraction"] is None
    assert meta["splits"]["train"]["stories"] == 60
    assert meta["splits"]["val"]["stories"] == 7
    # the recorded val_fraction is null, so another val_fraction is still the same data
    before = snapshot(tmp_path / "out")
    assert prepare(str(src), tmp_path / "out", val_fraction=0.3) == meta
    assert snapshot(tmp_path / "out") == before


def test_directory_of_mixed_files_in_sorted_order(tmp_path):
    a, b, c, v = (make_stories(n, seed=s) for n, s in ((20, 6), (15, 7), (10, 8), (5, 9)))
    src = tmp_path / "src"
    write_txt(src / "a-part.txt", a)
    (src / "b").mkdir()
    (src / "b" / "part.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in b))
    write_txt(src / "interval.txt", c)  # "val" inside a word: a training file
    (src / "validation.json").write_text(json.dumps([{"text": s} for s in v]))
    prepare(str(src), tmp_path / "out")
    assert_bins(tmp_path / "out", *expected_bins(a + b + c, None, val=v))


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by an in-memory DatasetDict; records its calls."""
    import datasets

    calls = []
    splits = {
        "train": make_stories(90, seed=10) + ["", "  "],  # empty rows are skipped
        "validation": make_stories(6, seed=11),
    }

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.DatasetDict(
            {k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, splits


def test_hub_source_uses_its_train_and_validation_splits(fake_hub, tmp_path):
    calls, splits = fake_hub
    meta = prepare(data_dir=tmp_path / "out")  # the default source
    assert calls == [(("roneneldan/TinyStories",), {})]
    train, val = splits["train"][:90], splits["validation"]
    assert_bins(tmp_path / "out", *expected_bins(train, None, val=val))
    assert meta["source"] == "roneneldan/TinyStories"
    assert meta["val_split"] == "validation"
    assert meta["val_fraction"] is None


def test_hub_source_without_validation_split_holds_out(fake_hub, tmp_path):
    _, splits = fake_hub
    del splits["validation"]
    meta = prepare("someone/stories", tmp_path / "out", val_fraction=0.1)
    assert_bins(tmp_path / "out", *expected_bins(splits["train"][:90], 0.1))
    assert meta["val_split"] == "held-out"


# ----------------------------------------------------------------------------- a bounded slice


def test_max_stories_from_the_hub_streams_only_the_slice(monkeypatch, tmp_path):
    """data.max_stories=N from the hub: the splits are streamed (nothing else downloaded), and
    N stories of each read; the slice is recorded and a rerun is a no-op."""
    import datasets

    splits = {"train": make_stories(500, seed=20), "validation": make_stories(30, seed=21)}
    calls, read = [], {"train": 0, "validation": 0}

    def rows(name):
        for text in splits[name]:
            read[name] += 1  # what a streamed download has fetched so far
            yield {"text": text}

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.IterableDatasetDict(
            {k: datasets.IterableDataset.from_generator(rows, gen_kwargs={"name": k})
             for k in splits}
        )  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    meta = prepare(data_dir=tmp_path / "out", max_stories=100)
    assert calls == [(("roneneldan/TinyStories",), {"streaming": True})]
    assert_bins(tmp_path / "out", *expected_bins(splits["train"][:100], None, splits["validation"]))
    assert read["train"] <= 101  # the stream stops at the slice (give or take one row)
    assert meta["max_stories"] == 100 and meta["splits"]["val"]["stories"] == 30
    assert prepare(data_dir=tmp_path / "out", max_stories=100) == meta and len(calls) == 1


def test_max_stories_of_local_files_across_files_and_held_out(tmp_path):
    """The first N stories of each split, over the split's files in order; a held-out val
    split comes from those N."""
    src = tmp_path / "src"
    a, b, v = make_stories(40, seed=1), make_stories(40, seed=2), make_stories(30, seed=3)
    write_txt(src / "a.txt", a)
    (src / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in b))
    write_txt(src / "stories-valid.txt", v)
    prepare(str(src), tmp_path / "out", max_stories=50)
    assert_bins(tmp_path / "out", *expected_bins((a + b)[:50], None, val=v[:50]))
    prepare(str(src / "a.txt"), tmp_path / "held", val_fraction=0.1, max_stories=30)
    assert_bins(tmp_path / "held", *expected_bins(a[:30], 0.1))


def test_hub_errors_are_data_errors(monkeypatch, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/stories' on the Hub\n(more lines)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load it from the Hugging Face hub") as e:
        prepare("someone/stories", tmp_path / "out")
    assert "ConnectionError: Couldn't reach" in str(e.value)
    assert_one_line(e)

    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}),
    )
    with pytest.raises(DataError, match=r"has no 'train' split") as e:
        prepare("someone/stories", tmp_path / "out")
    assert_one_line(e)

    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.DatasetDict(
            {"train": datasets.Dataset.from_dict({"story": ["x"]})}
        ),
    )
    with pytest.raises(DataError, match=r"has no 'text' column \(columns: story\)") as e:
        prepare("someone/stories", tmp_path / "out")
    assert_one_line(e)
    assert not (tmp_path / "out" / "train.bin").exists()
