"""The FLOP model against a hand count and against torch's FLOP counter on the real diffusers Wan."""

from __future__ import annotations

import pytest
import torch

from fv_accel.flops import (
    PassCount,
    StepFlops,
    format_flops,
    peak_bf16_tflops,
    peak_tflops_per_device,
    training_flops,
)
from fv_accel.models.wan import TINY_WAN_CONFIG, wan_forward_flops


def test_tiny_wan_forward_flops_hand_count():
    # TINY_WAN_CONFIG: D = 2·16 = 32, F = 64, f = 32, text_dim 32, patch [1,2,2] (P = 4), 2 layers.
    # Latent [16, 2, 8, 8] → N = 2·4·4 = 32 tokens; L = 8 text tokens.
    embed = 2 * 32 * (16 * 4) * 32                      # 131,072
    time = 2 * 32 * 32 + 2 * 32 * 32 + 2 * 32 * 192      # 16,384
    text = 2 * 8 * 32 * 32 + 2 * 8 * 32 * 32             # 32,768
    self_attn = 4 * 2 * 32 * 32 * 32 + 4 * 32 * 32 * 32  # 262,144 projections + 131,072 scores
    cross = 2 * 2 * 32 * 32 * 32 + 2 * 2 * 8 * 32 * 32 + 4 * 32 * 8 * 32
    ffn = 2 * 2 * 32 * 32 * 64
    out = 2 * 32 * 32 * 64
    hand = embed + time + text + 2 * (self_attn + cross + ffn) + out
    assert hand == 2_015_232
    assert wan_forward_flops(TINY_WAN_CONFIG, (16, 2, 8, 8), 8) == hand


@pytest.mark.parametrize(("shape", "text_len", "batch"), [((16, 2, 8, 8), 8, 3), ((16, 4, 8, 12), 5, 2)])
def test_matches_torch_flop_counter(shape, text_len, batch):
    """Every matmul of the real model is in the formula, and nothing else: equal to the FLOP."""
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_WAN_CONFIG).eval()
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), 500.0)
    text = torch.randn(batch, text_len, TINY_WAN_CONFIG["text_dim"])
    # The math attention backend decomposes into bmm, which the counter sees (the fused CPU kernel it misses).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=x, timestep=t, encoder_hidden_states=text)
    assert counter.get_total_flops() == batch * wan_forward_flops(TINY_WAN_CONFIG, shape, text_len)


def test_wan_1_3b_magnitude():
    """Wan2.1 1.3B, 81 frames 480×832 (latent [16, 21, 60, 104]), 512 text tokens: 32,760 tokens; the
    linear part is ≈ 2·(block weights)·N and attention adds 4·N²·D per layer."""
    from fv_accel.models.wan import WAN_1_3B_CONFIG

    flops = wan_forward_flops(WAN_1_3B_CONFIG, (16, 21, 60, 104), 512)
    n, d, f, layers = 21 * 30 * 52, 1536, 8960, 30
    attention = layers * 4 * n * n * d
    linear_blocks = layers * 2 * n * (6 * d * d + 2 * d * f)
    assert n == 32_760
    assert 0 < flops - attention - linear_blocks < 0.02 * flops
    # ≈ 2·(1.3e9 weights)·N = 85 TFLOP of matmuls plus 198 TFLOP of attention: 283 TFLOP per sample forward
    assert 2.8e14 < flops < 2.9e14
    assert abs(linear_blocks - 2 * 1.25e9 * n) < 0.1 * linear_blocks


def test_pass_counts_to_step_flops():
    from fv_accel.models import ModelBase

    class NoFlopFamily(ModelBase):  # states no FLOP model: the base class answers None
        normalize_latents = denormalize_latents = predict_velocity = None

    per = wan_forward_flops(TINY_WAN_CONFIG, (16, 2, 8, 8), 8)
    assert training_flops(per, PassCount(forward=4, backward=4)) == 12 * per
    # a no-grad forward counts once, a differentiated one three times
    assert training_flops(per, PassCount(forward=5, backward=1)) == 7 * per
    assert PassCount(1, 1) + PassCount(2, 0) == PassCount(3, 1)

    from fv_accel.config import ModelConfig
    from fv_accel.models.wan import WanModel

    class _Cfg:
        config = dict(TINY_WAN_CONFIG, in_channels=16)

        def parameters(self):
            return iter([torch.zeros(1)])

    model = WanModel.__new__(WanModel)
    model.transformer = _Cfg()
    model.config = ModelConfig(init_from="x")
    step = StepFlops({"student": model, "other": NoFlopFamily.__new__(NoFlopFamily)})
    assert step({"student": PassCount(2, 1)}, (16, 2, 8, 8), 8) == 4 * per
    assert step({}, (16, 2, 8, 8), 8) is None  # the method reported nothing: no MFU
    assert step({"other": PassCount(1, 0)}, (16, 2, 8, 8), 8) is None  # a family without a FLOP model


@pytest.mark.parametrize(("device_name", "expected"), [
    # Dense bf16 per GPU from NVIDIA's datasheets (their "with sparsity" figures halved).
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA GB200", 2500.0),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA H100 80GB HBM3", 989.0),  # the SXM part's device name
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce GTX 1080", None),
    ("", None),
])
def test_peak_bf16_tflops_picks_the_most_specific_name(device_name: str, expected: float | None) -> None:
    assert peak_bf16_tflops(device_name) == expected


def test_peak_table_and_format():
    assert peak_tflops_per_device(torch.device("cpu"), "no", None) is None
    assert peak_tflops_per_device(torch.device("cpu"), "bf16", None) is None
    assert peak_tflops_per_device(torch.device("cpu"), "no", 1.5) == 1.5
    assert format_flops(2_015_232) == "2.02 MFLOP"
    assert format_flops(2.83e14) == "283 TFLOP"
