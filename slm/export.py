"""``python -m slm.export``: a trained model as a Hugging Face ``transformers`` directory, or
as one GGUF file for llama.cpp, Ollama and LM Studio.

    python -m slm.export ckpt=outputs/DATE/TIME/slm.pt out=my-model   # or a Lightning .ckpt
    python -m slm.export ckpt=... format=gguf gguf_type=q8_0 out=my-model.gguf

``format=hf`` (the default) writes a directory that loads offline with
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``: the
weights (safetensors), ``config.json``, ``generation_config.json``, the checkpoint's tokenizer
and a model card (``README.md``, from the run's ``metrics.json`` and Hydra config). The format,
both ways, is ``slm.hf``'s (which architectures export as which family); ``python train.py
init_from=DIR`` starts training from such a directory. Needs the ``hf`` extra.
``format=gguf`` writes ``out`` as one ``.gguf`` file, ``slm.gguf``'s format (``gguf_type``:
f32, f16, q8_0). Needs the ``gguf`` extra.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from slm import files, gguf, tokenizer
from slm.checkpoint import load_model, load_tokenizer, run_dir_of
from slm.errors import CheckpointError, ConfigError, SlmError, describe, run_cli
from slm.hf import FAMILIES, hf_family, require, write_model_dir
from slm.model import GPTConfig
from slm.tokenizer import EOT_ID, Tokenizer

FORMATS = ("hf", "gguf")


def export(
    ckpt: str | Path,
    out: str | Path,
    overwrite: bool = False,
    format: str = "hf",
    gguf_type: str = "f32",
) -> Path:
    """Write the model in ``ckpt`` (``slm.pt`` or Lightning ``.ckpt``) as a ``transformers``
    directory ``out`` (``format="hf"``) or as the GGUF file ``out`` (``format="gguf"``,
    ``gguf_type`` f32, f16 or q8_0). Either is built under a temporary name next to ``out``
    and renamed at the end: on any error ``out`` is left as it was. An existing ``out`` (a
    non-empty directory, a file) needs ``overwrite``."""
    if format not in FORMATS:  # both before the checkpoint is read
        raise ConfigError(f"format={format} is not one of {', '.join(FORMATS)}")
    if format == "gguf":
        gguf.check_type(gguf_type)
    ckpt, out = Path(ckpt).expanduser(), Path(out).expanduser()
    model = load_model(ckpt)  # CheckpointError: missing, foreign, truncated, inconsistent
    tok = load_tokenizer(ckpt)
    c = model.config
    if (c.vocab_size, c.eot_id) != (tok.vocab_size, tok.eot_id):
        raise CheckpointError(
            f"{ckpt}: the model's vocab_size={c.vocab_size}, eot_id={c.eot_id} are not those of "
            f"its tokenizer, {tok.describe()} ({tok.vocab_size}, {tok.eot_id})"
        )
    family = hf_family(c)  # a model that no family computes: refused before out is looked at
    if format == "gguf":
        return _export_gguf(model, tok, out, overwrite, gguf_type)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out={out} is not empty; pass overwrite=true to replace it")
    require("transformers")
    require("safetensors")
    try:
        new = files.NewDir(out)  # replaces out whole at the end, or leaves it as it was
    except OSError as e:
        raise ConfigError(
            f"out={out}: cannot write in {out.parent} ({e.strerror}); choose a directory you "
            "can write"
        ) from e
    with _written_whole(out, "directory"), new as tmp:
        params = write_model_dir(tmp, model, tok)
        (tmp / "README.md").write_text(model_card(ckpt, c, family, params, out.name, tok))
    return out


def _export_gguf(model, tok: Tokenizer, out: Path, overwrite: bool, gguf_type: str) -> Path:
    if out.is_dir():
        raise ConfigError(f"out={out} is a directory; format=gguf writes one file: pass FILE.gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"out={out} exists; pass overwrite=true to replace it")
    with _written_whole(out, "path"):
        gguf.write(out, model, tok, gguf_type)
    return out


@contextlib.contextmanager
def _written_whole(out: Path, kind: str) -> Iterator[None]:
    """An ``OSError`` in the block (a full disk, a folder turned read-only), where ``out`` is
    still as it was, as a one-line ``SlmError``; ``kind``: what to choose instead."""
    try:
        yield
    except OSError as e:
        raise SlmError(
            f"out={out}: writing failed ({describe(e)}); nothing was written to {out}, free "
            f"space or choose another {kind}"
        ) from e


def model_card(
    ckpt: Path, c: GPTConfig, family: str, params: int, name: str, tok: Tokenizer | None = None
) -> str:
    """A README.md for the exported directory, from the run's ``metrics.json`` and Hydra
    config where they sit next to the checkpoint; "unknown" where they do not."""
    run = run_dir_of(ckpt.resolve())
    metrics = files.read_json(run / "metrics.json")
    cfg = _yaml(run / ".hydra" / "config.yaml")
    overrides = _yaml(run / ".hydra" / "overrides.yaml")
    command = None
    if isinstance(overrides, list):
        command = " ".join(["python train.py", *map(shlex.quote, map(str, overrides))])
    data, split = None, None
    if isinstance(cfg, dict):
        d = cfg.get("data") or {}
        # meta.json names the source data.dir was prepared from (a relative data.dir is
        # relative to where training ran: found when the export runs there too).
        meta = files.read_json(Path(str(d.get("dir"))) / "meta.json")
        data = meta.get("source") or d.get("source") or f"what data.dir={d.get('dir')} held"
        split = (meta.get("splits") or {}).get("val")

    def fmt(x, spec: str = ".4f") -> str:
        return "unknown" if x is None else format(x, spec)

    best = metrics.get("best_val_loss")
    seen = "unknown"
    if metrics.get("tokens_seen") is not None:
        seen = f"{metrics['tokens_seen']:,} in {metrics.get('steps', 0):,} optimizer steps"
    bpb = None
    if best is not None and split and split.get("bytes"):
        bpb = best / math.log(2) * split["tokens"] / split["bytes"]
    if tok is None or tok.name == tokenizer.NAME:
        tok_line = f"GPT-2 BPE (tiktoken's gpt2 ranks); id {EOT_ID}, end of text, ends each story"
    else:
        tok_line = (
            f"byte-level BPE fitted to the training data by slm (`tokenizer=bpe`), "
            f"{tok.vocab_size:,} tokens; id {tok.eot_id}, end of text, ends each story"
        )
    arch = (
        f"{c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, context {c.block_size} "
        f"tokens; positions={c.positions}, norm={c.norm}, mlp={c.mlp}, qk_norm={c.qk_norm}, "
        f"tie_embeddings={c.tie_embeddings}, bias={c.bias}"
        + (f", rope_theta={c.rope_theta:g}" if c.positions == "rope" else "")
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [slm, tinystories]
---

# {name}

A small GPT trained with slm, exported by `python -m slm.export` as `{FAMILIES[family]}`.

| | |
| --- | --- |
| architecture | {arch} |
| parameters | {params:,} (embedding tied with lm_head: {c.tie_embeddings}) |
| tokenizer | {tok_line} |
| training data | {data or "unknown"} |
| tokens seen | {seen} |
| val loss (best) | {fmt(best)} nats/token |
| val perplexity | {fmt(math.exp(best) if best is not None else None, ".2f")} |
| val bits per byte | {fmt(bpb)} |
| exported from | `{ckpt.name}`; the run's status: {metrics.get("status", "unknown")} |

Trained with:

```
{command or "unknown"}
```

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
room = model.config.max_position_embeddings - ids.shape[1]  # the context: {c.block_size} tokens
out = model.generate(ids, max_new_tokens=min(200, room), do_sample=True, top_k=200)
print(tokenizer.decode(out[0]))
```

Continue training it with slm: `python train.py init_from={name}`.
"""


def _yaml(path: Path) -> dict | list | None:
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # absent or unreadable: the card says "unknown"
        return None


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    from slm.config import compose

    cfg = compose("export", sys.argv[1:] if argv is None else argv)
    try:
        ckpt, out = cfg.ckpt, cfg.out
    except MissingMandatoryValue as e:
        raise ConfigError(
            f"{e.full_key} is required: ckpt=PATH (slm.pt or .ckpt) out=DIR (or FILE.gguf with "
            "format=gguf)"
        ) from None
    if not isinstance(cfg.overwrite, bool):
        raise ConfigError(f"overwrite={cfg.overwrite} must be true or false")
    if cfg.format == "hf" and cfg.gguf_type is not None:  # export checks format and gguf_type
        raise ConfigError(f"gguf_type={cfg.gguf_type} is for format=gguf; add format=gguf")
    gguf_type = cfg.gguf_type or "f32"
    path = export(str(ckpt), str(out), cfg.overwrite, cfg.format, gguf_type)
    if cfg.format == "gguf":
        size = path.stat().st_size / 1e6
        print(
            f"wrote {path} ({gguf_type}, {size:.1f} MB): run it with llama.cpp, "
            f"llama-completion -m {shlex.quote(str(path))} -c 0 -p 'Once upon a time' "
            "(README: Run with llama.cpp and Ollama)"
        )
    else:
        print(f"wrote {path}: load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return path


if __name__ == "__main__":
    run_cli(main)
