"""The LLM judge of the story suite (``judge=PATH_OR_URL``).

Each completion is sent, inside the rubric prompt (a file, ``conf/judge_rubric.txt`` by
default), to an OpenAI-compatible chat-completions endpoint (llama.cpp, vLLM, Ollama) or a
local ``transformers`` causal LM directory, which answers with a 1-10 score and a one-line
reason for grammar, consistency, creativity and plot (the TinyStories paper's criteria).
Replies without the four scores are counted, not fatal.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from omegaconf import DictConfig

from slm.errors import ConfigError, SlmError, first_line, one_line
from slm.measures import mean

GRADES = ("grammar", "consistency", "creativity", "plot")
DEFAULT_RUBRIC = Path(__file__).resolve().parent.parent / "conf" / "judge_rubric.txt"


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
    (``http://host:port/v1``; a bare ``http://host:port`` gets ``/v1``). ``workers``: how many
    requests it is sent at once."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        timeout: float = 60,
        retries: int = 2,
        max_tokens: int = 300,
        api_key: str | None = None,
        workers: int = 1,
    ) -> None:
        base = url.rstrip("/")
        if urllib.parse.urlsplit(base).path == "":
            base += "/v1"
        self.url, self.timeout, self.retries, self.max_tokens = base, timeout, retries, max_tokens
        self.api_key, self.workers = api_key, workers
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

    workers = 1  # one model in this process: one prompt at a time

    def __init__(self, path: str | Path, device: str | torch.device, max_tokens: int = 300):
        from slm.hf import require  # transformers is the hf extra

        transformers = require("transformers")
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
            suite.judge_workers,
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
    means = {g: mean(x[g]["score"] for x in graded) for g in GRADES}
    overall = mean(mean(x[g]["score"] for g in GRADES) for x in graded)
    return {**{f"judge_{g}": v for g, v in means.items()}, "judge_mean": overall}


def _progress(items, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=" stories", disable=None, file=sys.stderr)
