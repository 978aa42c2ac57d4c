"""Story-quality evaluation: the model completes story openings taken from held-out stories,
and the completions are measured (``slm.measures``) and, on demand, graded by an LLM judge
(``slm.judge``).

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

The numbers (``summarize``; README, Story evaluation), per decoding mode: ``distinct_n``
(n = 1, 2, 3) over all the completions of the mode together (low when the model says the same
things in every story); ``repeat_4gram``, the share of a completion's 4-grams that repeat an
earlier one (high when a story loops); ``eot_rate``, the share of completions that end with
``<|endoftext|>`` within the token limit; ``words``, their mean length in words;
``carryover``, the share of the opening's names and nouns that the completion uses again
(the last three averaged over the completions). Once per opening, ``continuation_loss``: the
model's loss (nats per token) on the true rest of the story, given the opening. The
completions go to a jsonl file beside the scores.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from slm import files
from slm.decode import Decoder
from slm.errors import ConfigError, DataError, SlmError, one_line
from slm.judge import (
    GRADES,
    is_url,
    judge_means,
    judge_records,
    load_rubric,
    make_judge,
)
from slm.measures import carryover, distinct_n, mean, repeat_rate, words
from slm.model import GPT
from slm.precision import eval_mode, inference_autocast
from slm.sampling import check_sampling, next_token

log = logging.getLogger(__name__)

MODES = ("greedy", "sampled")
MODE_KEYS = (
    "distinct_1", "distinct_2", "distinct_3", "repeat_4gram", "eot_rate", "words", "carryover",
    *(f"judge_{g}" for g in (*GRADES, "mean")),
)  # fmt: skip
# The flat names of every number (``flat``): the trackers' stories/NAME, sweep.csv columns.
COLUMNS = (
    "continuation_loss",
    *(f"{mode}_{key}" for mode in MODES for key in MODE_KEYS),
    "judge_parse_failures",
    "judge_request_failures",
)
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


def _limit(max_new_tokens: int, block_size: int, prompt: Sequence[int]) -> int:
    """How many tokens ``prompt`` may take: ``max_new_tokens``, or fewer where the context
    window (``block_size``) fills first."""
    return min(max_new_tokens, block_size - len(prompt))


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
    """``(new ids, ended)`` for prompts of any lengths, generated as one batch: a policy over
    the one decoder (``slm.decode``) in which each prompt is a group of one row, prefilled on
    its own, then every row takes one token a step at its own position, all drawn together
    from ``generator`` (``next_token``, as ``generate`` draws). A row ends at ``stop_token``
    (``ended``; not in its ids), after ``max_new_tokens`` tokens, or when its context window
    (``block_size``) is full: no context shift, so every token is written seeing the whole
    opening. Ended rows leave the batch. (``generate`` takes prompts of one length only;
    grouping by length would make one batch per length, most of them of one row.)"""
    T = model.config.block_size
    device = next(model.parameters()).device
    out: list[tuple[list[int], bool]] = [([], False) for _ in prompts]
    limits = [_limit(max_new_tokens, T, p) for p in prompts]
    decoder = Decoder(model, len(prompts))
    with decoder.running():
        seqs = [decoder.add(torch.tensor([list(p)], device=device)) for p in prompts]
        alive = list(range(len(prompts)))  # the prompts whose rows are still in the batch
        while alive:
            tok = next_token(
                torch.cat([seqs[b].logits for b in alive]), temperature, top_k, top_p, generator
            )
            going = []
            for j, (b, t) in enumerate(zip(alive, tok.tolist())):
                if t == stop_token:
                    out[b] = (out[b][0], True)
                else:
                    out[b][0].append(t)
                if t != stop_token and len(out[b][0]) < limits[b]:
                    going.append(j)
                else:
                    decoder.remove(seqs[b])
            decoder.advance([(seqs[alive[j]], tok[j : j + 1]) for j in going])
            alive = [alive[j] for j in going]
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
                "limit": _limit(s.max_new_tokens, model.config.block_size, prompts[i]),
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
    out = []
    with eval_mode(model):
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
            "repeat_4gram": mean(r["repeat_4gram"] for r in rs),
            "eot_rate": mean(r["ended"] for r in rs),
            "words": mean(r["words"] for r in rs),
            "carryover": mean(r["carryover"] for r in rs),
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
        try:
            summary["judge"] = judge_records(grader, rubric, records, grader.workers)
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
