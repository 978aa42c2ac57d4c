"""More than one process on the CPU (gloo): FSDP against DDP, sharded and full checkpoint
resume, Muon sharded, the bf16 policy, a start check failing on one node, the split
invariance of the data stream, and the process-group timeout.

Multi-process runs are expensive (marked slow), so they share processes: two torchrun "nodes"
on localhost (one rank each) run a whole plan of trainings one after another
(tests/dist_worker.py), once per module; the tests below read what those runs wrote.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from slm import tokenizer
from slm.checkpoint import load_model, read
from slm.config import compose
from slm.errors import ConfigError
from slm.prepare import prepare
from slm.sample import generate
from slm.strategy import agree_on_start, world_size
from slm.train import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
# The tiny model at 32 dims and 32 tokens, 8 windows per micro-batch: a global batch of 16;
# clipping at 0.05 (the gradient norm of these steps is far above it) and weight decay 0.1.
COMMON = [
    "model=tiny", "model.n_embd=32", "model.block_size=32", "hardware=cpu",
    "data.num_workers=0", "data.batch_size=8", "data.val_windows=4", f"trainer.max_steps={STEPS}",
    "val_every_n_steps=10", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.weight_decay=0.1",
    "trainer.gradient_clip_val=0.05", "trainer.log_every_n_steps=1", "sample.max_new_tokens=8",
    "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "stories=0",
]  # fmt: skip
TWO_NODES = ["trainer.devices=1", "trainer.num_nodes=2", "dist_timeout=1"]
SHORT = ["trainer.max_steps=4", "val_every_n_steps=2", "optim.warmup_steps=1"]


def cfg_of(data, run_dir, *overrides):
    where = [f"data.dir={data / 'data'}", f"run_dir={run_dir}"]
    return compose("train", [*COMMON, *where, *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("strategy")
    pets = ["cat", "dog", "bird", "fish"]
    stories = [f"Story {i}: the {pets[i % 4]} ran home. It was happy." for i in range(300)]
    src = d / "stories.txt"
    src.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(str(src), d / "data", val_fraction=0.1)
    return d


@pytest.fixture(scope="module")
def one_process(data):
    """The 16-window global batch in one process: 1 x 16, and 1 x 8 accumulated twice."""
    runs = {}
    splits = {"1x16": ["data.batch_size=16"], "1x8x2": ["trainer.accumulate_grad_batches=2"]}
    for name, extra in splits.items():
        runs[name] = data / name
        train(cfg_of(data, runs[name], *extra))
    return runs


@pytest.fixture(scope="module")
def cluster(data, one_process):
    """The plan, run by two torchrun nodes of one rank each: what every rank returned, and
    where each run wrote."""
    out = data / "cluster"
    out.mkdir()
    run = {name: out / name for name in ("ddp", "fsdp", "sharded", "full", "muon_ddp",
                                         "muon_fsdp", "bf16", "compiled", "empty",
                                         "sharded_full_disk")}  # fmt: skip
    base = [*COMMON, *TWO_NODES, f"data.dir={data / 'data'}"]
    fsdp, full = [*base, "strategy=fsdp"], [*base, "strategy=fsdp", "strategy.checkpoint=full"]

    def job(name, overrides, into=None, **options):
        return {"name": name, "overrides": [*overrides, f"run_dir={run[into or name]}"], **options}

    plan = {"runs": [
        # rank 1 has no last.ckpt to resume (run dirs not on a shared filesystem): both stop
        {"name": "agree", "overrides": [*base, "ckpt_path=last"], "rank_overrides": {
            "0": [f"run_dir={one_process['1x16']}"], "1": [f"run_dir={run['empty']}"]}},
        job("ddp", base),
        # SampleStories on the GPU's decode path; the story suite at the end, on rank 0 alone
        job("fsdp", [*fsdp, "stories=1", "suite.max_new_tokens=4"], static_decode=True),
        job("sharded_stop", fsdp, "sharded", stop_at=13),
        job("sharded_resume", [*fsdp, "ckpt_path=last"], "sharded"),
        job("full_stop", full, "full", stop_at=13),
        job("full_resume", [*full, "ckpt_path=last"], "full"),
        job("muon_ddp", [*base, *SHORT, "optim=muon"]),
        job("muon_fsdp", [*fsdp, *SHORT, "optim=muon"]),
        job("bf16", [*fsdp, *SHORT, "trainer.precision=bf16-mixed"], record_dtypes=True),
        job("compiled", [*fsdp, *SHORT, "compile=true"]),  # as on CUDA (hardware=auto)
        {"name": "checks"},  # before the run that fails: no collective may follow its stop
        job("sharded_full_disk", [*fsdp, *SHORT], full_disk=True),  # last: it fails
    ]}  # fmt: skip
    (out / "plan.json").write_text(json.dumps(plan))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={r}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "tests/dist_worker.py",
                str(out / "plan.json"),
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    for node in nodes:  # both nodes' logs: a rank's error is often a crash of the other
        assert node.returncode == 0, "\n===== node 1 =====\n".join(log[-10000:] for log in logs)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, run, "\n".join(logs)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "slm.pt", weights_only=True)["model"]


def history(run: Path) -> dict:
    return read(run / "checkpoints" / "last.ckpt")["callbacks"]["RunHistory"]


def sample_text(run: Path) -> list[str]:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("samples/text_summary")]


def assert_close_weights(a, b, atol):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.mark.slow
def test_fsdp_trains_as_ddp_with_clipping_and_weight_decay(cluster):
    ranks, run, _ = cluster
    for r in ranks:
        assert r["ddp"]["error"] is None and r["fsdp"]["error"] is None
    # FSDP2 shards each weight by rows (a DTensor of the same name and full shape): the
    # optimizer groups are those of the unsharded model (weight decay on the 2-D weights)
    checks = ranks[0]["checks"]
    assert checks["adamw_groups_sharded"] == checks["adamw_groups"]
    decay, no_decay = checks["adamw_groups"]
    assert decay[1] == 0.1 and "transformer.h.0.attn.c_attn.weight" in decay[0]
    assert no_decay[1] == 0.0 and "transformer.h.0.ln_1.weight" in no_decay[0]
    # the same steps: losses, val/loss and the weights of slm.pt (gathered from both ranks)
    ha, hb = history(run["ddp"]), history(run["fsdp"])
    assert [s for s, _ in hb["train"]] == list(range(STEPS))
    assert [v for _, v in hb["train"]] == pytest.approx([v for _, v in ha["train"]], rel=1e-5)
    assert [s for s, _ in hb["val"]] == [0, 10, 20]
    assert [v for _, v in hb["val"]] == pytest.approx([v for _, v in ha["val"]], rel=1e-5)
    assert hb["val"][-1][1] < hb["val"][0][1] - 0.5  # it learns
    # (the embedding's rows of tokens the data lacks get tiny gradients, which Adam scales up:
    # the reductions' float rounding shows there first)
    assert_close_weights(weights(run["fsdp"]), weights(run["ddp"]), atol=5e-5)
    assert torch.load(run["fsdp"] / "slm.pt", weights_only=True)["step"] == STEPS
    # rank 0 wrote the outputs once; the checkpoints are folders of both ranks' shards
    metrics = json.loads((run["fsdp"] / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["tokens_seen"] == STEPS * 16 * 32
    assert metrics["stories"]["openings"] == 1  # the suite, on slm.pt
    assert sorted(p.name for p in (run["fsdp"] / "checkpoints" / "last.ckpt").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt",
    ]  # fmt: skip
    # SampleStories ran sharded, through the static decode step GPUs take: the same story
    assert sample_text(run["fsdp"]) == sample_text(run["ddp"])
    assert len(sample_text(run["fsdp"])) == 2  # at steps 10 and 20


def test_clipping_is_active(data):
    """At the start the gradient norm is far above the clip: the runs above were clipped."""
    from slm.data import TokenDataModule
    from slm.model import GPT, GPTConfig

    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
    dm = TokenDataModule(str(data / "data"), block_size=32, batch_size=16, num_workers=0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    model(x, y)[1].backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm > 10 * 0.05  # trainer.gradient_clip_val in COMMON


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sharded", "full"])
def test_fsdp_resume_is_exact(cluster, kind):
    """Stopped after step 13 (as by Ctrl-C) and resumed from last.ckpt: the run ends as the
    uninterrupted one, to the bit."""
    ranks, run, _ = cluster
    for r in ranks:
        assert r[f"{kind}_stop"]["error"] == "SystemExit: 1"
        assert r[f"{kind}_resume"]["error"] is None
    assert ranks[0][f"{kind}_stop"]["last_step"] == 13
    last = run[kind] / "checkpoints" / "last.ckpt"
    assert last.is_dir() if kind == "sharded" else last.is_file()
    ha, hb = history(run["fsdp"]), history(run[kind])
    assert hb["train"] == ha["train"] and hb["val"] == ha["val"]
    a, b = weights(run["fsdp"]), weights(run[kind])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run[kind] / "metrics.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_a_full_disk_leaves_no_partial_sharded_checkpoint(cluster):
    """The shards of a sharded checkpoint go into a new folder that replaces the old one once
    every rank has written: on a full disk every rank stops with one line that says so, and no
    folder (nor its temporary) is left."""
    ranks, run, _ = cluster
    ckpts = run["sharded_full_disk"] / "checkpoints"
    for r in ranks:
        assert r["sharded_full_disk"]["error"] == (
            f"CheckpointError: {ckpts / 'best-step2.ckpt'}: no space left on device, so the "
            "checkpoint was not written (nothing of it is left); free space on that disk"
        )
    assert list(ckpts.iterdir()) == []


@pytest.mark.slow
def test_slm_pt_of_a_sharded_run_generates(cluster):
    """slm.pt holds the full, unsharded weights: generate.py's loading and sampling."""
    _, run, _ = cluster
    model = load_model(run["fsdp"] / "slm.pt")
    assert model.transformer.wte.weight.shape == (50304, 32)
    ids = generate(model, tokenizer.encode("Story 3: the"), 8, temperature=0)[0]
    assert len(ids) >= 1
    # and the sharded checkpoint folder itself loads as weights (evaluate, init_from)
    sharded = load_model(run["fsdp"] / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sharded.state_dict().items())


@pytest.mark.slow
def test_muon_under_fsdp(cluster):
    """Sharded Muon (each matrix orthogonalised whole, on one rank) is the unsharded step on
    the same gradients, to the bit; trained, it follows DDP's Muon to bf16's precision."""
    ranks, run, _ = cluster
    checks = ranks[0]["checks"]
    assert checks["muon_groups_sharded"] == checks["muon_groups"]
    assert checks["muon_max_diff"] == 0.0 and checks["muon_moved"] > 0
    for r in ranks:
        assert r["muon_fsdp"]["error"] is None and r["muon_ddp"]["error"] is None
    va, vb = (history(run[k])["val"] for k in ("muon_ddp", "muon_fsdp"))
    assert [v for _, v in vb] == pytest.approx([v for _, v in va], rel=1e-3)


@pytest.mark.slow
def test_fsdp_bf16_gathers_bf16_and_keeps_fp32_master_weights(cluster):
    ranks, run, _ = cluster
    for r in ranks:
        assert r["bf16"]["error"] is None
        assert r["bf16"]["dtypes"] == ["torch.bfloat16"]  # the weights a Block computes with
    state = weights(run["bf16"])
    assert {v.dtype for v in state.values()} == {torch.float32}  # what the optimizer updated
    val = history(run["bf16"])["val"]
    assert val[-1][1] < val[0][1]


@pytest.mark.slow
def test_fsdp_trains_compiled(cluster):
    """compile=true (the default on CUDA) with the GPT sharded: FSDP2's hooks, which gather
    the weights, run around the compiled forward (compiling GPT.forward alone skipped them:
    a DTensor embedding at the first step)."""
    ranks, run, _ = cluster
    for r in ranks:
        assert r["compiled"]["error"] is None
    val = history(run["compiled"])["val"]
    assert [s for s, _ in val] == [0, 2, 4] and val[-1][1] < val[0][1]


@pytest.mark.slow
def test_a_start_check_failing_on_one_node_stops_every_node(cluster):
    """Rank 1 has no last.ckpt to resume: both ranks stop at once with its one line, where
    the other node used to wait in init_process_group for 30 minutes."""
    ranks, run, _ = cluster
    missing = f"ckpt_path=last: there is no {run['empty']}/checkpoints/last.ckpt"
    assert ranks[1]["agree"]["error"].startswith(f"ConfigError: {missing}")
    assert ranks[0]["agree"]["error"].startswith(
        f"ConfigError: rank 1 stopped before training, so every rank does: {missing}"
    )
    assert max(r["agree"]["seconds"] for r in ranks) < 30


@pytest.mark.slow
def test_the_model_does_not_depend_on_the_split(cluster, one_process):
    """2 ranks x 8 = 1 x 16 = 1 x 8 accumulated twice: the same windows at every step."""
    _, run, _ = cluster
    reference = weights(run["ddp"])
    for name in ("1x16", "1x8x2"):
        assert_close_weights(weights(one_process[name]), reference, atol=1e-5)
        va, vb = history(run["ddp"])["val"], history(one_process[name])["val"]
        assert [v for _, v in vb] == pytest.approx([v for _, v in va], abs=1e-5)
    # the checkpoint records the global batch, and this run's split of it
    keys = ("global_batch", "batch_size", "world_size", "accumulate")
    state = read(one_process["1x8x2"] / "checkpoints" / "last.ckpt")["TokenDataModule"]
    assert [state[k] for k in keys] == [16, 8, 1, 2]
    state = read(run["ddp"] / "checkpoints" / "last.ckpt")["TokenDataModule"]
    assert [state[k] for k in keys] == [16, 8, 2, 1]


@pytest.mark.slow
def test_dist_timeout_bounds_the_wait_for_a_missing_node(data, tmp_path, monkeypatch):
    """torchrun says there are 2 ranks, the other never comes: after dist_timeout, one line."""
    port = free_port()
    env = dict(TORCHELASTIC_RUN_ID="t", RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="1", GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = cfg_of(data, tmp_path, *TWO_NODES, "dist_timeout=0.05")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        train(cfg)
    assert time.perf_counter() - t0 < 20
    assert str(e.value).startswith(
        f"rank 0 of 2: the ranks did not all meet at 127.0.0.1:{port} within dist_timeout=0.05 "
        "minutes"
    )
    assert "\n" not in str(e.value)
    assert not torch.distributed.is_initialized()


def test_start_errors_without_other_ranks_are_raised_as_they_are(data, tmp_path):
    cfg = cfg_of(data, tmp_path)
    assert world_size(cfg) == 1
    with pytest.raises(ConfigError, match="boom"):
        agree_on_start(cfg, ConfigError("boom"))
    agree_on_start(cfg, None)


def test_a_requeued_slurm_job_resumes_from_its_last_ckpt(tmp_path, monkeypatch):
    """submitit (or Lightning) requeued the job: same command, same run dir, no ckpt_path; it
    resumes from the last.ckpt its first run left, a file or a sharded folder."""
    from slm.checkpoint import SHARDED_META
    from slm.resume import resolve_ckpt_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_ckpt_path(None, tmp_path) is None  # nothing to resume yet: a fresh start
    last.mkdir(parents=True)
    (last / SHARDED_META).write_bytes(b"")
    assert resolve_ckpt_path(None, tmp_path) == str(last)
    assert resolve_ckpt_path("last", tmp_path) == str(last)  # a sharded folder is a last.ckpt
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resolve_ckpt_path(None, tmp_path) is None  # the first run starts fresh


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dist_timeout=0"], "dist_timeout=0 must be a positive number of minutes"),
        (["trainer.strategy=fsdp"], "trainer.strategy=fsdp with strategy=ddp: the strategy"),
        (["strategy=fsdp", "strategy.checkpoint=both"], "strategy.checkpoint=both is not one"),
        (["strategy=fsdp", "trainer.precision=16-mixed"], "strategy=fsdp trains in bf16-mixed"),
    ],
)
def test_strategy_settings_that_cannot_work_are_refused(data, tmp_path, overrides, message):
    from slm.strategy import check_strategy

    cfg = cfg_of(data, tmp_path, *overrides)
    with pytest.raises(ConfigError) as e:
        check_strategy(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_resume_data_check_reads_a_sharded_checkpoint(tmp_path):
    """check_resume_data (the data dir a checkpoint trained on) reads a sharded folder's
    meta.pt, where it failed with IsADirectoryError."""
    from slm.checkpoint import SHARDED_META
    from slm.errors import CheckpointError
    from slm.resume import check_resume_data

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"TokenDataModule": {"dir": str(tmp_path / "a")}}, folder / SHARDED_META)
    check_resume_data(folder, tmp_path / "a")
    with pytest.raises(CheckpointError, match="was trained on data.dir="):
        check_resume_data(folder, tmp_path / "b")


def test_dist_timeout_reaches_the_strategy(data, tmp_path):
    """dist_timeout (minutes) is the process group's timeout under either strategy, in place
    of Lightning's 30 minutes; one process trains without a process group."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from slm.strategy import FSDP, trainer_strategy

    ddp = trainer_strategy(cfg_of(data, tmp_path, "trainer.devices=2"))
    assert isinstance(ddp, DDPStrategy) and ddp._timeout == timedelta(minutes=10)
    fsdp = trainer_strategy(cfg_of(data, tmp_path, "strategy=fsdp", "dist_timeout=2.5"))
    assert isinstance(fsdp, FSDP) and fsdp._timeout == timedelta(minutes=2.5)
    assert trainer_strategy(cfg_of(data, tmp_path)) == "auto"
