"""EMA callback arithmetic, gating, swap-in and state on plain modules; FSDP2 shards at world size 1."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from fv_accel.callbacks.ema import EMACallback, load_ema_state_dict
from fv_accel.config import EMAConfig
from fv_accel.errors import CheckpointError


def fake_method(module: nn.Module) -> Any:
    return SimpleNamespace(role_models={"student": SimpleNamespace(transformer=module)})


def set_weights(module: nn.Linear, value: float) -> None:
    with torch.no_grad():
        module.weight.fill_(value)
        module.bias.fill_(-value)


def test_decay_arithmetic_and_gating() -> None:
    lin = nn.Linear(3, 2)
    ema = EMACallback(EMAConfig(decay=0.75, start_step=2), fake_method(lin))
    ema.on_train_start(None)  # type: ignore[arg-type]
    set_weights(lin, 1.0)
    ema.on_after_optimizer_step(None, 1, ["student"])  # type: ignore[arg-type]  # before start_step
    assert not ema.initialized and ema.num_updates == 0
    set_weights(lin, 2.0)
    ema.on_after_optimizer_step(None, 2, ["student"])  # type: ignore[arg-type]  # first active: copy
    assert ema.initialized and torch.equal(ema.shadow_full()["weight"], torch.full((2, 3), 2.0))
    set_weights(lin, 10.0)
    ema.on_after_optimizer_step(None, 3, ["critic"])  # type: ignore[arg-type]  # student did not step
    assert ema.num_updates == 1
    ema.on_after_optimizer_step(None, 4, ["critic", "student"])  # type: ignore[arg-type]
    # 0.75·2 + 0.25·10 = 4 (exact in binary)
    assert torch.equal(ema.shadow_full()["weight"], torch.full((2, 3), 4.0))
    assert torch.equal(ema.shadow_full()["bias"], torch.full((2,), -4.0))
    set_weights(lin, 0.0)
    ema.on_after_optimizer_step(None, 5, ["student"])  # type: ignore[arg-type]
    assert torch.equal(ema.shadow_full()["weight"], torch.full((2, 3), 3.0))
    assert ema.num_updates == 3


def test_swapped_in_restores_exactly_even_on_error() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    ema = EMACallback(EMAConfig(decay=0.5), fake_method(lin))
    ema.on_train_start(None)  # type: ignore[arg-type]
    with ema.swapped_in():  # not started yet: the EMA is the weights
        pass
    ema.update()
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin.weight.add_(torch.randn(4, 4) * 1e-3)  # weights move on; the average lags behind
    trained = {k: v.clone() for k, v in lin.state_dict().items()}
    ema.update()
    expected = {k: before[k] + 0.5 * (trained[k] - before[k]) for k in before}
    with ema.swapped_in():
        assert all(torch.allclose(lin.state_dict()[k], expected[k], rtol=0, atol=1e-7) for k in expected)
    assert all(torch.equal(lin.state_dict()[k], trained[k]) for k in trained)
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in():
        raise RuntimeError("inside")
    assert all(torch.equal(lin.state_dict()[k], trained[k]) for k in trained)


def test_state_dict_roundtrip_and_mismatch() -> None:
    lin = nn.Linear(3, 2)
    ema = EMACallback(EMAConfig(decay=0.9), fake_method(lin))
    ema.update()
    set_weights(lin, 1.0)
    ema.update()
    state = {"shadow": {k: v.clone() for k, v in ema.state_dict()["shadow"].items()},
             "initialized": True, "num_updates": 2, "decay": 0.9}
    other_lin = nn.Linear(3, 2)
    other = EMACallback(EMAConfig(decay=0.9), fake_method(other_lin))
    other.load_state_dict(state)
    assert other.initialized and other.num_updates == 2
    assert all(torch.equal(other.shadow_full()[k], ema.shadow_full()[k]) for k in state["shadow"])
    wrong = EMACallback(EMAConfig(decay=0.9), fake_method(nn.Linear(3, 3, bias=False)))
    with pytest.raises(ValueError, match="missing|unexpected"):
        wrong.load_state_dict(state)


def test_fsdp2_shards_checkpoint_and_one_process_read(tmp_path: Path, single_process_dist: Any) -> None:
    """World size 1 FSDP2: the shadow is a DTensor laid out like the parameters, DCP saves it under
    ``callbacks.ema`` and :func:`load_ema_state_dict` reads back full tensors keyed like the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fv_accel.checkpoint.manager import _CallbackState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
    fully_shard(model)
    ema = EMACallback(EMAConfig(decay=0.5, start_step=1), fake_method(model))
    ema.on_train_start(None)  # type: ignore[arg-type]
    state = ema.state_dict()
    assert all(isinstance(v, DTensor) and v.placements == model.get_parameter(k).placements
               for k, v in state["shadow"].items())
    with pytest.raises(CheckpointError, match="had not started"):
        dcp.save({"callbacks.ema": _CallbackState(ema)}, checkpoint_id=str(tmp_path / "before"))
        load_ema_state_dict(tmp_path / "before", with_student_rest=False)
    start = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ema.on_after_optimizer_step(None, 1, ["student"])  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.on_after_optimizer_step(None, 2, ["student"])  # type: ignore[arg-type]
    dcp.save({"callbacks.ema": _CallbackState(ema)}, checkpoint_id=str(tmp_path / "ckpt"))
    full = load_ema_state_dict(tmp_path / "ckpt", with_student_rest=False)
    assert full.keys() == start.keys()
    assert all(torch.allclose(full[k], start[k] + 0.5, rtol=0, atol=1e-6) for k in start)
    dcp.save({"roles.student.transformer": {"w": torch.zeros(2)}}, checkpoint_id=str(tmp_path / "no_ema"))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_ema_state_dict(tmp_path / "no_ema")
    with pytest.raises(CheckpointError, match="not a readable DCP checkpoint"):
        load_ema_state_dict(tmp_path / "nonexistent")
