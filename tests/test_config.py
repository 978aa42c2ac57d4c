import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import GPUS
from omegaconf import OmegaConf

from slm.config import CONF_DIR, ConfigError, compose, resolve_hardware, validate
from slm.errors import override

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml"))


def test_groups_are_the_documented_ones():
    assert MODELS == ["gpt2", "medium", "small", "tiny"]
    assert HARDWARE == ["a100", "auto", "cpu", "h100", "t4"]
    assert sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml")) == ["gpt2", "modern"]
    assert sorted(p.stem for p in (CONF_DIR / "optim").glob("*.yaml")) == ["adamw", "muon"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_option_composes(model, hardware):
    cfg = compose("train", [f"model={model}", f"hardware={hardware}"])
    assert set(cfg.model) == {
        "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias",
        "positions", "norm", "mlp", "qk_norm", "tie_embeddings", "rope_theta",
    }  # fmt: skip
    assert cfg.model.n_embd % cfg.model.n_head == 0
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolations


@pytest.mark.parametrize(
    "model, shape",
    [("small", (6, 6, 384, 256)), ("medium", (8, 8, 512, 512)), ("gpt2", (12, 12, 768, 1024))],
)
def test_model_shapes(model, shape):
    m = compose("train", [f"model={model}"]).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == shape


def test_defaults():
    cfg = compose("train")
    assert cfg.data.source is None  # what data.dir holds, else roneneldan/TinyStories
    assert list(cfg.optim.betas) == [0.9, 0.95]
    assert cfg.optim.weight_decay == 0.1 and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-3  # optim=adamw: the old keys
    assert cfg.hardware.precision == "auto"


@pytest.mark.parametrize(
    "hardware, precision, compile_",
    [("a100", "bf16-mixed", True), ("h100", "bf16-mixed", True), ("t4", "16-mixed", True)],
)
def test_gpu_hardware_precision(hardware, precision, compile_):
    cfg = compose("train", [f"hardware={hardware}"])
    assert (cfg.hardware.precision, cfg.hardware.compile) == (precision, compile_)


def test_auto_on_cpu_resolves_to_fp32_without_compile(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = resolve_hardware(compose("train"))
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.compile, cfg.optim.fused) == (
        "cpu", "32-true", False, False,
    )  # fmt: skip


@pytest.mark.parametrize("name, capability, expected", GPUS)
def test_auto_on_gpus(monkeypatch, name, capability, expected):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: capability)
    # PyTorch says yes on every one of them, counting emulated bf16 (slow on a T4).
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)
    cfg = resolve_hardware(compose("train"))
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.compile, cfg.optim.fused) == (
        "gpu", expected, "default", True,
    )  # fmt: skip


def test_explicit_trainer_values_win(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = resolve_hardware(compose("train", ["hardware=a100", "trainer.precision=32-true"]))
    assert cfg.trainer.precision == "32-true"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_head=5"], "model.n_embd=384 is not divisible by model.n_head=5"),
        (["optim.lr=-1e-3"], "optim.lr=-0.001 must be positive"),
        (["optim.min_lr=1e-2"], "optim.min_lr=0.01 is above optim.lr=0.001"),
        (["optim.warmup_steps=600", "trainer.max_steps=500"], "warmup_steps=600 exceeds"),
        (["data.val_windows=none"], "data.val_windows=none must be"),
    ],
)
def test_invalid_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose("train", overrides))


@pytest.mark.parametrize("group", ["model", "hardware", "arch", "optim"])
def test_unknown_group_option(group):
    with pytest.raises(ConfigError, match=f"Could not find '{group}/nope'; choose one of"):
        compose("train", [f"{group}=nope"])


@pytest.mark.parametrize("name", ["train", "evaluate", "serve"])
def test_unknown_key_is_one_line(name):
    """What python -m slm.evaluate bogus=1 meets (before: Hydra's traceback). Not Hydra's hint
    (+bogus=1), which adds a key that nothing reads: the closest key, where one is close."""
    with pytest.raises(ConfigError) as e:
        compose(name, ["bogus=1"])
    assert str(e.value) == (
        f"Could not override 'bogus': conf/{name}.yaml has no such key; check its spelling"
    )
    with pytest.raises(ConfigError) as e:
        compose("generate", ["max_tokens=10"])
    assert str(e.value) == (
        "Could not override 'max_tokens': conf/generate.yaml has no such key; did you mean "
        "max_new_tokens=10?"
    )


@pytest.mark.parametrize(
    "name, override, fix",
    [
        ("generate", "+max_tokens=10", "did you mean max_new_tokens=10?"),
        ("train", "+max_stepz=5", "did you mean trainer.max_steps=5?"),
        ("train", "++max_stepz=5", "did you mean trainer.max_steps=5?"),
        ("train", "+model.n_layers=2", "did you mean model.n_layer=2?"),
        ("train", "+model.nope=2", "did you mean model.norm=2?"),  # not a GPTConfig field
        ("train", "+bogus=1", "check its spelling"),
        ("evaluate", "+optim.lrr=1e-3", "did you mean optim.lr=1e-3?"),
        ("serve", "+limits.max_tokenz=4", "did you mean limits.max_tokens=4?"),
        ("export", "+outt=x", "did you mean out=x?"),
        ("generate", "+trainer.devices=1", "did you mean device=1?"),  # generate has no trainer
    ],
)
def test_a_key_that_nothing_reads_is_refused_in_one_line(name, override, fix):
    """``+key=value`` (Hydra's own hint for a key the config lacks) was taken and ignored:
    ``generate.py +max_tokens=10`` wrote 200 tokens, ``train.py +max_stepz=5`` trained 5,000
    steps. Every command composes through here (train.py and generate.py: the slow test below)."""
    with pytest.raises(ConfigError) as e:
        compose(name, ["hardware=cpu", override] if name == "train" else [override])
    key = override.lstrip("+").partition("=")[0]
    assert str(e.value) == (
        f"{override} adds a key that nothing reads: conf/{name}.yaml has no {key}; {fix}"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["+trainer.enable_progress_bar=false"],  # a lightning.Trainer argument: train checks it
        ["++seed=7", "++trainer.max_steps=3"],  # ++ on a key the config has: an override
        ["+model.vocab_size=512"],  # a GPTConfig field: checked against the data
        ["+hydra.job.env_set.X=1", "model=tiny"],
    ],
)
def test_the_keys_meant_to_be_added_stay(overrides):
    cfg = compose("train", overrides)
    assert cfg.seed == (7 if "++seed=7" in overrides else 1337)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, fix",
    [
        (["generate.py", "ckpt=x", "+max_tokens=10"], "max_new_tokens=10"),
        (["train.py", "+max_stepz=5"], "trainer.max_steps=5"),
    ],
)
def test_the_hydra_apps_refuse_a_key_that_nothing_reads(command, fix, tmp_path):
    """The root scripts (@hydra.main) check their own command line; train.py leaves no run
    dir behind."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / command[0]), *command[1:]],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    added, key = command[-1], command[-1][1:].partition("=")[0]
    name = Path(command[0]).stem
    assert len(lines) == 1 and lines[0].endswith(
        f"error: {added} adds a key that nothing reads: conf/{name}.yaml has no {key}; "
        f"did you mean {fix}?"
    ), lines
    assert list(tmp_path.iterdir()) == []


def test_fp16_on_cpu_is_rejected():
    cfg = compose("train", ["hardware=cpu", "trainer.precision=16-mixed"])
    with pytest.raises(ConfigError, match="precision 16-mixed was asked for on cpu"):
        resolve_hardware(cfg)


def test_bf16_mixed_is_allowed_on_cpu():
    """It runs there (slowly), so the mixed-precision code path can be tested on a CPU."""
    cfg = resolve_hardware(compose("train", ["hardware=cpu", "trainer.precision=bf16-mixed"]))
    assert cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    "value, expected",
    [("true", "default"), ("false", False), ("max-autotune", "max-autotune"), ("auto", False)],
)
def test_compile_takes_a_mode(monkeypatch, value, expected):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_hardware(compose("train", [f"compile={value}"])).compile == expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("compile=fast", "compile=fast is not auto, true, false or a torch.compile mode"),
        ("optim.fused=maybe", "optim.fused=maybe must be auto, true or false"),
    ],
)
def test_bad_compile_and_fused(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_hardware(compose("train", ["hardware=cpu", override]))


def test_gpu_hardware_without_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU; use hardware=cpu"):
        resolve_hardware(compose("train", ["hardware=a100"]))


def test_conf_dir_is_the_repo_conf():
    assert CONF_DIR == Path(__file__).resolve().parents[1] / "conf"


VALUES = ["/data/my stories.txt", "/data/café.txt", "Zoë's", 'say "hi"', "a,b", "[x]", "x=y",
          "C:\\dir\\", "/plain/path-1.txt", "Lily's dog, \"Max\" — 🐶 $HOME `x`"]  # fmt: skip


@pytest.mark.parametrize("value", VALUES)
def test_override_is_one_shell_word_that_hydra_reads_back(value):
    word = override("data.source", value)
    [arg] = shlex.split(word)
    bash = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True)
    assert bash.stdout == arg  # the shell itself agrees with shlex
    assert compose("train", [arg]).data.source == value


@pytest.mark.parametrize("value", ["/data/café.txt", "Zoë's", "x=y", "(x)"])
def test_unparsable_override_is_one_line_that_says_how_to_quote(value):
    with pytest.raises(ConfigError) as e:
        compose("train", ["model=tiny", f"data.source={value}"])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"Hydra cannot parse the override data.source={value}: ")
    suggestion = override("data.source", value)
    assert f"write it as {suggestion} (see Quoting in the README)" in msg
    assert compose("train", shlex.split(suggestion)).data.source == value
