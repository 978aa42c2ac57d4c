"""Shared fixtures: the real TinyStories pieces (skipped when absent) and small written sources.

No test reaches the network: the Hugging Face libraries and W&B are put offline before
anything imports them (MLflow's telemetry off), and the one hub code path that is tested gets
a monkeypatched loader.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import yaml
from omegaconf import OmegaConf
from torch.utils.data import Dataset

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The trackers' tests (and the commands they start) run W&B offline and MLflow on a local
# store, with MLflow's usage telemetry (on by default) off: nothing is sent anywhere.
os.environ["WANDB_MODE"] = "offline"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each of the N workers gets one thread (and so do the commands it starts).
    # The tests' tensors are small: threads contending for a shared core only slow them.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories"
V1_NAME = "TinyStories-train.head-2MiB.txt"
V2_NAME = "TinyStoriesV2-GPT4-train.head-10000-lines.txt"
EOT = "<|endoftext|>"


# -- CUDA's autocast rules on the CPU ----------------------------------------------------------
# Ops that CUDA autocast runs in float32, returning float32 (aten/src/ATen/autocast_mode.cpp:
# the fp32 and fp32_set_opt_dtype lists), where CPU autocast runs them in the autocast dtype:
# the ones slm calls (its norms, and the softmax of sampling and of the cross-entropy). The CPU
# already runs cross_entropy_loss and nll_loss in float32.
CUDA_FP32_OPS = ("layer_norm", "rms_norm", "softmax.int", "log_softmax.int")


def _in_float32(op):
    def kernel(keyset, *args):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast("cpu", enabled=False):  # below autocast: the op's own kernel
            return op(*args)

    return kernel


@pytest.fixture
def cuda_autocast():
    """CPU autocast with CUDA autocast's float32 rule for ``CUDA_FP32_OPS``: under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` a LayerNorm or RMSNorm returns float32, as
    on a GPU (what crashed ``generate`` with ``qk_norm`` on every GPU), also inside
    ``torch.compile``. The rule is an AutocastCPU kernel for each op, removed after the test;
    compiled graphs are dropped before and after (they were traced under the other rule), and
    the compile caches are off meanwhile."""
    with torch.library._scoped_library("aten", "IMPL") as lib:
        for name in CUDA_FP32_OPS:
            packet, _, overload = name.partition(".")
            op = getattr(getattr(torch.ops.aten, packet), overload or "default")
            lib.impl(name, _in_float32(op), "AutocastCPU", with_keyset=True)
        torch._dynamo.reset()
        try:
            with (
                torch._inductor.config.patch(fx_graph_cache=False),
                torch._functorch.config.patch(enable_autograd_cache=False),
            ):
                yield
        finally:
            torch._dynamo.reset()


# -- the real TinyStories pieces ---------------------------------------------------------------


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    """``<repo>/../shared/data/tinystories``: real TinyStories text (see its SOURCES.md)."""
    if not TINYSTORIES.is_dir():
        pytest.skip(f"real TinyStories pieces not found at {TINYSTORIES} (a sibling of the repo)")
    return TINYSTORIES


def _piece(tinystories_dir: Path, name: str) -> Path:
    path = tinystories_dir / name
    if not path.is_file():
        pytest.skip(f"{name} not found in {tinystories_dir}")
    return path


@pytest.fixture(scope="session")
def v1_txt(tinystories_dir: Path) -> Path:
    """The first 2 MiB of TinyStories-train.txt: 2,317 stories (the last one cut off)."""
    return _piece(tinystories_dir, V1_NAME)


@pytest.fixture(scope="session")
def v2_txt(tinystories_dir: Path) -> Path:
    """The first 10,000 lines of TinyStoriesV2-GPT4-train.txt: 1,728 stories."""
    return _piece(tinystories_dir, V2_NAME)


# -- small written sources --------------------------------------------------------------------


def parse_stories(text: str) -> list[str]:
    """Stories of TinyStories-format text, parsed line by line (independently of slm.sources):
    a line that is only ``<|endoftext|>`` (give or take whitespace) ends a story; stories are
    stripped and empty ones dropped."""
    stories, lines = [], []
    for line in text.split("\n"):
        if line.strip() == EOT:
            stories.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line)
    stories.append("\n".join(lines).strip())
    return [s for s in stories if s]


def write_txt(path: Path, stories: list[str]) -> Path:
    """Write ``stories`` in the dataset's own text format (each followed by a separator line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s}\n{EOT}\n" for s in stories), encoding="utf-8")
    return path


VOCAB = (
    "Once upon a time there was a little girl named Lily . She loved to play in the park "
    'with her dog Max . One day , they found a big red ball under a tree ! " Look ! " said '
    "Lily . Max wagged his tail and ran fast . The sun was warm and the sky was blue . Tom "
    "the cat was sad because he lost his toy car . They all became good friends ."
)
WORDS = VOCAB.split()


def make_stories(n: int, seed: int = 0, words: tuple[int, int] = (20, 80)) -> list[str]:
    """``n`` deterministic, varied little stories (a few sentences each, some on two lines)."""
    rng = random.Random(seed)
    stories = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        if i % 3 == 0:
            body = body.replace(" . ", ".\n", 1)
        stories.append(f"Story {i}: {body}")
    return stories


@pytest.fixture
def small_txt(tmp_path: Path) -> Path:
    """A 300-story TinyStories-format file written by the test."""
    return write_txt(tmp_path / "src" / "stories.txt", make_stories(300))


# -- prepared bins, as the tests of slm.prepare and slm.sources expect them -------------------

EOT_ID = 50256  # gpt2's <|endoftext|>
LOCK = ".prepare.lock"  # stays in data.dir: prepares of one dir take turns on it


def story_tokens(stories: list[str]) -> list[list[int]]:
    enc = tiktoken.get_encoding("gpt2")  # loaded once: tiktoken keeps it
    return [enc.encode_ordinary(s) + [EOT_ID] for s in stories]


def held_out(n: int, fraction: float) -> list[bool]:
    return [math.floor((i + 1) * fraction) > math.floor(i * fraction) for i in range(n)]


def expected_bins(stories: list[str], val_fraction: float | None, val: list[str] = ()):
    """(train ids, val ids): with ``val_fraction`` the held-out stories go to val, else the
    given ``val`` stories do."""
    train_ids: list[int] = []
    val_ids: list[int] = []
    mask = held_out(len(stories), val_fraction) if val_fraction else [False] * len(stories)
    for ids, to_val in zip(story_tokens(stories), mask):
        (val_ids if to_val else train_ids).extend(ids)
    for ids in story_tokens(list(val)):
        val_ids.extend(ids)
    return train_ids, val_ids


def read_bin(path: Path) -> list[int]:
    return np.fromfile(path, dtype=np.uint16).tolist()


def assert_bins(out: Path, train: list[int], val: list[int]) -> None:
    assert read_bin(out / "train.bin") == train
    assert read_bin(out / "val.bin") == val
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == len(train)
    assert meta["splits"]["val"]["tokens"] == len(val)


def assert_one_line(exc: pytest.ExceptionInfo) -> None:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error message is not a single line: {msg!r}"


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Which files ``out`` holds (inode, mtime), but for the lock file, which stays."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(out.iterdir())
        if p.name != LOCK
    }


# -- a disk that fills up ----------------------------------------------------------------------


class _Filling:
    """A file on a disk that fills up: a write stores half of what it is given, then fails
    with ENOSPC, as a write to a full disk does."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        part = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
        self._f.write(part[: len(part) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextlib.contextmanager
def full_disk(under: Path, after: int = 0):
    """The disk under ``under`` full once ``after`` files have been written there: every file
    opened for writing there after that takes half of what is written to it, then fails with
    ``OSError(ENOSPC)``. Through Python's ``open`` (pathlib, slm.files,
    torch.distributed.checkpoint's writer), not ``torch.save`` into a path (C++)."""
    import builtins
    import io

    real, opened, under = io.open, [], Path(under).resolve()

    def open_(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        path = Path(os.fsdecode(file)).resolve() if isinstance(file, (str, os.PathLike)) else None
        if path is not None and any(c in mode for c in "wax+") and path.is_relative_to(under):
            opened.append(path)
            if len(opened) > after:
                return _Filling(f)
        return f

    builtins.open = io.open = open_
    try:
        yield opened
    finally:
        builtins.open = io.open = real


# -- the training config with overrides -------------------------------------------------------


@functools.cache
def train_cfg():
    from slm.config import compose

    return compose("train")


def cfg_with(*overrides: str):
    """The training config with ``key=value`` overrides (composed once: Hydra is slow)."""
    cfg = train_cfg().copy()
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    return cfg


# model=tiny on CPU, small batches: a step takes ~0.1 s.
TINY_ARGS = [
    "model=tiny",
    "hardware=cpu",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.val_windows=16",
    "trainer.max_steps=40",
    "val_every_n_steps=20",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "stories=0",  # the story suite at the end: on in the tests that check it
]


def tiny_cfg(data_dir, run_dir, *overrides):
    """The config of a ``TINY_ARGS`` run on ``data_dir`` into ``run_dir``, with ``overrides``."""
    from slm.config import compose

    return compose("train", [*TINY_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", *overrides])


# -- a shared tokenizer=bpe run -------------------------------------------------------------
# model=tiny tokenizer=bpe on the real V2 piece (its BPE fitted there), at a constant lr
# (min_lr = lr, no warmup): a run cut at any step and resumed with more steps is the run.
BPE_ARGS = [
    "tokenizer=bpe",
    "data.val_fraction=0.05",
    "val_every_n_steps=6",
    "optim.warmup_steps=0",
    "optim.min_lr=3e-3",
]


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory, v2_txt) -> tuple[Path, Path]:
    """(run dir, data dir) of a 12-step ``model=tiny tokenizer=bpe`` fit on the V2 piece,
    shared by the train, generate, export and evaluate tests."""
    from slm.train import train

    d = tmp_path_factory.mktemp("bpe-run")
    train(
        tiny_cfg(d / "data", d / "run", f"data.source={v2_txt}", *BPE_ARGS, "trainer.max_steps=12")
    )
    return d / "run", d / "data"


# -- GPUs, as torch.cuda describes them (the tests patch torch.cuda to be one) -------------

# (name, compute capability, precision): bf16 only where the tensor cores compute it.
GPUS = [
    ("A100", (8, 0), "bf16-mixed"),
    ("H100", (9, 0), "bf16-mixed"),
    ("L4", (8, 9), "bf16-mixed"),
    ("T4", (7, 5), "16-mixed"),
    ("V100", (7, 0), "16-mixed"),
]


# -- a tiny GPTModule on random tokens: Lightning fits without data on disk -----------------

TINY_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)  # GPTModule/GPTConfig kwargs


class RandomWindows(Dataset):
    """``n`` random (x, y) windows of ``block`` tokens below ``vocab``, the same for an index."""

    def __init__(self, block: int = TINY_GPT["block_size"], vocab: int = 50257, n: int = 1000):
        self.block, self.vocab, self.n = block, vocab, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        t = torch.randint(0, self.vocab, (self.block + 1,), generator=g)
        return t[:-1], t[1:]


# -- the root scripts -------------------------------------------------------------------------


def generate_cli():
    """The root ``generate.py``, loaded as a module (a script, not part of ``slm``): its
    ``run(cfg)`` is the command without Hydra's entry point (it returns the exit code)."""
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the story model: a tiny GPT that tells template stories --------------------------------
# Shared by the decoding tests (generate, the decoder's policies, the server): it ends its
# stories with <|endoftext|> and looks back at its context (the name and pet of a story
# come back), so a wrong cache or position shows in its tokens.

STORY_BLOCK = 32


def template_stories(n: int = 300) -> list[int]:
    """gpt2 ids of ``n`` template stories, each followed by <|endoftext|>: a name and a pet
    that come back later in the story."""
    from slm import tokenizer

    rng = random.Random(0)
    ids: list[int] = []
    for _ in range(n):
        name = rng.choice(["Tom", "Lily", "Sam", "Mia", "Ben", "Sue"])
        pet = rng.choice(["cat", "dog", "bird", "fish", "frog"])
        place = rng.choice(["park", "lake", "shop", "forest"])
        text = f"{name} had a {pet}. {name} and the {pet} went to the {place}. The {pet} was happy."
        ids += tokenizer.encode(text + " The end.") + [EOT_ID]
    return ids


@pytest.fixture(scope="session")
def story_model():
    """A 2-layer GPT (learned positions, block_size 32) trained for a few seconds on the
    template stories. The loss is a softmax over the ~36 ids the stories use (the model's
    own rows of the tied lm_head): the full 50k-way softmax would cost ~100 ms a step on 2
    CPU cores and teach nothing more here. The other tokens keep their small random-init
    logits, so greedy decoding stays on the stories' tokens. Its exact greedy stories depend
    on the CPU's float rounding: tests compare decoders with each other, not with a text."""
    import torch.nn.functional as F

    from slm.model import GPT, GPTConfig

    data = torch.tensor(template_stories())
    used, targets = torch.unique(data, return_inverse=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=STORY_BLOCK))
    t = model.transformer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        ix = torch.randint(len(data) - STORY_BLOCK - 1, (16,)).tolist()
        x = torch.stack([data[i : i + STORY_BLOCK] for i in ix])
        y = torch.stack([targets[i + 1 : i + 1 + STORY_BLOCK] for i in ix])
        h = t.wte(x) + t.wpe(torch.arange(STORY_BLOCK))
        for block in t.h:
            h = block(h)
        logits = t.ln_f(h) @ model.lm_head.weight[used].T
        loss = F.cross_entropy(logits.reshape(-1, len(used)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    return model.eval()


def greedy(model, prompt: list[int], n: int, **kw) -> list[int]:
    """The greedy continuation of ``prompt`` by ``slm.sample.generate``."""
    from slm.sample import generate

    return generate(model, prompt, n, temperature=0, **kw)[0]


def reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding written out independently of slm's decoder: a full forward over the
    window each step; a window that outgrows block_size keeps its newest block_size // 2."""
    block = model.config.block_size
    window, out = prompt[-block:], []
    for _ in range(n):
        logits, _ = model(torch.tensor([window]))
        out.append(int(logits[0, -1].argmax()))
        window = window + out[-1:]
        if len(window) > block:
            window = window[-(block // 2) :]
    return out


# -- exportable models: random weights, saved as training saves them (export, gguf) ---------

# name -> model.* overrides on model=tiny, and the transformers class it exports as (GGUF:
# the same family, under its own names: gpt2, llama, qwen3).
EXPORT_ARCHS = {
    "gpt2": ([], "GPT2LMHeadModel"),
    "gpt2-untied-bias": (["model.tie_embeddings=false", "model.bias=true"], "GPT2LMHeadModel"),
    "llama": (
        ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu",
         "model.tie_embeddings=false", "model.rope_theta=500"],
        "LlamaForCausalLM",
    ),
    "llama-bias": (
        ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=true",
         "model.tie_embeddings=false"],
        "LlamaForCausalLM",
    ),
    "llama-tied": (
        ["model.positions=rope", "model.norm=rmsnorm", "model.mlp=swiglu"],
        "LlamaForCausalLM",
    ),
    "qwen3": (["arch=modern"], "Qwen3ForCausalLM"),  # RoPE, RMSNorm, SwiGLU, QK-norm, untied
}  # fmt: skip


def tiny_config(*overrides: str):
    """The ``GPTConfig`` of ``model=tiny`` with ``overrides``."""
    from slm.config import compose
    from slm.model import GPTConfig

    return GPTConfig(**compose("train", ["model=tiny", *overrides]).model)


def save_slm_pt(path: Path, config, seed: int = 0):
    """A GPT with random weights, norm gains and biases (none of them at their init values,
    so a gain or bias that an export dropped or misplaced shows), saved as training does."""
    from slm import checkpoint
    from slm.model import GPT

    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # gains around 1, biases around 0 (small: not one token always)
                p.add_(torch.randn_like(p) * (0.02 if name.endswith("bias") else 0.2))
            elif name.endswith("c_proj.weight"):
                p.mul_(4)  # larger residual updates: the layers matter for the logits
    checkpoint.save_slm_pt(path, config, model.state_dict(), step=7)
    return model
