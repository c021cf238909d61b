"""``models.<role>.compile: regional``: every block is compiled before FSDP2 shards it, and the sharded,
compiled model computes what the eager one does (forward, backward, on a world-size-1 FSDP2 group)."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from diffusers import WanTransformer3DModel
from torch.distributed.tensor import DTensor

from fv_accel.config import ModelConfig
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel
from fv_accel.runtime import assert_fsdp2_sharded


def _sharded(accelerator, compile_mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**TINY_WAN_CONFIG)
    cfg = ModelConfig(family="wan", init_from="unused", compile=compile_mode)
    model = WanModel.from_transformer("student", transformer, cfg)
    compiled = [getattr(block, "_compiled_call_impl", None) is not None for block in model.transformer.blocks]
    assert compiled == [compile_mode == "regional"] * len(compiled)
    sharded = fsdp2_prepare_model(accelerator, model.transformer)
    assert_fsdp2_sharded("student", sharded)
    return sharded


@pytest.mark.timeout(600)
def test_regional_compile_matches_eager_under_fsdp2(single_process_dist) -> None:
    accelerator = single_process_dist
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    t = torch.tensor([250.0, 750.0])
    text = torch.randn(2, 8, 32, generator=gen)
    results = {}
    for mode in ("off", "regional"):
        model = _sharded(accelerator, mode)
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out.float().square().mean().backward()
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for n, p in model.named_parameters()}
        results[mode] = (out.detach(), grads)
    out_eager, grads_eager = results["off"]
    out_compiled, grads_compiled = results["regional"]
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-5, atol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys()
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)
