"""Story-quality evaluation: the model completes story openings taken from held-out stories,
and the completions are measured (and, on demand, graded by an LLM judge).

    python -m slm.evaluate ckpt=outputs/run/slm.pt data.dir=DIR stories=50
    python -m slm.evaluate ckpt=PATH stories=50 judge=http://localhost:8080/v1
    python train.py stories=8          # the default: the suite on slm.pt at the end of a run

The openings: ``stories`` held-out stories picked by ``suite.seed`` (the same for every
checkpoint), each cut after its first sentence (or its first K words), as text, so that
models with other tokenizers get the same ones. Each is completed greedily and
``suite.samples`` times by sampling, from ``<|endoftext|>`` + the opening (how every story
starts in training), until the end-of-text token, ``suite.max_new_tokens`` tokens or the
end of the model's context window (``block_size`` tokens, the opening included), all the
openings of a mode as one batch.

The numbers (``summarize``; README, Story evaluation), per decoding mode:

- ``distinct_n`` (n = 1, 2, 3): distinct n-grams / all n-grams, over all the completions of
  the mode together (Li et al., 2016), of words, punctuation marks and line breaks
  (``units``): low when the model says the same things in every story.
- ``repeat_4gram``: within a completion, the share of its 4-grams that repeat an earlier
  one, averaged over the completions: high when a story loops (on words or on line breaks).
- ``eot_rate``: the share of completions that end with ``<|endoftext|>`` within the token
  limit; ``words``: their mean length in words.
- ``carryover``: the share of the opening's names and nouns (``names_and_nouns``: a plain
  heuristic, no NLP library) that the completion uses again, averaged over the completions.

and, once per opening, ``continuation_loss``: the model's loss (nats per token) on the true
rest of the story, given the opening. The completions go to a jsonl file beside the scores.

The judge (``judge=PATH_OR_URL``): each completion is sent, inside the rubric prompt (a file,
``conf/judge_rubric.txt`` by default), to an OpenAI-compatible chat-completions endpoint
(llama.cpp, vLLM, Ollama) or a local ``transformers`` causal LM directory, which answers with
a 1-10 score and a one-line reason for grammar, consistency, creativity and plot (the
TinyStories paper's criteria). Replies without the four scores are counted, not fatal.
"""

from __future__ import annotations

import copy
import dataclasses
import http.client
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from slm import files
from slm.errors import ConfigError, DataError, SlmError, first_line, one_line
from slm.model import GPT, KVCache
from slm.precision import inference_autocast
from slm.sample import _next_token, check_sampling  # generate()'s sampling, exactly

log = logging.getLogger(__name__)

MODES = ("greedy", "sampled")
GRADES = ("grammar", "consistency", "creativity", "plot")
MODE_KEYS = (
    "distinct_1", "distinct_2", "distinct_3", "repeat_4gram", "eot_rate", "words", "carryover",
    *(f"judge_{g}" for g in (*GRADES, "mean")),
)  # fmt: skip
# The flat names of every number (``flat``): TensorBoard tags stories/NAME, sweep.csv columns.
COLUMNS = (
    "continuation_loss",
    *(f"{mode}_{key}" for mode in MODES for key in MODE_KEYS),
    "judge_parse_failures",
    "judge_request_failures",
)
DEFAULT_RUBRIC = Path(__file__).resolve().parent.parent / "conf" / "judge_rubric.txt"
MAX_BATCH = 64  # completions generated together at most (the KV cache grows with the batch)


# -- openings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opening:
    story: int  # the story's index in the held-out split
    text: str  # the opening the model completes
    continuation: str  # the rest of the story: opening + continuation == the story


class TokenStories(Sequence):
    """The stories of a token file (``val.bin``: each story's ids followed by the end-of-text
    id), decoded with ``tok`` when read. Text after the last end-of-text id is left out."""

    def __init__(self, path: str | Path, tok) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} is missing: no held-out stories to take openings from")
        self.tok = tok
        self.ids = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else []
        ends = np.flatnonzero(np.asarray(self.ids) == tok.eot_id)
        starts = np.concatenate([[0], ends + 1])[:-1].astype(np.int64)
        keep = ends > starts  # no empty stories
        self.starts, self.ends = starts[keep], ends[keep]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:
        return self.tok.decode(self.ids[self.starts[i] : self.ends[i]].tolist())


# The end of a sentence: . ! or ? (and closing quotes), then a space and a capital (or an
# opening quote): `"Look!" said Tim.` is one sentence.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)]*(?=\s+[\"'“‘(]*[A-Z0-9])")
_ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Mt)\.$")  # "Mr. Brown" goes on
_TOKEN = re.compile(r"\S+")


def split_opening(story: str, opening: str | int = "sentence") -> tuple[str, str] | None:
    """``(opening, continuation)`` of ``story``: its first sentence (``"sentence"``) or its
    first ``opening`` words, and the rest, so that the two add up to the story. None when
    nothing (no word) would be left to continue."""
    if opening == "sentence":
        ends = (m.end() for m in _SENTENCE_END.finditer(story))
        cut = next((e for e in ends if not _ABBREVIATION.search(story[:e])), None)
    else:
        tokens = list(_TOKEN.finditer(story))
        cut = tokens[opening - 1].end() if len(tokens) > opening else None
    if cut is None or not words(story[cut:]):
        return None
    return story[:cut], story[cut:]


def pick_openings(
    stories: Sequence[str], n: int, seed: int, opening: str | int = "sentence"
) -> list[Opening]:
    """``n`` openings from ``stories``, in an order fixed by ``seed`` alone: the same for
    every checkpoint. Stories with nothing after the opening are skipped; fewer than ``n``
    (with a warning) when the stories run out."""
    picked = []
    for i in np.random.default_rng(seed).permutation(len(stories)):
        if len(picked) == n:
            break
        split = split_opening(stories[int(i)], opening)
        if split is not None:
            picked.append(Opening(int(i), *split))
    if len(picked) < n:
        log.warning("stories=%d, but only %d held-out stories have an opening", n, len(picked))
    return picked


# -- measures --------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_UNIT = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|\n|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, inner apostrophes); punctuation is dropped."""
    return _WORD.findall(text.lower().replace("’", "'"))


def units(text: str) -> list[str]:
    """What the n-grams of ``distinct_n`` and ``repeat_rate`` are made of: the words, each
    punctuation mark and each line break (a model that loops on "\\n" or "!" repeats too)."""
    return _UNIT.findall(text.lower().replace("’", "'"))


def ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(seq[i:] for i in range(n))))


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams of ``units`` over ``texts`` together (None: none)."""
    grams = [g for t in texts for g in ngrams(units(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeat_rate(text: str, n: int = 4) -> float | None:
    """The share of ``text``'s n-grams of ``units`` that repeat an earlier one (None: none)."""
    grams = ngrams(units(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


DETERMINERS = frozenset(
    "a an the his her their my your its our this that these those some every another".split()
)
# Skipped between a determiner and its noun ("a little red ball" -> ball, "a three year old
# girl" -> girl), as are the words with an adjective's ending (``_ADJECTIVE_END``) before
# another word ("a clumsy rabbit").
ADJECTIVES = frozenset(
    """little big small tiny huge old young new happy sad angry scared kind nice good bad best
    pretty beautiful shiny red blue green yellow pink purple orange brown black white gray grey
    gold golden long tall short fast slow soft hard warm cold hot dark bright fluffy funny silly
    brave friendly special favorite clever smart curious lonely great sunny magic magical
    colorful wise strong busy hungry sleepy lazy gentle cute wet dry clean dirty loud quiet
    shy excited fun lovely sweet tasty yummy fancy rich poor sick tired proud very really so
    too two three four five six seven eight nine ten year years""".split()
)
_ADJECTIVE_END = re.compile(r"(?:y|ful|ous|ive|ish|less|al|ic|ed)$")
# Never names, though capitalized at the start of a sentence; never nouns.
FUNCTION_WORDS = frozenset(
    """i me he she it we they you him them us his her its our their my your mine yours
    a an the this that these those some every another any all each no not
    and but or so if then than because when while after before as at by for from in into of
    off on onto out over to under up upon with without about around through
    once one there here where what who why how which today yesterday tomorrow now later soon
    suddenly finally first next last also too very just only again always never sometimes
    is are was were be been being am do does did done has have had can could will would
    shall should may might must let lets let's yes no oh wow hello hi bye please thank thanks
    okay ok look come go see named called""".split()
)
# Common verbs of TinyStories' first sentences: what follows a noun, never an adjective's noun.
VERBS = frozenset(
    """said saw went ran sat played looked wanted liked loved found got made took came lived
    jumped walked lost gave told asked says sees goes runs sits plays looks wants likes loves
    finds gets makes takes comes lives jumps walks loses gives tells asks""".split()
)
# Nouns that set a scene rather than name a thing to carry on ("once upon a time").
FILLER_NOUNS = frozenset("time day night morning lot bit way while kind thing things".split())
_WORD_CASED = re.compile(r"[A-Za-z]+(?:['’][a-z]+)*")


def names_and_nouns(text: str) -> list[str]:
    """The names and nouns of ``text`` by a plain heuristic, in order, without repeats:

    - a name is a capitalized word that is no function word ("Lily", "Max", "Mom"; not
      "Once", "She", "The");
    - a noun is the word after a determiner (a, the, his, ...), past up to three adjectives
      (common ones, and words ending like one, -y, -ful, -ous, ..., before another word: "a
      little girl" -> girl, "a clumsy rabbit" -> rabbit), unless it is a function or filler
      word ("a time").

    Pronouns are not followed (a completion that says "she" for Lily does not carry Lily),
    and nouns without a determiner ("birds sang") are missed."""
    tokens = _WORD_CASED.findall(text)
    found: list[str] = []
    for i, w in enumerate(tokens):
        low = w.lower().replace("’", "'")
        if w[0].isupper() and low not in FUNCTION_WORDS and low not in ADJECTIVES:
            found.append(w)
        elif low in DETERMINERS:
            j = i + 1
            while j + 1 < len(tokens) and j - i <= 3 and _adjective(tokens[j], tokens[j + 1]):
                j += 1
            noun = tokens[j].lower() if j < len(tokens) else ""
            if noun and tokens[j].islower() and noun not in FUNCTION_WORDS | VERBS | FILLER_NOUNS:
                found.append(tokens[j])
    return list(dict.fromkeys(found))


def _adjective(word: str, following: str) -> bool:
    low = word.lower()
    if low in ADJECTIVES:
        return True
    # A noun may follow ("a clumsy rabbit"), not a verb ("the puppy jumped").
    noun = following.islower() and following not in FUNCTION_WORDS | VERBS
    noun = noun and not following.endswith("ed")
    return noun and bool(_ADJECTIVE_END.search(low)) and low not in FUNCTION_WORDS


def _forms(word: str) -> set[str]:
    """A word's singular and plural forms (ball/balls, box/boxes, puppy/puppies)."""
    w = word.lower()
    forms = {w, w + "s", w + "es"}
    if w.endswith("ies"):
        forms.add(w[:-3] + "y")
    if w.endswith("y"):
        forms.add(w[:-1] + "ies")
    for suffix in ("es", "s"):
        if w.endswith(suffix):
            forms.add(w[: -len(suffix)])
    return forms


def carryover(opening: str, completion: str) -> tuple[float | None, list[str], list[str]]:
    """The share of ``opening``'s names and nouns that ``completion`` uses again (in either
    number, any case), with the carried and the dropped ones; None when the opening has none."""
    terms = names_and_nouns(opening)
    if not terms:
        return None, [], []
    present = set(words(completion))
    carried = [t for t in terms if _forms(t) & present]
    dropped = [t for t in terms if t not in carried]
    return len(carried) / len(terms), carried, dropped


def _mean(values: Iterable) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


# -- completing the openings -----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How the suite completes the openings (``suite.*``), recorded with the scores."""

    opening: str | int = "sentence"
    samples: int = 1
    max_new_tokens: int | None = None  # None: the model's block_size
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337

    @classmethod
    def from_cfg(cls, suite: DictConfig, block_size: int) -> Settings:
        """``suite.*``; ``max_new_tokens`` null becomes ``block_size`` (the whole window)."""
        s = cls(**{k: suite[k] for k in cls.__dataclass_fields__})
        return dataclasses.replace(s, max_new_tokens=s.max_new_tokens or block_size)


def _prompt(tok, opening: Opening, block_size: int) -> list[int]:
    """``<|endoftext|>`` + the opening (a story starts after one in training), cut to its last
    ``block_size - 1`` tokens so that one new token fits in the window."""
    return [tok.eot_id, *tok.encode(opening.text)][-(block_size - 1) :]


@torch.inference_mode()
def complete_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    stop_token: int,
) -> list[tuple[list[int], bool]]:
    """``(new ids, ended)`` for prompts of any lengths, generated as one batch: each prompt is
    prefilled into its own row of one KV cache, then every row takes one token a step through
    ``GPT.decode`` at its own position (what its per-row ``pos`` is for), sampled as
    ``slm.sample.generate`` samples. A row ends at ``stop_token`` (``ended``; not in its ids),
    after ``max_new_tokens`` tokens, or when its context window (``block_size``) is full: no
    context shift, so every token is written seeing the whole opening. Ended rows leave the
    batch. (``generate`` takes prompts of one length only; grouping by length would make one
    batch per length, most of them of one row.)"""
    config, device = model.config, next(model.parameters()).device
    T = config.block_size
    autocast, dtype = inference_autocast(device)
    dtype = dtype or next(model.parameters()).dtype
    out: list[tuple[list[int], bool]] = [([], False) for _ in prompts]
    limits = [min(max_new_tokens, T - len(p)) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        with autocast:
            cache = KVCache(config, len(prompts), device, dtype)
            logits = []
            for b, p in enumerate(prompts):  # prefill row b: a view of it as a cache of one
                row = copy.copy(cache)
                row.k, row.v = [k[b : b + 1] for k in cache.k], [v[b : b + 1] for v in cache.v]
                row.pos = 0
                idx = torch.tensor([list(p)], device=device)
                logits.append(model(idx, cache=row, last_only=True)[0][:, -1])
            logits = torch.cat(logits)
            pos = torch.tensor([len(p) for p in prompts], device=device)  # each row's next slot
            rows = list(range(len(prompts)))  # the prompt of each row still in the batch
            while rows:
                tok = _next_token(logits, temperature, top_k, top_p, generator)
                alive = []
                for j, (b, t) in enumerate(zip(rows, tok.tolist())):
                    if t == stop_token:
                        out[b] = (out[b][0], True)
                        continue
                    out[b][0].append(t)
                    if len(out[b][0]) < limits[b]:
                        alive.append(j)
                if not alive:
                    break
                if len(alive) < len(rows):  # drop the ended rows from the batch
                    keep = torch.tensor(alive, device=device)
                    rows, tok, pos = [rows[j] for j in alive], tok[keep], pos[keep]
                    cache.k, cache.v = [k[keep] for k in cache.k], [v[keep] for v in cache.v]
                logits = model.decode(tok[:, None], pos, cache)
                pos = pos + 1
    finally:
        model.train(was_training)
    return out


def complete(model: GPT, tok, openings: Sequence[Opening], s: Settings) -> list[dict]:
    """One record per completion: each opening greedily, then ``s.samples`` times sampled
    (one seeded generator for the whole run), with the completion's measures. All the
    openings of a mode are one batch (``complete_batch``; ``MAX_BATCH`` rows at most)."""
    prompts = [_prompt(tok, o, model.config.block_size) for o in openings]
    generator = torch.Generator().manual_seed(s.seed)
    modes = [("greedy", 1, 0.0)] + ([("sampled", s.samples, s.temperature)] if s.samples else [])
    records = []
    for mode, copies, temperature in modes:
        rows = [(i, sample) for i in range(len(openings)) for sample in range(copies)]
        done = []
        for k in range(0, len(rows), MAX_BATCH):
            chunk = [prompts[i] for i, _ in rows[k : k + MAX_BATCH]]
            done += complete_batch(
                model, chunk, s.max_new_tokens, temperature, s.top_k, s.top_p, generator,
                tok.eot_id,
            )  # fmt: skip
        for (i, sample), (ids, ended) in zip(rows, done):
            o, text = openings[i], tok.decode(ids)
            share, carried, dropped = carryover(o.text, text)
            records.append({
                "opening_index": i, "story": o.story, "mode": mode, "sample": sample,
                "opening": o.text, "completion": text, "ended": ended, "tokens": len(ids),
                "limit": min(s.max_new_tokens, model.config.block_size - len(prompts[i])),
                "words": len(words(text)), "repeat_4gram": repeat_rate(text, 4),
                "carryover": share, "carried": carried, "dropped": dropped,
            })  # fmt: skip
    return records


@torch.inference_mode()
def continuation_loss(model: GPT, tok, openings: Sequence[Opening]) -> list[tuple[float, int]]:
    """Per opening, the model's mean loss (nats per token) on the true continuation and its
    end-of-text id, given ``<|endoftext|>`` + the opening, and how many tokens that is
    (cut at ``block_size``; (nan, 0) when the opening fills the window)."""
    device = next(model.parameters()).device
    autocast, _ = inference_autocast(device)
    T = model.config.block_size
    was_training = model.training
    model.eval()
    out = []
    try:
        for o in openings:
            head = _prompt(tok, o, T)
            ids = (head + tok.encode(o.continuation) + [tok.eot_id])[: T + 1]
            n = len(ids) - len(head)
            if n <= 0:
                out.append((math.nan, 0))
                continue
            x = torch.tensor([ids[:-1]], device=device)
            y = torch.tensor([ids[1:]], device=device)
            y[:, : len(head) - 1] = -100  # the opening's own tokens are not scored
            with autocast:
                _, loss = model(x, y)
            out.append((loss.item(), n))
    finally:
        model.train(was_training)
    return out


def summarize(records: Sequence[dict], losses: Sequence[tuple[float, int]]) -> dict:
    """The suite's numbers: ``continuation_loss`` (token-weighted over the openings) and,
    per mode, the measures of its completions (module docstring)."""
    n = sum(c for _, c in losses)
    out: dict = {
        "openings": len(losses),
        "continuation_loss": sum(v * c for v, c in losses if c) / n if n else None,
    }
    for mode in MODES:
        rs = [r for r in records if r["mode"] == mode]
        if not rs:
            continue
        texts = [r["completion"] for r in rs]
        out[mode] = {
            "completions": len(rs),
            **{f"distinct_{k}": distinct_n(texts, k) for k in (1, 2, 3)},
            "repeat_4gram": _mean(r["repeat_4gram"] for r in rs),
            "eot_rate": _mean(r["ended"] for r in rs),
            "words": _mean(r["words"] for r in rs),
            "carryover": _mean(r["carryover"] for r in rs),
        }
    return out


def flat(summary: dict) -> dict[str, float]:
    """The summary's numbers by their ``COLUMNS`` name (those it has)."""
    out = {"continuation_loss": summary.get("continuation_loss")}
    for mode in MODES:
        for key, value in summary.get(mode, {}).items():
            out[f"{mode}_{key}"] = value
    judge = summary.get("judge") or {}
    out["judge_parse_failures"] = judge.get("parse_failures")
    out["judge_request_failures"] = judge.get("request_failures")
    return {k: out[k] for k in COLUMNS if isinstance(out.get(k), (int, float))}


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """The records, one JSON object a line, written whole (a temporary file, then renamed)."""
    try:
        files.write_jsonl(path, records)
    except OSError as e:
        raise ConfigError(
            f"cannot write the completions to {path} ({e.strerror}); choose another file "
            "with stories_out=PATH"
        ) from e


def completions_path(ckpt: str | Path) -> Path:
    """Where the completions of ``ckpt``'s model go: ``<name>.stories.jsonl`` beside it
    (``slm.pt`` -> ``slm.stories.jsonl``; a transformers dir ``my-model`` ->
    ``my-model.stories.jsonl``)."""
    ckpt = Path(ckpt).expanduser()
    return ckpt.parent / f"{ckpt.stem if ckpt.is_file() else ckpt.name}.stories.jsonl"


# -- the judge -------------------------------------------------------------------------------


class JudgeUnavailable(SlmError):
    """No answer from the judge after the retries (timeouts, refused connections, 5xx)."""


class MalformedReply(SlmError):
    """An answer that is not a chat completion (not JSON, or no message in it)."""


def load_rubric(path: str | Path | None) -> str:
    """The rubric prompt: ``{opening}`` and ``{completion}`` are filled in for each
    completion (other braces are left alone)."""
    path = Path(path).expanduser() if path else DEFAULT_RUBRIC
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"suite.rubric={path}: cannot read it ({e.strerror})") from e
    if "{completion}" not in text:
        raise ConfigError(
            f"suite.rubric={path} has no {{completion}} placeholder: the judge would not see "
            "the story; add {opening} and {completion} where they belong"
        )
    return text


def judge_prompt(rubric: str, opening: str, completion: str) -> str:
    values = {"opening": opening.strip(), "completion": completion.strip()}
    return re.sub(r"\{(opening|completion)\}", lambda m: values[m[1]], rubric)


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def _score(value) -> float | None:
    if isinstance(value, str):
        m = re.match(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$", value)
        value = float(m[1]) if m else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 1 <= value <= 10 else None


def parse_grades(reply: str) -> dict[str, dict] | None:
    """``{criterion: {"score", "reason"}}`` for the four criteria, from a judge's reply: a JSON
    object (anywhere in the reply: code fences and prose around it are fine) of
    ``{"grammar": {"score": 7, "reason": "..."}, ...}`` or ``{"grammar": 7, ...}``, else
    lines like ``Grammar: 7/10 - reason``. None unless all four have a score in [1, 10]."""
    for obj in _json_objects(reply):
        lower = {str(k).lower(): v for k, v in obj.items()}
        grades = {}
        for g in GRADES:
            v = lower.get(g)
            score = _score(v.get("score") if isinstance(v, dict) else v)
            if score is not None:
                reason = v.get("reason", "") if isinstance(v, dict) else ""
                grades[g] = {"score": score, "reason": str(reason)}
        if len(grades) == len(GRADES):
            return grades
    grades = {}
    for g in GRADES:
        m = re.search(
            rf"^\W*{g}\W*?(\d+(?:\.\d+)?)\s*(?:/\s*10)?(?:\s*[-–—:.,;]\s*|\s+)?(.*)$",
            reply, re.IGNORECASE | re.MULTILINE,
        )  # fmt: skip
        if m and _score(float(m[1])) is not None:
            grades[g] = {"score": float(m[1]), "reason": m[2].strip()}
    return grades if len(grades) == len(GRADES) else None


class EndpointJudge:
    """An OpenAI-compatible server: ``POST {url}/chat/completions`` (stdlib HTTP), at
    temperature 0. ``url`` is the base URL as the openai client takes it
    (``http://host:port/v1``; a bare ``http://host:port`` gets ``/v1``)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        timeout: float = 60,
        retries: int = 2,
        max_tokens: int = 300,
        api_key: str | None = None,
    ) -> None:
        base = url.rstrip("/")
        if urllib.parse.urlsplit(base).path == "":
            base += "/v1"
        self.url, self.timeout, self.retries, self.max_tokens = base, timeout, retries, max_tokens
        self.api_key = api_key
        self.model = model or self._first_model()

    def _request(self, path: str, body: dict | None = None) -> dict:
        """One request, retried ``retries`` times after a timeout, a refused connection or a
        5xx/429 answer (waiting 0.25 s, 0.5 s, ... between tries)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        error: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2 ** (attempt - 1), 8.0))
            request = urllib.request.Request(self.url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:  # the request itself is wrong: no retry
                    detail = e.read()[:200].decode("utf-8", "replace")
                    raise JudgeUnavailable(
                        f"{self.url}{path} answered HTTP {e.code}: {detail}"
                    ) from None
                error = e
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
                error = e
            else:
                try:
                    return json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise MalformedReply(f"not JSON ({first_line(e)}): {raw[:200]!r}") from e
        reason = getattr(error, "reason", None) or error
        raise JudgeUnavailable(
            f"no answer from {self.url}{path} after {self.retries + 1} tries "
            f"(timeout {self.timeout} s): {type(reason).__name__}: {first_line(reason)}"
        )

    def _first_model(self) -> str:
        try:
            return str(self._request("/models")["data"][0]["id"])
        except (MalformedReply, JudgeUnavailable, KeyError, IndexError, TypeError) as e:
            raise ConfigError(
                f"judge={self.url}: could not list its models ({first_line(e)}); check that the "
                "server runs there, or name the model with suite.judge_model=NAME"
            ) from e

    def complete(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        answer = self._request("/chat/completions", body)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise MalformedReply(f"no choices[0].message.content in {str(answer)[:200]}") from None
        if not isinstance(content, str):
            raise MalformedReply(f"choices[0].message.content is {type(content).__name__}")
        return content

    def __str__(self) -> str:
        return f"{self.url} ({self.model})"


class LocalJudge:
    """A ``transformers`` causal LM directory, loaded from local files only, greedy; the
    prompt goes through the tokenizer's chat template when it has one."""

    def __init__(self, path: str | Path, device: str | torch.device, max_tokens: int = 300):
        from slm.export import _import  # transformers is the hf extra

        transformers = _import("transformers")
        self.path, self.max_tokens = Path(path), max_tokens
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype="auto"
            )
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"judge={path}: not a transformers causal LM ({first_line(e)})"
            ) from e
        self.model.to(device).eval()
        self.device = device
        c = self.model.config
        self.context = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 0)

    @torch.inference_mode()
    def complete(self, prompt: str) -> str:
        tok = self.tok
        if getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        else:
            ids = tok(prompt, return_tensors="pt").input_ids
        if self.context and ids.size(1) + self.max_tokens > self.context:
            raise ConfigError(
                f"judge={self.path}: the rubric prompt ({ids.size(1)} tokens) and "
                f"suite.judge_max_tokens={self.max_tokens} do not fit its context of "
                f"{self.context} tokens; use a judge with a longer context or a shorter rubric"
            )
        ids = ids.to(self.device)
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_tokens,
            do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )  # fmt: skip
        return tok.decode(out[0, ids.size(1) :], skip_special_tokens=True)

    def __str__(self) -> str:
        return str(self.path)


def is_url(target: str) -> bool:
    return str(target).startswith(("http://", "https://"))


def make_judge(target: str, suite: DictConfig, device: str | torch.device = "cpu"):
    """The judge ``judge=`` names: an ``http(s)://`` base URL or a transformers directory."""
    if is_url(target):
        key_env = suite.judge_api_key_env
        return EndpointJudge(
            str(target), suite.judge_model, suite.judge_timeout, suite.judge_retries,
            suite.judge_max_tokens, os.environ.get(key_env) if key_env else None,
        )  # fmt: skip
    return LocalJudge(Path(str(target)).expanduser(), device, suite.judge_max_tokens)


def judge_records(judge, rubric: str, records: list[dict], workers: int = 1) -> dict:
    """Grade every record with ``judge`` (adds ``record["judge"]``: the grades, or the error
    and the reply), and sum up: per mode the mean of each criterion over the graded
    completions and of the four (``judge_mean``), and the failures. The first completion is
    graded alone: a judge that does not answer it at all stops here (``JudgeUnavailable``)."""

    def grade(record: dict) -> tuple[dict, str | None]:
        prompt = judge_prompt(rubric, record["opening"], record["completion"])
        try:
            reply = judge.complete(prompt)
        except JudgeUnavailable as e:
            return {"error": one_line(e)}, "request"
        except MalformedReply as e:
            return {"error": f"malformed answer: {one_line(e)}"}, "parse"
        grades = parse_grades(reply)
        if grades is None:
            return {"error": "no four 1-10 scores in the reply", "reply": reply[:2000]}, "parse"
        return grades, None

    if not records:
        return {"judge": str(judge), "judged": 0, "parse_failures": 0, "request_failures": 0}
    first = grade(records[0])
    if first[1] == "request":
        raise JudgeUnavailable(f"judge {judge}: {first[0]['error']}")
    results = [first]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results += list(_progress(pool.map(grade, records[1:]), len(records) - 1, "judging"))
    for record, (grades, _) in zip(records, results):
        record["judge"] = grades
    failures = [kind for _, kind in results]
    return {
        "judge": str(judge),
        "judged": failures.count(None),
        "parse_failures": failures.count("parse"),
        "request_failures": failures.count("request"),
    }


def judge_means(records: Sequence[dict], mode: str) -> dict[str, float | None]:
    graded = [r["judge"] for r in records if r["mode"] == mode and "error" not in r["judge"]]
    means = {g: _mean(x[g]["score"] for x in graded) for g in GRADES}
    overall = _mean(_mean(x[g]["score"] for g in GRADES) for x in graded)
    return {**{f"judge_{g}": v for g, v in means.items()}, "judge_mean": overall}


def _progress(items, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=" stories", disable=None, file=sys.stderr)


# -- the suite -------------------------------------------------------------------------------


def check(cfg: DictConfig) -> None:
    """``stories``, ``judge`` and ``suite.*`` as the suite needs them (a ``ConfigError`` for
    the first wrong one), before any work starts: a typo is caught at a run's start, not at
    its end."""
    n, s = cfg.get("stories", 0), cfg.suite
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"stories={n} must be an integer >= 0 (0 = no story suite)")
    opening = s.opening
    if opening != "sentence" and (
        isinstance(opening, bool) or not isinstance(opening, int) or opening < 1
    ):
        raise ConfigError(f"suite.opening={opening} must be sentence or a number of words >= 1")
    for key in ("samples", "seed"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 0:
            raise ConfigError(f"suite.{key}={s[key]} must be an integer >= 0")
    try:
        check_sampling(s.max_new_tokens or 1, s.temperature, s.top_k, s.top_p)
    except ValueError as e:
        raise ConfigError(f"suite.{e}") from None
    if s.max_new_tokens is not None and s.max_new_tokens < 1:
        raise ConfigError(
            f"suite.max_new_tokens={s.max_new_tokens} must be >= 1, or null for block_size"
        )
    if s.samples and s.temperature == 0:
        raise ConfigError(
            "suite.temperature=0 makes the sampled completions greedy ones; set a temperature "
            "> 0, or suite.samples=0 for greedy completions only"
        )
    judge = cfg.get("judge")
    if not judge:
        return
    for key in ("judge_timeout", "judge_retries", "judge_max_tokens", "judge_workers"):
        v, bound = s[key], ">= 0" if key == "judge_retries" else "> 0"
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or v < 0 or (v == 0 and bound == "> 0"):
            raise ConfigError(f"suite.{key}={v} must be a number {bound}")
    if not is_url(judge):
        path = Path(str(judge)).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"judge={judge} is neither an http(s):// URL of an OpenAI-compatible server nor "
                "a transformers model directory (with config.json)"
            )
    load_rubric(s.rubric)


def run(
    model: GPT,
    tok,
    stories: Sequence[str],
    n: int,
    suite: DictConfig,
    out: str | Path,
    judge: str | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> dict:
    """The suite: ``n`` openings from ``stories``, completed by ``model`` (ids <-> text by
    ``tok``), measured; the records written to ``out`` (jsonl); graded by ``judge`` if given.
    Returns the summary (``summarize``, plus the judge's, the settings and the timings).
    ``strict=False`` records a judge that fails in the summary (``judge.error``) instead of
    raising: what the end of a training run wants."""
    s = Settings.from_cfg(suite, model.config.block_size)
    openings = pick_openings(stories, n, s.seed, s.opening)
    grader = rubric = judge_error = None
    if judge:  # loaded (or asked for its model) before the generation: a wrong one fails fast
        try:
            rubric = load_rubric(suite.rubric)
            grader = make_judge(judge, suite, device)
        except SlmError as e:
            if strict:
                raise
            judge_error = e
    t0 = time.perf_counter()
    records = complete(model, tok, openings, s)
    losses = continuation_loss(model, tok, openings)
    for r in records:
        loss, _ = losses[r["opening_index"]]
        r["continuation_loss"] = None if math.isnan(loss) else loss
    summary = summarize(records, losses)
    summary["settings"] = {**dataclasses.asdict(s), "tokenizer": tok.name}
    summary["generate_seconds"] = round(time.perf_counter() - t0, 3)
    out = Path(out)
    write_jsonl(out, records)  # the completions are kept, whatever the judge does
    summary["completions_file"] = str(out)
    if grader is not None:
        t0 = time.perf_counter()
        workers = suite.judge_workers if isinstance(grader, EndpointJudge) else 1
        try:
            summary["judge"] = judge_records(grader, rubric, records, workers)
        except SlmError as e:
            if strict:
                raise
            judge_error = e
        else:
            for mode in MODES:
                if mode in summary:
                    summary[mode].update(judge_means(records, mode))
            write_jsonl(out, records)
        summary["judge_seconds"] = round(time.perf_counter() - t0, 3)
    if judge_error is not None:
        summary["judge"] = {"judge": str(judge), "error": one_line(judge_error)}
    return summary
