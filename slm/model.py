"""A GPT in plain PyTorch, after nanoGPT: token + learned position embeddings, pre-LN blocks of
causal self-attention and a GELU MLP, a final LayerNorm and an ``lm_head`` tied to the token
embedding. Attention runs in two modes: training (causal, no cache) and cached (``KVCache``:
the new keys and values written at each row's slots, ``Slots``), which generation uses for its
prefill and its one-token steps (``slm.decode``).

The changes that won since GPT-2 are config choices (the defaults are GPT-2, so old
checkpoints load unchanged): rotary positions (``positions="rope"``, RoFormer / Llama),
``norm="rmsnorm"`` (Llama), ``mlp="swiglu"`` (Llama) or ``"relu2"`` (Primer,
modded-nanogpt), ``qk_norm`` (RMSNorm on each head's queries and keys: OLMo 2, Qwen 3,
modded-nanogpt) and an untied ``lm_head`` (``tie_embeddings=False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

CHOICES = {
    "positions": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "relu2"),
}


@dataclass
class GPTConfig:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    vocab_size: int = 50257  # the tokenizer's (GPT-2's); the embedding is padded to x64
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    positions: str = "learned"  # "learned" (absolute, GPT-2) or "rope" (rotary)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    mlp: str = "gelu"  # "gelu", "swiglu" or "relu2"
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention
    tie_embeddings: bool = True  # lm_head shares the token embedding's weights
    rope_theta: float = 10000.0  # RoPE base: the slowest pair turns once per ~2*pi*theta tokens
    eot_id: int = 50256  # the tokenizer's <|endoftext|> (GPT-2's): ends and starts a story

    def __post_init__(self) -> None:
        broken = GPTConfig.broken_rule(vars(self))
        if broken is not None:
            raise ValueError(broken[1])

    @staticmethod
    def broken_rule(values: Mapping[str, Any], prefix: str = "") -> tuple[str, str] | None:
        """The first rule of a model's shape that ``values`` (a config's fields) break, as
        ``(the key to change, a one-line message)``, the keys named with ``prefix`` (``model.``
        in the Hydra config); None where they keep them all."""
        n_embd, n_head = values["n_embd"], values["n_head"]
        if n_embd % n_head:
            return "n_embd", (
                f"{prefix}n_embd={n_embd} is not divisible by {prefix}n_head={n_head}; "
                "pick n_embd as a multiple of n_head"
            )
        for key, allowed in CHOICES.items():
            if values.get(key) not in allowed:
                return key, f"{prefix}{key}={values.get(key)} is not one of {', '.join(allowed)}"
        if values["positions"] == "rope" and (n_embd // n_head) % 2:
            return "n_embd", (
                f"{prefix}positions=rope rotates pairs of dimensions: the head size "
                f"n_embd/n_head={n_embd // n_head} must be even; change {prefix}n_embd or n_head"
            )
        return None

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width. GELU and ReLU^2 have two C x 4C matrices (8C^2 weights);
        SwiGLU has three (gate, up, down), so its width is 8C/3, rounded up to a multiple of 8,
        for about the same parameters (exactly the same at C=384 and C=768)."""
        if self.mlp == "swiglu":
            return 8 * math.ceil(8 * self.n_embd / 3 / 8)
        return 4 * self.n_embd

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the big lm_head matmul on fast tensor-core tile sizes.
        return (self.vocab_size + 63) // 64 * 64

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for ``batch`` rows of up to ``block_size`` positions,
    allocated once: ``k[layer]`` and ``v[layer]`` are (batch, n_head, block_size, head_size).
    With RoPE the keys are stored rotated (at their slot's position). The cache holds no
    positions: whoever decodes (``slm.decode``) knows how far each row is filled, and says
    where a call writes (``GPT.forward``'s ``pos``). One tensor per layer, not one for all: a
    compiled step that writes a slot of a graph input in place stays in place, where a slot of
    a view (one layer of a stacked tensor) is written by copying the whole cache."""

    def __init__(self, config: GPTConfig, batch: int, device, dtype) -> None:
        shape = (batch, config.n_head, config.block_size, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows ``start:stop`` as a cache of their own: views, so what is written lands here."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        return view


class Slots:
    """Where one cached forward writes and what it reads: ``T`` new positions per row from
    ``pos`` on (an int: every row at the same slot; a (B,) tensor: a slot per row), attending
    over the first ``span`` slots of the cache, each query only to keys at or before its own
    position. Made once per forward and shared by every layer."""

    def __init__(self, pos: int | torch.Tensor, T: int, span: int, device) -> None:
        self.pos, self.T, self.span = pos, T, span
        self.mask, self.causal = None, False
        if isinstance(pos, int):
            self.positions = torch.arange(pos, pos + T, device=device)  # (T,)
            if span == pos + T and pos == 0:
                self.causal = True  # a prefill: plain causal attention, no mask tensor
            elif span != pos + T or T > 1:  # (one new query over the filled prefix: no mask)
                self.mask = torch.arange(span, device=device) <= self.positions[:, None]
        else:  # written by a position tensor: the same shapes at every step (compile, CUDA graphs)
            self.positions = pos[:, None] + torch.arange(T, device=device)  # (B, T)
            # (B, 1, T, span): row b sees its own filled slots; stale ones past it are masked
            self.mask = (torch.arange(span, device=device) <= self.positions[..., None])[:, None]

    def update(self, buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Write ``new`` (B, n_head, T, head_size) into its slots of ``buf`` (one layer's keys
        or values), cast into the cache's dtype (under CUDA autocast qk_norm's keys come back
        float32 where the cache is bf16); the slots attention reads."""
        new = new.to(buf.dtype)
        if isinstance(self.pos, int):
            buf[:, :, self.pos : self.pos + self.T] = new
        else:  # row b's T keys at its own slots: an index_put_ that compiles in place (a
            # scatter_ is copied whole by inductor: the cache, at every step)
            rows = torch.arange(new.size(0), device=new.device)[:, None]
            buf[rows, :, self.positions] = new.transpose(1, 2)
        return buf[:, :, : self.span]


class RMSNorm(nn.Module):
    """x / rms(x) * gain: LayerNorm without the mean subtraction and the bias (Llama)."""

    def __init__(self, ndim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(config: GPTConfig, ndim: int | None = None) -> nn.Module:
    ndim = ndim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(ndim)
    return nn.LayerNorm(ndim, bias=config.bias)


def rope_cache(config: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, (block_size, head_size / 2): position p turns
    pair i by p * theta^(-2i / head_size)."""
    hs = config.head_size
    inv_freq = config.rope_theta ** (-torch.arange(0, hs, 2, device=device).float() / hs)
    angles = torch.outer(torch.arange(config.block_size, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of the last dim by its angle (the half-split
    layout of GPT-NeoX and Llama in Hugging Face). Rotations compose, so q . k depends on the
    positions' difference only: what lets a KV cache slide (``GPT.shift_cache``)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # bounds the attention logits: no loss spikes at high lr
            self.q_norm = RMSNorm(config.head_size)
            self.k_norm = RMSNorm(config.head_size)
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv: tuple[torch.Tensor, torch.Tensor, Slots] | None = None,
    ) -> torch.Tensor:
        """Training (``kv`` None: causal over ``x``'s own positions) or cached: ``kv`` is this
        layer's keys, values and the call's ``Slots``; the new keys and values are written
        there and the queries attend over the slots read."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # (cos, sin) of these T positions; keys are cached rotated
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask, causal = None, True
        if kv is not None:
            keys, values, slots = kv
            k, v = slots.update(keys, k), slots.update(values, v)
            mask, causal = slots.mask, slots.causal
        # A cache may hold another dtype than the activations (a bf16 cache under fp32
        # activations): attend in the cache's, which costs a cast of the new queries only.
        dtype = x.dtype
        q = q.to(k.dtype)
        # Flash attention on GPUs; is_causal avoids materialising a mask in training.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C).to(dtype)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU (GPT-2), ReLU^2 (Primer: relu(x)^2, sparser and cheaper than GELU) or SwiGLU
    (Llama: silu(gate) * up, ``c_fc`` computing gate and up in one matmul)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind, hidden = config.mlp, config.mlp_hidden
        n_fc = 2 * hidden if config.mlp == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, n_fc, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope=None, kv=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # The order of the modules is the order of the optimizer's state in checkpoints.
        layers = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))
        if config.positions == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers["drop"] = nn.Dropout(config.dropout)
        layers["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        layers["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(layers)
        if config.positions == "rope":
            # Not saved in checkpoints (persistent=False): computed from the config.
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the output projection is the token embedding (saves ~19M
            # parameters at n_embd=384 and helps small models).
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> dict[str, int]:
        """Parameters split as in the scaling-law papers: the token and position embeddings
        vs. everything else (an untied ``lm_head`` counts as non-embedding)."""
        total = sum(p.numel() for p in self.parameters())  # tied weights count once
        emb = self.transformer.wte.weight.numel()
        if "wpe" in self.transformer:
            emb += self.transformer.wpe.weight.numel()
        return {"total": total, "embedding": emb, "non_embedding": total - emb}

    def _embed(self, idx: torch.Tensor, pos: torch.Tensor):
        """The input of the first block for tokens ``idx`` (B, T) at positions ``pos`` ((T,),
        or (B, T) for a position per row), and RoPE's (cos, sin) of those positions (None with
        learned positions), shaped to broadcast over the heads of (B, n_head, T, head_size)."""
        x, rope = self.transformer.wte(idx), None
        if self.config.positions == "learned":
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.rope_cos[pos], self.rope_sin[pos]  # (T, hs / 2) or (B, T, hs / 2)
            if pos.dim() == 2:
                rope = rope[0][:, None], rope[1][:, None]  # (B, 1, T, hs / 2)
        return self.transformer.drop(x), rope

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pos: int | torch.Tensor = 0,
        span: int | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the real vocab (a view without the padding columns, so padding ids
        are never sampled) and, with ``targets``, the mean cross-entropy over the real vocab.

        Training runs without ``cache``: causal attention over ``idx``'s own T positions. With
        a ``cache`` (generation, ``slm.decode``), the T tokens of each row sit at cache slots
        ``pos`` .. ``pos + T - 1`` (``pos`` an int for every row, or a (B,) tensor, a slot per
        row); their keys and values are written there, and they attend over the first
        ``span`` slots (default: the filled ones for an int ``pos``, all ``block_size`` slots
        for a tensor, shapes that never change: one compiled graph for every position).
        ``last_only`` computes logits for the last position only (generation)."""
        B, T = idx.size()
        kvs: list = [None] * self.config.n_layer
        if cache is None:
            positions = torch.arange(T, device=idx.device)
        else:
            if span is None:
                span = pos + T if isinstance(pos, int) else self.config.block_size
            slots = Slots(pos, T, span, idx.device)
            positions = slots.positions
            kvs = [(k, v, slots) for k, v in zip(cache.k, cache.v)]
        if isinstance(pos, int) and pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}"
            )
        x, rope = self._embed(idx, positions)
        for block, kv in zip(self.transformer.h, kvs):
            x = block(x, rope, kv)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, padded_vocab_size)
        V = self.config.vocab_size
        loss = None
        if targets is not None:
            # The loss runs over the padded logits with the padding columns at -inf: out of
            # the softmax, so the same loss and gradients as over the real vocab. Filling a
            # few columns in place is free, where the cross-entropy of the sliced logits
            # copied the largest activation of the model (B x T x vocab) into a contiguous
            # tensor, and its backward filled and copied one more. Outside autograd: their
            # gradient is exactly 0 anyway, and the matmul does not keep its output.
            with torch.no_grad():
                logits[..., V:] = float("-inf")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits[..., :V], loss

    def new_cache(self, batch: int, dtype: torch.dtype) -> KVCache:
        """An empty ``KVCache`` of ``batch`` rows in ``dtype`` on the model's device."""
        return KVCache(self.config, batch, next(self.parameters()).device, dtype)

    def shift_cache(self, cache: KVCache, filled: int, keep: int) -> None:
        """Of the ``filled`` positions of ``cache`` (every row), keep the newest ``keep``,
        moved to the front, and drop the rest: a context shift that keeps the cache (RoPE
        only); new tokens then continue at slot ``keep``.

        A key is cached rotated at its slot p; moving it to slot p - d would need it rotated
        at p - d. Rotations compose, so rotating it once more by -d does that exactly (what
        llama.cpp does at a context shift); values carry no position. Attention scores then
        depend on the same relative positions as before the shift, and the cache stays one
        preallocated tensor with positions < block_size. The kept keys still remember
        (through the layers below) the tokens that were dropped, which is what a refill
        would forget. With learned absolute positions a shifted key would be wrong: refill
        the cache instead."""
        if self.config.positions != "rope":
            raise ValueError("shift_cache needs positions=rope; with learned positions refill")
        if not 0 <= keep <= filled <= self.config.block_size:
            raise ValueError(f"keep={keep} must be in [0, filled={filled}]")
        d = filled - keep
        if d and keep:  # (keep=0 moves nothing: d may then be block_size, past the table)
            # cos(-a) = cos(a), sin(-a) = -sin(a): rotate back by d positions.
            cos, sin = self.rope_cos[d], -self.rope_sin[d]
            for k, v in zip(cache.k, cache.v):
                k[:, :, :keep] = apply_rope(k[:, :, d:filled], cos, sin)
                v[:, :, :keep] = v[:, :, d:filled].clone()  # the ranges may overlap

    @torch.inference_mode()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """``idx`` (B, T) with ``max_new_tokens`` sampled tokens appended to each row, as
        nanoGPT's ``generate`` does (no stop at ``<|endoftext|>``; ``temperature=0`` is
        greedy). A thin call of ``slm.sample.generate``, the decoder every command uses; use
        that for stop tokens, top-p, a seeded generator or streaming."""
        from slm.sample import generate  # the decoder builds on this module

        new = generate(self, idx, max_new_tokens, temperature, top_k, stop_token=None)
        return torch.cat([idx, torch.tensor(new, dtype=idx.dtype, device=idx.device)], dim=1)

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = False
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on >= 2-D weights (matmuls, embeddings) only; biases and
        LayerNorm gains are not decayed."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
