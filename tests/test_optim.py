"""Muon for the hidden matrices + AdamW for the rest: the split, the one-optimizer wrapper
(schedule, state_dict), and a real Trainer fit of model=tiny arch=modern optim=muon that
learns, resumes exactly and loads in generate.py."""

import io
import json

import lightning as L
import pytest
import torch
from conftest import generate_cli, tiny_cfg

from slm.config import compose
from slm.model import GPT, GPTConfig
from slm.module import GPTModule
from slm.optim import MuonWithAdamW, build_optimizer, split_params
from slm.prepare import prepare
from slm.train import train

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=256)


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_in_exactly_one_group(tie):
    model = GPT(GPTConfig(**{**TINY.to_dict(), "tie_embeddings": tie, "qk_norm": True}))
    groups = split_params(model)
    ids = [id(p) for g in groups.values() for _, p in g]
    assert len(ids) == len(set(ids))  # none twice (a tied weight is one parameter)
    assert set(ids) == {id(p) for p in model.parameters()}  # none left out
    muon = {n for n, _ in groups["muon"]}
    assert muon == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    decay = {n for n, _ in groups["decay"]}
    assert decay == (
        {"transformer.wte.weight", "transformer.wpe.weight"}
        | (set() if tie else {"lm_head.weight"})
    )
    assert all(p.dim() == 1 for _, p in groups["no_decay"])  # norm gains (and q/k gains)

    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    assert isinstance(opt, MuonWithAdamW)
    assert [len(g["params"]) for g in opt.param_groups] == [8, len(decay), len(groups["no_decay"])]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-3, 1e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1, 0.0]
    assert opt.param_groups[0] is opt.muon.param_groups[0]  # shared, so the scheduler reaches it


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer 'sgd' is not one of adamw, muon"):
        build_optimizer(GPT(TINY), "sgd")


def _steps(model, opt, sched, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 256, (4, 8), generator=g)
        _, loss = model(x, x)
        loss.backward()
        opt.step(lambda: None)  # a closure, as Lightning passes one
        opt.zero_grad()
        sched.step()


def test_schedule_and_state_dict_round_trip():
    """The schedule multiplies both optimizers' lrs; a state_dict restored into a fresh wrapper
    continues exactly like the original."""
    torch.manual_seed(0)
    a = GPT(TINY)
    b = GPT(TINY)
    b.load_state_dict(a.state_dict())

    def make(model):
        opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.02)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    opt_a, sched_a = make(a)
    _steps(a, opt_a, sched_a, 3, seed=0)
    assert [g["lr"] for g in opt_a.param_groups] == pytest.approx([0.02 / 4, 1e-3 / 4, 1e-3 / 4])
    buffer = io.BytesIO()  # through bytes, as in a checkpoint: no tensor shared with opt_a
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert len(state["state"]) == sum(1 for _ in a.parameters())
    b.load_state_dict(a.state_dict())
    opt_b, sched_b = make(b)
    opt_b.load_state_dict(state)
    sched_b.load_state_dict(sched_a.state_dict())
    assert opt_b.muon.state is opt_b.state and opt_b.adamw.param_groups == opt_b.param_groups[1:]
    _steps(a, opt_a, sched_a, 2, seed=1)
    _steps(b, opt_b, sched_b, 2, seed=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_muon_moves_every_hidden_matrix_by_its_orthogonalized_step():
    model = GPT(TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "muon", lr=0.0, muon_lr=0.02)  # AdamW frozen, Muon only
    _, loss = model(torch.randint(0, 256, (4, 8)), torch.randint(0, 256, (4, 8)))
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name.startswith("transformer.h.") and p.dim() == 2), name


def test_muon_orthogonalises_each_stacked_matrix_on_its_own():
    """c_attn stacks q, k and v, SwiGLU's c_fc gate and up: their update is the reference's,
    where each is a matrix of its own (here torch.optim.Muon on the blocks split by hand), two
    steps (momentum) with weight decay; the momentum buffer keeps the stacked weight's shape."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.to_dict(), "mlp": "swiglu", "n_layer": 1}))
    hidden = split_params(model)["muon"]
    opt = build_optimizer(model, "muon", lr=0.0, muon_lr=0.02, muon_weight_decay=0.1)

    def n_blocks(name: str) -> int:
        return 3 if name.endswith("c_attn.weight") else 2 if name.endswith("c_fc.weight") else 1

    parts = [
        [torch.nn.Parameter(b.detach().clone()) for b in p.chunk(n_blocks(n))] for n, p in hidden
    ]
    reference = torch.optim.Muon(
        [b for bs in parts for b in bs], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True
    )
    for _ in range(2):
        for (_, p), bs in zip(hidden, parts):
            p.grad = torch.randn_like(p)
            for b, g in zip(bs, p.grad.chunk(len(bs))):
                b.grad = g.clone()
        opt.step()
        reference.step()
    for (name, p), bs in zip(hidden, parts):
        torch.testing.assert_close(p, torch.cat(list(bs)), rtol=0, atol=1e-7, msg=name)
        assert opt.state[p]["momentum_buffer"].shape == p.shape


# -- a real Trainer run ----------------------------------------------------------------------

MODERN = ["experiment=modern", "optim.warmup_steps=2", "trainer.max_steps=8",
          "val_every_n_steps=4", "data.val_windows=8"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory, v1_txt):
    d = tmp_path_factory.mktemp("muon")
    prepare(str(v1_txt), d / "data", val_fraction=0.02)
    return d / "data", [f"data.source={v1_txt}", "data.val_fraction=0.02"]


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_tiny_modern_muon_fit_learns_resumes_exactly_and_generates(
    data, tmp_path, monkeypatch, capsys
):
    data_dir, source = data
    train(tiny_cfg(data_dir, tmp_path / "a", *source, *MODERN))
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)
    hist = a["callbacks"]["RunHistory"]
    assert hist["val"][-1][1] < hist["val"][0][1] - 0.5  # from ~10.8, in 8 steps on real text
    assert a["hyper_parameters"]["optimizer"] == "muon"
    assert a["hyper_parameters"]["positions"] == "rope"

    real_init = L.Trainer.__init__

    def init(self, *args, callbacks=(), **kwargs):
        real_init(self, *args, callbacks=[*callbacks, StopAt(5)], **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)
    with pytest.raises(SystemExit):
        train(tiny_cfg(data_dir, tmp_path / "b", *source, *MODERN))
    monkeypatch.setattr(L.Trainer, "__init__", real_init)
    train(tiny_cfg(data_dir, tmp_path / "b", *source, *MODERN, "ckpt_path=last"))
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    for k, w in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], w, rtol=1e-5, atol=1e-6, msg=k)
    momentum = [s for s in b["optimizer_states"][0]["state"].values() if "momentum_buffer" in s]
    assert len(momentum) == 8  # Muon's state for the 8 hidden matrices came back too
    hb = b["callbacks"]["RunHistory"]
    assert [v for _, v in hb["val"]] == pytest.approx([v for _, v in hist["val"]], rel=1e-5)

    cfg = compose("generate", [f"ckpt={tmp_path / 'b/slm.pt'}", "max_new_tokens=20",
                               "num_samples=1", "device=cpu"])  # fmt: skip
    assert generate_cli().run(cfg) == 0  # generate.py
    assert capsys.readouterr().out.startswith("Once upon a time")
    module = GPTModule.load_from_checkpoint(tmp_path / "b/checkpoints/last.ckpt")
    assert module.config.positions == "rope" and not module.config.tie_embeddings
    assert json.loads((tmp_path / "b/metrics.json").read_text())["steps"] == 8
