"""The story suite's LLM judge (slm.judge): the rubric, the parsing of grades, the endpoint
judge through a real local HTTP server (a stub in the OpenAI format), grades in a whole
evaluation run, and a tiny transformers model exported by slm.export as a local judge."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import cfg_with

from slm import judge as jd
from slm import stories
from slm.checkpoint import save_slm_pt
from slm.errors import ConfigError
from slm.evaluate import main as evaluate_main
from slm.model import GPT, GPTConfig
from slm.prepare import prepare


def suite_cfg(*overrides: str):
    return cfg_with(*overrides).suite


# -- the rubric ------------------------------------------------------------------------------


def test_rubric_needs_the_completion(tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Grade this story.")
    with pytest.raises(ConfigError, match=r"has no \{completion\} placeholder"):
        jd.load_rubric(rubric)
    text = jd.load_rubric(None)  # conf/judge_rubric.txt
    prompt = jd.judge_prompt(text, " Once.", " Then {opening} {x}. ")
    assert "Once. *** Then {opening} {x}." in prompt  # filled once; other braces stay
    assert '{"grammar": {"score": 7' in prompt


# -- the judge -------------------------------------------------------------------------------

GRADED = {
    "grammar": {"score": 8, "reason": "Fluent."},
    "consistency": {"score": 6, "reason": "Keeps Lily."},
    "creativity": {"score": 5, "reason": "Plain."},
    "plot": {"score": 7, "reason": "Ends well."},
}


def test_parse_grades():
    expected = {k: {"score": float(v["score"]), "reason": v["reason"]} for k, v in GRADED.items()}
    assert jd.parse_grades(json.dumps(GRADED)) == expected
    fenced = f"Here you go:\n```json\n{json.dumps(GRADED, indent=2)}\n```\nHope it helps."
    assert jd.parse_grades(fenced) == expected
    flat = {"Grammar": 8, "Consistency": "6/10", "Creativity": 5, "Plot": 7.0}
    assert [v["score"] for v in jd.parse_grades(json.dumps(flat)).values()] == [8, 6, 5, 7]
    lines = "Grammar: 8/10 - fluent\nConsistency: 6 - keeps Lily\n**Creativity**: 5\nPlot: 7/10"
    grades = jd.parse_grades(lines)
    assert [v["score"] for v in grades.values()] == [8, 6, 5, 7]
    assert grades["grammar"]["reason"] == "fluent"
    assert jd.parse_grades(json.dumps({**GRADED, "plot": {"score": 11}})) is None  # not 1-10
    assert jd.parse_grades(json.dumps({k: GRADED[k] for k in ("grammar", "plot")})) is None
    assert jd.parse_grades("A lovely story!") is None


class StubJudge:
    """An OpenAI-compatible server on 127.0.0.1 in a thread: ``GET /v1/models`` and
    ``POST /v1/chat/completions``, the latter answering each request with the next step of
    ``script``: ``grades`` (GRADED, in a code fence), ``prose`` (no scores), ``broken`` (a
    body that is not JSON), ``slow`` (answers after 1 s) or ``500``."""

    def __init__(self, script: list[str]) -> None:
        self.script, self.requests = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"data": [{"id": "stub-judge"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, body, self.headers.get("Authorization")))
                step = stub.script.pop(0) if stub.script else "grades"
                if step == "slow":
                    time.sleep(1.0)
                if step == "500":
                    return self._send(500, b'{"error": "overloaded"}')
                if step == "broken":
                    return self._send(200, b'{"choices": [')
                content = "What a lovely story!" if step == "prose" else (
                    f"```json\n{json.dumps(GRADED)}\n```"
                )  # fmt: skip
                answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                with contextlib.suppress(OSError):  # the client gave up (a timeout)
                    self._send(200, json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> StubJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def records_for(n: int) -> list[dict]:
    return [
        {"mode": "greedy" if i % 2 == 0 else "sampled", "opening": f"Tom had {i} cats.",
         "completion": f" They played {i} games."}
        for i in range(n)
    ]  # fmt: skip


def test_endpoint_judge_counts_malformed_answers_and_retries_timeouts(monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    script = ["grades", "prose", "broken", "slow", "grades", "500", "grades", "slow", "slow"]
    with StubJudge(script) as stub:
        suite = suite_cfg(
            "suite.judge_timeout=0.3", "suite.judge_retries=1",
            "suite.judge_api_key_env=STUB_KEY", "suite.judge_max_tokens=50",
        )  # fmt: skip
        judge = jd.make_judge(stub.url.removesuffix("/v1"), suite)  # a bare host gets /v1
        assert judge.model == "stub-judge"  # the first of GET /v1/models
        records = records_for(6)
        summary = jd.judge_records(judge, jd.load_rubric(None), records, workers=1)
    # grades | prose | broken | slow -> retried: grades | 500 -> retried: grades | slow, slow
    assert summary == {
        "judge": f"{stub.url} (stub-judge)",
        "judged": 3, "parse_failures": 2, "request_failures": 1,
    }  # fmt: skip
    kinds = [("error" not in r["judge"], r["judge"].get("error", "")[:20]) for r in records]
    assert kinds == [
        (True, ""), (False, "no four 1-10 scores "), (False, "malformed answer: no"),
        (True, ""), (True, ""), (False, "no answer from http:"),
    ]  # fmt: skip
    assert records[1]["judge"]["reply"] == "What a lovely story!"
    assert records[0]["judge"]["grammar"] == {"score": 8.0, "reason": "Fluent."}
    path, body, auth = stub.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub-judge", 0, 50)
    assert "Tom had 0 cats. *** They played 0 games." in body["messages"][0]["content"]
    assert len(stub.requests) == 9  # every step used: the retries were made
    means = jd.judge_means(records, "greedy")  # records 0 and 4 graded (2 failed)
    assert means == {"judge_grammar": 8, "judge_consistency": 6, "judge_creativity": 5,
                     "judge_plot": 7, "judge_mean": 6.5}  # fmt: skip


def test_endpoint_judge_that_does_not_answer_is_one_line(unused_url):
    with pytest.raises(ConfigError, match=r"could not list its models .*suite.judge_model=NAME"):
        jd.make_judge(unused_url, suite_cfg("suite.judge_retries=0"))
    judge = jd.make_judge(unused_url, suite_cfg("suite.judge_retries=0", "suite.judge_model=m"))
    with pytest.raises(jd.JudgeUnavailable, match=r"no answer from .* after 1 tries"):
        jd.judge_records(judge, jd.load_rubric(None), records_for(2))


@pytest.fixture
def unused_url() -> str:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_port
    server.server_close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("stories")
    names = ["Tom", "Lily", "Ben", "Mia"]
    text = [
        f"{names[i % 4]} had a red ball. {names[i % 4]} threw the ball to {i} friends. The end."
        for i in range(80)
    ]
    src = d / "s.txt"
    src.write_text("\n<|endoftext|>\n".join(text) + "\n")
    prepare(str(src), d / "data", val_fraction=0.25)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(config)
        save_slm_pt(d / f"m{seed}.pt", config, model.state_dict(), step=0)
    return d


def test_evaluate_with_stories_and_a_judge(prepared, capsys):
    """python -m slm.evaluate ... stories=3 judge=URL: the loss, the suite's numbers, the
    completions file with the grades; the same openings for another checkpoint."""
    d = prepared
    args = [f"data.dir={d / 'data'}", "stories=3", "suite.max_new_tokens=6", "device=cpu",
            "suite.judge_workers=1"]  # fmt: skip
    with StubJudge(["grades", "prose"]) as stub:
        result = evaluate_main([f"ckpt={d / 'm0.pt'}", *args, f"judge={stub.url}"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    s = result["stories"]
    assert s["openings"] == 3 and s["greedy"]["completions"] == s["sampled"]["completions"] == 3
    assert s["settings"]["max_new_tokens"] == 6 and s["settings"]["temperature"] == 0.8
    assert s["judge"] == {
        "judge": f"{stub.url} (stub-judge)",
        "judged": 5, "parse_failures": 1, "request_failures": 0,
    }  # fmt: skip
    assert s["greedy"]["judge_mean"] == 6.5 and s["sampled"]["judge_plot"] == 7
    assert len(stub.requests) == 6
    lines = (d / "m0.stories.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert s["completions_file"] == str(d / "m0.stories.jsonl") and len(records) == 6
    assert [r["mode"] for r in records] == ["greedy"] * 3 + ["sampled"] * 3
    assert records[0]["judge"]["plot"]["score"] == 7 and "error" in records[1]["judge"]
    for r in records:
        assert r["opening"].endswith(".") and r["tokens"] <= 6
        assert 0 < r["continuation_loss"] < 20
    # Another checkpoint: the same openings, other completions; no judge, no judge numbers.
    other = evaluate_main([f"ckpt={d / 'm1.pt'}", *args])["stories"]
    assert "judge" not in other and "judge_mean" not in other["greedy"]
    records1 = [json.loads(x) for x in (d / "m1.stories.jsonl").read_text().splitlines()]
    assert [r["opening"] for r in records1] == [r["opening"] for r in records]
    assert [r["completion"] for r in records1] != [r["completion"] for r in records]


def test_local_transformers_judge(prepared, tmp_path):
    """A tiny transformers model exported by slm.export: prompted, greedy, its (random)
    answers counted as parse failures; a rubric longer than its context is one line."""
    pytest.importorskip("transformers")
    from slm.export import export

    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=640)
    torch.manual_seed(0)
    save_slm_pt(tmp_path / "judge.pt", config, GPT(config).state_dict(), step=0)
    judge_dir = export(tmp_path / "judge.pt", tmp_path / "judge")
    stories.check(cfg_with(f"judge={judge_dir}"))
    judge = jd.make_judge(str(judge_dir), suite_cfg("suite.judge_max_tokens=5"))
    prompt = jd.judge_prompt(jd.load_rubric(None), "Tom had a cat.", " It was black.")
    reply = judge.complete(prompt)
    assert isinstance(reply, str) and reply == judge.complete(prompt)  # greedy
    records = records_for(2)
    summary = jd.judge_records(judge, jd.load_rubric(None), records)
    assert (summary["judged"], summary["parse_failures"]) == (0, 2)
    rubric = jd.load_rubric(None)
    assert records[0]["judge"]["reply"] == judge.complete(
        jd.judge_prompt(rubric, records[0]["opening"], records[0]["completion"])
    )  # the reply kept for reading
    judge.max_tokens = 400
    with pytest.raises(ConfigError, match=r"do not fit its context of 640 tokens"):
        judge.complete(prompt)
