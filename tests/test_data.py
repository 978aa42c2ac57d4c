"""slm.data: validated token files, exact random train windows, fixed val windows."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_stories, write_txt

from slm.data import FixedWindows, RandomWindows, TokenDataModule, load_tokens
from slm.prepare import DataError, prepare
from slm.prepare import main as prepare_main

T, B = 16, 4  # tiny windows and batches: the tests are about indices, not scale


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_txt(tmp_path_factory.mktemp("src") / "stories.txt", make_stories(400, seed=21))


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(str(source), out, val_fraction=0.05)
    return out


@pytest.fixture
def data_copy(prepared, tmp_path) -> Path:
    """A copy of the prepared dir that a test may damage."""
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def tokens_of(data_dir: Path, split: str) -> np.ndarray:
    return np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16).astype(np.int64)


def module(data_dir, source, **kwargs) -> TokenDataModule:
    kwargs = {"block_size": T, "batch_size": B, "num_workers": 0, "seed": 7, **kwargs}
    dm = TokenDataModule(dir=str(data_dir), source=str(source), val_fraction=0.05, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    batches = [(x.clone(), y.clone()) for x, y in itertools.islice(it, n)]
    del it  # stops the loader's worker processes
    return batches


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


# ----------------------------------------------------------------------------- train windows


def test_train_batches_are_exact_shifted_slices(prepared, source):
    dm = module(prepared, source)
    tokens = tokens_of(prepared, "train")
    n = len(tokens)
    assert dm.n_tokens["train"] == n > 1000
    batches = take(dm.train_dataloader(), 5)
    for b, (x, y) in enumerate(batches):
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (B, T)
        starts = np.random.default_rng((7, b)).integers(0, n - T, size=B)  # (seed, step)
        assert starts.tolist() == dm.train_dataloader().dataset.starts(b, n).tolist()
        assert ((0 <= starts) & (starts + T + 1 <= n)).all()
        for row, i in enumerate(starts):
            assert x[row].tolist() == tokens[i : i + T].tolist()
            assert y[row].tolist() == tokens[i + 1 : i + T + 1].tolist()


def test_windows_reach_the_last_token():
    """Starts cover 0..n-T-1: the final window's target ends on the last token."""
    ds = RandomWindows("unused.bin", block_size=3, batch_size=4000, seed=0)
    starts = ds.starts(0, n_tokens=10)
    assert set(starts.tolist()) == set(range(10 - 3))


def test_train_stream_is_reproducible_and_seeded(prepared, source):
    first = take(module(prepared, source).train_dataloader(), 4)
    assert same(first, take(module(prepared, source).train_dataloader(), 4))
    other = take(module(prepared, source, seed=8).train_dataloader(), 4)
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # successive batches differ too
    assert not any(torch.equal(first[i][0], first[i + 1][0]) for i in range(3))


def fake_trainer(rank=0, step=0, accumulate=1, world_size=1):
    """What the DataModule reads of a Trainer: its rank, world size, accumulation and the
    optimizer steps trained so far."""
    return SimpleNamespace(
        global_rank=rank, world_size=world_size, accumulate_grad_batches=accumulate,
        global_step=step,
    )  # fmt: skip


def test_ranks_and_micro_batches_deal_out_one_global_batch(prepared, source):
    """Step s draws its global batch from (seed, s); rank r's micro-batch m is its slice
    r * accumulate + m: 2 ranks x 2 micro-batches of 4 are the 16 windows of 1 x 16."""
    whole = module(prepared, source, batch_size=4 * B)
    n = whole.n_tokens["train"]
    reference = take(whole.train_dataloader(), 2)  # steps 0 and 1, 16 windows each
    for s in range(2):
        starts = np.random.default_rng((7, s)).integers(0, n - T, size=4 * B)
        assert reference[s][0][:, 0].tolist() == tokens_of(prepared, "train")[starts].tolist()
    dealt = {}
    for rank in (0, 1):
        dm = module(prepared, source)
        dm.trainer = fake_trainer(rank=rank, accumulate=2, world_size=2)
        loader = dm.train_dataloader()
        assert (loader.dataset.rank, loader.dataset.world_size) == (rank, 2)
        dealt[rank] = take(loader, 4)  # micro-batches 0, 1 (step 0) and 2, 3 (step 1)
    for s in range(2):
        x = torch.cat([dealt[r][2 * s + m][0] for r in (0, 1) for m in (0, 1)])
        assert torch.equal(x, reference[s][0])
    # the ranks draw different windows
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(dealt[0], dealt[1]))


def test_workers_split_the_stream_without_duplicates(prepared, source):
    """num_workers=2 yields exactly the batches of num_workers=0, in the same order."""
    serial = take(module(prepared, source, num_workers=0).train_dataloader(), 7)
    parallel = take(module(prepared, source, num_workers=2).train_dataloader(), 7)
    assert same(serial, parallel)
    firsts = {tuple(x[:, 0].tolist()) for x, _ in parallel}
    assert len(firsts) == 7  # no batch served twice


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream(prepared, source, workers):
    """After 3 optimizer steps of 2 accumulated micro-batches, the stream resumes at batch 6."""
    dm = module(prepared, source)
    dm.trainer = fake_trainer(accumulate=2)
    full = take(dm.train_dataloader(), 9)
    dm = module(prepared, source, num_workers=workers)
    dm.trainer = fake_trainer(step=3, accumulate=2)
    loader = dm.train_dataloader()
    assert loader.dataset.start == 6
    assert same(take(loader, 3), full[6:])


# ----------------------------------------------------------------------------- val windows


def test_val_windows_are_fixed_and_evenly_spaced(prepared, source):
    dm = module(prepared, source, val_windows=10)
    tokens = tokens_of(prepared, "val")
    n = len(tokens)
    assert dm.n_tokens["val"] == n > 10 * T
    first, second = take(dm.val_dataloader(), 99), take(dm.val_dataloader(), 99)
    assert same(first, second)
    assert [len(x) for x, _ in first] == [4, 4, 2]  # 10 windows in batches of 4

    starts = dm.val_dataloader().dataset.starts
    assert len(starts) == 10
    assert starts[0] == 0 and starts[-1] == n - T - 1  # from the start to the very end
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced, up to rounding
    assert starts.tolist() == np.linspace(0, n - T - 1, 10).round().astype(int).tolist()
    x = torch.cat([x for x, _ in first])
    y = torch.cat([y for _, y in first])
    assert x.dtype == torch.int64 and x.shape == (10, T)
    for row, i in enumerate(starts):
        assert x[row].tolist() == tokens[i : i + T].tolist()
        assert y[row].tolist() == tokens[i + 1 : i + T + 1].tolist()


def test_val_windows_all_cover_the_split_without_overlap(prepared, source):
    dm = module(prepared, source, val_windows="all")
    tokens = tokens_of(prepared, "val")
    n = len(tokens)
    ds = dm.val_dataloader().dataset
    assert len(ds) == (n - 1) // T
    assert ds.starts.tolist() == list(range(0, len(ds) * T, T))
    batches = take(dm.val_dataloader(), 10**6)
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert x.tolist() == tokens[: len(ds) * T].tolist()
    assert y.tolist() == tokens[1 : len(ds) * T + 1].tolist()


def test_fixed_windows_edge_cases(tmp_path):
    assert FixedWindows("x.bin", n_tokens=17, block_size=16, n="all").starts.tolist() == [0]
    assert FixedWindows("x.bin", n_tokens=17, block_size=16, n=5).starts.tolist() == [0]
    assert FixedWindows("x.bin", n_tokens=100, block_size=10, n=1).starts.tolist() == [0]
    assert FixedWindows("x.bin", n_tokens=33, block_size=16, n="all").starts.tolist() == [0, 16]


# ----------------------------------------------------------------------------- preparing


def test_prepare_data_prepares_missing_bins(source, tmp_path):
    out = tmp_path / "fresh"
    dm = TokenDataModule(dir=str(out), block_size=T, source=str(source), val_fraction=0.05)
    dm.prepare_data()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == str(source.resolve())
    dm.setup("fit")
    assert dm.n_tokens == {s: meta["splits"][s]["tokens"] for s in ("train", "val")}
    assert dm.meta == meta


def test_prepare_data_is_a_no_op_when_prepared(data_copy, source):
    before = {p.name: p.stat().st_mtime_ns for p in data_copy.iterdir()}
    TokenDataModule(dir=str(data_copy), source=str(source), val_fraction=0.05).prepare_data()
    assert {p.name: p.stat().st_mtime_ns for p in data_copy.iterdir()} == before


# ----------------------------------------------------------------------------- bad data


def raises_one_line(pattern, fn, *args):
    with pytest.raises(DataError, match=pattern) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return e


def test_load_tokens_returns_a_read_only_memmap(prepared):
    tokens = load_tokens(prepared, "train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert not tokens.flags.writeable
    assert tokens.tolist() == tokens_of(prepared, "train").tolist()


def test_bin_with_odd_byte_size(data_copy):
    with open(data_copy / "train.bin", "ab") as f:
        f.write(b"\x00")
    raises_one_line(
        r"train\.bin has an odd byte size .*no uint16 token file", load_tokens, data_copy, "train"
    )


def test_bin_with_token_ids_beyond_the_vocab(data_copy):
    tokens = np.fromfile(data_copy / "val.bin", dtype=np.uint16)
    bad = np.concatenate([tokens[:100], [50256, 50257, 60000, 7]]).astype(np.uint16)
    bad.tofile(data_copy / "val.bin")
    meta = json.loads((data_copy / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] = len(bad)  # counts right: the id check must fire
    (data_copy / "meta.json").write_text(json.dumps(meta))
    raises_one_line(
        r"val\.bin holds token id 60000, beyond the gpt2 vocab of 50257",
        load_tokens,
        data_copy,
        "val",
    )


def test_bin_size_not_matching_meta(data_copy):
    tokens = np.fromfile(data_copy / "train.bin", dtype=np.uint16)
    tokens[:-10].tofile(data_copy / "train.bin")
    raises_one_line(
        r"train\.bin holds [\d,]+ tokens but meta\.json says [\d,]+ \(truncated\?\)",
        load_tokens,
        data_copy,
        "train",
    )


def test_missing_meta_or_bin(data_copy, source):
    (data_copy / "val.bin").unlink()
    raises_one_line(r"val\.bin is missing", load_tokens, data_copy, "val")
    (data_copy / "meta.json").unlink()
    raises_one_line(
        r"meta\.json is missing.*unknown origin.*overwrite=true", load_tokens, data_copy, "train"
    )
    dm = TokenDataModule(dir=str(data_copy), block_size=T, source=str(source))
    raises_one_line(r"meta\.json is missing", dm.setup, "fit")


def run_suggested_command(e: pytest.ExceptionInfo) -> None:
    """Run the ``python -m slm.prepare ...`` command that the error ``e`` suggests, literally."""
    assert "\n" not in str(e.value)
    m = re.search(r"`python -m slm\.prepare ([^`]*)`", str(e.value))
    assert m, f"no prepare command in: {e.value}"
    prepare_main(shlex.split(m[1]))


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_bin_error_in_training_gives_a_command_that_works(data_copy, source, split):
    """The bug: training's error suggested `python -m slm.prepare data.dir=... overwrite=true`,
    which left out data.source and so fetched the default, the hub's TinyStories."""
    good = tokens_of(data_copy, split)
    good[: len(good) // 2].astype(np.uint16).tofile(data_copy / f"{split}.bin")
    dm = TokenDataModule(dir=str(data_copy), block_size=T, batch_size=B, num_workers=0)
    with pytest.raises(DataError, match=rf"{split}\.bin has .* truncated") as e:
        dm.prepare_data()  # data.dir alone: its meta.json records the source
    run_suggested_command(e)
    dm.prepare_data()
    dm.setup("fit")
    assert tokens_of(data_copy, split).tolist() == good.tolist()


def test_load_tokens_error_gives_a_command_that_works(data_copy, source):
    """Where setup runs without prepare_data (every rank but one per node) the bins are
    checked again, with the same fix."""
    tokens = tokens_of(data_copy, "train")
    tokens[:-10].astype(np.uint16).tofile(data_copy / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin holds [\d,]+ tokens but meta\.json says") as e:
        load_tokens(data_copy, "train")
    run_suggested_command(e)  # the bug: the command fetched the hub's TinyStories instead
    assert load_tokens(data_copy, "train").tolist() == tokens.tolist()


def test_meta_of_another_tokenizer(data_copy):
    meta = json.loads((data_copy / "meta.json").read_text())
    (data_copy / "meta.json").write_text(json.dumps({**meta, "tokenizer": "cl100k_base"}))
    raises_one_line(
        r"is for tokenizer 'cl100k_base' \(uint16\), not gpt2", load_tokens, data_copy, "train"
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_block_size_not_below_the_tokens_of_a_split(prepared, source, split):
    n = len(tokens_of(prepared, split))
    dm = TokenDataModule(dir=str(prepared), block_size=n, source=str(source), val_fraction=0.05)
    raises_one_line(
        rf"model\.block_size={n} is not smaller than the {n:,} tokens of .*{split}\.bin",
        dm.setup,
        "fit",
    )
    if split == "val":  # the smaller split: one token less fits, as a single val window
        dm = module(prepared, source, block_size=n - 1, val_windows="all")
        assert dm.val_dataloader().dataset.starts.tolist() == [0]
