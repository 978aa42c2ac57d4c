"""GPT-2 BPE through tiktoken, the one tokenizer slm uses.

Every story is encoded with ``encode_ordinary`` (special-token text in a story is plain text)
and followed by one ``<|endoftext|>`` token, so the model learns where a story ends.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Sequence

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
            f"TIKTOKEN_CACHE_DIR is {cache}); run once online to cache them, or offline set "
            "TIKTOKEN_CACHE_DIR to a directory seeded with vocab.bpe and encoder.json "
            "(bash ../shared/data/gpt2/seed-tiktoken-cache.sh DIR; see Offline in the README)"
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
