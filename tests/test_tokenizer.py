"""slm.tokenizer: gpt2 through tiktoken, and a BPE fitted to the data (tokenizer=bpe); one EOT
after every story."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from conftest import parse_stories

from slm import tokenizer
from slm.errors import SlmError

STORIES = [
    "Once upon a time, there was a little dog named Max.",
    'Lily said, "Look!"\nThe ball was red.',  # two paragraphs
    "Ünïcödé: naïve café, 日本語の話, emoji 🐶🎈 and a long dash — done.",
    "A story that mentions <|endoftext|> as plain text, twice: <|endoftext|>.",
    "   leading and trailing spaces are the caller's business   ",
    "x",
    "Numbers 12345 and 3.14, tabs\tand\r\nwindows newlines.",
]


def reference(stories: list[str]) -> list[int]:
    """What encode_stories must equal: encode_ordinary of each story, then the EOT id."""
    enc = tiktoken.get_encoding("gpt2")
    out: list[int] = []
    for s in stories:
        out += enc.encode_ordinary(s) + [50256]
    return out


def test_constants_match_tiktoken_gpt2():
    enc = tokenizer.get_encoding()
    assert tokenizer.NAME == enc.name == "gpt2"
    assert tokenizer.VOCAB_SIZE == enc.n_vocab == 50257
    assert tokenizer.EOT_ID == enc.eot_token == 50256
    assert enc.encode(tokenizer.EOT, allowed_special={tokenizer.EOT}) == [tokenizer.EOT_ID]


def test_encode_treats_marker_text_as_ordinary_text():
    ids = tokenizer.encode("a <|endoftext|> b")
    assert tokenizer.EOT_ID not in ids
    assert tokenizer.decode(ids) == "a <|endoftext|> b"


@pytest.mark.parametrize(
    "stories",
    [
        STORIES[:3],  # the fast path: one joined encode call
        STORIES,  # holds the literal marker text: the story-by-story path
        [STORIES[3]],
        [],
        [""],  # an empty story still gets its EOT
    ],
    ids=["plain", "with-marker-text", "marker-only-story", "none", "empty-story"],
)
def test_encode_stories_equals_per_story_encode_ordinary_plus_eot(stories):
    ids = tokenizer.encode_stories(stories)
    assert ids.dtype == np.uint16
    assert ids.tolist() == reference(stories)
    assert int((ids == tokenizer.EOT_ID).sum()) == len(stories)


def test_encode_stories_lone_surrogate_falls_back_like_encode_ordinary():
    stories = ["bad \ud800 surrogate", "fine"]
    assert tokenizer.encode_stories(stories).tolist() == reference(stories)


def test_encode_stories_roundtrips_through_decode():
    ids = tokenizer.encode_stories(STORIES)
    assert tokenizer.decode(ids) == "".join(s + tokenizer.EOT for s in STORIES)


def test_encode_stories_is_the_same_in_other_threads():
    """Each thread encodes with its own copy of the encoding: same tokens everywhere."""
    results: dict[int, list[int]] = {}

    def work(k: int) -> None:
        results[k] = tokenizer.encode_stories(STORIES).tolist()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[k] for k in range(3)] == [reference(STORIES)] * 3
    assert tokenizer.thread_encoding() is tokenizer.thread_encoding()  # one copy per thread
    assert tokenizer.thread_encoding() is not tokenizer.get_encoding()


@pytest.fixture
def offline_tiktoken(monkeypatch):
    """tiktoken as it fails offline with an empty cache: a multi-line network error."""

    def no_network(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic...'): Max retries\nmore")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/empty/cache")
    tokenizer.get_encoding.cache_clear()
    yield
    tokenizer.get_encoding.cache_clear()


def test_no_bpe_files_offline_is_a_one_line_error(offline_tiktoken):
    with pytest.raises(SlmError) as e:
        tokenizer.encode("Once upon a time")
    assert str(e.value) == (
        "tiktoken could not load the gpt2 BPE files (ConnectionError: HTTPSConnectionPool("
        "host='openaipublic...'): Max retries; TIKTOKEN_CACHE_DIR is /empty/cache); run once "
        "online to cache them, or offline copy vocab.bpe and encoder.json into a folder FOLDER "
        "and run `python -m slm.tokenizer seed --from FOLDER` (see Offline in the README)"
    )


def test_tokenizer_object_is_the_gpt2_encoding(tmp_path):
    import torch

    from slm.checkpoint import load_tokenizer

    tok = tokenizer.gpt2()
    text = "Once upon a time, Zoë said <|endoftext|> 🙂"
    ids = tok.encode(text)
    assert ids == tokenizer.encode(text) and tok.decode(ids) == text
    assert b"".join(tok.token_bytes(t) for t in ids).decode() == text
    assert (tok.name, tok.vocab_size, tok.eot_id, tok.sha256) == ("gpt2", 50257, 50256, None)
    old = tmp_path / "slm.pt"  # a checkpoint from before tokenizers were stored: gpt2
    torch.save({"model_args": {"n_layer": 1}, "model": {"w": torch.zeros(1)}}, old)
    assert load_tokenizer(old) is tok
    assert tokenizer.from_state(tok.state()) is tok


# -- tokenizer=bpe -------------------------------------------------------------------------


def batches(stories: list[str], size: int = 256) -> list[list[str]]:
    return [stories[i : i + size] for i in range(0, len(stories), size)]


@pytest.fixture(scope="module")
def v2_stories(v2_txt) -> list[str]:
    return parse_stories(v2_txt.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bpe(v2_stories) -> tokenizer.BPETokenizer:
    """A 4,096-token BPE fitted to the V2 piece."""
    return tokenizer.train_bpe(batches(v2_stories), 4096)


def assert_exact(tok, stories: list[str]) -> None:
    """Each story's ids decode to it byte for byte and are those of one EOT-terminated
    batch encode, with the EOT id exactly at the story ends."""
    ids = tok.encode_stories(stories)
    ends = np.flatnonzero(ids == tok.eot_id)
    assert len(ends) == len(stories)
    pieces = np.split(ids, ends + 1)[:-1]
    for story, piece in zip(stories, pieces):
        assert piece[-1] == tok.eot_id
        body = piece[:-1].tolist()
        assert body == tok.encode(story)
        assert tok.decode(body) == story
        assert b"".join(tok.token_bytes(t) for t in body) == story.encode("utf-8")


def test_bpe_round_trip_is_byte_exact_on_real_text(bpe, v2_stories, v1_txt):
    v1 = parse_stories(v1_txt.read_text(encoding="utf-8"))  # not trained on: held-out text
    assert all(any(q in s for s in v1) for q in "“’«ñ…")  # curly quotes, Spanish, ellipses
    for stories in (v1, v2_stories):
        assert_exact(bpe, stories)
    assert bpe.vocab_size == 4096 and bpe.eot_id == 0
    assert bpe.token_bytes(bpe.eot_id) == b"<|endoftext|>"


def test_bpe_round_trip_of_odd_text(bpe):
    assert_exact(bpe, STORIES)  # emoji, CJK, tabs, CRLF; the marker text in a story
    # The Hugging Face copy's mojibake (UTF-8 read as cp1252), and emoji it never saw.
    assert_exact(bpe, ["Lily said, â€œHi!â€\x9d and smiled.", "Tom ðŸ˜Š and 🐶🎈", "\x00\x7f\n"])
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eot_id not in ids and bpe.decode(ids) == "a <|endoftext|> b"
    stories = ["bad \ud800 surrogate", "fine"]  # as tiktoken encodes lone surrogates
    assert bpe.encode_stories(stories).tolist() == bpe.encode("bad \ufffd surrogate") + [0] + [
        *bpe.encode("fine"),
        0,
    ]


def test_bpe_encodes_as_the_tokenizers_library(bpe, v1_txt):
    """tiktoken with the BPE's ids as ranks gives exactly the ids of Hugging Face's own
    encoder for the same tokenizer.json, on text it was not trained on."""
    from tokenizers import Tokenizer as HFTokenizer

    stories = parse_stories(v1_txt.read_text(encoding="utf-8"))
    hf = HFTokenizer.from_str(bpe.json)
    assert [e.ids for e in hf.encode_batch(stories)] == [bpe.encode(s) for s in stories]


def test_bpe_training_is_deterministic(bpe, v2_stories):
    """The same stories give the same tokenizer.json, byte for byte, however they are
    batched (each training builds its hash maps with new random seeds)."""
    again = tokenizer.train_bpe(batches(v2_stories, 100), 4096)
    assert again.json == bpe.json and again.sha256 == bpe.sha256
    small = tokenizer.train_bpe(batches(v2_stories[:300]), 512)
    assert small.vocab_size == 512 and small.json != bpe.json


def test_bpe_state_and_file_round_trip(bpe, tmp_path):
    (tmp_path / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    for tok in (
        tokenizer.from_state(bpe.state()),
        tokenizer.BPETokenizer.from_file(tmp_path / "tokenizer.json"),
    ):
        assert tok.same_as(bpe) and tok.encode(STORIES[2]) == bpe.encode(STORIES[2])


@pytest.mark.parametrize(
    "size, message",
    [
        (65_537, "tokenizer.vocab_size=65,537 does not fit the uint16 bins"),
        (256, "tokenizer.vocab_size=256 is below 257"),
        ("4k", "tokenizer.vocab_size=4k must be an integer"),
    ],
)
def test_vocab_size_out_of_range_is_a_one_line_error(size, message):
    with pytest.raises(SlmError, match=message) as e:
        tokenizer.train_bpe([["never read"]], size)
    assert "\n" not in str(e.value)
    tokenizer.check_vocab_size(65_536)  # ids 0..65,535 fit


def _edit(bpe, fn) -> str:
    spec = json.loads(bpe.json)
    fn(spec)
    return json.dumps(spec)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer NFC"),
        (lambda s: s.update(added_tokens=[]), "special tokens are"),
        (lambda s: s["model"]["merges"].reverse(), "not in id order"),
        (lambda s: s["model"]["vocab"].pop("Ġthe"), "ids are not 0..4094"),
    ],
)
def test_foreign_tokenizer_json_is_refused(bpe, edit, message):
    """Only files that tiktoken encodes exactly as tokenizers does are read."""
    with pytest.raises(SlmError, match=f"x/tokenizer.json: .*{message}") as e:
        tokenizer.BPETokenizer(_edit(bpe, edit), "x/tokenizer.json")
    assert "\n" not in str(e.value)


# -- offline: python -m slm.tokenizer seed ---------------------------------------------------

GPT2_FILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"


@pytest.fixture
def bpe_files(tmp_path) -> Path:
    """A copy of the GPT-2 BPE files, as a user would bring them to an offline machine."""
    if not all((GPT2_FILES / name).is_file() for name in ("vocab.bpe", "encoder.json")):
        pytest.skip(f"the GPT-2 BPE files are not at {GPT2_FILES}")
    folder = tmp_path / "gpt2-files"
    folder.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(GPT2_FILES / name, folder / name)
    return folder


def test_seed_fills_a_cache_that_tiktoken_loads_without_network(
    bpe_files, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "cache"
    tokenizer.main(["seed", str(cache), "--from", str(bpe_files)])
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and f"export TIKTOKEN_CACHE_DIR={cache}" in err
    # tiktoken's own gpt2 constructor, reading this cache, with every download refused.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.load, "read_file", lambda path: pytest.fail(f"downloads {path}"))
    from tiktoken_ext.openai_public import gpt2

    enc = tiktoken.Encoding(**gpt2())
    text = "Once upon a time, Zoë found a 🐶."
    assert enc.encode_ordinary(text) == tokenizer.encode(text)


def test_seed_into_tiktokens_own_cache_by_default(bpe_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "default"))
    tokenizer.main(["seed", "--from", str(bpe_files)])
    out, err = capsys.readouterr()
    assert len(list((tmp_path / "default").iterdir())) == 2 and err == ""


def test_seed_checks_the_hashes_before_writing(bpe_files, tmp_path, capsys):
    with open(bpe_files / "encoder.json", "ab") as f:
        f.write(b" ")
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        tokenizer.main(["seed", str(cache), "--from", str(bpe_files)])
    assert e.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {bpe_files / 'encoder.json'} has SHA-256 ")
    assert "not GPT-2's 196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783" in line
    assert not cache.exists()  # vocab.bpe was right, but nothing is written


def test_seed_from_a_folder_without_the_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tokenizer.main(["seed", str(tmp_path / "cache"), "--from", str(tmp_path)])
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: cannot read {tmp_path / 'vocab.bpe'} (No such file")
    assert "holding the GPT-2 BPE files vocab.bpe and encoder.json" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["seed"], "the following arguments are required: --from; usage: python -m slm.tokenizer"),
        (["plant"], "argument command: invalid choice: 'plant' (choose from 'seed'); usage: "),
    ],
)
def test_seed_usage_errors_are_one_line(argv, message, capsys):
    """A usage error: one line, as every command reports its errors (status 2, argparse's)."""
    with pytest.raises(SystemExit) as e:
        tokenizer.main(argv)
    assert e.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {message}"), line
