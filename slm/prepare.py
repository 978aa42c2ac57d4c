"""Tokenize a TinyStories source into ``train.bin`` / ``val.bin`` / ``meta.json``.

    python -m slm.prepare data.source=roneneldan/TinyStories data.dir=data/tinystories
    python -m slm.prepare tokenizer=bpe tokenizer.vocab_size=4096   # fit a BPE to the data first

``data.source`` is a Hugging Face dataset name or a local path (text, jsonl, json or parquet
files, or a directory of them), read by ``slm.sources``. Null (the default) stands for what
``data.dir`` holds, as its meta.json records it, else roneneldan/TinyStories
(``resolve_source``). ``data.max_stories=N`` takes the first N stories of each split only
(streamed from the hub, so that only those are downloaded).

With ``tokenizer=bpe`` a byte-level BPE is first trained on the train split (at most
``tokenizer.train_bytes`` of it, streamed) and written to ``data.dir``/tokenizer.json; a
tokenizer given as it is (a checkpoint's: ``slm.evaluate``, ``init_from``) is written there too.
Tokens are streamed to disk in batches (memory stays flat however large the source), batches
are encoded in parallel threads (each with its own copy of the encoding, see
``tokenizer.thread_encoding``), and each bin is written under a temporary name of its own
and renamed only when complete, so a failed or interrupted run never leaves a bin that a later
run trusts. Prepares of one ``data.dir`` (several nodes on a shared filesystem, evaluate beside
train) take turns on a lock file in it (``.prepare.lock``): the first writes, the others find
the dir prepared. Existing bins are checked against meta.json's sizes, and a dir that is not
right is never reported as prepared: the error gives the command that prepares it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from slm import files, tokenizer
from slm.errors import DataError, override, run_cli
from slm.sources import (
    DEFAULT_SOURCE,
    Batches,
    canonical_source,
    check_not_a_missing_path,
    load_source,
)
from slm.tokenizer import BPETokenizer, Tokenizer

try:
    import fcntl
except ImportError:  # Windows: no flock; the unique temporary names still keep bins whole
    fcntl = None

SPLITS = ("train", "val")
META_VERSION = 1


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


def _encode_in_parallel(batches: Iterable[list[str]], tok: Tokenizer) -> Iterator[tuple]:
    """``(stories, tokens)`` per batch, in order, with at most 2 x threads batches in flight."""
    threads, pool = _encoder_pool()
    pending: deque = deque()
    try:
        for stories in batches:
            pending.append((stories, pool.submit(tok.encode_stories, stories)))
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


def _check_val_fraction(splits: dict[str, list[Batches]], val_fraction: float) -> bool:
    """Whether the val split is held out of the train stories (the source has none)."""
    held_out = not splits["val"]
    if held_out and not 0 < val_fraction < 1:
        raise DataError(
            f"data.val_fraction={val_fraction} must be in (0, 1): the source has no "
            "validation split, so one is held out of its stories"
        )
    return held_out


def _write_splits(
    splits: dict[str, list[Batches]], out: Path, val_fraction: float, tok: Tokenizer
) -> dict:
    held_out = _check_val_fraction(splits, val_fraction)
    stats = {s: {"tokens": 0, "stories": 0, "bytes": 0} for s in SPLITS}
    # Names no other process writes: a bin is renamed into place only by the process that
    # wrote all of it, even where two prepares run at once without the lock (no ``flock``).
    tmp = {s: files.temp_name(out / f"{s}.bin") for s in SPLITS}
    story_index = 0  # over the train stream, for the held-out split
    try:
        with contextlib.ExitStack() as stack:
            bins = {s: stack.enter_context(open(tmp[s], "xb")) for s in SPLITS}
            for split in ("train", "val"):
                bar = stack.enter_context(
                    tqdm(desc=f"tokenizing {split}", unit=" stories", disable=None, file=sys.stderr)
                )
                for stream in splits[split]:
                    for stories, ids in _encode_in_parallel(stream, tok):
                        if held_out and split == "train":
                            # Route whole stories: story k's tokens end with its EOT.
                            ends = np.flatnonzero(ids == tok.eot_id)
                            lengths = np.diff(ends, prepend=-1)
                            index = story_index + np.arange(len(stories))
                            to_val = held_out_mask(index, val_fraction)
                            token_to_val = np.repeat(to_val, lengths)
                            story_bytes = np.array([len(s.encode("utf-8")) for s in stories])
                            for dest, mask, token_mask in (
                                ("val", to_val, token_to_val),
                                ("train", ~to_val, ~token_to_val),
                            ):
                                ids[token_mask].tofile(bins[dest])
                                st = stats[dest]
                                st["tokens"] += int(lengths[mask].sum())
                                st["stories"] += int(mask.sum())
                                st["bytes"] += int(story_bytes[mask].sum())
                            story_index += len(stories)
                        else:
                            ids.tofile(bins[split])
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


# ----------------------------------------------------------------------------- tokenizer


def _train_stories(
    src: str, val_fraction: float, cap: int, used: dict, max_stories: int | None = None
) -> Iterator[list[str]]:
    """Batches of the train split's stories (the held-out val stories left out, so that the
    BPE never sees the text it is scored on) while their UTF-8 bytes stay within ``cap``;
    ``used`` counts the stories and bytes taken."""
    splits = load_source(src, batch=256, max_stories=max_stories)
    held_out = _check_val_fraction(splits, val_fraction)
    index = 0
    for stream in splits["train"]:
        for stories in stream:
            if held_out:
                to_val = held_out_mask(index + np.arange(len(stories)), val_fraction)
                stories = [s for s, v in zip(stories, to_val) if not v]
                index += len(to_val)
            batch = []
            for story in stories:
                try:
                    n = len(story.encode("utf-8"))
                except UnicodeEncodeError:  # lone surrogates: as tiktoken will encode them
                    story = tokenizer.fix_surrogates(story)
                    n = len(story.encode("utf-8"))
                if used["bytes"] + n > cap:
                    used["first"] = used["first"] or n
                    if batch:
                        yield batch
                    return
                used["bytes"] += n
                used["stories"] += 1
                used["first"] = used["first"] or n
                batch.append(story)
            if batch:
                yield batch


def fit_bpe(
    src: str, config: Mapping, val_fraction: float, max_stories: int | None = None
) -> tuple[BPETokenizer, dict]:
    """A byte-level BPE trained on the first ``config["train_bytes"]`` bytes of ``src``'s
    train split (of its first ``max_stories`` stories), streamed (``tokenizer.train_bpe``),
    and what it learned from."""
    used = {"stories": 0, "bytes": 0, "first": 0}
    cap = config["train_bytes"]
    stories = _train_stories(src, val_fraction, cap, used, max_stories)
    with tqdm(
        desc=f"fitting a {config['vocab_size']:,}-token BPE", unit=" stories", disable=None,
        file=sys.stderr,
    ) as bar:  # fmt: skip
        tok = tokenizer.train_bpe((bar.update(len(b)) or b for b in stories), config["vocab_size"])
    if used["stories"] == 0:
        if used["first"]:
            raise DataError(
                f"tokenizer.train_bytes={cap:,} is less than the first story "
                f"({used['first']:,} bytes): the BPE would learn from nothing; raise it"
            )
        raise DataError(f"data.source {src} holds no training text; check the files")
    training = {k: config[k] for k in ("vocab_size", "train_bytes")}
    return tok, {**training, "stories": used["stories"], "bytes": used["bytes"]}


def tokenizer_config(meta: dict) -> dict | None:
    """The ``tokenizer`` config that prepared the dir of ``meta``: gpt2 (also for a meta.json
    from before tokenizers were recorded), or bpe with the settings it was trained with; None
    for a tokenizer that was given as it is (a checkpoint's)."""
    name, training = meta.get("tokenizer", tokenizer.NAME), meta.get("tokenizer_training")
    if name == tokenizer.NAME:
        return {"name": name}
    if name == "bpe" and isinstance(training, dict):
        return {"name": name, **{k: training.get(k) for k in ("vocab_size", "train_bytes")}}
    return None


def tokenizer_overrides(config: Mapping | None) -> str:
    """The overrides that choose ``config`` (``""`` for gpt2, the default)."""
    if not config or config.get("name") == tokenizer.NAME:
        return ""
    return (
        f"tokenizer={config['name']} tokenizer.vocab_size={config['vocab_size']} "
        f"tokenizer.train_bytes={config['train_bytes']}"
    )


def _describe(config: Mapping | None, meta: dict | None = None) -> str:
    if config is None and meta.get("tokenizer") == "bpe":  # given as it is: known by its file
        return (
            f"bpe, {meta.get('vocab_size')} tokens, sha256 {str(meta.get('tokenizer_sha256'))[:8]}"
        )
    if config is None:
        return str(meta.get("tokenizer"))
    overrides = tokenizer_overrides(config).removeprefix("tokenizer=")
    return overrides.replace("tokenizer.", "") or config["name"]


def read_tokenizer(data_dir: str | Path, meta: dict | None = None) -> Tokenizer:
    """The tokenizer that the prepared ``data_dir`` holds: gpt2, or its ``tokenizer.json``,
    checked against the sha256 that meta.json records."""
    data_dir = Path(data_dir)
    meta = meta or read_meta(data_dir)
    if meta is None:
        raise DataError(
            f"{data_dir}/meta.json is missing, so its tokens are of unknown origin; "
            + prepare_command(data_dir, None)
        )
    name = meta.get("tokenizer")
    if name == tokenizer.NAME:
        return tokenizer.gpt2().load()
    problem = _tokenizer_problem(data_dir, meta)
    if problem:
        raise DataError(f"{problem}; {reprepare(data_dir, meta)}")
    return BPETokenizer.from_file(data_dir / "tokenizer.json")


def _tokenizer_problem(out: Path, meta: dict) -> str | None:
    """Why ``out``/tokenizer.json is not the one meta.json records (None: it is, or gpt2)."""
    name = meta.get("tokenizer")
    if name == tokenizer.NAME:
        return None
    if name != "bpe":
        return f"{out}/meta.json is for tokenizer {name!r}, not {' or '.join(tokenizer.KINDS)}"
    path = out / "tokenizer.json"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return f"{path} is missing (meta.json records tokens of a bpe tokenizer)"
    if digest != meta.get("tokenizer_sha256"):
        recorded = str(meta.get("tokenizer_sha256"))[:8]
        return f"{path} is not the one meta.json records (sha256 {digest[:8]}, not {recorded})"
    return None


def _same_tokenizer(meta: dict, want: Tokenizer | dict) -> bool:
    if isinstance(want, Tokenizer):
        have = (meta.get("tokenizer", tokenizer.NAME), meta.get("tokenizer_sha256"))
        return have == (want.name, want.sha256)
    return tokenizer_config(meta) == want


def _request(spec: Mapping | Tokenizer | None) -> Tokenizer | dict:
    """What ``prepare`` is asked for: a tokenizer to use as it is (gpt2, or a checkpoint's), or
    the ``tokenizer`` config of a BPE to train (checked)."""
    if isinstance(spec, Tokenizer):
        return spec
    config = tokenizer.check_config(spec or {"name": tokenizer.NAME})
    return tokenizer.gpt2() if config["name"] == tokenizer.NAME else config


# ----------------------------------------------------------------------------- prepare

LOCK = ".prepare.lock"  # in data.dir: prepares of one dir take turns (see _locked)


def prepare_command(
    data_dir: str | Path,
    source: str | None,
    val_fraction: float | None = None,
    tokenizer: Mapping | None = None,
    max_stories: int | None = None,
) -> str:
    """The fix that errors about a data dir suggest: the command that prepares it again from
    ``source`` (holding out ``val_fraction``, with the ``tokenizer`` config; its first
    ``max_stories`` per split), quoted for the shell and Hydra, to be pasted as it is. Where
    the source is unknown (no readable meta.json), ``SOURCE`` stands for it."""
    src = override("data.source", source) if source else "data.source=SOURCE"
    cmd = f"python -m slm.prepare {src} {override('data.dir', str(data_dir))}"
    if val_fraction is not None:
        cmd += f" data.val_fraction={val_fraction}"
    if tokenizer_overrides(tokenizer):
        cmd += f" {tokenizer_overrides(tokenizer)}"
    if max_stories is not None:
        cmd += f" data.max_stories={max_stories}"
    cmd += " data.overwrite=true"
    if source:
        return f"prepare it again with `{cmd}`"
    return f"prepare it again with `{cmd}`, SOURCE being the text it was prepared from"


def reprepare(data_dir: str | Path, meta: dict) -> str:
    """The fix for a prepared dir gone bad: the command that prepares it again as ``meta``
    records it (source, held-out fraction, tokenizer)."""
    config = tokenizer_config(meta)
    if config is None:
        return (
            "prepare it again with data.overwrite=true from the checkpoint whose tokenizer it "
            "holds (python -m slm.evaluate ckpt=..., or python train.py init_from=...)"
        )
    return prepare_command(
        data_dir, meta.get("source"), meta.get("val_fraction"), config, meta.get("max_stories")
    )


def read_meta(data_dir: str | Path, fix: str | None = None) -> dict | None:
    """``data_dir``/meta.json, or None where there is none. One that is not valid JSON or not
    a slm meta.json (token counts per split) is a DataError that ends with ``fix`` (by default
    ``prepare_command`` for an unknown source)."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"is not valid JSON ({e})"
    else:
        splits = meta.get("splits") if isinstance(meta, dict) else None
        if isinstance(splits, dict) and all(
            isinstance(splits.get(s), dict) and isinstance(splits[s].get("tokens"), int)
            for s in SPLITS
        ):
            return meta
        problem = "is not a slm meta.json (it has no token counts per split)"
    raise DataError(f"{path} {problem}; {fix or prepare_command(data_dir, None)}")


def resolve_source(source: str | None, data_dir: str | Path) -> str:
    """What ``data.source`` stands for, as meta.json records it: the given source (a local
    path made absolute); where it is null, the source that ``data_dir`` was prepared from
    (its meta.json), so that ``data.dir`` alone names prepared data; else DEFAULT_SOURCE.
    The one place that decides it, for prepare, training and evaluate alike."""
    if source:
        return canonical_source(source)
    meta = read_meta(data_dir)
    recorded = meta.get("source") if meta else None
    return recorded if isinstance(recorded, str) and recorded else DEFAULT_SOURCE


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``out``/.prepare.lock while the dir is checked and
    written. Prepares of one dir (one per node on a shared filesystem, as Lightning runs
    ``prepare_data`` on every node; or evaluate beside train) then take turns, and each finds
    the dir as the one before left it: the first writes, the others find it prepared.

    Yields whether the lock is held. A dir this process cannot write is only read (unlocked,
    as nothing here can write it either; writing it fails in ``_check_writable``), and on a
    filesystem without locks the unique temporary names alone keep bins whole.
    """
    fd = None
    with contextlib.suppress(OSError):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = False
        if fd is not None and fcntl is not None:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"waiting for another prepare of {out} to finish", file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError:  # e.g. ENOLCK: a network filesystem without lock support
                pass
        yield locked
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _slice(max_stories: int | None, other: int | None) -> str:
    """``, max_stories=N`` for a message, where either side of a comparison has a slice."""
    if max_stories is None and other is None:
        return ""
    return f", max_stories={max_stories}"


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a prepare that was killed (SIGKILL, out of memory): with the lock
    held, no other prepare is writing any of them."""
    for pattern in ("train.bin.*tmp", "val.bin.*tmp", "meta.json.*tmp", "tokenizer.json.*tmp"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def _wrong_size(out: Path, meta: dict) -> str | None:
    """Which bin does not have the byte size that ``meta`` records (a truncated copy, a disk
    that filled up), else None. Sizes only: ``data.load_tokens`` checks the ids."""
    for split in SPLITS:
        path = out / f"{split}.bin"
        size, tokens = path.stat().st_size, meta["splits"][split]["tokens"]
        if size != 2 * tokens:
            return (
                f"{path} has {size:,} bytes but meta.json records {tokens:,} uint16 tokens "
                f"({2 * tokens:,} bytes), so it is truncated or corrupt"
            )
    return None


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a unique name: prepares may run side by side
            pass
    except OSError as e:
        raise DataError(
            f"data.dir {out} is not writable ({e.strerror}); choose a directory you can write"
        ) from e


def prepare(
    source: str | None = None,
    data_dir: str | Path = "data/tinystories",
    val_fraction: float = 0.01,
    overwrite: bool = False,
    tokenizer: Mapping | Tokenizer | None = None,
    max_stories: int | None = None,
) -> dict:
    """Write ``train.bin``, ``val.bin`` and ``meta.json`` (and, for a BPE, ``tokenizer.json``)
    into ``data_dir``; return the meta.

    ``source`` None stands for what ``data_dir`` holds (see ``resolve_source``), taken as it
    was prepared (its ``val_fraction`` is not compared). ``tokenizer``: the ``tokenizer``
    config (``{"name": "gpt2"}``, the default, or ``{"name": "bpe", "vocab_size",
    "train_bytes"}``: a BPE trained on the train split here), or a ``Tokenizer`` to use as it
    is (a checkpoint's). ``max_stories``: only the first that many stories of each split (a
    bounded slice: from the hub, only that much is downloaded); None for all of them (not
    compared where ``source`` is None). A no-op when ``meta.json`` records this source, slice
    and tokenizer and the files have the sizes and hash it records; a missing bin is prepared
    again. Tokens of another source, slice or tokenizer, bins with no or an unreadable
    ``meta.json`` and bins of the wrong size are an error that says how to prepare the dir
    again; with ``overwrite`` the dir is prepared again, whatever it holds, without reading
    it.
    """
    want = _request(tokenizer)
    config = want if isinstance(want, dict) else None
    out = Path(data_dir).expanduser().resolve()
    if source:
        check_not_a_missing_path(source)
    # A dir this prepare made is removed again where it fails (it would hold only the lock).
    with files.removed_on_error(out, leftovers=[LOCK]), _locked(out) as locked:
        src = resolve_source(source, out)
        fix = prepare_command(out, src if source else None, val_fraction, config, max_stories)
        meta = None if overwrite else read_meta(out, fix)
        if meta is not None:
            as_it_is = source is None  # what the dir holds, as it was prepared
            same = (
                meta.get("source") == src
                and _same_tokenizer(meta, want)
                and (as_it_is or meta.get("val_fraction") in (None, val_fraction))
                and (meta.get("max_stories") == max_stories or (as_it_is and max_stories is None))
            )
            if not same:
                raise DataError(_mismatch(out, meta, src, val_fraction, want, max_stories))
            if all((out / f"{s}.bin").exists() for s in SPLITS):
                problem = _wrong_size(out, meta) or _tokenizer_problem(out, meta)
                if problem:  # prepared again as it was, from its recorded source
                    raise DataError(f"{problem}; {reprepare(out, meta)}")
                return meta
        elif not overwrite and any((out / f"{s}.bin").exists() for s in SPLITS):
            raise DataError(
                f"data.dir {out} holds .bin files but no meta.json, so their origin is unknown; "
                + fix
            )
        _check_writable(out)
        if isinstance(want, Tokenizer):
            want.load()  # gpt2 offline without the BPE files: fail before touching anything
        # Batches of 256 stories keep every encoder thread busy even on a small source.
        # Fails before anything existing is touched.
        splits = load_source(src, batch=256, max_stories=max_stories)
        training = None
        if config:  # the BPE learns from a pass of its own over the source (streamed)
            _check_val_fraction(splits, val_fraction)
            want, training = fit_bpe(src, config, val_fraction, max_stories)
        tok = want
        if locked:
            _remove_stale_temporaries(out)
        (out / "meta.json").unlink(missing_ok=True)  # old bins are untrusted from here on
        if isinstance(tok, BPETokenizer):
            files.write_text(out / "tokenizer.json", tok.json)
        else:
            (out / "tokenizer.json").unlink(missing_ok=True)
        stats = _write_splits(splits, out, val_fraction, tok)
        held_out = not splits["val"]
        meta = {
            "version": META_VERSION,
            "source": src,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_id,
            "tokenizer_sha256": tok.sha256,  # of tokenizer.json here (bpe); null for gpt2
            "tokenizer_training": training,  # what the BPE was trained with; null if given
            "dtype": "uint16",
            "val_split": "held-out" if held_out else "validation",
            "val_fraction": val_fraction if held_out else None,
            "max_stories": max_stories,
            "splits": stats,
        }
        files.write_json(out / "meta.json", meta)
    return meta


def _mismatch(
    out: Path, meta: dict, src: str, val_fraction: float, want, max_stories: int | None = None
) -> str:
    """The error for a data dir that holds other tokens than asked for: what it holds, what
    was asked for, and the ways out (use them as they are, or prepare the dir again)."""
    have_config = tokenizer_config(meta)
    have = _describe(have_config, meta)
    asked = want.describe() if isinstance(want, Tokenizer) else _describe(want)
    had = meta.get("max_stories")
    message = (
        f"data.dir {out} holds tokens of {meta.get('source')!r} ({have}, val_fraction="
        f"{meta.get('val_fraction')}{_slice(had, max_stories)}), not of {src!r} ({asked}, "
        f"val_fraction={val_fraction}{_slice(max_stories, had)}); "
    )
    if _same_tokenizer(meta, want):
        return message + (
            "leave data.source unset to use them, pass data.overwrite=true to replace them, "
            "or choose another data.dir"
        )
    if isinstance(want, Tokenizer) and want.name == "bpe":  # a checkpoint's: no command
        return message + (
            "choose another data.dir (it is prepared with that tokenizer), or pass "
            "data.overwrite=true to replace them"
        )
    use = ""
    if have_config is not None and meta.get("source") == src:
        use = f"pass {tokenizer_overrides(have_config) or 'tokenizer=gpt2'} to use them, or "
    config = want if isinstance(want, dict) else {"name": want.name}
    fix = prepare_command(out, src, val_fraction, config, max_stories)
    return message + use + fix + " (or choose another data.dir)"


def tokenize(source: str, path: str | Path, tokenizer: Tokenizer | None = None) -> dict:
    """Every story of ``source`` (all its files or splits, train then val) into the one token
    file ``path``, with ``tokenizer`` (gpt2 by default), for scoring a model on all of a text
    (``slm.evaluate text=...``). Returns the counts ``{"tokens", "stories", "bytes"}``;
    touches no data dir."""
    tok = (tokenizer or _gpt2()).load()
    splits = load_source(source, batch=256)
    stats = {"tokens": 0, "stories": 0, "bytes": 0}
    with open(path, "wb") as f:
        for stream in splits["train"] + splits["val"]:
            for stories, ids in _encode_in_parallel(stream, tok):
                ids.tofile(f)
                stats["tokens"] += len(ids)
                stats["stories"] += len(stories)
                stats["bytes"] += sum(len(s.encode("utf-8")) for s in stories)
    if stats["stories"] == 0:
        raise DataError(f"data.source {source} holds no text; check the files")
    return stats


def _gpt2() -> Tokenizer:
    return tokenizer.gpt2()


def main(argv: list[str] | None = None) -> dict:
    """``python -m slm.prepare [hydra overrides]``: the ``data`` and ``tokenizer`` keys of the
    training config."""
    from slm.config import compose

    cfg = compose("train", sys.argv[1:] if argv is None else argv)
    d = cfg.data
    out = Path(d.dir).expanduser().resolve()
    before = _stamp(out / "meta.json")
    meta = prepare(d.source, d.dir, d.val_fraction, d.overwrite, cfg.tokenizer, d.max_stories)
    for split in SPLITS:
        s = meta["splits"][split]
        print(f"{split}: {s['stories']:,} stories, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    if _stamp(out / "meta.json") == before:
        print(f"{out} already holds these tokens of {meta['source']}; nothing written")
    else:
        files = "train.bin,val.bin,meta.json" + (
            ",tokenizer.json" if meta["tokenizer_sha256"] else ""
        )
        print(f"wrote {out}/{{{files}}}")
    return meta


def _stamp(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is (inode, mtime), None where there is none: prepare rewrote
    meta.json where this changed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


if __name__ == "__main__":
    run_cli(main)
