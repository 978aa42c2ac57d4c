"""Inference weights in fewer bytes: ``weights=fp32|bf16|fp16|int8|auto`` for generate.py,
``python -m slm.serve`` and ``python -m slm.evaluate`` (the story suite with it).

Decoding one token reads every weight once: at batch 1 its speed is set by the bytes of
weights read per token. ``pack(model, fmt)`` stores the matmul weights (every ``Linear``, the
``lm_head``) and the token embedding in ``fmt``: bf16 or fp16 (2 bytes a weight), or int8 with
one fp32 scale per output channel (1 byte: symmetric, ``w ~ q * scale``, ``q`` in [-127, 127]).
Activations, norms, the position embedding and the KV cache stay in the model's precision
(fp32 on a CPU, autocast's dtype on CUDA): the formats change what is read, not what is
computed. A tied ``lm_head`` and token embedding stay one tensor (in oneDNN's layout,
below, the ``lm_head`` holds its own copy: the embedding reads plain rows).

How each matmul runs (``PackedLinear``; docs/design.md and benchmarks/README.md say why):

- in the compiled decode step, one row at a time (batch 1), int8 anywhere and fp32 on a CPU:
  as a reduction, ``(w.float() * x).sum(-1) * scale``, which inductor turns into one loop that
  streams the weight (a matmul library's one-row product read fp32 at under half the
  memory's speed here, and torch's int8 kernels slower still);
- bf16 on a CPU whose oneDNN computes in it (``onednn_bf16``): oneDNN's matmul on the weight
  stored once, at load, in oneDNN's own blocked layout (the layout inductor's weight freezing
  uses), eager and compiled, at every batch size: its one-row product then reads at the
  memory's speed, where the plain layout reads at under half of it;
- otherwise bf16/fp16 as the weights' own matmul (the input cast to it), and int8 as a matmul
  with the weight cast to the input's dtype, the per-channel scale applied to the output (it
  factors out of each dot product): correct, and the slow path for int8 (it makes a cast copy
  of each weight per call; compile for speed).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from slm.errors import ConfigError
from slm.precision import default_precision

FORMATS = ("auto", "fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (out, in) as int8 ``q`` and an fp32 scale per output row (row ``n`` is
    ``q[n] * scale[n]``), symmetric: the row's largest magnitude maps to 127."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def onednn_bf16(device: torch.device) -> bool:
    """Whether a bf16 matmul weight on ``device`` goes into oneDNN's blocked layout: on a CPU
    where torch's oneDNN computes in bf16 (AVX512 or AMX; a CPU without them keeps the plain
    layout and torch's matmul)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


@torch.library.custom_op("slm::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W.T`` with ``W`` in oneDNN's blocked layout (``torch.ops.mkldnn``'s ops, as
    inductor's weight freezing uses them). An op of its own for ``torch.compile``: inductor
    lowers oneDNN's linear only for weights frozen into the graph, and here the weights are
    the model's buffers, shared by every graph of the step."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _store(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``w`` in ``fmt``: the stored tensor, and the int8 scale (None otherwise)."""
    if fmt == "int8":
        return quantize(w)
    return w.detach().to(DTYPES[fmt]), None


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in a ``weights`` format (module docstring)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias=None) -> None:
        super().__init__()
        self.out_features = weight.size(0)
        # a flag, not the tensor's layout: torch.compile's fake tensors do not carry that
        self.onednn = weight.dtype == torch.bfloat16 and onednn_bf16(weight.device)
        if self.onednn:  # tuned for decoding's one row (any batch size works)
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, scale = self.weight, self.scale
        if self.onednn:  # bf16 in oneDNN's layout
            x16 = x.to(w.dtype).contiguous()
            if torch.compiler.is_compiling():
                y = onednn_linear(x16, w, self.out_features)
            else:  # the op itself: no custom op's dispatch per call
                y = torch.ops.mkldnn._linear_pointwise(x16, w, None, "none", [], "")
        elif torch.compiler.is_compiling() and x.numel() == x.size(-1) and self.streamed(x):
            y = (w.to(torch.float32) * x.reshape(1, -1)).sum(-1).reshape(*x.shape[:-1], -1)
        elif scale is None and w.dtype != x.dtype:
            y = F.linear(x.to(w.dtype), w)  # bf16 / fp16 weights: their own matmul
        else:
            y = F.linear(x, w.to(x.dtype))
        if scale is not None:
            y = y * scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def streamed(self, x: torch.Tensor) -> bool:
        """Whether a compiled one-row product is the streaming reduction: for int8 (every
        matmul kernel would first make a cast copy of it), and for fp32 on a CPU (where
        inductor's loop reads it at twice a GEMV library's speed). bf16 and fp16 keep their
        library matmul, which inductor's loop did not beat here."""
        return self.scale is not None or (x.device.type == "cpu" and self.weight.dtype == x.dtype)


class PackedEmbedding(nn.Module):
    """The rows of an embedding table stored in a ``weights`` format, as fp32."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.weight[idx].to(torch.float32)
        return e if self.scale is None else e * self.scale[idx, None]


@torch.no_grad()
def pack(model: nn.Module, fmt: str) -> nn.Module:
    """``model`` (a GPT, for inference) with its matmul weights and token embedding stored in
    ``fmt`` (fp32, bf16, fp16 or int8; ``resolve`` turns ``auto`` into one), in place. Its
    ``weights`` attribute records the format. Training a packed model is not supported: its
    packed weights are buffers, not parameters."""
    if fmt not in DTYPES and fmt != "int8":
        raise ValueError(f"weights={fmt} is not one of {', '.join(FORMATS[1:])}")
    t = model.transformer
    tied = model.lm_head.weight is t.wte.weight
    weight, scale = _store(model.lm_head.weight, fmt)
    model.lm_head = PackedLinear(weight, scale)
    if not tied:
        weight, scale = _store(t.wte.weight, fmt)
    t.wte = PackedEmbedding(weight, scale)  # tied: the lm_head's values, read by row
    for block in t.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    packed = PackedLinear(*_store(child.weight, fmt), child.bias)
                    setattr(parent, name, packed)
    model.weights = fmt
    return model


def weight_bytes(model: nn.Module) -> int:
    """The bytes of weights one decode step reads: every matmul's weights (with int8 scales
    and biases) and the norms' gains. The embedding tables are read a row per token (a tied
    token embedding counts once, as the ``lm_head``)."""
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, PackedEmbedding)):
            continue
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if t.dim() >= 1:
                tensors[id(t)] = t
    rope = {id(b) for name, b in model.named_buffers() if name.startswith("rope_")}
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in rope)


@functools.cache
def fastest_on_cpu() -> str:
    """fp32, bf16 or fp16, whichever multiplies a decode step's weights fastest on this CPU,
    each as ``PackedLinear`` runs it eagerly: a (1024 -> 16384) matmul (64 MB in fp32, more
    than a cache holds) at batch 1 and at batch 8, the best of 5 of each, their sum (about
    0.2 s, once per process). CPUs differ: with native bf16 (AVX512-BF16, AMX) or without, and
    in their fp16 kernels, which can be fast at batch 1 and slow at batch 8 (seen here)."""
    w = torch.randn(16384, 1024) * 0.02
    cost = {}
    for fmt in ("bf16", "fp16", "fp32"):  # ties go to the first: a half precision
        linear = PackedLinear(*_store(w, fmt))
        cost[fmt] = 0.0
        for batch in (1, 8):
            x = torch.randn(batch, 1024)
            linear(x)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                linear(x)
                times.append(time.perf_counter() - t0)
            cost[fmt] += min(times)
    return min(cost, key=cost.get)


def resolve(fmt: str, device: torch.device) -> str:
    """The format ``weights=fmt`` means on ``device``: ``auto`` is the half precision the
    device computes best (CUDA: bf16 on compute capability >= 8.0, else fp16, as training's
    precision; MPS: fp16; a CPU: ``fastest_on_cpu``); the others are themselves. int8 is never
    chosen for you: it costs a little quality (benchmarks/README.md). A ``ConfigError`` for
    a format not in ``FORMATS``."""
    if fmt not in FORMATS:
        raise ConfigError(f"weights={fmt} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if device.type == "cuda":
        return "bf16" if default_precision(device) == "bf16-mixed" else "fp16"
    if device.type == "mps":
        return "fp16"
    return fastest_on_cpu()
