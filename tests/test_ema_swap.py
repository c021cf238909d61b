"""EMA swap under FSDP2: the swapped-in weights reach every unit, even those a no-grad forward left unsharded.

FSDP2 keeps the root unit unsharded after a forward (it expects the backward), and every unit with
``reshard_after_forward: false``; a swap that writes only the sharded parameters would then sample with training
weights in those units. Oracle: a plain (unsharded) tiny Wan with ``load_state_dict`` of the EMA (or training)
weights, computed without FSDP.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fv_accel.callbacks.ema import EMACallback
from fv_accel.config import EMAConfig
from fv_accel.runtime import assert_fsdp2_sharded, build_accelerator


def _plain_tiny_wan() -> nn.Module:
    from diffusers import WanTransformer3DModel

    from fv_accel.models.wan import TINY_WAN_CONFIG

    torch.manual_seed(0)
    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def _forward(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    text = torch.randn(2, 8, 32, generator=gen)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([100.0, 900.0]), encoder_hidden_states=text,
                     return_dict=False)[0]


def _oracle(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward of a fresh unsharded model holding ``weights``."""
    model = _plain_tiny_wan()
    model.load_state_dict(weights, strict=True)
    return _forward(model)


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("reshard_after_forward", ["true", "false"])
def test_ema_swap_reaches_units_a_forward_left_unsharded(fresh_world, monkeypatch, reshard_after_forward) -> None:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    # What `fsdp_reshard_after_forward` in the accelerate config becomes; build_accelerator leaves it to the plugin.
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", reshard_after_forward)
    accelerator = build_accelerator()
    model = fsdp2_prepare_model(accelerator, _plain_tiny_wan())  # sharded like build.shard_roles does it
    assert_fsdp2_sharded("student", model)
    assert len([m for m in model.modules() if isinstance(m, FSDPModule)]) > 2  # root + blocks (+ norms)
    ema = EMACallback(EMAConfig(decay=0.5), SimpleNamespace(role_models={"student": SimpleNamespace(
        transformer=model, modules=lambda: {"transformer": model}, trained_modules=lambda: ("transformer",))}))
    ema.on_train_start(None)  # type: ignore[arg-type]
    ema.update()  # the average starts at the initial weights
    with torch.no_grad():  # "training" moves every weight away from the average
        gen = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.to_local().add_(torch.randn(p.to_local().shape, generator=gen) * 0.1)
    training = _full_weights(model)
    ema_weights = ema.shadow_full()
    want_ema, want_training = _oracle(ema_weights), _oracle(training)
    assert (want_ema - want_training).abs().max() > 1e-2  # the two weight sets are told apart by the output

    # The student's own sample first: a no-grad forward leaves units unsharded (the root, or every one).
    torch.testing.assert_close(_forward(model), want_training, rtol=1e-5, atol=1e-5)
    with ema.swapped_in():
        torch.testing.assert_close(_forward(model), want_ema, rtol=1e-5, atol=1e-5)
    # Leaving the swap must not leave EMA weights behind in units the sample left unsharded.
    torch.testing.assert_close(_forward(model), want_training, rtol=1e-5, atol=1e-5)
    for module in model.modules():  # the forward left units unsharded: look at the sharded parameters
        if isinstance(module, FSDPModule):
            module.reshard()
    assert all(torch.equal(p.full_tensor(), training[n]) for n, p in model.named_parameters())
