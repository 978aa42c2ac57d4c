"""Generate stories from a trained checkpoint (``slm.pt`` or a Lightning ``.ckpt``), with the
tokenizer it embeds.

    python generate.py ckpt=outputs/run/slm.pt
    python generate.py ckpt=PATH prompt="Once upon a time" max_new_tokens=200 \
        temperature=0.8 top_k=200 top_p=0.95 num_samples=3 seed=1337 device=auto compile=auto

Text goes to stdout (the first sample streams as it is produced; the others, generated in the
same batch, follow when it is done), a summary and warnings to stderr. Bad arguments and bad
checkpoints give a one-line ``error: ...`` on stderr and exit code 1. See conf/generate.yaml.
"""

from __future__ import annotations

import codecs
import sys
import time
import warnings

import hydra
import torch
from omegaconf import DictConfig

from slm.checkpoint import load_model, load_tokenizer
from slm.config import Inference, check_added_keys, resolve_inference
from slm.errors import report
from slm.sample import generate, warm_up
from slm.sampling import check_sampling
from slm.weights import pack


def validate(cfg: DictConfig) -> Inference:
    """The device to run on, whether to compile the decode step and the weights' format;
    ``ValueError`` (one line) for the first bad argument. Runs before the checkpoint is read,
    so a typo fails at once."""
    check_added_keys(cfg)  # +key=value that nothing would read (Hydra's hint for a typo)
    plan = resolve_inference(cfg, "python generate.py ckpt=PATH (a slm.pt or .ckpt)")
    check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_samples)
    if cfg.seed is not None and (not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool)):
        raise ValueError(f"seed={cfg.seed} must be an integer, or null for a random draw")
    return plan


def run(cfg: DictConfig) -> int:
    """Generate as ``cfg`` says; the exit code."""
    out, err = sys.stdout, sys.stderr
    try:
        device, compile, weights = validate(cfg)
        model = pack(load_model(cfg.ckpt, device), weights)  # CheckpointError: a ValueError
        tok = load_tokenizer(cfg.ckpt)  # an SlmError for gpt2 offline without the BPE files
    except ValueError as e:
        return report(e)
    # Hydra reads prompt=123 as an int and prompt=null as None.
    prompt = "" if cfg.prompt is None else str(cfg.prompt)
    n = cfg.num_samples
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device).manual_seed(cfg.seed)

    # A token can end inside a multi-byte character: decode bytes incrementally.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_token(i: int, t: int) -> None:
        if i == 0:
            out.write(utf8.decode(tok.token_bytes(t)))
            out.flush()

    def header(i: int) -> None:
        if n > 1:
            out.write(f"--- sample {i + 1}/{n} ---\n")

    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kwargs: print(
            f"warning: {message}", file=err
        )
        compile_s = 0.0
        if compile:  # before the text: the once-per-process cost apart from the decode rate
            t0 = time.perf_counter()
            warm_up(model, n)
            compile_s = time.perf_counter() - t0
        ids, block = tok.encode(prompt), model.config.block_size
        if len(ids) > block:  # said before the text starts, where it is seen
            kept = tok.decode(ids[-block:])
            print(
                f"warning: the prompt has {len(ids)} tokens, more than the model's context "
                f"(block_size={block}): the stories continue from its last {block} tokens "
                f"only, {len(kept)} of its {len(prompt)} characters, from {kept[:24]!r}",
                file=err,
            )
            ids = ids[-block:]
        header(0)
        out.write(prompt)
        out.flush()
        t0 = time.perf_counter()
        try:
            samples = generate(
                model,
                ids,
                cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                num_samples=n,
                generator=generator,
                on_token=on_token,
                stop_token=tok.eot_id,
                compile=compile,
            )
        except KeyboardInterrupt:
            out.write("\n")
            print("interrupted", file=err)
            return 130
        seconds = time.perf_counter() - t0
    out.write(utf8.decode(b"", final=True) + "\n")
    for i in range(1, n):
        header(i)
        out.write(prompt + tok.decode(samples[i]) + "\n")
    out.flush()
    tokens = sum(len(s) for s in samples)
    compiled = f", compiled (compile {compile_s:.1f} s, once per process)" if compile else ""
    print(
        f"{n} sample(s), {tokens} new tokens in {seconds:.2f} s "
        f"({tokens / max(seconds, 1e-9):,.1f} tokens/s) on {device}, {weights} weights{compiled}",
        file=err,
    )
    return 0


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    code = run(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # a non-UTF-8 terminal must not end the run
        sys.stdout.reconfigure(errors="replace")
    main()
