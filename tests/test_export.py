"""slm.export: transformers directories that compute what slm computes, the tokenizer as
tiktoken encodes, init_from back into slm, and one-line errors that leave ``out`` alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EXPORT_ARCHS, save_slm_pt, tiny_config

from slm import export as ex
from slm import hf
from slm.checkpoint import load_model
from slm.config import compose
from slm.errors import CheckpointError, ConfigError, SlmError, run_cli
from slm.model import GPTConfig
from slm.resume import apply_init_from
from slm.sample import generate
from slm.tokenizer import EOT, EOT_ID, get_encoding

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]
ARCHS = EXPORT_ARCHS


@pytest.fixture(scope="module")
def text_ids(v2_txt) -> torch.Tensor:
    """Two windows of 64 tokens of real TinyStories text: the end of the first story, its
    <|endoftext|> and the start of the next."""
    ids = get_encoding().encode(v2_txt.read_text(encoding="utf-8")[:8000], allowed_special={EOT})
    end = ids.index(EOT_ID)
    return torch.tensor(ids[end - 64 : end + 64]).view(2, 64)


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory):
    """(slm model, its export directory, the expected transformers class) for one arch."""
    overrides, cls = ARCHS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = save_slm_pt(d / "run" / "slm.pt", tiny_config(*overrides))
    out = ex.export(d / "run" / "slm.pt", d / "hf")
    return model, out, cls


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """model=tiny exported: for the tests that need one export, not one per arch."""
    d = tmp_path_factory.mktemp("gpt2-tiny")
    save_slm_pt(d / "slm.pt", tiny_config())
    return ex.export(d / "slm.pt", d / "hf")


@pytest.fixture(scope="module")
def small_stories_dir(tmp_path_factory) -> Path:
    """200 short stories the test writes, prepared once."""
    from slm.prepare import prepare

    d = tmp_path_factory.mktemp("stories")
    stories = [f"Tom had {i} red balls. They played all day. The end." for i in range(200)]
    (d / "stories.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(d / "stories.txt"), d / "data", val_fraction=0.1)
    return d / "data"


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported[1])


def test_export_computes_the_same_logits(exported, text_ids):
    model, out, cls = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == cls
    assert hf.config.vocab_size == 50257  # the padding rows are gone
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    if model.config.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        ours, _ = model(text_ids)
        theirs = hf(text_ids).logits
    assert theirs.shape == ours.shape == (2, 64, 50257)
    assert (theirs - ours).abs().max().item() < 1e-4


@pytest.mark.slow
def test_greedy_generate_gives_the_same_tokens(exported, text_ids):
    model, out, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = text_ids[0, :12]
    ours = generate(model, prompt.tolist(), 48, temperature=0)[0]  # ends before an EOT
    theirs = hf.generate(prompt[None], max_new_tokens=48, do_sample=False)[0, 12:].tolist()
    if not (model.config.tie_embeddings and model.config.positions == "rope"):
        # Random tied RoPE models repeat one token (its own embedding is the top logit);
        # the others vary, which checks the positions of transformers' cached decoding.
        assert len(set(ours)) > 2
    # transformers stops at (and keeps) the eos token, <|endoftext|>, from the exported config.
    assert theirs == ours + ([EOT_ID] if len(ours) < 48 else [])


def test_export_round_trips_to_identical_weights(exported):
    model, out, _ = exported
    back = load_model(out)  # what init_from reads
    assert back.config == model.config
    V = model.config.vocab_size
    theirs = back.state_dict()
    for name, t in model.state_dict().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(theirs[name][:V], t[:V]), name
            assert not theirs[name][V:].any()  # the padding comes back as zero rows
        else:
            assert torch.equal(theirs[name], t), name
    assert set(theirs) == set(model.state_dict())


def test_export_directory_holds_the_files(exported):
    model, out, _ = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= names
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == EOT_ID
    config = json.loads((out / "config.json").read_text())
    if config["model_type"] == "gpt2":
        assert config["activation_function"] == "gelu"  # exact GELU, as nn.GELU()
        # llama.cpp's convert_hf_to_gguf.py reads n_ctx (a KeyError without it)
        assert config["n_ctx"] == config["n_positions"] == model.config.block_size
    assert not list(out.parent.glob(".hf.*"))  # no temporary directory left behind


@pytest.mark.slow
@pytest.mark.parametrize("piece", ["v1_txt", "v2_txt"])
def test_tokenizer_encodes_and_decodes_as_slm(hf_tokenizer, piece, request):
    """Real text, its stories' <|endoftext|> separator lines included: slm's ids (the
    separators are plain text to both), the same text back, the EOT as bos and eos."""
    text = request.getfixturevalue(piece).read_text(encoding="utf-8")
    ids = hf_tokenizer(text)["input_ids"]
    assert text.count(EOT) > 1000 and EOT_ID not in ids
    assert ids == get_encoding().encode_ordinary(text)
    assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == EOT_ID
    assert len(hf_tokenizer) == 50257


def test_literal_endoftext_is_plain_text_as_in_slm(gpt2_dir):
    """A literal <|endoftext|> in a text is plain text to the exported tokenizer, as slm
    encodes every text (and as the model saw such text in training); the token itself is
    given by its id."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    text = f"The end.{EOT}Once upon a time {EOT}"
    ids = hf_tok(text)["input_ids"]
    assert ids == get_encoding().encode_ordinary(text) and EOT_ID not in ids
    assert hf_tok.eos_token_id == EOT_ID


def test_tokenizer_merges_are_gpt2s_own(hf_tokenizer, exported):
    """Recovered from tiktoken's ranks alone, the merges are OpenAI's list, in its order."""
    original = REPO.parent / "shared" / "data" / "gpt2" / "vocab.bpe"
    if not original.is_file():
        pytest.skip(f"{original} not found")
    ours = (exported[1] / "merges.txt").read_text(encoding="utf-8").splitlines()
    theirs = original.read_text(encoding="utf-8").splitlines()
    assert len(ours) == 50001 and ours[1:] == [m for m in theirs[1:] if m]


# -- init_from -------------------------------------------------------------------------------


def test_init_from_takes_the_config_and_weights(tmp_path):
    model = save_slm_pt(tmp_path / "run" / "slm.pt", tiny_config(*ARCHS["llama"][0]))
    out = ex.export(tmp_path / "run" / "slm.pt", tmp_path / "hf")
    for source in (out, tmp_path / "run" / "slm.pt"):
        cfg = compose("train", [f"init_from={source}", "model.dropout=0.1"])  # model=small
        init = apply_init_from(cfg, {"dropout": "model.dropout=0.1"})
        assert cfg.model.n_embd == 64 and cfg.model.positions == "rope"  # from the source
        assert cfg.model.dropout == 0.1  # a setting of the run, not of the weights
        assert GPTConfig(**cfg.model) == GPTConfig(**{**model.config.to_dict(), "dropout": 0.1})
        fc = init.transformer.h[1].mlp.c_fc.weight
        assert torch.equal(fc, model.transformer.h[1].mlp.c_fc.weight)


def test_init_from_refuses_a_conflicting_model_override(gpt2_dir):
    out = gpt2_dir
    cfg = compose("train", [f"init_from={out}", "model.n_layer=3"])
    with pytest.raises(ConfigError) as e:
        apply_init_from(cfg, {"n_layer": "model.n_layer=3"})
    assert str(e.value) == (
        f"init_from={out} fixes the model, but model.n_layer=3 (init_from has n_layer=2); "
        "drop the override (only model.dropout may differ)"
    )


def test_init_from_a_missing_path_is_one_line(tmp_path):
    cfg = compose("train", [f"init_from={tmp_path / 'nope'}"])
    with pytest.raises(CheckpointError) as e:
        apply_init_from(cfg, {})
    assert str(e.value) == (
        f"init_from={tmp_path / 'nope'}: {tmp_path / 'nope'}: no such file; pass a slm.pt or a "
        "Lightning .ckpt"
    )


@pytest.mark.slow
def test_train_starts_from_init_from_weights(tmp_path, small_stories_dir, monkeypatch):
    """train(cfg) with init_from: the first optimizer step starts from the source's weights
    (an exported directory), and the run's slm.pt has its config."""
    from slm.module import GPTModule
    from slm.train import train

    model = save_slm_pt(tmp_path / "src" / "slm.pt", tiny_config())
    out = ex.export(tmp_path / "src" / "slm.pt", tmp_path / "hf")
    seen = {}
    configure = GPTModule.configure_optimizers

    def spy(self):
        seen.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return configure(self)

    monkeypatch.setattr(GPTModule, "configure_optimizers", spy)
    cfg = compose("train", [
        "hardware=cpu", "data.num_workers=0", "data.batch_size=4", "data.val_windows=2",
        "trainer.max_steps=2", "val_every_n_steps=2", "optim.warmup_steps=0",
        "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        f"data.dir={small_stories_dir}", f"run_dir={tmp_path / 'run'}", f"init_from={out}",
    ])  # fmt: skip
    train(cfg)
    for name, t in model.state_dict().items():
        assert torch.equal(seen[name][:50257], t[:50257]), name  # the padding rows are zeros
    saved = torch.load(tmp_path / "run" / "slm.pt", weights_only=True)
    assert saved["model_args"] == model.config.to_dict()


@pytest.mark.slow
def test_cli_init_from_conflict_is_one_line(gpt2_dir, tmp_path):
    out = gpt2_dir
    proc = subprocess.run(
        [sys.executable, "train.py", "hardware=cpu", f"init_from={out}", "model.n_embd=128",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].endswith(  # after the log line's time and logger name
        f" - error: init_from={out} fixes the model, but model.n_embd=128 (init_from has "
        "n_embd=64); drop the override (only model.dropout may differ)"
    )


# -- errors ----------------------------------------------------------------------------------

RELU2 = (
    "model.mlp=relu2: neither transformers nor llama.cpp has a family with ReLU^2 MLPs; train "
    "with model.mlp=swiglu to export (arch=modern's default: it exports as Qwen 3)"
)
REFUSED = [
    (["model.mlp=relu2"], RELU2),
    (["arch=modern", "model.mlp=relu2"], RELU2),
    (["model.positions=rope"], "model.norm=layernorm with model.positions=rope: Llama has RMSNorm"),
    (["model.positions=rope", "model.norm=rmsnorm"],
     "model.mlp=gelu with model.positions=rope: Llama has SwiGLU"),
    (["model.norm=rmsnorm"],
     "model.norm=rmsnorm with model.positions=learned: GPT-2 has LayerNorm"),
    (["model.mlp=swiglu"], "model.mlp=swiglu with model.positions=learned: GPT-2 has GELU"),
    (["model.qk_norm=true"],
     "model.qk_norm=true with model.positions=learned: GPT-2 has no QK-norm"),
    (["arch=modern", "model.bias=true"],
     "model.bias=true with model.qk_norm=true: Qwen 3 has no MLP biases"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, message", REFUSED)
def test_unexportable_combination_is_refused_and_writes_nothing(tmp_path, overrides, message):
    save_slm_pt(tmp_path / "slm.pt", tiny_config(*overrides))
    with pytest.raises(ConfigError) as e:
        ex.export(tmp_path / "slm.pt", tmp_path / "out")
    assert str(e.value) == f"cannot export {message}; exportable are {hf.EXPORTABLE}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slm.pt"]


def test_missing_and_foreign_checkpoints_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file; pass a slm\.pt or a"):
        ex.export(tmp_path / "nope.pt", out)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt: no model config inside"):
        ex.export(tmp_path / "foreign.pt", out)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not loadable with weights_only=True"):
        ex.export(tmp_path / "junk.pt", out)
    assert not out.exists()


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "slm.export", f"ckpt={tmp_path / 'nope.pt'}",
         f"out={tmp_path / 'o'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.pt'}: no such file; pass a slm.pt or a Lightning .ckpt"
    ]
    assert not (tmp_path / "o").exists()


def test_non_empty_out_needs_overwrite_and_a_failure_keeps_it(tmp_path, monkeypatch):
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty; pass overwrite=true to replace it"):
        ex.export(tmp_path / "slm.pt", out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "write_tokenizer", broken)  # fails after the weights are written
    with pytest.raises(SlmError) as e:
        ex.export(tmp_path / "slm.pt", out, overwrite=True)
    assert str(e.value) == (
        f"out={out}: writing failed (OSError: disk full); nothing was written to {out}, free "
        "space or choose another directory"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slm.pt"]  # no temp dir left
    monkeypatch.undo()
    ex.export(tmp_path / "slm.pt", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slm.pt"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_unwritable_out_is_one_line_and_writes_nothing(tmp_path, capsys):
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    with pytest.raises(SystemExit):  # as python -m slm.export reports it
        run_cli(lambda: ex.main([f"ckpt={tmp_path / 'slm.pt'}", "out=/proc/my-model"]))
    assert capsys.readouterr().err.splitlines() == [
        "error: out=/proc/my-model: cannot write in /proc (No such file or directory); choose a "
        "directory you can write"
    ]
    assert not Path("/proc/my-model").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slm.pt"]


def test_cli_format_gguf_writes_one_file_and_says_how_to_run_it(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    out = tmp_path / "my model.gguf"
    args = [f"ckpt={tmp_path / 'slm.pt'}", "format=gguf", "gguf_type=q8_0", f"out='{out}'"]
    assert ex.main(args) == out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == 7  # mostly q8_0
    assert reader.fields["general.architecture"].contents() == "gpt2"
    size = out.stat().st_size / 1e6
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {out} (q8_0, {size:.1f} MB): run it with llama.cpp, llama-completion -m "
        f"'{out}' -c 0 -p 'Once upon a time' (README: Run with llama.cpp and Ollama)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my model.gguf", "slm.pt"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["gguf_type=q8_0"], "gguf_type=q8_0 is for format=gguf; add format=gguf"),
        (["format=onnx"], "format=onnx is not one of hf, gguf"),
        (["format=gguf", "gguf_type=q4_k"], "gguf_type=q4_k is not one of f32, f16, q8_0"),
    ],
)
def test_cli_format_and_gguf_type_errors_are_one_line(tmp_path, args, message):
    """Checked before the checkpoint is read; a gguf_type that format=hf would ignore too."""
    with pytest.raises(ConfigError) as e:
        ex.main([f"ckpt={tmp_path / 'missing.pt'}", f"out={tmp_path / 'out'}", *args])
    assert str(e.value) == message
    assert not list(tmp_path.iterdir())


def test_lightning_ckpt_exports_with_its_run_in_the_model_card(tmp_path):
    """A .ckpt in a run's checkpoints/: the card reads the run's metrics and command."""
    run = tmp_path / "run"
    model = save_slm_pt(run / "slm.pt", tiny_config())
    hp = {**model.config.to_dict(), "lr": 1e-3}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    (run / "checkpoints").mkdir()
    torch.save({"hyper_parameters": hp, "state_dict": state}, run / "checkpoints" / "last.ckpt")
    data = tmp_path / "data"
    data.mkdir()
    meta = {"source": "roneneldan/TinyStories", "splits": {"val": {"tokens": 100, "bytes": 400}}}
    (data / "meta.json").write_text(json.dumps(meta))
    (run / "metrics.json").write_text(json.dumps({
        "status": "completed", "best_val_loss": 1.5, "final_val_loss": 1.6, "steps": 40,
        "tokens_seen": 20480,
    }))  # fmt: skip
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  dir: {data}\n  source: null\n")
    (run / ".hydra" / "overrides.yaml").write_text("- model=tiny\n- optim.lr=1e-3\n")
    out = ex.export(run / "checkpoints" / "last.ckpt", tmp_path / "tiny-stories")
    card = (out / "README.md").read_text()
    assert "| training data | roneneldan/TinyStories |" in card
    assert "| tokens seen | 20,480 in 40 optimizer steps |" in card
    assert "| val loss (best) | 1.5000 nats/token |" in card
    assert "| val perplexity | 4.48 |" in card
    assert "| val bits per byte | 0.5410 |" in card  # 1.5 / ln 2 * 100 tokens / 400 bytes
    assert "python train.py model=tiny optim.lr=1e-3" in card
    assert 'AutoModelForCausalLM.from_pretrained("tiny-stories")' in card
    assert "| parameters | 3," in card and "GPT2LMHeadModel" in card


def test_model_card_says_unknown_without_a_run(gpt2_dir):
    card = (gpt2_dir / "README.md").read_text()
    assert "| val loss (best) | unknown nats/token |" in card
    assert "| tokens seen | unknown |" in card


def test_without_transformers_export_says_how_to_install(tmp_path, monkeypatch):
    save_slm_pt(tmp_path / "slm.pt", tiny_config())
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package gives
    with pytest.raises(
        SlmError, match=r'^transformers is not installed .*pip install -e "\.\[hf\]"$'
    ):
        ex.export(tmp_path / "slm.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_hf_refuses_what_slm_does_not_compute(exported, tmp_path):
    _, out, _ = exported
    config = json.loads((out / "config.json").read_text())
    d = tmp_path / "other"
    d.mkdir()
    (d / "model.safetensors").symlink_to(out / "model.safetensors")
    key = "activation_function" if config["model_type"] == "gpt2" else "hidden_act"
    (d / "config.json").write_text(json.dumps({**config, key: "relu"}))
    with pytest.raises(CheckpointError, match=rf"config.json: {key}='relu', slm computes"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"model_type='bert'; slm reads gpt2, llama, qwen3"):
        load_model(d)


# -- tokenizer=bpe ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_export(bpe_run, tmp_path_factory) -> Path:
    return ex.export(bpe_run[0] / "slm.pt", tmp_path_factory.mktemp("bpe-export") / "hf")


def test_bpe_export_tokenizes_and_computes_as_slm(bpe_run, bpe_export, v1_txt, v2_txt):
    """The checkpoint's own BPE, as a fast tokenizer that AutoTokenizer reads: the same ids
    as slm on real text (a literal <|endoftext|> in the text is plain text to both), the same
    text back, the EOT as bos/eos; the model has the BPE's vocab and computes slm's logits."""
    from slm.checkpoint import load_tokenizer

    out = bpe_export
    tok = load_tokenizer(bpe_run[0] / "slm.pt")
    assert (out / "tokenizer.json").read_bytes() == (bpe_run[1] / "tokenizer.json").read_bytes()
    assert not (out / "vocab.json").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for piece in (v1_txt, v2_txt):
        text = piece.read_text(encoding="utf-8")
        parts = text.split(EOT)
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text)
        assert tok.eot_id not in ids and len(parts) > 1000
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == tok.eot_id == 0
    assert len(hf_tok) == tok.vocab_size == 4096
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == 0
    assert "byte-level BPE fitted to the training data" in (out / "README.md").read_text()

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.vocab_size == 4096
    ids = torch.tensor(tok.encode(parts[1])[:64]).view(1, -1)
    with torch.no_grad():
        ours = load_model(bpe_run[0] / "slm.pt")(ids)[0]
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_init_from_a_bpe_export_takes_its_tokenizer(
    bpe_run, bpe_export, v2_txt, tmp_path, monkeypatch
):
    """A new data dir is tokenized with the export's BPE (not gpt2, not a new one): the same
    bins as the run it came from, and the model's vocab and EOT are the BPE's. Asking for
    another tokenizer on the command line is a one-line error."""
    from slm import train as train_module

    args = ["model=tiny", f"init_from={bpe_export}", f"data.source={v2_txt}",
            "data.val_fraction=0.05", f"data.dir={tmp_path / 'data'}"]  # fmt: skip
    cfg = compose("train", args)
    apply_init_from(cfg, {})
    tok = train_module.prepare_data(cfg)
    assert tok.json == (bpe_export / "tokenizer.json").read_text(encoding="utf-8")
    assert (cfg.model.vocab_size, cfg.model.eot_id) == (4096, 0)
    for name in ("tokenizer.json", "train.bin", "val.bin"):
        assert (tmp_path / "data" / name).read_bytes() == (bpe_run[1] / name).read_bytes()

    monkeypatch.setattr(train_module, "command_line", lambda group: ["tokenizer=gpt2"])
    with pytest.raises(ConfigError) as e:
        train_module.prepare_data(compose("train", args))
    assert str(e.value) == (
        f"init_from={bpe_export} fixes the tokenizer ({tok.describe()}), but tokenizer=gpt2 "
        "asks for another; drop the override"
    )
