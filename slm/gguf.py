"""The GGUF format of llama.cpp (and Ollama, LM Studio, which run it): an slm GPT and its
tokenizer as one ``.gguf`` file, what ``python -m slm.export format=gguf`` writes, with the
``gguf`` package (llama.cpp's own Python writer; the ``gguf`` extra).

The architectures are ``slm.hf``'s families, which llama.cpp implements under the same names
(``hf_family`` decides and refuses for both formats): ``gpt2``, ``llama`` and ``qwen3``. The
tensors are the family's ``transformers`` tensors (``hf.to_hf``) under llama.cpp's names (the
``gguf`` package's map of them), in nn.Linear's (out, in) layout, with one change: llama.cpp's
``llama`` rotates the pairs (x[2i], x[2i+1]) of each head, where slm and transformers rotate
(x[i], x[i + d/2]) (``qwen3`` rotates those too: GPT-NeoX's RoPE), so a llama's query and key
rows are interleaved per head (``interleave_heads``) to compute the same attention. GPT-2's
zero biases where slm has none come with ``to_hf``; a tied ``lm_head`` is left out (llama.cpp
then reads the token embedding). GPT-2 in llama.cpp uses the tanh approximation of GELU, slm
the exact one: its logits differ slightly (``benchmarks/README.md``: gguf_export).

The tokenizer is GPT-2's kind for both of slm's (``tokenizer.ggml.model=gpt2``): the tokens
as byte-level text in id order, the merges in rank order (``tokenizer.byte_level_text``: the
pair tiktoken merges is the one llama.cpp merges), the ``gpt-2`` pre-tokenizer (the regex
both use), ``<|endoftext|>`` a control token, bos and eos, nothing added to a text. Read
with special tokens off (``llama_tokenize(..., parse_special=false)``), a literal
``<|endoftext|>`` in a text is plain text, as slm encodes it; llama.cpp's own programs parse
special tokens in a prompt (there the text is the token).

``gguf_type``: ``f32``, ``f16`` or ``q8_0`` for the 2-D weights but the position embedding;
norms and biases stay float32 (llama.cpp's converter's rule), and a q8_0 weight whose rows are
not a multiple of 32 values is stored as f16.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from slm import files, hf, tokenizer
from slm.errors import ConfigError
from slm.model import GPT, GPTConfig
from slm.tokenizer import Tokenizer

TYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's regex: both slm tokenizers split by it


def require_gguf() -> ModuleType:
    """The ``gguf`` package (the ``gguf`` extra), or a one-line error saying how to install."""
    return hf.require("gguf", extra="gguf")


def check_type(gguf_type: str) -> str:
    """``gguf_type`` itself, or a one-line ``ConfigError`` naming the choices."""
    if gguf_type not in TYPES:
        raise ConfigError(f"gguf_type={gguf_type} is not one of {', '.join(TYPES)}")
    return gguf_type


def interleave_heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head's (x[0..d/2), x[d/2..d)) halves reordered as pairs (x[i], x[i+d/2])
    side by side: the half-split RoPE layout (slm, transformers) as llama.cpp's ``llama``
    rotates it. Works on a weight (rows, in) and on a bias (rows,)."""
    rest = t.shape[1:]
    d = t.shape[0] // n_head
    return t.reshape(n_head, 2, d // 2, *rest).transpose(1, 2).reshape(t.shape)


def tensors(c: GPTConfig, state: dict[str, torch.Tensor], family: str) -> dict[str, np.ndarray]:
    """The model's tensors (``family``'s: ``hf.hf_family``) as llama.cpp names and lays them
    out, float32, in file order."""
    import gguf  # the package, which write has required

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], c.n_layer)
    out = {}
    for hf_name, t in hf.to_hf(c, state, family, conv1d=False).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # every name hf.layout makes is in llama.cpp's map
            raise AssertionError(f"no GGUF name for {hf_name}")
        if family == "llama" and name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                "attn_k.bias")):  # fmt: skip
            t = interleave_heads(t, c.n_head)
        out[name] = t.detach().to(torch.float32).cpu().numpy()
    return out


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str) -> str:
    """The type ``name`` is stored in: float32 for vectors (norms, biases) and the position
    embedding, else ``gguf_type``, f16 where q8_0's blocks of 32 do not fit a row."""
    if len(shape) < 2 or name.startswith("position_embd."):
        return "f32"
    if gguf_type == "q8_0" and shape[-1] % 32:
        return "f16"
    return gguf_type


def write(path: str | Path, model: GPT, tok: Tokenizer, gguf_type: str = "f32") -> None:
    """``model`` and ``tok`` as one GGUF file at ``path`` (written under a temporary name,
    then renamed: ``slm.files``). A model that llama.cpp does not compute is a one-line
    ``ConfigError`` (``hf.hf_family``), before anything is written; an ``OSError`` leaves
    ``path`` as it was."""
    gguf = require_gguf()
    check_type(gguf_type)
    c = model.config
    family = hf.hf_family(c)
    arrays = tensors(c, model.state_dict(), family)
    tokens, merges = tokenizer.byte_level_text(tok)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[tok.eot_id] = gguf.TokenType.CONTROL
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]  # fmt: skip

    def fill(w) -> None:
        w.add_name(Path(path).stem)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(c.vocab_size)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.mlp_hidden)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_head)
        if family == "gpt2":
            w.add_layer_norm_eps(hf.EPS)
        else:
            w.add_layer_norm_rms_eps(hf.EPS)
            w.add_rope_freq_base(c.rope_theta)
            w.add_rope_dimension_count(c.head_size)
            w.add_key_length(c.head_size)
            w.add_value_length(c.head_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.eot_id)
        w.add_eos_token_id(tok.eot_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        for name, a in arrays.items():
            kind = tensor_type(name, a.shape, gguf_type)
            data = gguf.quants.quantize(a, qtype[kind])
            w.add_tensor(name, data, raw_dtype=qtype[kind])

    def save(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, family)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    files.write_with(path, save)
