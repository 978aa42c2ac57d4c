"""slm's models in llama.cpp: GGUF exports (``python -m slm.export format=gguf``) run by the
real llama.cpp (llama-cpp-python, one thread), against slm itself (fp32 on the CPU).

    python benchmarks/gguf_export.py --data DIR --ckpt RUN/slm.pt [--ckpt RUN2/slm.pt ...]

For each checkpoint, exported as f32, f16 and q8_0:

1. tokenization: llama.cpp's ids (special tokens not parsed, as slm reads every text) against
   slm's for the whole of each shared TinyStories piece (``--text``);
2. greedy: ``--tokens`` new tokens from ``<|endoftext|>`` + ``--prompt`` by llama.cpp (each
   file with llama.cpp's default float16 KV cache, and the f32 file with a float32 one; the
   argmax of each step's logits fed back) and by ``slm.sample.generate`` (temperature 0, not
   stopping at ``<|endoftext|>``): how many agree, the first that does not, and how far apart
   slm's top two logits were there;
3. held-out text: ``--windows`` windows of ``block_size`` tokens evenly spaced over
   ``DIR/val.bin`` (the data dir the model was trained on), each scored from position 0: the
   largest |logit difference| to slm's and the share of positions with the same top token
   (f32), and the loss (nats/token) of slm and of each file, all with llama.cpp's default
   float16 KV cache; then the f32 file's largest difference with a float32 KV cache, and for
   GPT-2 also to slm with llama.cpp's tanh GELU in place of its exact one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import cpu_name

from slm import export
from slm.checkpoint import load_model, load_tokenizer
from slm.hf import hf_family
from slm.sample import generate

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "tinystories"
PIECES = ("TinyStories-train.head-2MiB.txt", "TinyStoriesV2-GPT4-train.head-10000-lines.txt")
TYPES = ("f32", "f16", "q8_0")
F32_CACHE = dict(type_k=0, type_v=0)  # a float32 KV cache (ggml type 0), not llama.cpp's f16


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def measure(ckpt: Path, data: Path, args, llama_cpp, tmp: Path) -> dict:
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    c = model.config
    row: dict = {"ckpt": str(ckpt), "tokenizer": tok.describe(), "block_size": c.block_size}
    paths = {}
    for kind in TYPES:
        paths[kind] = export.export(ckpt, tmp / f"{kind}.gguf", format="gguf", gguf_type=kind)
        row[f"{kind}_MB"] = round(paths[kind].stat().st_size / 1e6, 2)
    row["arch"] = hf_family(c)

    def llama(kind: str, **kw):
        return llama_cpp.Llama(str(paths[kind]), n_threads=1, verbose=False, **kw)

    # 1. tokenization of real text
    llm = llama("f32", vocab_only=True)
    for name in args.text:
        text = (SHARED / name).read_text(encoding="utf-8")
        ours = tok.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        same = sum(a == b for a, b in zip(ours, theirs))
        row[f"tokens_{name[:15]}"] = f"{same:,} of {len(ours):,} equal ({len(theirs):,})"
    llm.close()

    # 2. greedy
    prompt = [tok.eot_id, *tok.encode(args.prompt)]
    n = min(args.tokens, c.block_size - len(prompt))
    with torch.no_grad():
        ours = generate(model, prompt, n, temperature=0, stop_token=None)[0]
    for kind, cache in [("f32", {}), ("f32", F32_CACHE), ("f16", {}), ("q8_0", {})]:
        llm = llama(kind, n_ctx=c.block_size, logits_all=True, **cache)
        theirs = llama_greedy(llm, prompt, n)
        llm.close()
        name = f"greedy_{kind}" + ("_kv_f32" if cache else "")
        diverge = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        row[name] = f"{sum(a == b for a, b in zip(ours, theirs))} of {n} equal"
        row[f"{name}_first_difference"] = diverge
        if diverge is not None:  # how close slm's top two were there
            with torch.no_grad():
                top = model(torch.tensor([prompt + ours]))[0][0, len(prompt) + diverge - 1]
            first, second = top.topk(2).values.tolist()
            row[f"{name}_slm_top2_gap_there"] = first - second
    row["greedy_text"] = tok.decode(ours[:60])
    llm = llama("f32", n_ctx=c.block_size, logits_all=True)

    # 3. held-out windows
    val = np.memmap(data / "val.bin", dtype=np.uint16, mode="r")
    T = c.block_size
    starts = np.linspace(0, len(val) - T - 1, args.windows).astype(int)
    windows = [torch.from_numpy(val[s : s + T + 1].astype(np.int64)) for s in starts]
    with torch.no_grad():
        slm_logits = [model(w[None, :-1])[0][0] for w in windows]
    targets = torch.cat([w[1:] for w in windows])
    row["loss_slm"] = F.cross_entropy(torch.cat(slm_logits), targets).item()

    def max_difference(logits, ref) -> float:
        return max((a - b).abs().max().item() for a, b in zip(logits, ref))

    for kind in TYPES:  # llama.cpp's defaults: a float16 KV cache
        if kind != "f32":
            llm.close()
            llm = llama(kind, n_ctx=T, logits_all=True)
        logits = [llama_logits(llm, w[:-1].tolist()) for w in windows]
        row[f"loss_{kind}"] = F.cross_entropy(torch.cat(logits), targets).item()
        if kind == "f32":
            top = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, slm_logits)])
            row["top1_agreement_f32"] = top.float().mean().item()
            row["max_logit_difference_f32"] = max_difference(logits, slm_logits)
    llm.close()
    # The f32 file with a float32 KV cache: what is left is the computation's.
    llm = llama("f32", n_ctx=T, logits_all=True, **F32_CACHE)
    logits = [llama_logits(llm, w[:-1].tolist()) for w in windows]
    row["max_logit_difference_f32_kv_f32"] = max_difference(logits, slm_logits)
    if row["arch"] == "gpt2":  # slm with llama.cpp's tanh GELU: is that the difference?
        tanh = load_model(ckpt)
        for block in tanh.transformer.h:
            block.mlp.gelu = torch.nn.GELU(approximate="tanh")
        with torch.no_grad():
            ref = [tanh(w[None, :-1])[0][0] for w in windows]
        row["max_logit_difference_f32_kv_f32_vs_slm_tanh_gelu"] = max_difference(logits, ref)
    llm.close()
    for kind in ("f16", "q8_0"):
        row[f"{kind}_vs_f32"] = f"{(row[f'loss_{kind}'] / row['loss_f32'] - 1) * 100:+.3f}%"
    row["positions"] = len(targets)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", required=True, help="a slm.pt (repeatable)")
    p.add_argument(
        "--data", action="append", required=True,
        help="the data dir each --ckpt was trained on (one, or one per --ckpt)",
    )  # fmt: skip
    p.add_argument("--text", nargs="*", default=list(PIECES), help="TinyStories pieces")
    p.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily.")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    args = p.parse_args()
    import llama_cpp

    torch.set_num_threads(1)
    data = args.data * len(args.ckpt) if len(args.data) == 1 else args.data
    print(json.dumps({"machine": cpu_name(), "cpus": os.cpu_count(),
                      "load": os.getloadavg(), "torch": torch.__version__,
                      "llama_cpp_python": llama_cpp.__version__,
                      "python": platform.python_version()}))  # fmt: skip
    for ckpt, d in zip(args.ckpt, data):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(Path(ckpt), Path(d), args, llama_cpp, Path(tmp))
        row["seconds"] = round(time.perf_counter() - start, 1)
        row["load"] = os.getloadavg()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
