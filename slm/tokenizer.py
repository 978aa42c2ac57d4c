"""Tokenizers: GPT-2's BPE through tiktoken (``tokenizer=gpt2``, the default), and a
byte-level BPE fitted to the data (``tokenizer=bpe``: trained with Hugging Face ``tokenizers``,
encoded with tiktoken).

Every story is encoded with ``encode_ordinary`` (special-token text in a story is plain text)
and followed by one ``<|endoftext|>`` token, so the model learns where a story ends.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tiktoken

from slm import files
from slm.errors import ConfigError, SlmError, first_line

NAME = "gpt2"
EOT = "<|endoftext|>"
VOCAB_SIZE = 50257
EOT_ID = 50256


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The tiktoken ``gpt2`` encoding (downloaded once, then read from tiktoken's cache).

    Offline with an empty cache, tiktoken fails deep in ``requests`` (a ~100-line traceback):
    that becomes one line saying how to get the BPE files (README, Offline)."""
    try:
        return tiktoken.get_encoding(NAME)
    except Exception as e:  # a network error, or a corrupt cached file (a hash mismatch)
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or "unset (tiktoken uses its default cache)"
        raise SlmError(
            f"tiktoken could not load the gpt2 BPE files ({type(e).__name__}: {first_line(e)}; "
            f"TIKTOKEN_CACHE_DIR is {cache}); run once online to cache them, or offline copy "
            "vocab.bpe and encoder.json into a folder FOLDER and run "
            "`python -m slm.tokenizer seed --from FOLDER` (see Offline in the README)"
        ) from e


_local = threading.local()


def thread_encoding() -> tiktoken.Encoding:
    """This thread's own copy of the ``gpt2`` encoding, for encoding in parallel threads.

    A tiktoken ``Encoding`` encodes fastest in the first thread that used it (by all signs its
    regex engine's fast path belongs to that thread); in every other thread it was measured
    30-40% slower, so threads sharing one encoding barely scale. A copy per thread (about
    20 ms to build, freed with its thread) lets each thread encode at full speed.
    """
    enc = getattr(_local, "encoding", None)
    if enc is None:
        base = get_encoding()
        enc = _local.encoding = tiktoken.Encoding(
            name=base.name,
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens=base._special_tokens,
        )
    return enc


def encode(text: str) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` in the text is encoded as ordinary text."""
    return get_encoding().encode_ordinary(text)


def decode(ids: Sequence[int]) -> str:
    return get_encoding().decode(list(ids))


class Tokenizer:
    """Text <-> token ids, as every entry point needs it (generate, evaluate, serve): the
    ``gpt2`` encoding here, ``BPETokenizer`` for ``tokenizer=bpe``; a checkpoint carries the one
    it was trained with (``slm.checkpoint.load_tokenizer``). ``<|endoftext|>`` in a text is
    plain text to ``encode``; ``eot_id`` ends a story (and starts one from an empty prompt)."""

    name: str = NAME
    vocab_size: int = VOCAB_SIZE
    eot_id: int = EOT_ID
    sha256: str | None = None  # of the tokenizer.json that defines it (None: tiktoken's gpt2)

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (a token can end inside a UTF-8 character: stream bytes)."""
        return get_encoding().decode_single_token_bytes(token)

    def encode_stories(self, stories: Sequence[str]) -> np.ndarray:
        return encode_stories(stories)

    def load(self) -> Tokenizer:
        """Itself, ready to encode: gpt2 reads tiktoken's BPE files here (a one-line
        ``SlmError`` offline without them), so an entry point fails before any work."""
        get_encoding()
        return self

    def state(self) -> dict:
        """What checkpoints store to rebuild it (``from_state``): primitives only."""
        return {"name": self.name}

    def describe(self) -> str:
        """A few words for messages: ``gpt2``, ``bpe (4,096 tokens, sha256 1a2b3c4d)``."""
        return self.name

    def same_as(self, other: Tokenizer) -> bool:
        return (self.name, self.sha256) == (other.name, other.sha256)

    @property
    def ranks(self) -> dict[bytes, int]:
        """Its BPE: each token's bytes -> its id (a merge's priority is the id it makes)."""
        return get_encoding()._mergeable_ranks


@functools.cache
def gpt2() -> Tokenizer:
    """The ``gpt2`` tokenizer (tiktoken)."""
    return Tokenizer()


def encode_stories(stories: Sequence[str]) -> np.ndarray:
    """Concatenated tokens of ``stories``, each followed by one EOT, as uint16.

    Equal to ``encode_ordinary(s) + [EOT_ID]`` for each story, but done in one call: tiktoken
    runs its pre-tokenizer regex separately on each piece between allowed special tokens, so
    encoding ``s1<|endoftext|>s2<|endoftext|>`` gives exactly the per-story tokens. One call
    per batch removes the per-story Python overhead, and tiktoken releases the GIL inside, so
    threads encode batches in parallel (each with its own copy, see ``thread_encoding``).
    """
    return _encode_stories(thread_encoding(), EOT_ID, stories)


def _encode_stories(enc: tiktoken.Encoding, eot_id: int, stories: Sequence[str]) -> np.ndarray:
    joined = EOT.join(stories) + EOT
    # EOT cannot overlap itself, so the count only exceeds len(stories) when a story holds
    # the literal marker text, which must stay ordinary text: then go story by story.
    if joined.count(EOT) == len(stories):
        try:
            ids = enc.encode_to_numpy(joined, allowed_special={EOT}, disallowed_special=())
            return ids.astype(np.uint16)
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary knows how to fix them
            pass
    chunks = (enc.encode_ordinary(s) + [eot_id] for s in stories)
    return np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.uint16)


# -- byte-level BPE as text (Hugging Face files) ---------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters, which byte-level BPE files
    (``vocab.json``, ``merges.txt``) use to write tokens as text: printable Latin-1 bytes stand
    for themselves, the others (controls, space) take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(others)})
    return dict(sorted(chars.items()))


def last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge made ``token``: tiktoken's BPE run on ``token``'s bytes with
    only the merges of lower rank (the lowest-ranked adjacent pair first), which stops at
    exactly two parts for every token that the BPE can build."""
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise SlmError(f"gpt2 token {token!r} (rank {rank}) is not a merge of two tokens")
    return parts[0], parts[1]


def byte_level_text(tok: Tokenizer) -> tuple[list[str], list[str]]:
    """``tok`` written as byte-level BPE text, as GPT-2's ``vocab.json`` and ``merges.txt``
    and GGUF's ``tokenizer.ggml.tokens`` and ``merges`` hold it: every id's token
    (``bytes_to_unicode`` text; ``<|endoftext|>`` at ``eot_id``), and the merges in the order
    of the ids they make, ``"left right"`` each, recovered from the ranks (``last_merge``).
    A BPE that merges the lowest-listed pair first then picks the pair tiktoken does at every
    step."""
    chars = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    tokens = [EOT] * tok.vocab_size
    ordered = sorted(tok.ranks.items(), key=lambda kv: kv[1])
    for token, rank in ordered:
        tokens[rank] = text(token)
    merges = [" ".join(map(text, last_merge(tok.ranks, t))) for t, _ in ordered if len(t) > 1]
    return tokens, merges


# -- tokenizer=bpe: a byte-level BPE fitted to the data ---------------------------------------

MIN_VOCAB = 257  # the 256 byte tokens and <|endoftext|>
MAX_VOCAB = 1 << 16  # ids are stored as uint16 in train.bin / val.bin
KINDS = ("gpt2", "bpe")


def _gpt2_pattern() -> str:
    # tiktoken's own gpt2 pre-tokenizer regex: the same splits as the original GPT-2 pattern
    # that `tokenizers`' ByteLevel pre-tokenizer uses, and tiktoken's faster form of it.
    from tiktoken_ext.openai_public import r50k_pat_str

    return r50k_pat_str


def fix_surrogates(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) as U+FFFD, as tiktoken's encode does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class _BadBPE(ValueError):
    """Why a ``tokenizer.json`` is not one slm reads (``_read_bpe`` says where)."""


def _read_bpe(text: str, where: str) -> tuple[dict[bytes, int], int]:
    """``_parse_bpe(text)``, its error a one-line ``SlmError`` that names ``where``."""
    try:
        return _parse_bpe(text)
    except _BadBPE as e:
        raise SlmError(
            f"{where}: {e}; slm reads the byte-level BPE files that tokenizer=bpe trains"
        ) from e.__cause__


@functools.lru_cache(maxsize=8)  # keyed on the text: one check per file, whoever reads it
def _parse_bpe(text: str) -> tuple[dict[bytes, int], int]:
    """The ranks (token bytes -> id) and EOT id of a byte-level BPE ``tokenizer.json``, after
    checking that tiktoken encodes with them exactly as ``tokenizers`` does: GPT-2's byte map
    and pre-tokenizer, no normalizer, ``<|endoftext|>`` the one special token, ids 0..V-1, and
    merges in id order, each of which tiktoken's BPE (lowest-id pair first, on the bytes of the
    token it makes, with only the tokens before it) rebuilds. ``tokenizers`` trains exactly such
    files; ``ignore_merges`` keeps a piece that is a token whole, as tiktoken does."""
    bad = _BadBPE
    try:
        spec = json.loads(text)
        model = spec["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"not a tokenizers JSON file ({type(e).__name__}: {first_line(e)})") from e
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or spec.get("normalizer"):
        raise bad(
            f"model {model.get('type')}, pre_tokenizer {pre.get('type')}, normalizer "
            f"{(spec.get('normalizer') or {}).get('type')} (not BPE, ByteLevel, none)"
        )
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        raise bad("its ByteLevel pre-tokenizer adds a prefix space or has no regex")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise bad("its BPE has subword prefixes or suffixes")
    specials = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or []}
    if set(specials) != {EOT} or vocab.get(EOT) != specials[EOT]:
        raise bad(f"its special tokens are {sorted(specials)}, not only {EOT}")
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > MAX_VOCAB:
        raise bad(f"its {len(vocab)} ids are not 0..{len(vocab) - 1}, or more than {MAX_VOCAB}")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items() if t != EOT}
    except KeyError as e:
        raise bad(f"a token holds {e.args[0]!r}, outside GPT-2's byte-to-character map") from e
    if sum(len(t) == 1 for t in ranks) != 256 or len(ranks) != len(vocab) - 1:
        raise bad("it lacks some of the 256 byte tokens, or two tokens have the same bytes")
    last = -1
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        left, right = bytes(byte_of[c] for c in a), bytes(byte_of[c] for c in b)
        rank = ranks.get(left + right)
        if rank is None or rank <= last or last_merge(ranks, left + right) != (left, right):
            raise bad(f"its merge {a!r} + {b!r} is not in id order as tiktoken merges")
        last = rank
    if len(merges) != len(ranks) - 256:
        raise bad(f"it has {len(merges)} merges for {len(ranks) - 256} tokens above the bytes")
    return ranks, vocab[EOT]


class BPETokenizer(Tokenizer):
    """A byte-level BPE fitted to the data (``tokenizer=bpe``), defined by a Hugging Face
    ``tokenizer.json`` (``train_bpe`` writes it; ``data.dir`` and checkpoints hold it, and
    ``AutoTokenizer`` reads it as it is). Its token ids are the tiktoken ranks, so it encodes
    with tiktoken, like gpt2: ``_read_bpe`` checks that the result is exactly that of
    ``tokenizers``, which it beats several times over, with the same batch path and thread
    copies as gpt2 (``encode_stories``)."""

    name = "bpe"

    def __init__(self, text: str, where: str = "tokenizer.json") -> None:
        ranks, self.eot_id = _read_bpe(text, where)
        self.json = text
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        self.vocab_size = len(ranks) + 1
        self._ranks = ranks
        self._local = threading.local()
        self._encoding = self._new_encoding()

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlmError(f"{path}: cannot read it ({type(e).__name__}: {first_line(e)})") from e
        return cls(text, str(path))

    def _new_encoding(self) -> tiktoken.Encoding:
        return tiktoken.Encoding(
            name=f"bpe-{self.sha256[:12]}",
            pat_str=_gpt2_pattern(),
            mergeable_ranks=self._ranks,
            special_tokens={EOT: self.eot_id},
        )

    def _thread_encoding(self) -> tiktoken.Encoding:
        """This thread's own copy, as ``thread_encoding`` for gpt2 (a few ms to build)."""
        enc = getattr(self._local, "encoding", None)
        if enc is None:
            enc = self._local.encoding = self._new_encoding()
        return enc

    def encode(self, text: str) -> list[int]:
        return self._thread_encoding().encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))

    def token_bytes(self, token: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token)

    def encode_stories(self, stories: Sequence[str]) -> np.ndarray:
        return _encode_stories(self._thread_encoding(), self.eot_id, stories)

    def load(self) -> BPETokenizer:
        return self

    def state(self) -> dict:
        return {"name": self.name, "json": self.json, "sha256": self.sha256}

    def describe(self) -> str:
        return f"bpe ({self.vocab_size:,} tokens, sha256 {self.sha256[:8]})"

    @property
    def ranks(self) -> dict[bytes, int]:
        return self._ranks


def train_bpe(batches: Iterable[Sequence[str]], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (fewer where the text has fewer pairs to
    merge), trained with Hugging Face ``tokenizers`` on the stories of ``batches``, each a text
    of its own (no merge crosses a story's end): GPT-2's byte map and pre-tokenizer regex, all
    256 bytes as the first tokens (any text encodes, byte for byte), ``<|endoftext|>`` the one
    special token (id 0). Deterministic: the same stories give the same ``tokenizer.json``,
    byte for byte. Memory grows with the distinct words, not the text: stream the batches."""
    check_vocab_size(vocab_size)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(batches, trainer)
    spec = json.loads(hf.to_str())
    spec["model"]["ignore_merges"] = True  # a piece that is a token stays whole, as tiktoken
    return BPETokenizer(json.dumps(spec, ensure_ascii=False) + "\n")


def check_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"tokenizer.vocab_size={vocab_size} must be an integer")
    if vocab_size > MAX_VOCAB:
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size:,} does not fit the uint16 bins (ids up to "
            f"65,535); choose at most {MAX_VOCAB:,}"
        )
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"tokenizer.vocab_size={vocab_size} is below {MIN_VOCAB}, the 256 byte tokens and "
            "<|endoftext|>; choose more (4096 or 8192 suit TinyStories)"
        )


def check_config(cfg: Mapping) -> dict:
    """The ``tokenizer`` config group (``conf/tokenizer/``) as a plain dict, checked:
    ``{"name": "gpt2"}`` or ``{"name": "bpe", "vocab_size": ..., "train_bytes": ...}``."""
    name = cfg.get("name")
    if name == "gpt2":
        return {"name": "gpt2"}
    if name != "bpe":
        raise ConfigError(f"tokenizer.name={name} is not one of {', '.join(KINDS)}")
    check_vocab_size(cfg.get("vocab_size"))
    train_bytes = cfg.get("train_bytes")
    if isinstance(train_bytes, bool) or not isinstance(train_bytes, int) or train_bytes < 1:
        raise ConfigError(
            f"tokenizer.train_bytes={train_bytes} must be a positive integer (bytes of training "
            "text the BPE learns from)"
        )
    return {"name": "bpe", "vocab_size": cfg["vocab_size"], "train_bytes": train_bytes}


def from_state(state: Mapping | None, where: str = "the checkpoint") -> Tokenizer:
    """The tokenizer that ``Tokenizer.state()`` describes; ``None`` (a checkpoint from before
    tokenizers were stored) is gpt2."""
    if state is None or state.get("name") == "gpt2":
        return gpt2()
    if state.get("name") == "bpe" and isinstance(state.get("json"), str):
        tok = BPETokenizer(state["json"], f"{where} (its tokenizer)")
        if state.get("sha256") not in (None, tok.sha256):
            raise SlmError(f"{where}: its tokenizer does not match its recorded sha256")
        return tok
    raise SlmError(
        f"{where}: stores tokenizer {state.get('name')!r}, which slm does not know "
        f"({', '.join(KINDS)})"
    )


# -- offline: seed tiktoken's cache with copied BPE files ---------------------------------------
# python -m slm.tokenizer seed [CACHE_DIR] --from FOLDER

GPT2_FILES_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
# The SHA-256 that tiktoken itself checks (tiktoken_ext.openai_public.gpt2).
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def tiktoken_cache_dir() -> Path:
    """The directory tiktoken reads its downloads from: ``$TIKTOKEN_CACHE_DIR``, else
    ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache`` (tiktoken's own rule)."""
    import tempfile

    env = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    return Path(env or Path(tempfile.gettempdir()) / "data-gym-cache").expanduser()


def seed_tiktoken_cache(folder: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Copy ``vocab.bpe`` and ``encoder.json`` from ``folder`` into tiktoken's cache
    ``cache_dir`` (default: ``tiktoken_cache_dir()``) under the names tiktoken looks for (the
    SHA-1 of each file's download URL), after checking each file's SHA-256, so that the
    ``gpt2`` encoding loads with no network. Both files are checked before either is
    written; each is written whole (``slm.files``). Returns the paths written."""
    folder = Path(folder).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else tiktoken_cache_dir()
    contents = {}
    for name, want in GPT2_FILES.items():
        path = folder / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SlmError(
                f"cannot read {path} ({e.strerror}); --from must be a folder holding the GPT-2 "
                f"BPE files vocab.bpe and encoder.json (from {GPT2_FILES_URL}/)"
            ) from e
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise SlmError(
                f"{path} has SHA-256 {got}, not GPT-2's {want}: a different or damaged file; "
                f"copy it again from {GPT2_FILES_URL}/{name}"
            )
        contents[name] = data
    written = []
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            key = hashlib.sha1(f"{GPT2_FILES_URL}/{name}".encode()).hexdigest()
            files.write_bytes(cache / key, data)
            written.append(cache / key)
    except OSError as e:
        raise SlmError(
            f"cannot write tiktoken's cache {cache} ({e.strerror}); pass a directory you can "
            "write and export TIKTOKEN_CACHE_DIR=that directory"
        ) from e
    return written


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import sys
    from typing import NoReturn

    from slm.errors import fail, run_cli

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            # A usage error on one line, as every command's (status 2, as argparse's).
            usage = self.format_usage().removeprefix("usage: ")
            fail(ConfigError(f"{message}; usage: {usage}"), status=2)

    parser = Parser(
        prog="python -m slm.tokenizer",
        description="Offline use of the gpt2 encoding: seed tiktoken's cache from copied files.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser(
        "seed",
        help="copy vocab.bpe and encoder.json into tiktoken's cache, checking their SHA-256",
    )
    seed.add_argument(
        "cache_dir", nargs="?", default=None,
        help="the cache to fill (default: $TIKTOKEN_CACHE_DIR, else tiktoken's default)",
    )  # fmt: skip
    seed.add_argument(
        "--from", dest="folder", required=True, help="a folder holding vocab.bpe and encoder.json"
    )
    args = parser.parse_args(argv)

    def run() -> None:
        for path in seed_tiktoken_cache(args.folder, args.cache_dir):
            print(f"wrote {path}")
        cache = Path(args.cache_dir or tiktoken_cache_dir()).expanduser().resolve()
        if cache != tiktoken_cache_dir().resolve():
            print(f"now export TIKTOKEN_CACHE_DIR={cache} wherever slm runs", file=sys.stderr)

    run_cli(run)


if __name__ == "__main__":
    main()
