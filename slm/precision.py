"""One place decides where and in what precision the model runs: the device of the inference
commands, and the numeric precision for training, evaluation and generation.

bf16 only where the GPU computes it natively (compute capability >= 8.0: A100, H100, L4, RTX 30xx
and later); fp16 with loss scaling on older GPUs (T4, V100); fp32 on the CPU. (PyTorch's
``torch.cuda.is_bf16_supported()`` also says yes on a T4, where bf16 is emulated and slow.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.utilities import GradClipAlgorithmType

from slm.errors import first_line

MIXED = ("bf16-mixed", "16-mixed")
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a
    ``ValueError`` when the machine does not have it."""
    name = str(name)
    kind = name.split(":")[0]
    if kind not in DEVICES or (":" in name and kind != "cuda"):
        raise ValueError(f"device={name} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but this machine has no CUDA GPU; use device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name} but MPS is not available here; use device=cpu or auto")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name}: {first_line(e)}") from e
    if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name} but there are {torch.cuda.device_count()} CUDA devices")
    return device


def default_precision(device: str | torch.device) -> str:
    """The Lightning precision to train in on ``device``: ``bf16-mixed``, ``16-mixed`` or
    ``32-true``."""
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16-mixed" if major >= 8 else "16-mixed"
    return "32-true"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision string; None when it runs without autocast."""
    if precision == "bf16-mixed":
        return torch.bfloat16
    if precision == "16-mixed":
        return torch.float16
    return None


def inference_autocast(device: str | torch.device):
    """The autocast context for evaluation and generation on ``device`` (a no-op on the CPU)
    and the dtype activations (and a KV cache) have under it, or None for the model's own."""
    device = torch.device(device)
    dtype = autocast_dtype(default_precision(device))
    if dtype is None:
        return contextlib.nullcontext(), None
    return torch.autocast(device.type, dtype=dtype), dtype


def inference_precision(model: torch.nn.Module, device: str | torch.device):
    """``inference_autocast(device)``, with the dtype of activations and of a KV cache filled
    in: the model's parameters' where autocast is off (the CPU)."""
    autocast, dtype = inference_autocast(device)
    return autocast, dtype or next(model.parameters()).dtype


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in:
    evaluation and generation in the middle of training leave it training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class ClippableMixedPrecision(MixedPrecision):
    """Lightning's mixed-precision plugin, but a fused optimizer may be clipped.

    Lightning refuses to clip gradients for an optimizer that unscales them inside its own step
    (fused AdamW), even under bf16 where nothing is scaled, because it only unscales for the
    other optimizers. Here the gradients of a fused optimizer are unscaled right after the
    closure's backward, where Lightning unscales the others, so the clipping hooks that follow
    see true gradients; ``GradScaler.step`` then hands the fused kernel no scale (the gradients
    are unscaled already) but still the found-inf flag, so a step with overflowed fp16
    gradients is skipped on the GPU, without a host sync."""

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        def closure_then_unscale():
            result = closure()
            # As Lightning does for the other optimizers: not when backward was skipped (a
            # training_step that returned None), or GradScaler would refuse the next unscale.
            ran_backward = result is not None or not model.automatic_optimization
            if self.scaler is not None and ran_backward and _optimizer_handles_unscaling(optimizer):
                self.scaler.unscale_(optimizer)
            return result

        return super().optimizer_step(optimizer, model, closure_then_unscale, **kwargs)

    def clip_gradients(
        self,
        optimizer,
        clip_val: float = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        # Skips MixedPrecision's refusal: the gradients were unscaled after the closure.
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def trainer_precision(precision: str, accelerator: str) -> dict:
    """``lightning.Trainer`` keyword arguments for ``precision`` on ``accelerator`` (``cpu``,
    ``gpu``/``cuda``): the mixed precisions get ``ClippableMixedPrecision`` as a plugin."""
    if precision not in MIXED:
        return {"precision": precision}
    device = "cuda" if accelerator in ("gpu", "cuda") else accelerator
    return {"plugins": [ClippableMixedPrecision(precision, device)]}
