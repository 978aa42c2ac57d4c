"""A GPT in plain PyTorch, after nanoGPT: token + learned position embeddings, pre-LN blocks of
causal self-attention and a GELU MLP, a final LayerNorm and an ``lm_head`` tied to the token
embedding. Generation can use a key/value cache (``KVCache``): one new position per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    vocab_size: int = 50257  # GPT-2's; the embedding is padded up to a multiple of 64
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the big lm_head matmul on fast tensor-core tile sizes.
        return (self.vocab_size + 63) // 64 * 64

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``block_size``
    positions, allocated once; ``pos`` is how many positions are filled."""

    def __init__(self, config: GPTConfig, batch: int, device, dtype) -> None:
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch, config.n_head, config.block_size, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask, causal = None, True
        if cache is not None:
            p = cache.pos
            cache.k[layer, :, :, p : p + T] = k
            cache.v[layer, :, :, p : p + T] = v
            k, v = cache.k[layer, :, :, : p + T], cache.v[layer, :, :, : p + T]
            if p > 0:  # queries at p..p+T-1 see every cached key up to their own position
                causal = False
                if T > 1:
                    mask = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(p)
        # Flash attention on GPUs; is_causal avoids materialising a mask in training.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying: the output projection is the token embedding (saves ~19M parameters
        # at n_embd=384 and helps small models).
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
        """Parameters split as in the scaling-law papers: the (tied) token and position
        embeddings vs. everything else."""
        total = sum(p.numel() for p in self.parameters())  # tied weights count once
        emb = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return {"total": total, "embedding": emb, "non_embedding": total - emb}

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the real vocab (a view without the padding columns, so padding ids
        are never sampled) and, with ``targets``, the mean cross-entropy over the real vocab.
        ``cache`` continues from ``cache.pos``; ``last_only`` computes logits for the last
        position only (generation)."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
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
