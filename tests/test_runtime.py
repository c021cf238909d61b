"""build_accelerator: the launcher's FSDP settings reach fully_shard; every model ends up FSDP2-sharded."""

from __future__ import annotations

import pytest
import torch

from fv_accel.runtime import assert_fsdp2_sharded, build_accelerator


def _prepared_tiny_wan(accelerator):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from diffusers import WanTransformer3DModel

    from fv_accel.models.wan import TINY_WAN_CONFIG

    torch.manual_seed(0)
    model = fsdp2_prepare_model(accelerator, WanTransformer3DModel(**TINY_WAN_CONFIG))
    assert_fsdp2_sharded("student", model)
    return model


def _reshards_after_forward(module: torch.nn.Module) -> bool:
    group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
    return group.post_forward_mesh_info is not None


@pytest.mark.parametrize(("env", "expected"), [(None, True), ("false", False), ("true", True)])
def test_reshard_after_forward_follows_the_launcher(fresh_world, monkeypatch, env, expected) -> None:
    if env is not None:
        monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", env)  # what `fsdp_reshard_after_forward` becomes
    accelerator = build_accelerator()
    assert accelerator.is_fsdp2
    assert accelerator.state.fsdp_plugin.reshard_after_forward is expected
    model = _prepared_tiny_wan(accelerator)
    assert [_reshards_after_forward(block) for block in model.blocks] == [expected] * len(model.blocks)


def test_unsupported_mixed_precision_is_refused(fresh_world, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ValueError, match="'fp16' is not supported"):
        build_accelerator()
