"""Serving speed: 1, 4 and 8 concurrent streaming clients against ``python -m slm.serve``.

    python benchmarks/serve.py [--model small] [--clients 1 4 8] [--max-tokens 128] \
        [--rounds 2] [--repeats 3] [--device auto] [--compile | --no-compile] [--threads N] \
        [--greedy] [--weights fp32|bf16|fp16|int8]
    python benchmarks/serve.py --server llama.cpp [--gguf-type f32|f16|q8_0] ...

``--server llama.cpp`` runs llama-cpp-python's OpenAI-compatible server
(``pip install 'llama-cpp-python[server]'``) on a GGUF of the same weights (``slm.gguf``)
instead, with the same clients: the comparison users would make.

The server runs in its own process (as a user runs it) on a randomly initialised model
(``conf/model/<model>.yaml``, seed 1337: speed does not depend on the weights), saved to a
temporary ``slm.pt``. For each number of clients C, C threads each send ``--rounds`` streaming
requests one after the other (the same prompt, ``--max-tokens`` new tokens, the playground's
sampling: temperature 0.8, top-k 200, top-p 0.95, or ``--greedy``), all starting together.
Per level:

- aggregate tokens/s: all completion tokens (the final ``usage``) / the wall time from the
  first request sent to the last token received;
- time to first token (TTFT): from sending a request to its first text chunk, p50 and max;
- latency per token: the gaps between one request's consecutive chunks (one token each), p50
  and p99 over all requests;
- speed-up: aggregate tokens/s over that of 1 client.

A warm-up round runs first (the most clients, 8 tokens each): the first requests of a process
pay for lazy initialisation. The levels run ``--repeats`` times, interleaved, and each level's
best run is reported (a shared machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import torch
from common import cpu_name
from omegaconf import OmegaConf

from slm.checkpoint import save_slm_pt
from slm.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a little girl named Lily. She"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args) -> subprocess.Popen:
    """``python -m slm.serve`` on ``ckpt``, or with ``--server llama.cpp``, llama-cpp-python's
    OpenAI-compatible server on a GGUF of the same weights (``slm.gguf``, ``--gguf-type``)."""
    cmd = [sys.executable, "-m", "slm.serve", f"ckpt={ckpt}", f"port={port}"]
    cmd += [f"device={args.device}", f"max_batch={args.max_batch}", "api_key=null"]
    cmd.append(f"weights={args.weights}")
    if args.compile is not None:
        cmd.append(f"compile={str(args.compile).lower()}")
    if args.server == "llama.cpp":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(ckpt), "--port", str(port)]
        cmd += ["--model_alias", "slm", "--n_ctx", str(args.n_ctx)]
        if args.threads:
            cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become ready in 10 minutes")


def stream_one(url: str, body: dict) -> dict:
    """One streaming request: when it was sent, when each text chunk came, its tokens."""
    sent = time.perf_counter()
    arrivals, tokens = [], 0  # tokens: the usage's, or one per text chunk
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["text"] for c in chunk["choices"]):
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens or len(arrivals)}


def level(url: str, clients: int, rounds: int, body: dict) -> dict:
    barrier = threading.Barrier(clients)
    results: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        barrier.wait()
        for _ in range(rounds):
            r = stream_one(url, body)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["sent"] for r in results)
    end = max(r["arrivals"][-1] for r in results)
    ttft = [r["arrivals"][0] - r["sent"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    q = statistics.quantiles(gaps, n=100)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / (end - start),
        "ttft_p50": statistics.median(ttft),
        "ttft_max": max(ttft),
        "token_p50": q[49],
        "token_p99": q[98],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    p.add_argument("--repeats", type=int, default=3, help="runs of every level; the best counts")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    p.add_argument("--greedy", action="store_true", help="temperature 0 instead of sampling")
    p.add_argument("--weights", default="fp32", help="slm's weights= (fp32, bf16, fp16, int8)")
    p.add_argument("--server", default="slm", choices=["slm", "llama.cpp"])
    p.add_argument("--gguf-type", default="f32", help="llama.cpp: f32, f16 or q8_0")
    args = p.parse_args()

    config = GPTConfig(
        **OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{args.model}.yaml"))
    )
    torch.manual_seed(1337)
    model = GPT(config)
    sampling = {"temperature": 0} if args.greedy else {"temperature": 0.8, "top_p": 0.95}
    if not args.greedy:
        sampling["top_k"] = 200
    body = {"model": "slm", "prompt": PROMPT, "max_tokens": args.max_tokens, "stream": True}
    body |= {"stream_options": {"include_usage": True}, **sampling}
    with tempfile.TemporaryDirectory(prefix="slm-bench-serve-") as tmp:
        ckpt = Path(tmp) / "slm.pt"
        save_slm_pt(ckpt, config, model.state_dict(), step=0)
        args.n_ctx = config.block_size
        if args.server == "llama.cpp":
            from slm import gguf, tokenizer

            ckpt = Path(tmp) / f"slm-{args.gguf_type}.gguf"
            gguf.write(ckpt, model, tokenizer.gpt2(), args.gguf_type)
        port = free_port()
        t0 = time.perf_counter()
        server = start_server(ckpt, port, args)
        ready = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}"
        try:
            print(
                f"model={args.model} ({model.num_params()['total'] / 1e6:.1f}M parameters, "
                f"block_size {config.block_size}), {args.max_tokens} new tokens a request, "
                f"{args.rounds} requests per client, "
                f"{'greedy' if args.greedy else 'temperature 0.8, top-k 200, top-p 0.95'}"
            )
            what = (
                f"llama.cpp {args.gguf_type}" if args.server == "llama.cpp" else
                f"slm device={args.device} max_batch={args.max_batch} compile={args.compile} "
                f"weights={args.weights}"
            )  # fmt: skip
            print(
                f"server: {what} threads={args.threads or 'default'}, ready in {ready:.1f} s; "
                f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average before: "
                f"{os.getloadavg()[0]:.2f}"
            )
            level(url, max(args.clients), 1, body | {"max_tokens": 8})  # warm-up
            best: dict[int, dict] = {}
            for repeat in range(args.repeats):  # levels interleaved: a busy spell hits them all
                for clients in args.clients:
                    r = level(url, clients, args.rounds, body)
                    print(
                        f"  run {repeat + 1}, {clients} clients: {r['tokens_per_s']:,.1f} tokens/s",
                        flush=True,
                    )
                    if r["tokens_per_s"] > best.get(clients, {"tokens_per_s": 0})["tokens_per_s"]:
                        best[clients] = r
            print(
                f"best of {args.repeats}:\n"
                "| clients | requests | tokens | aggregate tokens/s | speed-up | TTFT p50 | "
                "TTFT max | token p50 | token p99 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            )
            base = None
            for clients in args.clients:
                r = best[clients]
                base = base or r["tokens_per_s"]
                print(
                    f"| {clients} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:,.1f} | "
                    f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50'] * 1e3:,.0f} ms | "
                    f"{r['ttft_max'] * 1e3:,.0f} ms | {r['token_p50'] * 1e3:,.1f} ms | "
                    f"{r['token_p99'] * 1e3:,.1f} ms |",
                    flush=True,
                )
            print(f"load average after: {os.getloadavg()[0]:.2f}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
