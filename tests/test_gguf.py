"""slm.gguf: one GGUF file that llama.cpp reads as slm's model and tokenizer. Read back with
the ``gguf`` package's reader (every tensor's name, shape, type and values; the metadata),
and, where llama-cpp-python is installed, run by llama.cpp itself: its logits, tokenization,
greedy tokens and held-out loss against slm's (skipped elsewhere, e.g. in CI)."""

from __future__ import annotations

import errno
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXPORT_ARCHS, assert_one_line, save_slm_pt, tiny_config

from slm import export as ex
from slm import gguf as slm_gguf
from slm.checkpoint import load_model, load_tokenizer
from slm.errors import ConfigError, SlmError
from slm.model import apply_rope, rope_cache
from slm.sample import generate
from slm.tokenizer import EOT, EOT_ID, get_encoding

gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[1]
GPT2_FILES = REPO.parent / "shared" / "data" / "gpt2"  # OpenAI's encoder.json and vocab.bpe
ARCH = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
NORMAL, CONTROL = 1, 3  # llama.cpp's token types
F32 = 0  # ggml's float32 type: a KV cache in float32, not llama.cpp's default float16


@functools.cache  # reading 100,000 token and merge strings takes seconds: once per file
def read(path: Path):
    """(metadata key -> value, tensor name -> reader tensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module", params=list(EXPORT_ARCHS))
def written(request, tmp_path_factory):
    """(slm model, its f32 GGUF file, the llama.cpp architecture) for one exportable arch."""
    overrides, cls = EXPORT_ARCHS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = save_slm_pt(d / "slm.pt", tiny_config(*overrides))
    return model, ex.export(d / "slm.pt", d / "model.gguf", format="gguf"), ARCH[cls]


# -- the file, read back ---------------------------------------------------------------------


def llama_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Row i and row i + d/2 of each head side by side: the pairs llama.cpp's llama rotates."""
    d = t.shape[0] // n_head
    order = [h * d + j * (d // 2) + i for h in range(n_head) for i in range(d // 2) for j in (0, 1)]
    return t[order]


def expected_tensors(model, arch: str) -> dict[str, torch.Tensor]:
    """The GGUF tensors of ``model``, written out here by llama.cpp's names for each family
    (nn.Linear's (out, in) layout, the vocab padding dropped, zero biases for GPT-2)."""
    c, sd = model.config, model.state_dict()
    V = c.vocab_size
    out = {"token_embd.weight": sd["transformer.wte.weight"][:V]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["transformer.wpe.weight"]

    def bias(name: str, rows: int) -> torch.Tensor:
        return sd[name] if name in sd else torch.zeros(rows)

    for i in range(c.n_layer):
        s, b = f"transformer.h.{i}", f"blk.{i}"
        pairs = {"attn_norm": "ln_1", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                 "ffn_down": "mlp.c_proj"}  # fmt: skip
        if arch == "gpt2":
            pairs.update(attn_qkv="attn.c_attn", ffn_up="mlp.c_fc")
        for g, m in pairs.items():
            out[f"{b}.{g}.weight"] = sd[f"{s}.{m}.weight"]
            if arch == "gpt2" or (c.bias and not g.endswith("norm")):
                out[f"{b}.{g}.bias"] = bias(f"{s}.{m}.bias", sd[f"{s}.{m}.weight"].shape[0])
        if arch == "gpt2":
            continue
        q, k, v = sd[f"{s}.attn.c_attn.weight"].chunk(3)
        gate, up = sd[f"{s}.mlp.c_fc.weight"].chunk(2)
        if arch == "llama":
            q, k = llama_rows(q, c.n_head), llama_rows(k, c.n_head)
        out.update({f"{b}.attn_q.weight": q, f"{b}.attn_k.weight": k, f"{b}.attn_v.weight": v,
                    f"{b}.ffn_gate.weight": gate, f"{b}.ffn_up.weight": up})  # fmt: skip
        if c.bias:
            bq, bk, bv = sd[f"{s}.attn.c_attn.bias"].chunk(3)
            bq, bk = llama_rows(bq, c.n_head), llama_rows(bk, c.n_head)
            gate_b, up_b = sd[f"{s}.mlp.c_fc.bias"].chunk(2)
            out.update({f"{b}.attn_q.bias": bq, f"{b}.attn_k.bias": bk, f"{b}.attn_v.bias": bv,
                        f"{b}.ffn_gate.bias": gate_b, f"{b}.ffn_up.bias": up_b})  # fmt: skip
        if c.qk_norm:
            out[f"{b}.attn_q_norm.weight"] = sd[f"{s}.attn.q_norm.weight"]
            out[f"{b}.attn_k_norm.weight"] = sd[f"{s}.attn.k_norm.weight"]
    out["output_norm.weight"] = sd["transformer.ln_f.weight"]
    if arch == "gpt2":
        out["output_norm.bias"] = bias("transformer.ln_f.bias", c.n_embd)
    if not c.tie_embeddings:  # tied: llama.cpp reads token_embd for the output layer
        out["output.weight"] = sd["lm_head.weight"][:V]
    return out


def test_every_tensor_has_llama_cpps_name_shape_and_values(written):
    model, path, arch = written
    _, tensors = read(path)
    expected = expected_tensors(model, arch)
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml's order: (in, out)
        assert np.array_equal(t.data, want.numpy()), name


def test_metadata_describes_the_model_and_tokenizer(written):
    model, path, arch = written
    c = model.config
    fields, _ = read(path)
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == 0  # all f32
    ffn = {"gpt2": 4 * 64, "llama": 176, "qwen3": 176}[arch]  # SwiGLU: 8C/3 up to x8
    assert {k.removeprefix(f"{arch}."): v for k, v in fields.items() if k.startswith(arch)} == {
        "vocab_size": 50257, "context_length": 64, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": ffn, "attention.head_count": 2, "attention.head_count_kv": 2,
        **({"attention.layer_norm_epsilon": pytest.approx(1e-5)} if arch == "gpt2" else {
            "attention.layer_norm_rms_epsilon": pytest.approx(1e-5),
            "rope.freq_base": c.rope_theta, "rope.dimension_count": 32,
            "attention.key_length": 32, "attention.value_length": 32}),
    }  # fmt: skip
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 50257 and tokens[EOT_ID] == EOT
    assert [i for i, t in enumerate(types) if t != NORMAL] == [EOT_ID] and types[EOT_ID] == CONTROL
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == EOT_ID
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.add_eos_token"] is False
    assert len(fields["tokenizer.ggml.merges"]) == 50000


def test_gpt2_tokens_and_merges_are_openais_own(written):
    """Recovered from tiktoken's ranks alone: OpenAI's encoder.json and vocab.bpe."""
    if not (GPT2_FILES / "vocab.bpe").is_file():
        pytest.skip(f"{GPT2_FILES}/vocab.bpe not found")
    fields, _ = read(written[1])
    encoder = json.loads((GPT2_FILES / "encoder.json").read_text(encoding="utf-8"))
    assert fields["tokenizer.ggml.tokens"] == sorted(encoder, key=encoder.get)
    merges = (GPT2_FILES / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert fields["tokenizer.ggml.merges"] == [m for m in merges if m]


def test_interleaved_rows_rotate_as_llama_cpp_rotates():
    """llama.cpp's llama rotates the pairs (x[2i], x[2i+1]) by p * theta^(-2i/d); slm the pairs
    (x[i], x[i+d/2]). With the rows interleaved, llama.cpp's rotation of the queries is slm's,
    interleaved alike: q . k, and so attention, is the same."""
    torch.manual_seed(0)
    c = tiny_config(*EXPORT_ARCHS["llama"][0])
    H, d = c.n_head, c.head_size
    W, x = torch.randn(c.n_embd, c.n_embd), torch.randn(c.block_size, c.n_embd)
    cos, sin = rope_cache(c)
    ours = apply_rope((x @ W.T).view(-1, H, d).transpose(0, 1), cos, sin)  # (H, T, d)
    pairs = (x @ slm_gguf.interleave_heads(W, H).T).view(-1, H, d // 2, 2).transpose(0, 1)
    angle = torch.arange(c.block_size)[:, None] * c.rope_theta ** (-torch.arange(0, d, 2) / d)
    a, b = pairs[..., 0], pairs[..., 1]
    theirs = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), -1)
    want = torch.stack(ours.chunk(2, dim=-1), dim=-1)  # slm's (x[i], x[i+d/2]) side by side
    torch.testing.assert_close(theirs, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(slm_gguf.interleave_heads(W, H), llama_rows(W, H))


@pytest.mark.parametrize("arch, kind", [("gpt2", "f16"), ("qwen3", "q8_0")])
def test_f16_and_q8_0_store_the_weights_in_their_type(tmp_path, arch, kind):
    """Vectors (norms, biases) and GPT-2's position embedding stay float32; the other weights
    are ``kind``, but q8_0 (blocks of 32) on rows that blocks do not fill (SwiGLU's 176-wide
    ffn_down rows): f16. Each dequantizes to the f32 value within its type's rounding."""
    overrides, _ = EXPORT_ARCHS[arch]
    model = save_slm_pt(tmp_path / "slm.pt", tiny_config(*overrides))
    path = ex.export(tmp_path / "slm.pt", tmp_path / "m.gguf", format="gguf", gguf_type=kind)
    fields, tensors = read(path)
    assert fields["general.file_type"] == {"f16": 1, "q8_0": 7}[kind]
    Q = gguf.GGMLQuantizationType
    seen = set()
    for name, want in expected_tensors(model, ARCH[EXPORT_ARCHS[arch][1]]).items():
        t, want = tensors[name], want.numpy()
        if want.ndim == 1 or name.startswith("position_embd"):
            expected_type = Q.F32
        elif kind == "q8_0" and want.shape[-1] % 32:
            expected_type = Q.F16
        else:
            expected_type = Q[kind.upper()]
        assert t.tensor_type == expected_type, name
        seen.add(expected_type)
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if expected_type == Q.F16:
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        elif expected_type == Q.Q8_0:
            # Each block of 32: x / (amax / 127) rounded, times that scale stored as f16.
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            bound = step / 2 + 127 * step * 2.0**-11  # the rounding, and the f16 scale's
            assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), name
        else:
            assert np.array_equal(got, want), name
    assert seen == ({Q.F32, Q.F16} | ({Q.Q8_0} if kind == "q8_0" else set()))
    if kind == "q8_0":
        assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 176 % 32 != 0
    else:
        assert tensors["position_embd.weight"].tensor_type == Q.F32


def test_bpe_tokenizer_is_its_tokenizer_json(bpe_run, tmp_path):
    """A tokenizer=bpe model: the tokens and merges of its own tokenizer.json, by id, and
    its <|endoftext|> (id 0) the control, bos and eos token."""
    path = ex.export(bpe_run[0] / "slm.pt", tmp_path / "bpe.gguf", format="gguf")
    fields, tensors = read(path)
    spec = json.loads((bpe_run[1] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert fields["tokenizer.ggml.merges"] == merges
    types = fields["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t != NORMAL] == [0] and types[0] == CONTROL
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 0
    assert list(tensors["token_embd.weight"].shape) == [64, 4096]  # the BPE's vocab, no padding


# -- refusals and failures -------------------------------------------------------------------


def test_unexportable_model_is_refused_and_writes_nothing(tmp_path):
    save_slm_pt(tmp_path / "slm.pt", tiny_config("arch=modern", "model.mlp=relu2"))
    with pytest.raises(ConfigError, match=r"^cannot export model\.mlp=relu2: .*model\.mlp=swiglu"):
        ex.export(tmp_path / "slm.pt", tmp_path / "m.gguf", format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slm.pt"]


def test_bad_values_are_one_line(tmp_path):
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    (tmp_path / "dir").mkdir()
    cases = [
        (dict(format="gguf", gguf_type="q4_0"), "m.gguf",
         "gguf_type=q4_0 is not one of f32, f16, q8_0"),
        (dict(format="onnx"), "m.gguf", "format=onnx is not one of hf, gguf"),
        (dict(format="gguf"), "dir",
         f"out={tmp_path / 'dir'} is a directory; format=gguf writes one file: pass FILE.gguf"),
    ]  # fmt: skip
    for kwargs, out, message in cases:
        with pytest.raises(ConfigError) as e:
            ex.export(tmp_path / "slm.pt", tmp_path / out, **kwargs)
        assert str(e.value) == message
        assert_one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "slm.pt"]


def test_existing_out_needs_overwrite_and_a_failed_write_keeps_it(tmp_path, monkeypatch):
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    out = tmp_path / "m.gguf"
    out.write_bytes(b"an older model")
    with pytest.raises(ConfigError, match=r"m\.gguf exists; pass overwrite=true to replace it$"):
        ex.export(tmp_path / "slm.pt", out, format="gguf")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(SlmError) as e:
        ex.export(tmp_path / "slm.pt", out, overwrite=True, format="gguf")
    assert str(e.value) == (
        f"out={out}: writing failed (OSError: [Errno 28] No space left on device); nothing was "
        f"written to {out}, free space or choose another path"
    )
    assert out.read_bytes() == b"an older model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "slm.pt"]  # no temporary
    monkeypatch.undo()
    ex.export(tmp_path / "slm.pt", out, overwrite=True, format="gguf")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "gpt2"


def test_without_gguf_export_says_how_to_install(tmp_path, monkeypatch):
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    install = r'pip install -e "\.\[gguf\]"$'
    with pytest.raises(SlmError, match=r"^gguf is not installed \(.*\); " + install):
        ex.export(tmp_path / "slm.pt", tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()


# -- llama.cpp itself (llama-cpp-python; skipped where it is not installed) --------------------


@pytest.fixture
def llama_cpp():
    return pytest.importorskip("llama_cpp")


class Llama:
    """A llama.cpp model, closed at the end of the ``with`` block."""

    def __init__(self, llama_cpp, path: Path, **kwargs) -> None:
        self.llm = llama_cpp.Llama(str(path), n_threads=1, verbose=False, **kwargs)

    def __enter__(self):
        return self.llm

    def __exit__(self, *exc) -> None:
        self.llm.close()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (one sequence, from position 0)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def text_ids(v2_txt) -> list[int]:
    """64 tokens of real TinyStories text (gpt2)."""
    return get_encoding().encode_ordinary(v2_txt.read_text(encoding="utf-8")[:2000])[:64]


def test_llama_cpp_computes_slms_logits(llama_cpp, written, text_ids):
    """Each family's f32 file, run by llama.cpp with a float32 KV cache: slm's logits at every
    position, to float rounding; GPT-2 within the difference of llama.cpp's tanh GELU (read
    from a float16 table) from slm's exact one, and then the same top token wherever slm's top
    two are further apart than that (random weights make near ties)."""
    model, path, arch = written
    with Llama(llama_cpp, path, n_ctx=64, logits_all=True, type_k=F32, type_v=F32) as llm:
        assert llm.n_vocab() == 50257 and llm.token_eos() == llm.token_bos() == EOT_ID
        theirs = llama_logits(llm, text_ids)
    with torch.no_grad():
        ours = model(torch.tensor([text_ids]))[0][0].numpy()
    assert theirs.shape == ours.shape == (64, 50257)
    tol = 1e-3 if arch == "gpt2" else 1e-5
    assert np.abs(theirs - ours).max() < tol
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tol
    assert clear.sum() > 32 and (theirs.argmax(-1) == ours.argmax(-1))[clear].all()


TRICKY = [
    f"The end.{EOT}Once upon a time {EOT}<|endo",  # literal markers: plain text, as slm's
    "I'm  don't 123 4567 naïve café 日本語 😀\n\n  \t x’s",
    "it's IT'S We'LL 3.14159 1,000,000 \u00a0nbsp\u2003em a\r\nb\rc",
]


def test_llama_cpp_tokenizes_as_slm(llama_cpp, written, bpe_run, tmp_path):
    """Both tokenizers: llama.cpp's ids for a text (special tokens not parsed, as slm reads
    every text) are slm's, a literal <|endoftext|> plain text to both; and back to the text.
    Parsing special tokens (what llama.cpp's programs do with a prompt), it is the token."""
    bpe = ex.export(bpe_run[0] / "slm.pt", tmp_path / "bpe.gguf", format="gguf")
    for path, tok in ((written[1], load_tokenizer(written[1].parent / "slm.pt")),
                      (bpe, load_tokenizer(bpe_run[0] / "slm.pt"))):  # fmt: skip
        with Llama(llama_cpp, path, vocab_only=True) as llm:
            for text in TRICKY:
                ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                assert ids == tok.encode(text), text
                assert llm.detokenize(ids).decode("utf-8") == text
            special = llm.tokenize(f"a{EOT}b".encode(), add_bos=False, special=True)
            assert special == [*tok.encode("a"), tok.eot_id, *tok.encode("b")]


@pytest.mark.slow
def test_llama_cpp_tokenizes_real_text_as_slm(llama_cpp, bpe_run, v1_txt, v2_txt, tmp_path):
    """Both TinyStories pieces, whole (about 900,000 tokens), with both tokenizers."""
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    for ckpt in (tmp_path / "slm.pt", bpe_run[0] / "slm.pt"):
        path = ex.export(ckpt, tmp_path / f"{ckpt.parent.name}.gguf", format="gguf")
        tok = load_tokenizer(ckpt)
        with Llama(llama_cpp, path, vocab_only=True) as llm:
            for piece in (v1_txt, v2_txt):
                text = piece.read_text(encoding="utf-8")
                ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                assert ids == tok.encode(text), piece.name


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation: the top token of each step's logits, fed back."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def test_llama_cpp_greedy_tokens_and_q8_0_loss(llama_cpp, bpe_run, tmp_path, v2_txt):
    """A trained tokenizer=bpe model: llama.cpp's greedy tokens from the f32 file (with a
    float32 KV cache: llama.cpp's float16 one can flip a near tie) are slm's; the q8_0 file's
    loss on held-out text is within 1% of the f32 file's, which is slm's."""
    ckpt = bpe_run[0] / "slm.pt"
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    text = v2_txt.read_text(encoding="utf-8").split(EOT)[-2]  # a story
    ids = [tok.eot_id, *tok.encode(text)][:64]
    losses = {}
    for kind in ("f32", "q8_0"):
        path = ex.export(ckpt, tmp_path / f"{kind}.gguf", format="gguf", gguf_type=kind)
        cache = dict(type_k=F32, type_v=F32) if kind == "f32" else {}  # no f16 near-tie flips
        with Llama(llama_cpp, path, n_ctx=64, logits_all=True, **cache) as llm:
            logits = torch.from_numpy(llama_logits(llm, ids))
            loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
            losses[kind] = loss.item()
            if kind == "f32":
                prompt = ids[:8]
                theirs = llama_greedy(llm, prompt, 40)
    with torch.no_grad():
        ours_loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[1].item()
    assert theirs == generate(model, prompt, 40, temperature=0, stop_token=None)[0]
    assert math.isclose(losses["f32"], ours_loss, rel_tol=1e-4)
    assert abs(losses["q8_0"] - losses["f32"]) / losses["f32"] < 0.01
