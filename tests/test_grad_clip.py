"""fv_accel.grad_clip.clip_grad_norm_ against a hand computation and torch.nn.utils.clip_grad_norm_ on a plain copy:
plain parameters and FSDP2 (DTensor) parameters of a world-size-1 mesh."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from fv_accel.grad_clip import clip_grad_norm_


def _model_with_grads(scale: float) -> nn.Module:
    """Two Linear layers with fixed gradients ``scale * randn`` (one parameter left without a gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = scale * torch.randn(p.shape, generator=gen)
    model[1].bias.grad = None  # a parameter without a gradient is skipped, not counted as zero
    return model


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that also carries the gradients (``copy.deepcopy`` of a Parameter drops ``.grad``)."""
    twin = copy.deepcopy(model)
    for p, src in zip(twin.parameters(), model.parameters(), strict=True):
        p.grad = None if src.grad is None else src.grad.clone()
    return twin


def _hand_norm(model: nn.Module) -> float:
    return sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None) ** 0.5


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_gradients_below_max_norm_are_left_bit_for_bit(scale: float) -> None:
    max_norm = 5.0
    model = _model_with_grads(scale)
    norm = _hand_norm(model)
    assert norm < max_norm
    before = _grads(model)
    total = clip_grad_norm_(model.parameters(), max_norm)
    assert total is not None and float(total) == pytest.approx(norm, rel=1e-6)
    for grad, ref in zip(_grads(model), before, strict=True):
        assert (grad is None) == (ref is None)
        if grad is not None:
            assert torch.equal(grad, ref), "a gradient below max_norm must not be rescaled"


@pytest.mark.parametrize("scale", [3.0, 100.0])
def test_gradients_above_max_norm_match_the_hand_value_and_torch(scale: float) -> None:
    max_norm = 0.5
    model = _model_with_grads(scale)
    reference = _copy_with_grads(model)
    norm = _hand_norm(model)
    assert norm > max_norm
    raw = _grads(model)
    total = clip_grad_norm_(model.parameters(), max_norm)
    torch_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert total is not None
    assert float(total) == pytest.approx(norm, rel=1e-6)  # the norm before clipping
    torch.testing.assert_close(total, torch_total)
    coef = max_norm / (norm + 1e-6)
    for p, ref, g in zip(model.parameters(), reference.parameters(), raw, strict=True):
        if g is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=0)
    clipped = _hand_norm(model)
    assert clipped == pytest.approx(max_norm, rel=1e-5)


def test_non_positive_max_norm_only_measures() -> None:
    model = _model_with_grads(100.0)
    before = _grads(model)
    total = clip_grad_norm_(model.parameters(), 0.0)
    assert total is not None and float(total) == pytest.approx(_hand_norm(model), rel=1e-6)
    assert all(g is None and r is None or torch.equal(g, r) for g, r in zip(_grads(model), before, strict=True))


def test_no_gradients_gives_none() -> None:
    assert clip_grad_norm_(nn.Linear(2, 2).parameters(), 1.0) is None


@pytest.mark.parametrize("scale", [1e-3, 100.0])
def test_fsdp2_dtensor_gradients_match_torch_on_a_plain_copy(single_process_dist: Any, scale: float) -> None:
    """FSDP2 on a one-rank mesh: the gradients are DTensors (Shard(0)); the result must be the one torch's
    clip gives on the same gradients held by plain parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    max_norm = 0.5
    plain = _model_with_grads(scale)
    reference = _copy_with_grads(plain)
    sharded = copy.deepcopy(plain)  # parameters only: the gradients are set as DTensors below
    fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    for p, src in zip(sharded.parameters(), plain.parameters(), strict=True):
        if src.grad is not None:
            p.grad = DTensor.from_local(src.grad.clone(), p.device_mesh, p.placements)
    assert all(isinstance(p.grad, DTensor) for p in sharded.parameters() if p.grad is not None)

    total = clip_grad_norm_(sharded.parameters(), max_norm)
    torch_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert total is not None and not isinstance(total, DTensor)
    torch.testing.assert_close(total, torch_total)
    for p, ref, src in zip(sharded.parameters(), reference.parameters(), plain.parameters(), strict=True):
        if ref.grad is None:
            assert p.grad is None
            continue
        got = p.grad.full_tensor()
        if scale < 1:  # below max_norm: untouched, bit for bit
            assert torch.equal(got, src.grad)
        torch.testing.assert_close(got, ref.grad, rtol=1e-6, atol=0)


def test_parameters_without_gradients_are_skipped_not_the_end_of_the_list() -> None:
    """A frozen parameter (no gradient) before trainable ones must not end the scan: every later gradient counts
    in the norm and is scaled (found by mutation testing: ``continue`` → ``break`` survived)."""
    frozen = nn.Parameter(torch.ones(3))
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    norm = clip_grad_norm_([frozen, a, b], max_norm=1.0)
    assert norm is not None and norm.item() == pytest.approx(5.0)  # sqrt(3² + 4²) by hand
    coef = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(a.grad, torch.tensor([3.0 * coef, 0.0])) and torch.allclose(b.grad, torch.tensor([0.0, 4.0 * coef]))
