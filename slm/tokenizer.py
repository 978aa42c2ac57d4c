"""GPT-2 BPE through tiktoken, the one tokenizer slm uses.

Every story is encoded with ``encode_ordinary`` (special-token text in a story is plain text)
and followed by one ``<|endoftext|>`` token, so the model learns where a story ends.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tiktoken

from slm.errors import SlmError, first_line

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
    ``gpt2`` encoding here; a checkpoint carries the one it was trained with
    (``slm.checkpoint.load_tokenizer``). ``<|endoftext|>`` in a text is plain text to
    ``encode``; ``eot_id`` ends a story (and starts one from an empty prompt)."""

    name: str = NAME
    vocab_size: int = VOCAB_SIZE
    eot_id: int = EOT_ID

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (a token can end inside a UTF-8 character: stream bytes)."""
        return get_encoding().decode_single_token_bytes(token)

    def encode_stories(self, stories: Sequence[str]) -> np.ndarray:
        return encode_stories(stories)


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
    enc = thread_encoding()
    joined = EOT.join(stories) + EOT
    # EOT cannot overlap itself, so the count only exceeds len(stories) when a story holds
    # the literal marker text, which must stay ordinary text: then go story by story.
    if joined.count(EOT) == len(stories):
        try:
            ids = enc.encode_to_numpy(joined, allowed_special={EOT}, disallowed_special=())
            return ids.astype(np.uint16)
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary knows how to fix them
            pass
    chunks = (enc.encode_ordinary(s) + [EOT_ID] for s in stories)
    return np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.uint16)


# -- the same tokenizer as Hugging Face files -----------------------------------------------


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


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
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


def save_hf_tokenizer(directory: str | Path, model_max_length: int) -> list[str]:
    """Write the gpt2 encoding as the Hugging Face GPT-2 tokenizer files into ``directory``
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``),
    built from tiktoken's own ranks, so ``AutoTokenizer.from_pretrained`` encodes as tiktoken
    does, ``<|endoftext|>`` included. Returns the names of the files written.

    A token's id is its rank; a merge's priority is the rank of the token it makes, so the
    merges, listed in rank order, make the BPE pick the same pair as tiktoken at every step."""
    enc = get_encoding()
    ranks: dict[bytes, int] = enc._mergeable_ranks
    chars = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT] = EOT_ID
    merges = [
        " ".join(map(text, _last_merge(ranks, token)))
        for token, _ in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(token) > 1
    ]
    special = {"content": EOT, "lstrip": False, "normalized": True, "rstrip": False}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        # tiktoken decodes to the exact text; HF's clean-up would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "added_tokens_decoder": {str(EOT_ID): {**special, "single_word": False, "special": True}},
    }
    directory = Path(directory)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2
        )
        + "\n",
    }
    for name, content in files.items():
        (directory / name).write_text(content, encoding="utf-8")
    return list(files)


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
    written; each is written under a temporary name and renamed. Returns the paths written."""
    import hashlib

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
            tmp = cache / f"{key}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, cache / key)
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

    from slm.errors import run_cli

    parser = argparse.ArgumentParser(
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
