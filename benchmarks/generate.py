"""Decode speed, side by side: slm's weight formats (eager and compiled) against transformers'
``generate`` on the exported model and llama.cpp on a GGUF of the same weights.

    python benchmarks/generate.py                        # model=small, batch 1, 1 thread
    python benchmarks/generate.py --arch modern          # RoPE, RMSNorm, SwiGLU, QK-norm
    python benchmarks/generate.py --batch 8 --sides slm  # slm only, batch 8
    python benchmarks/generate.py --device cuda          # on a GPU

The same randomly initialised model (``conf/model/<model>.yaml``, seed 1337: speed does not
depend on the weights), greedy, no stop at <|endoftext|>: every side makes exactly the same
number of new tokens, as many as fit the context after the prompt (no context shift, which
transformers does not have). Decode tokens/s = (new tokens - 1) / (the time for all of them -
the time for one, i.e. the prefill). The sides run in interleaved rounds (``--rounds``), so a
shared machine's load falls on all of them alike; each side's median and min over the rounds
are printed, with its ratio to slm fp32 eager (the median of the per-round ratios).

The weight-read bound: decoding at batch 1 reads every weight once per token, so no side can
beat (read bandwidth) / (bytes of weights read per token). The bandwidth is measured here
(the best of summing a 1 GiB tensor on the same threads, before and after the rounds); each
side's bytes per token are its own (its format's weights; the token embedding read a row at a
time unless it is the lm_head). Each side's share of its bound is printed.

Sides: ``slm`` (``--weights``, ``--modes``), ``transformers`` (the hf extra; the export of
``slm.hf``), ``llama.cpp`` (where ``llama_cpp`` is importable: ``pip install
llama-cpp-python``; GGUFs written by ``slm.gguf``, ``--gguf-types``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name
from omegaconf import OmegaConf

from slm import tokenizer
from slm.model import GPT, GPTConfig
from slm.precision import resolve_device
from slm.sample import generate, warm_up
from slm.weights import pack, weight_bytes

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"
ARCHS = {
    "gpt2": {},
    "modern": dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True),
}


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of the best of 5 sums of a 1 GiB fp32 tensor on ``device``."""
    x = torch.ones(2**28, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Side:
    """One way of decoding: ``run(n)`` makes ``n`` greedy tokens after the prompt."""

    name: str
    bytes_per_token: int

    def run(self, n: int) -> list[int]:
        raise NotImplementedError


class Slm(Side):
    def __init__(self, model: GPT, fmt: str, compile: bool, prompt: torch.Tensor) -> None:
        import copy

        self.model = pack(copy.deepcopy(model), fmt)
        self.compile, self.prompt = compile, prompt
        self.name = f"slm {fmt} {'compiled' if compile else 'eager'}"
        self.bytes_per_token = weight_bytes(self.model)
        if compile:
            warm_up(self.model, prompt.size(0))

    def run(self, n: int) -> list[int]:
        out = generate(self.model, self.prompt, n, temperature=0, stop_token=None,
                       compile=self.compile)  # fmt: skip
        return out[0]


class Transformers(Side):
    def __init__(self, model: GPT, tok, prompt: torch.Tensor, directory: Path) -> None:
        import transformers

        from slm import hf

        hf.write_model_dir(directory, model, tok)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        self.model.to(prompt.device)
        self.prompt, self.name = prompt, "transformers fp32"
        self.bytes_per_token = weight_bytes(model)

    @torch.inference_mode()
    def run(self, n: int) -> list[int]:
        ids = self.model.generate(
            self.prompt, attention_mask=torch.ones_like(self.prompt), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        return ids[0, self.prompt.size(1) :].tolist()


class LlamaCpp(Side):
    def __init__(self, path: Path, gguf_type: str, prompt: list[int], n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
            n_threads_batch=threads, verbose=False,
        )  # fmt: skip
        self.prompt, self.name = prompt, f"llama.cpp {gguf_type}"
        self.bytes_per_token = gguf_bytes_per_token(path)

    def run(self, n: int) -> list[int]:
        out = []
        for t in self.llm.generate(self.prompt, top_k=1, temp=0.0, reset=True):
            out.append(t)
            if len(out) == n:
                break
        return out


def gguf_bytes_per_token(path: Path) -> int:
    """The bytes of a GGUF's tensors one decode step reads (all but a token embedding that
    the lm_head does not share, which is read a row at a time; the position embedding)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    skip = {"position_embd.weight"}
    if "output.weight" in tensors:
        skip.add("token_embd.weight")
    return sum(b for name, b in tensors.items() if name not in skip)


def timed(side: Side, n: int, device: torch.device) -> tuple[float, list[int]]:
    sync(device)
    t0 = time.perf_counter()
    out = side.run(n)
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="a conf/model/*.yaml name")
    p.add_argument("--arch", default="gpt2", choices=ARCHS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=None, help="default: what fits the context")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every side")
    p.add_argument("--sides", nargs="+", default=["slm", "transformers", "llama.cpp"])
    p.add_argument("--weights", nargs="+", default=["fp32", "bf16", "fp16", "int8"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    p.add_argument("--gguf-types", nargs="+", default=["f32", "f16", "q8_0"])
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model" / f"{args.model}.yaml"))
    config = GPTConfig(**base, **ARCHS[args.arch])
    torch.manual_seed(1337)
    model = GPT(config).to(device).eval()
    tok = tokenizer.gpt2()
    ids = tok.encode(PROMPT)
    n = args.new_tokens or config.block_size - len(ids)
    prompt = torch.tensor([ids] * args.batch, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"model={args.model} arch={args.arch} ({model.num_params()['total'] / 1e6:.1f}M "
          f"parameters, block_size {config.block_size}), batch {args.batch}, {n} new tokens "
          f"from {PROMPT!r}, greedy")  # fmt: skip
    print(f"device: {device} ({where}), torch {torch.__version__}, {args.threads} thread(s)")

    sides: list[Side] = []
    tmp = tempfile.TemporaryDirectory(prefix="slm-bench-")
    if "slm" in args.sides:
        for mode in args.modes:
            for fmt in args.weights:
                t0 = time.perf_counter()
                sides.append(Slm(model, fmt, mode == "compiled", prompt))
                if mode == "compiled":
                    print(f"{sides[-1].name}: compiled in {time.perf_counter() - t0:.1f} s")
    if "transformers" in args.sides and importlib.util.find_spec("transformers"):
        sides.append(Transformers(model, tok, prompt, Path(tmp.name) / "hf"))
    if "llama.cpp" in args.sides and device.type == "cpu" and args.batch == 1:
        if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("slm.gguf"):
            from slm import gguf

            for t in args.gguf_types:
                path = Path(tmp.name) / f"model-{t}.gguf"
                gguf.write(path, model, tok, t)
                sides.append(LlamaCpp(path, t, ids, config.block_size, args.threads))
        else:
            print("llama.cpp: not measured (pip install llama-cpp-python)")

    bandwidth = [read_bandwidth(device)]
    rates: dict[str, list[float]] = {s.name: [] for s in sides}
    tokens: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for side in sides:
            side.run(2)  # caches, lazy initialisation
            t1, _ = timed(side, 1, device)
            tn, out = timed(side, n, device)
            rates[side.name].append(args.batch * (n - 1) / max(tn - t1, 1e-9))
            tokens.setdefault(side.name, out)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()),
              flush=True)  # fmt: skip
    bandwidth.append(read_bandwidth(device))
    bw = max(bandwidth)
    print(f"read bandwidth: {bandwidth[0] / 1e9:.1f} / {bandwidth[1] / 1e9:.1f} GB/s "
          "(before / after)")  # fmt: skip
    first = sides[0].name if sides else ""
    print(f"\n| side | tokens/s median (min) | x {first} | weight bytes/token | bound tokens/s "
          "| share of bound | greedy tokens as the first |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side in sides:
        v = rates[side.name]
        ratio = statistics.median(a / b for a, b in zip(v, rates[first]))
        bound = bw / side.bytes_per_token * args.batch
        same = sum(a == b for a, b in zip(tokens[side.name], tokens[first]))
        print(f"| {side.name} | {statistics.median(v):,.1f} ({min(v):,.1f}) | {ratio:.2f}x | "
              f"{side.bytes_per_token / 1e6:.1f} MB | {bound:,.0f} | "
              f"{statistics.median(v) / bound:.0%} | {same}/{n} |")  # fmt: skip
    tmp.cleanup()


if __name__ == "__main__":
    main()
