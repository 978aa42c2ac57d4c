"""The Hugging Face ``transformers`` format, both ways: an slm GPT and its tokenizer as a
``transformers`` directory (``write_model_dir``: what ``python -m slm.export`` writes), and
such a directory read back as a ``GPTConfig``, a state dict and a ``Tokenizer`` (``read_hf``,
``read_hf_tokenizer``: what ``init_from=DIR`` loads, through ``slm.checkpoint``).

Each architecture goes to the ``transformers`` family that computes the same function:

- learned positions + LayerNorm + GELU: ``GPT2LMHeadModel`` (Conv1D weights, exact GELU,
  zero biases where slm has none);
- RoPE + RMSNorm + SwiGLU: ``LlamaForCausalLM`` (same half-split rotation, eps, MLP layout);
- the same with ``qk_norm``: ``Qwen3ForCausalLM`` (RMSNorm on each head's queries and keys,
  before the rotation, as slm; OLMo 2 normalizes over all heads at once, another function).

Every other combination (ReLU^2, RoPE with LayerNorm, ...) is refused, naming the knob.
llama.cpp implements the same three (``slm.gguf`` writes them as GGUF), so ``hf_family``
decides for both formats.
The vocab padding (e.g. 50257 -> 50304 rows) is dropped on export and comes back as zero rows.
``transformers`` and ``safetensors`` are the ``hf`` extra (``require``).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from types import ModuleType

import torch

from slm import files, tokenizer
from slm.errors import CheckpointError, ConfigError, SlmError, first_line
from slm.model import GPT, GPTConfig
from slm.tokenizer import EOT, EOT_ID, VOCAB_SIZE, BPETokenizer, Tokenizer

log = logging.getLogger(__name__)
EPS = 1e-5  # slm's LayerNorm and RMSNorm eps (torch's LayerNorm default)
FAMILIES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
EXPORTABLE = (
    "learned+layernorm+gelu (GPT-2), rope+rmsnorm+swiglu (Llama), "
    "rope+rmsnorm+swiglu+qk_norm (Qwen 3)"
)


def require(name: str, extra: str = "hf") -> ModuleType:
    """The module ``name`` of an extra (``hf``: ``transformers``, ``safetensors``; ``gguf``:
    ``gguf``), or a one-line ``SlmError`` that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise SlmError(
            f'{name} is not installed ({first_line(e)}); pip install -e ".[{extra}]"'
        ) from e


# -- slm <-> the families --------------------------------------------------------------------


def hf_family(c: GPTConfig) -> str:
    """``gpt2``, ``llama`` or ``qwen3``: the family that computes what ``c`` does; a one-line
    ``ConfigError`` naming the knob where no family does."""

    def refuse(knob: str, why: str) -> ConfigError:
        return ConfigError(f"cannot export {knob}: {why}; exportable are {EXPORTABLE}")

    if c.mlp == "relu2":
        raise refuse(
            "model.mlp=relu2",
            "neither transformers nor llama.cpp has a family with ReLU^2 MLPs; train with "
            "model.mlp=swiglu to export (arch=modern's default: it exports as Qwen 3)",
        )
    if c.positions == "learned":  # GPT-2 is the one family with learned absolute positions
        if c.norm != "layernorm":
            raise refuse("model.norm=rmsnorm with model.positions=learned", "GPT-2 has LayerNorm")
        if c.mlp != "gelu":
            raise refuse(f"model.mlp={c.mlp} with model.positions=learned", "GPT-2 has GELU")
        if c.qk_norm:
            raise refuse("model.qk_norm=true with model.positions=learned", "GPT-2 has no QK-norm")
        return "gpt2"
    if c.norm != "rmsnorm":
        raise refuse("model.norm=layernorm with model.positions=rope", "Llama has RMSNorm")
    if c.mlp != "swiglu":
        raise refuse(f"model.mlp={c.mlp} with model.positions=rope", "Llama has SwiGLU")
    if c.qk_norm and c.bias:
        raise refuse("model.bias=true with model.qk_norm=true", "Qwen 3 has no MLP biases")
    return "qwen3" if c.qk_norm else "llama"


def hf_config(c: GPTConfig, family: str) -> dict:
    """The keyword arguments of the family's ``transformers`` config for ``c``."""
    common = dict(vocab_size=c.vocab_size, bos_token_id=c.eot_id, eos_token_id=c.eot_id)
    common["tie_word_embeddings"] = c.tie_embeddings
    if family == "gpt2":
        return dict(
            # n_ctx: GPT2Config's old name for n_positions; transformers no longer reads it,
            # llama.cpp's convert_hf_to_gguf.py needs it (KeyError: 'n_ctx' without it).
            **common, n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd,
            n_layer=c.n_layer, n_head=c.n_head, n_inner=None, layer_norm_epsilon=EPS,
            activation_function="gelu",  # exact (erf) GELU; GPT-2's default is the tanh one
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        )  # fmt: skip
    kwargs = dict(
        **common, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head, head_dim=c.head_size, hidden_act="silu",
        max_position_embeddings=c.block_size, rms_norm_eps=EPS, rope_theta=c.rope_theta,
        attention_bias=c.bias, attention_dropout=c.dropout,
    )  # fmt: skip
    if family == "llama":
        kwargs["mlp_bias"] = c.bias
    else:
        kwargs["use_sliding_window"] = False
    return kwargs


def layout(c: GPTConfig, family: str) -> list[tuple[str, tuple[str, ...]]]:
    """Each slm tensor and the family's tensors it is, split along dim 0 in that order (q, k,
    v of ``c_attn``; gate, up of SwiGLU's ``c_fc``). GPT-2's names are slm's own."""
    ends = ("weight", "bias") if c.bias else ("weight",)
    pairs: list[tuple[str, tuple[str, ...]]] = []
    if family == "gpt2":
        names = ["transformer.wte.weight", "transformer.wpe.weight"]
        for i in range(c.n_layer):
            for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                names += [f"transformer.h.{i}.{m}.{e}" for e in ends]
        names += [f"transformer.ln_f.{e}" for e in ends]
        pairs = [(n, (n,)) for n in names]
    else:
        pairs.append(("transformer.wte.weight", ("model.embed_tokens.weight",)))
        for i in range(c.n_layer):
            s, h = f"transformer.h.{i}", f"model.layers.{i}"
            pairs.append((f"{s}.ln_1.weight", (f"{h}.input_layernorm.weight",)))
            for e in ends:
                qkv = tuple(f"{h}.self_attn.{p}_proj.{e}" for p in "qkv")
                pairs.append((f"{s}.attn.c_attn.{e}", qkv))
                pairs.append((f"{s}.attn.c_proj.{e}", (f"{h}.self_attn.o_proj.{e}",)))
            if c.qk_norm:
                for n in ("q_norm", "k_norm"):
                    pairs.append((f"{s}.attn.{n}.weight", (f"{h}.self_attn.{n}.weight",)))
            pairs.append((f"{s}.ln_2.weight", (f"{h}.post_attention_layernorm.weight",)))
            for e in ends:
                gate_up = (f"{h}.mlp.gate_proj.{e}", f"{h}.mlp.up_proj.{e}")
                pairs.append((f"{s}.mlp.c_fc.{e}", gate_up))
                pairs.append((f"{s}.mlp.c_proj.{e}", (f"{h}.mlp.down_proj.{e}",)))
        pairs.append(("transformer.ln_f.weight", ("model.norm.weight",)))
    if not c.tie_embeddings:
        pairs.append(("lm_head.weight", ("lm_head.weight",)))
    return pairs


def _conv1d(family: str, name: str) -> bool:
    """GPT-2 stores its matmul weights as Conv1D, (in, out): the transpose of nn.Linear's."""
    return family == "gpt2" and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def to_hf(
    c: GPTConfig, state: dict[str, torch.Tensor], family: str, conv1d: bool = True
) -> dict[str, torch.Tensor]:
    """slm's state dict as the family's, without the vocab padding; GPT-2's biases are zeros
    where slm has none (LayerNorm and Linear with ``bias=False``). ``conv1d=False`` keeps
    GPT-2's matmul weights in nn.Linear's (out, in) layout, as GGUF stores them."""
    out: dict[str, torch.Tensor] = {}
    for name, hf_names in layout(c, family):
        t = state[name]
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[: c.vocab_size]
        if conv1d and _conv1d(family, name):
            t = t.t()
        for hf_name, part in zip(hf_names, t.chunk(len(hf_names), dim=0)):
            out[hf_name] = part.contiguous()
    if family == "gpt2" and not c.bias:
        for name in list(out):
            if name.endswith(".weight") and "wte" not in name and "wpe" not in name:
                # LayerNorm (C,); Conv1D (in, out) or Linear (out, in): out features
                width = out[name].shape[-1 if conv1d else 0]
                out[name.removesuffix("weight") + "bias"] = out[name].new_zeros(width)
    return out


# -- write -----------------------------------------------------------------------------------


def write_model_dir(directory: Path, model: GPT, tok: Tokenizer) -> int:
    """``model`` as its family's ``transformers`` model, with ``tok``, into the existing
    ``directory``: ``model.safetensors``, ``config.json``, ``generation_config.json`` and the
    tokenizer files (``write_tokenizer``). Returns the parameter count as ``transformers``
    counts it (tied weights once). A model that no family computes is a one-line
    ``ConfigError`` (``hf_family``)."""
    c = model.config
    family = hf_family(c)
    transformers = require("transformers")
    require("safetensors")
    config = transformers.AutoConfig.for_model(family, **hf_config(c, family))
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = to_hf(c, model.state_dict(), family)
    if c.tie_embeddings:  # the tied lm_head is in the model's state dict, not in the file
        state["lm_head.weight"] = state[layout(c, family)[0][1][0]]
    # strict: every tensor of the family's model is set, and nothing else.
    hf.load_state_dict(state, strict=True)
    hf.save_pretrained(directory)  # model.safetensors, config.json (tied lm_head saved once)
    transformers.GenerationConfig(
        bos_token_id=c.eot_id, eos_token_id=c.eot_id, pad_token_id=c.eot_id
    ).save_pretrained(directory)
    write_tokenizer(directory, tok, c.block_size)
    return sum(p.numel() for p in hf.parameters())


# A literal "<|endoftext|>" in a text is read as plain text, not as the special token: slm
# encodes every text so (encode_ordinary), and the model was trained on such text.
SPLIT_SPECIAL = True


def write_tokenizer(directory: str | Path, tok: Tokenizer, model_max_length: int) -> None:
    """``tok`` as Hugging Face tokenizer files in ``directory``, which
    ``AutoTokenizer.from_pretrained`` reads as a tokenizer that encodes and decodes as ``tok``
    does. A BPE: its ``tokenizer.json`` (a fast tokenizer); gpt2:
    GPT-2's own files (``GPT2Tokenizer``). ``<|endoftext|>`` is the bos and eos token, and a
    literal ``<|endoftext|>`` in a text is plain text (``split_special_tokens``), as slm
    encodes it and as the model saw it in training: give the token by its id
    (``tokenizer.eos_token_id``)."""
    if isinstance(tok, BPETokenizer):
        contents = _bpe_files(tok, model_max_length)
    else:
        contents = _gpt2_files(tok, model_max_length)
    for name, text in contents.items():
        (Path(directory) / name).write_text(text, encoding="utf-8")


def _gpt2_files(tok: Tokenizer, model_max_length: int) -> dict[str, str]:
    """The gpt2 encoding as the Hugging Face GPT-2 tokenizer files (``vocab.json``,
    ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``), built from
    tiktoken's own ranks (``tokenizer.byte_level_text``), so ``AutoTokenizer`` encodes as
    tiktoken does."""
    tokens, merges = tokenizer.byte_level_text(tok)
    vocab = {text: i for i, text in enumerate(tokens)}
    special = {"content": EOT, "lstrip": False, "normalized": True, "rstrip": False}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        # tiktoken decodes to the exact text; HF's clean-up would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": SPLIT_SPECIAL,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "added_tokens_decoder": {str(EOT_ID): {**special, "single_word": False, "special": True}},
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2
        )
        + "\n",
    }


def _bpe_files(tok: BPETokenizer, model_max_length: int) -> dict[str, str]:
    """``tokenizer.json`` (the BPE's own, byte for byte) and ``tokenizer_config.json``: a fast
    tokenizer whose bos/eos token is ``<|endoftext|>`` (no token is added to a text)."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode to the exact text
        "split_special_tokens": SPLIT_SPECIAL,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
    }
    return {
        "tokenizer.json": tok.json,
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


# -- read ------------------------------------------------------------------------------------

GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # exact, or tanh approximations
MASKS = re.compile(r"\.attn\.(masked_)?bias$")  # causal-mask buffers of older GPT-2 saves


def read_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a ``transformers`` directory: its ``tokenizer.json``, a byte-level BPE
    (what ``export`` writes for ``tokenizer=bpe``; one with GPT-2's own vocab is gpt2), else
    gpt2 (GPT-2's ``vocab.json`` and ``merges.txt``, as ``export`` writes them for gpt2, or no
    tokenizer files at all)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return tokenizer.gpt2()
    try:
        tok = BPETokenizer.from_file(path)
    except SlmError as e:
        raise CheckpointError(str(e)) from e
    gpt2_like = (tok.vocab_size, tok.eot_id) == (VOCAB_SIZE, EOT_ID)
    if gpt2_like and tok.ranks == tokenizer.gpt2().ranks:
        return tokenizer.gpt2()
    return tok


def read_hf(directory: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The ``GPTConfig`` and slm state dict of a ``transformers`` directory of the families
    above (what ``export`` writes, or e.g. OpenAI's GPT-2). A setting slm does not compute
    is a one-line ``CheckpointError`` naming its ``config.json`` key."""
    d = Path(directory)
    hf = files.read_json(d / "config.json")
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(
            f"{d}/config.json: model_type={family!r}; slm reads {', '.join(FAMILIES)} "
            "(GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM) directories"
        )

    def need(key: str, allowed: tuple, default=None):
        value = hf.get(key, default)
        if value not in allowed:
            raise CheckpointError(
                f"{d}/config.json: {key}={value!r}, slm computes {key}={allowed[0]!r}; "
                "this model cannot be loaded into slm's GPT"
            )
        return value

    tok = read_hf_tokenizer(d)
    need("vocab_size", (tok.vocab_size,))
    if family == "gpt2":
        n_embd = hf.get("n_embd", 768)
        need("n_inner", (None, 4 * n_embd))
        act = need("activation_function", GELUS, "gelu_new")
        if act != "gelu":  # OpenAI's GPT-2: nanoGPT starts from it with exact GELU too
            log.warning(
                "%s: activation_function=%s (tanh GELU) becomes slm's exact GELU: outputs "
                "differ slightly (~1e-3) until training adapts", d, act,
            )  # fmt: skip
        need("layer_norm_epsilon", (EPS,), EPS)
        need("scale_attn_by_inverse_layer_idx", (False,), False)
        args = dict(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd)
        args.update(block_size=hf.get("n_positions", 1024), tie_embeddings=True)
    else:
        heads, width = hf.get("num_attention_heads"), hf.get("hidden_size")
        need("hidden_act", ("silu",))
        need("num_key_value_heads", (heads, None))
        need("head_dim", (width // heads, None))
        need("rms_norm_eps", (EPS,))
        rope = hf.get("rope_parameters") or {}
        need("rope_scaling", (None,))
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{d}/config.json: rope_parameters={rope}, slm has plain RoPE")
        if family == "qwen3":
            need("use_sliding_window", (False,), False)
        else:
            need("mlp_bias", (hf.get("attention_bias", False),), False)
        args = dict(n_layer=hf.get("num_hidden_layers"), n_head=heads, n_embd=width)
        args.update(block_size=hf.get("max_position_embeddings"), tie_embeddings=False)
        args.update(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=family == "qwen3")
        args.update(rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
        args["bias"] = bool(hf.get("attention_bias", False))
        intermediate = GPTConfig(**args).mlp_hidden
        need("intermediate_size", (intermediate,))
    args["tie_embeddings"] = bool(hf.get("tie_word_embeddings", args["tie_embeddings"]))
    args.update(vocab_size=tok.vocab_size, eot_id=tok.eot_id)
    hf_state = _read_safetensors(d)
    if family == "gpt2":
        hf_state = {k: v for k, v in hf_state.items() if not MASKS.search(k)}
        # OpenAI's own files have no "transformer." prefix.
        hf_state = {(k if k.startswith("lm_head.") else "transformer." + k.removeprefix(
            "transformer.")): v for k, v in hf_state.items()}  # fmt: skip
        # slm's bias=False exports as zero biases: all zero means no biases.
        biases = [v for k, v in hf_state.items() if k.endswith(".bias")]
        args["bias"] = any(bool(b.any()) for b in biases)
        if not args["bias"]:
            hf_state = {k: v for k, v in hf_state.items() if not k.endswith(".bias")}
    if args["tie_embeddings"]:
        hf_state.pop("lm_head.weight", None)  # a tied copy, where a file stores it anyway
    try:
        config = GPTConfig(**args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{d}/config.json: {e}") from e
    return config, from_hf(config, hf_state, family, str(d))


def from_hf(
    c: GPTConfig, hf_state: dict[str, torch.Tensor], family: str, where: str
) -> dict[str, torch.Tensor]:
    """The inverse of ``to_hf``: the vocab padding comes back as zero rows (no token id
    reaches them). Missing or unexpected tensors are a one-line ``CheckpointError``."""
    state, used = {}, set()
    for name, hf_names in layout(c, family):
        missing = [n for n in hf_names if n not in hf_state]
        if missing:
            raise CheckpointError(f"{where}: the weights lack {missing[0]}")
        t = torch.cat([hf_state[n] for n in hf_names], dim=0)
        used.update(hf_names)
        if _conv1d(family, name):
            t = t.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = torch.cat([t, t.new_zeros(c.padded_vocab_size - len(t), t.shape[1])])
        state[name] = t.contiguous()
    if c.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    extra = sorted(set(hf_state) - used)
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} for a {family} model")
    return state


def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors``, or of the shards that its index names."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(files.read_json(index).get("weight_map", {}).values()))
    elif (d / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"{d}: no model.safetensors; slm reads safetensors weights (re-save the model with "
            "transformers' save_pretrained)"
        )
    require("safetensors")
    from safetensors.torch import load_file

    state = {}
    for name in names:
        try:
            state.update(load_file(str(d / name)))
        except Exception as e:  # a truncated or foreign file
            raise CheckpointError(f"{d / name}: not readable as safetensors ({e})") from e
    return state
