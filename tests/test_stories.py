"""The story suite (slm.stories): each measure against hand-computed values, the openings,
EOT and length counting through the real sampler, and the judge through a real local HTTP
server (a stub in the OpenAI format) and a tiny transformers model exported by slm.export."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from slm import stories as st
from slm.config import compose
from slm.errors import ConfigError
from slm.evaluate import main as evaluate_main
from slm.model import GPT, GPTConfig
from slm.prepare import prepare
from slm.tokenizer import gpt2

LOOP = "the dog ran. the dog ran. the dog ran."
VARIED = "Lily found a red ball in the park."
OPENING = "Once upon a time, there was a little girl named Lily. She had a big red ball."


@functools.cache
def train_cfg():
    return compose("train")


def cfg_with(*overrides: str):
    """The training config with ``key=value`` overrides (composed once: Hydra is slow)."""
    cfg = train_cfg().copy()
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    return cfg


def suite_cfg(*overrides: str):
    return cfg_with(*overrides).suite


# -- measures --------------------------------------------------------------------------------


def test_distinct_n_and_repeats_by_hand():
    # LOOP: "the dog ran ." x3: 12 units (words and marks), 4 distinct; 11 bigrams, 4
    # distinct; 10 trigrams, 4 distinct; 9 4-grams, 4 distinct.
    assert st.units(LOOP) == ["the", "dog", "ran", "."] * 3
    assert st.distinct_n([LOOP], 1) == pytest.approx(4 / 12)
    assert st.distinct_n([LOOP], 2) == pytest.approx(4 / 11)
    assert st.distinct_n([LOOP], 3) == pytest.approx(4 / 10)
    assert st.repeat_rate(LOOP, 4) == pytest.approx(1 - 4 / 9)
    # VARIED: 9 distinct units, no repeated 4-gram.
    assert st.distinct_n([VARIED], 1) == 1.0 and st.repeat_rate(VARIED) == 0.0
    # Across completions: 21 units, "the" and "." in both: 4 + 9 - 2 = 11 distinct.
    assert st.distinct_n([LOOP, VARIED], 1) == pytest.approx(11 / 21)
    # A loop of line breaks has no words, but repeats: 7 4-grams, 1 distinct.
    assert st.words("\n" * 10) == [] and st.repeat_rate("\n" * 10) == pytest.approx(6 / 7)
    assert st.repeat_rate("too short") is None and st.distinct_n([""], 2) is None
    assert st.words("Don’t  go, Sam!") == ["don't", "go", "sam"]


def test_names_and_nouns_and_carryover_by_hand():
    # "a time" is filler, "little" an adjective before the noun, "She" a function word.
    assert st.names_and_nouns(OPENING) == ["girl", "Lily", "ball"]
    assert st.carryover(OPENING, OPENING) == (1.0, ["girl", "Lily", "ball"], [])
    # "balls" carries "ball" (either number), "lily" carries "Lily" (any case).
    share, carried, dropped = st.carryover(OPENING, "lily threw the balls to her dog.")
    assert (share, carried, dropped) == (pytest.approx(2 / 3), ["Lily", "ball"], ["girl"])
    assert st.carryover(OPENING, "She smiled.")[0] == 0.0
    assert st.carryover("It was sunny.", "It was sunny.") == (None, [], [])
    assert st.names_and_nouns("Tom and Sue saw the puppies.") == ["Tom", "Sue", "puppies"]
    # An adjective's ending before a noun is skipped; not before a verb.
    assert st.names_and_nouns("There was a clumsy rabbit.") == ["rabbit"]
    assert st.names_and_nouns("The puppy jumped on a bed.") == ["puppy", "bed"]
    assert st.carryover("Tom saw the puppies.", "Tom had a puppy.")[0] == 1.0


def test_split_opening():
    # A quote's "!" followed by "said" ends no sentence.
    assert st.split_opening('"Look!" said Tim. He ran.') == ('"Look!" said Tim.', " He ran.")
    assert st.split_opening("Mr. Brown had a cat. It was black.") == (
        "Mr. Brown had a cat.", " It was black."
    )  # fmt: skip
    assert st.split_opening("One day.\nTom smiled.") == ("One day.", "\nTom smiled.")
    assert st.split_opening("Only one sentence here.") is None
    assert st.split_opening("Tom and Sue went home.", 3) == ("Tom and Sue", " went home.")
    assert st.split_opening("Tom and Sue", 3) is None


def test_openings_come_from_the_token_file_and_are_seed_stable(tmp_path):
    stories = [f"Story {i} begins here. Then Tom saw {i} birds." for i in range(30)]
    stories[3] = "A story of one sentence only."  # no continuation: never an opening
    tok = gpt2()
    path = tmp_path / "val.bin"
    tok.encode_stories(stories).tofile(path)
    held_out = st.TokenStories(path, tok)
    assert list(held_out) == stories
    a = st.pick_openings(held_out, 29, seed=5)
    assert a == st.pick_openings(held_out, 29, seed=5)
    assert a != st.pick_openings(held_out, 29, seed=6)
    assert sorted(o.story for o in a) == [i for i in range(30) if i != 3]
    for o in a:
        assert o.text + o.continuation == stories[o.story]
        assert o.text == f"Story {o.story} begins here."
    assert len(st.pick_openings(held_out, 50, seed=5)) == 29  # all there are, with a warning
    first = st.pick_openings(held_out, 3, seed=5)
    assert first == a[:3]  # N openings are the first N of the same order


# -- generation: EOT and length counting through the real sampler ----------------------------


def counting_model(word: int, eot: int, P: int) -> GPT:
    """A GPT that writes ``word`` while predicting from positions < P, then the end of text:
    its residual stream is its position's embedding (one-hot), the blocks add nothing."""
    c = GPTConfig(n_layer=1, n_head=1, n_embd=64, block_size=64, tie_embeddings=False)
    model = GPT(c).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
        model.transformer.wpe.weight.copy_(10 * torch.eye(64))
        model.lm_head.weight[word, :P] = 10.0
        model.lm_head.weight[eot, P:] = 10.0
    return model


def test_eot_and_length_counting():
    tok = gpt2()
    the = tok.encode(" the")[0]
    model = counting_model(the, tok.eot_id, P=20)
    short, long = "Tom ran.", "Tom ran to the big old tree in the park."
    L_short, L_long = 1 + len(tok.encode(short)), 1 + len(tok.encode(long))  # + the EOT start
    openings = [st.Opening(0, short, " Home."), st.Opening(1, long, " Home.")]
    # The prediction for position L - 1 + k is the k-th new token: " the" while < P.
    n_short, n_long = 20 - L_short + 1, 20 - L_long + 1
    assert n_long < 12 < n_short
    s = st.Settings(samples=2, max_new_tokens=12, seed=0)
    records = st.complete(model, tok, openings, s)
    assert [(r["mode"], r["opening_index"], r["sample"]) for r in records] == [
        ("greedy", 0, 0), ("greedy", 1, 0),
        ("sampled", 0, 0), ("sampled", 0, 1), ("sampled", 1, 0), ("sampled", 1, 1),
    ]  # fmt: skip
    for r in records:
        n = 12 if r["opening_index"] == 0 else n_long  # the first hits the limit
        assert r["completion"] == " the" * n
        assert (r["tokens"], r["words"], r["ended"]) == (n, n, r["opening_index"] == 1)
    summary = st.summarize(records, [(1.0, 3), (2.0, 1)])
    assert summary["continuation_loss"] == pytest.approx((1.0 * 3 + 2.0 * 1) / 4)
    for mode in ("greedy", "sampled"):
        assert summary[mode]["eot_rate"] == 0.5
        assert summary[mode]["words"] == (12 + n_long) / 2
        assert summary[mode]["repeat_4gram"] == pytest.approx(
            ((12 - 3 - 1) / (12 - 3) + (n_long - 3 - 1) / (n_long - 3)) / 2
        )  # "the the the ..." of m words: m - 3 4-grams, one distinct
        words = (12 + n_long) * (1 if mode == "greedy" else 2)
        assert summary[mode]["distinct_1"] == pytest.approx(1 / words)  # all "the"


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_ragged_batch_writes_what_generate_writes_for_each_opening(positions):
    """All the openings in one batch, each at its own position (prefilled into its own cache
    row, then GPT.decode per row), give the tokens of generate() on each opening alone."""
    from slm.sample import generate

    tok = gpt2()
    torch.manual_seed(0)
    # Untied: a random GPT with a tied lm_head repeats its last token.
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=20, tie_embeddings=False)
    model = GPT(dataclasses.replace(config, positions=positions))
    texts = ["Tom ran.", "Once upon a time, there was a cat named Sam.", "Lily had a big red ball."]
    prompts = [[tok.eot_id, *tok.encode(t)] for t in texts]
    free = st.complete_batch(model, prompts, 10, 0.0, None, None, None, stop_token=-1)
    assert [len(ids) for ids, _ in free] == [10, 20 - len(prompts[1]), 10]  # the window ends
    stop = free[1][0][2]  # the third token of row 1 as the stop: row 1 ends, leaving the batch
    batch = st.complete_batch(model, prompts, 10, 0.0, None, None, None, stop_token=stop)
    assert batch[1] == (free[1][0][: free[1][0].index(stop)], True)
    for p, (ids, ended) in zip(prompts, batch):
        room = min(10, 20 - len(p))  # no context shift: the window's end is a limit too
        [alone] = generate(model, p, room, temperature=0, stop_token=stop)
        assert ids == alone
        assert ended == (len(ids) < room)
    assert not all(ended for _, ended in batch)  # the others went on without row 1


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_ragged_batch_under_cuda_like_autocast(monkeypatch):
    """The GPU path on the CPU: bf16 autocast and a bf16 cache, with rms_norm returning
    float32 as it does under CUDA autocast (CPU autocast does not): the prefill and the
    decode steps write float32 keys into the bf16 cache rows."""
    rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: rms_norm(*a, **k).float())
    bf16 = (torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16)
    monkeypatch.setattr(st, "inference_autocast", lambda device: bf16)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, norm="rmsnorm",
                       qk_norm=True, positions="rope")  # fmt: skip
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    out = st.complete_batch(GPT(config), prompts, 12, 0.8, 50, None, None, stop_token=-1)
    assert [len(ids) for ids, _ in out] == [12, 10]  # the window: 16 - 3, 16 - 6 -> at most 12


def test_unwritable_completions_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write the completions to .* stories_out=PATH"):
        st.write_jsonl(tmp_path / "file" / "s.jsonl", [{"a": 1}])


def test_continuation_loss_is_the_models_loss_on_the_true_rest():
    tok = gpt2()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    o = st.Opening(0, "Sam had a kite.", " It flew high. Sam was happy.")
    head = [tok.eot_id, *tok.encode(o.text)]
    ids = head + tok.encode(o.continuation) + [tok.eot_id]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    expected = F.cross_entropy(logits[0, len(head) - 1 :], torch.tensor(ids[len(head) :]))
    [(loss, n)] = st.continuation_loss(model, tok, [o])
    assert n == len(ids) - len(head)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    # Cut at block_size: a long rest is scored on the first 64 + 1 - len(head) tokens.
    long = st.Opening(0, o.text, " It flew high." * 40)
    assert st.continuation_loss(model, tok, [long])[0][1] == 65 - len(head)


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stories=-1"], r"^stories=-1 must be an integer >= 0"),
        (["suite.opening=0"], r"^suite.opening=0 must be sentence or a number of words"),
        (["suite.top_p=2"], r"^suite.top_p=2 must be in \(0, 1\]"),
        (["suite.temperature=0"], r"^suite.temperature=0 makes the sampled completions greedy"),
        (["judge=/no/such/dir"], r"^judge=/no/such/dir is neither an http\(s\):// URL"),
        (["judge=http://h/v1", "suite.judge_timeout=0"], r"^suite.judge_timeout=0 must be"),
        (["judge=http://h/v1", "suite.rubric=/no/rubric.txt"], r"^suite.rubric=/no/rubric.txt"),
    ],
)
def test_check_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        st.check(cfg_with(*overrides))


def test_rubric_needs_the_completion(tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Grade this story.")
    with pytest.raises(ConfigError, match=r"has no \{completion\} placeholder"):
        st.load_rubric(rubric)
    text = st.load_rubric(None)  # conf/judge_rubric.txt
    prompt = st.judge_prompt(text, " Once.", " Then {opening} {x}. ")
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
    assert st.parse_grades(json.dumps(GRADED)) == expected
    fenced = f"Here you go:\n```json\n{json.dumps(GRADED, indent=2)}\n```\nHope it helps."
    assert st.parse_grades(fenced) == expected
    flat = {"Grammar": 8, "Consistency": "6/10", "Creativity": 5, "Plot": 7.0}
    assert [v["score"] for v in st.parse_grades(json.dumps(flat)).values()] == [8, 6, 5, 7]
    lines = "Grammar: 8/10 - fluent\nConsistency: 6 - keeps Lily\n**Creativity**: 5\nPlot: 7/10"
    grades = st.parse_grades(lines)
    assert [v["score"] for v in grades.values()] == [8, 6, 5, 7]
    assert grades["grammar"]["reason"] == "fluent"
    assert st.parse_grades(json.dumps({**GRADED, "plot": {"score": 11}})) is None  # not 1-10
    assert st.parse_grades(json.dumps({k: GRADED[k] for k in ("grammar", "plot")})) is None
    assert st.parse_grades("A lovely story!") is None


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
        judge = st.make_judge(stub.url.removesuffix("/v1"), suite)  # a bare host gets /v1
        assert judge.model == "stub-judge"  # the first of GET /v1/models
        records = records_for(6)
        summary = st.judge_records(judge, st.load_rubric(None), records, workers=1)
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
    means = st.judge_means(records, "greedy")  # records 0 and 4 graded (2 failed)
    assert means == {"judge_grammar": 8, "judge_consistency": 6, "judge_creativity": 5,
                     "judge_plot": 7, "judge_mean": 6.5}  # fmt: skip


def test_endpoint_judge_that_does_not_answer_is_one_line(unused_url):
    with pytest.raises(ConfigError, match=r"could not list its models .*suite.judge_model=NAME"):
        st.make_judge(unused_url, suite_cfg("suite.judge_retries=0"))
    judge = st.make_judge(unused_url, suite_cfg("suite.judge_retries=0", "suite.judge_model=m"))
    with pytest.raises(st.JudgeUnavailable, match=r"no answer from .* after 1 tries"):
        st.judge_records(judge, st.load_rubric(None), records_for(2))


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
        pt = {"model_args": config.to_dict(), "model": model.state_dict()}
        torch.save(pt, d / f"m{seed}.pt")
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
    pt = {"model_args": config.to_dict(), "model": GPT(config).state_dict()}
    torch.save(pt, tmp_path / "judge.pt")
    judge_dir = export(tmp_path / "judge.pt", tmp_path / "judge")
    st.check(cfg_with(f"judge={judge_dir}"))
    judge = st.make_judge(str(judge_dir), suite_cfg("suite.judge_max_tokens=5"))
    prompt = st.judge_prompt(st.load_rubric(None), "Tom had a cat.", " It was black.")
    reply = judge.complete(prompt)
    assert isinstance(reply, str) and reply == judge.complete(prompt)  # greedy
    records = records_for(2)
    summary = st.judge_records(judge, st.load_rubric(None), records)
    assert (summary["judged"], summary["parse_failures"]) == (0, 2)
    rubric = st.load_rubric(None)
    assert records[0]["judge"]["reply"] == judge.complete(
        st.judge_prompt(rubric, records[0]["opening"], records[0]["completion"])
    )  # the reply kept for reading
    judge.max_tokens = 400
    with pytest.raises(ConfigError, match=r"do not fit its context of 640 tokens"):
        judge.complete(prompt)
