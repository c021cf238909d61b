"""A FLOP model of the transformer, for model FLOP utilisation (MFU).

Counted: matrix multiplications (linear layers, the patch-embedding convolution, attention scores and the
attention-weighted sum), 2 FLOPs per multiply-accumulate. Not counted: norms, activations, RoPE, softmax,
modulation and other element-wise work (a few percent at real sizes). This is the convention of
``torch.utils.flop_counter.FlopCounterMode``, which the tests use to check the formula.

Each family states its own forward count (``ModelBase.forward_flops``; Wan's formula is
``fv_accel.models.wan.wan_forward_flops``); this module turns them into step FLOPs and MFU.

A training pass costs forward + backward = 3× the forward (the backward computes gradients for inputs and
for weights, 2× the forward). Activation-checkpoint recomputation is not counted: MFU measures the model's
FLOPs, not the hardware's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fv_accel.models.base import ModelBase

#: Dense (no sparsity) peak TFLOP/s per device in bf16, keyed by a substring of
#: ``torch.cuda.get_device_name()``; ``peak_bf16_tflops`` picks the longest key that matches, so "H100 NVL"
#: beats "H100" and "GB200" beats "B200". Sources: NVIDIA's datasheets, whose bf16 figures are "with
#: sparsity", halved here. H100 (SXM 1,979 → 989; PCIe 1,513 → 756; NVL 1,671 per GPU → 835); H800 product
#: brief (SXM 989, PCIe 756, as H100); H200 (SXM 989, NVL 1,671 → 835); HGX B200 (36 PF for 8 GPUs → 2250
#: each); GB200 NVL72 (10 PF per superchip of 2 GPUs → 2500 each).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H800", 989.0),
    ("H800 PCIe", 756.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("GB200", 2500.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU called ``device_name``: the most specific (longest) matching table key, so a
    variant with its own figure is never read as its family's first entry; None for an unknown GPU."""
    matches = [(len(key), value) for key, value in PEAK_BF16_TFLOPS if key in device_name]
    return max(matches)[1] if matches else None


@dataclass(frozen=True)
class PassCount:
    """Samples that went through one role's transformer during one micro-batch.

    ``forward`` counts every sample forward, with or without grad (a CFG-batched teacher call on B samples is
    2·B); ``backward`` counts the samples whose forward was differentiated. Activation-checkpoint recompute
    is not a forward here.
    """

    forward: int = 0
    backward: int = 0

    def __add__(self, other: PassCount) -> PassCount:
        return PassCount(self.forward + other.forward, self.backward + other.backward)


def model_forward_flops(model: ModelBase, latent_shape: Sequence[int], text_len: int) -> int | None:
    """Forward FLOPs per sample of a role model (its family's ``forward_flops``), or None when its family has
    no FLOP model."""
    return model.forward_flops(latent_shape, text_len)


def training_flops(forward_flops: int, passes: PassCount) -> int:
    """FLOPs of ``passes`` through a model whose forward costs ``forward_flops`` per sample."""
    return forward_flops * (passes.forward + 2 * passes.backward)


class StepFlops:
    """FLOPs of one step from the passes a method reports, with per-(role, shape) forward costs cached."""

    def __init__(self, role_models: Mapping[str, Any]) -> None:
        self.role_models = dict(role_models)
        self._cache: dict[tuple[str, tuple[int, ...], int], int | None] = {}

    def forward_flops(self, role: str, latent_shape: Sequence[int], text_len: int) -> int | None:
        key = (role, tuple(int(x) for x in latent_shape), int(text_len))
        if key not in self._cache:
            self._cache[key] = model_forward_flops(self.role_models[role], latent_shape, text_len)
        return self._cache[key]

    def __call__(self, passes: Mapping[str, PassCount], latent_shape: Sequence[int], text_len: int) -> int | None:
        """Total FLOPs; None when nothing was reported or a role has no FLOP model."""
        if not passes:
            return None
        total = 0
        for role, count in passes.items():
            per_sample = self.forward_flops(role, latent_shape, text_len)
            if per_sample is None:
                return None
            total += training_flops(per_sample, count)
        return total


def peak_tflops_per_device(device: Any, mixed_precision: str, configured: float | None) -> float | None:
    """The peak MFU is measured against: the configured value, else the bf16 table for a known GPU in a bf16
    run, else None (CPU, fp32 runs and unknown GPUs report achieved TFLOP/s without MFU)."""
    if configured is not None:
        return configured
    if getattr(device, "type", str(device)) != "cuda" or mixed_precision != "bf16":
        return None
    import torch

    return peak_bf16_tflops(torch.cuda.get_device_name(device))


def format_flops(value: float) -> str:
    if value <= 0:
        return "0"
    exp = min(int(math.log10(value) // 3), 5)
    unit = ["", "K", "M", "G", "T", "P"][exp]
    return f"{value / 10 ** (3 * exp):.3g} {unit}FLOP"
