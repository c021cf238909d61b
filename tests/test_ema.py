"""EMA callback arithmetic, gating, swap-in and state on plain modules; FSDP2 shards at world size 1."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from fv_accel.callbacks.ema import EMACallback
from fv_accel.checkpoint.layout import read_ema_state_dict
from fv_accel.config import EMAConfig
from fv_accel.errors import CheckpointError


def fake_method(module: nn.Module) -> Any:
    student = SimpleNamespace(transformer=module, modules=lambda: {"transformer": module},
                              trained_modules=lambda: ("transformer",))
    return SimpleNamespace(role_models={"student": student})


def set_weights(module: nn.Linear, value: float) -> None:
    with torch.no_grad():
        module.weight.fill_(value)
        module.bias.fill_(-value)


def test_decay_arithmetic_and_gating() -> None:
    lin = nn.Linear(3, 2)
    ema = EMACallback(EMAConfig(decay=0.75, start_step=2, update="generator_steps"), fake_method(lin))
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


def test_every_step_updates_after_critic_only_steps_too() -> None:
    """``update: every_step`` (the default): the EMA updates after every optimizer step, whichever roles stepped.
    Oracle: k updates of a constant weight w from shadow s give s_k = w + d^k (s − w)."""
    d, s, w, k = 0.5, 8.0, 0.0, 3
    lin = nn.Linear(3, 2)
    ema = EMACallback(EMAConfig(decay=d), fake_method(lin))
    assert ema.update_on == "every_step"
    ema.on_train_start(None)  # type: ignore[arg-type]
    set_weights(lin, s)
    ema.on_after_optimizer_step(None, 1, ["critic", "student"])  # type: ignore[arg-type]  # first: copy s
    set_weights(lin, w)  # the student's last update; the next steps are DMD2's critic-only steps
    for step in range(2, 2 + k):
        ema.on_after_optimizer_step(None, step, ["critic"])  # type: ignore[arg-type]
    assert ema.num_updates == 1 + k
    expected = w + d**k * (s - w)  # 1.0, exact in binary
    assert torch.equal(ema.shadow_full()["weight"], torch.full((2, 3), expected))
    assert torch.equal(ema.shadow_full()["bias"], torch.full((2,), -expected))

    gated = EMACallback(EMAConfig(decay=d, update="generator_steps"), fake_method(lin))
    gated.on_train_start(None)  # type: ignore[arg-type]
    set_weights(lin, s)
    gated.on_after_optimizer_step(None, 1, ["critic", "student"])  # type: ignore[arg-type]
    set_weights(lin, w)
    for step in range(2, 2 + k):
        gated.on_after_optimizer_step(None, step, ["critic"])  # type: ignore[arg-type]
    assert gated.num_updates == 1 and torch.equal(gated.shadow_full()["weight"], torch.full((2, 3), s))


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


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_fsdp2_shards_checkpoint_and_one_process_read(tmp_path: Path, single_process_dist: Any, device: str) -> None:
    """World size 1 FSDP2: the shadow is a DTensor laid out like the parameters, DCP saves it under
    ``callbacks.ema`` and :func:`read_ema_state_dict` reads back full tensors keyed like the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fv_accel.checkpoint.states import CallbackState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
    fully_shard(model)
    ema = EMACallback(EMAConfig(decay=0.5, start_step=1, device=device), fake_method(model))  # type: ignore[arg-type]
    ema.on_train_start(None)  # type: ignore[arg-type]
    state = ema.state_dict()
    assert all(isinstance(v, DTensor) and v.placements == model.get_parameter(k).placements
               for k, v in state["shadow"].items())
    with pytest.raises(CheckpointError, match="had not started"):
        dcp.save({"callbacks.ema": CallbackState(ema)}, checkpoint_id=str(tmp_path / "before"))
        read_ema_state_dict(tmp_path / "before", with_student_rest=False)
    start = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ema.on_after_optimizer_step(None, 1, ["student"])  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.on_after_optimizer_step(None, 2, ["student"])  # type: ignore[arg-type]
    dcp.save({"callbacks.ema": CallbackState(ema)}, checkpoint_id=str(tmp_path / "ckpt"))
    full = read_ema_state_dict(tmp_path / "ckpt", with_student_rest=False)
    assert full.keys() == start.keys()
    assert all(torch.allclose(full[k], start[k] + 0.5, rtol=0, atol=1e-6) for k in start)
    dcp.save({"roles.student.transformer": {"w": torch.zeros(2)}}, checkpoint_id=str(tmp_path / "no_ema"))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_ema_state_dict(tmp_path / "no_ema")
    with pytest.raises(CheckpointError, match="not a readable DCP checkpoint"):
        read_ema_state_dict(tmp_path / "nonexistent")


def _shadows(ema: EMACallback) -> dict[str, torch.Tensor]:
    return {k: v.to_local() if hasattr(v, "to_local") else v for k, v in ema.state_dict()["shadow"].items()}


def test_cpu_shadow_equals_device_shadow_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """device=cpu (host shadow, staged in buckets through two buffers) computes the bits of the default device,
    against a per-tensor torch.lerp reference, in separate host storage."""
    import fv_accel.callbacks.ema as ema_module

    # 256-byte buckets: the 10×20 weight (800 B) gets a bucket of its own, the small tensors share buckets
    monkeypatch.setattr(ema_module, "STAGING_BUCKET_BYTES", 256)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Linear(10, 20), nn.Linear(20, 3))
    on_device = EMACallback(EMAConfig(decay=0.9), fake_method(model))
    on_host = EMACallback(EMAConfig(decay=0.9, device="cpu"), fake_method(model))
    for ema in (on_device, on_host):
        ema.on_train_start(None)  # type: ignore[arg-type]
    params = dict(model.named_parameters())
    reference = {k: p.detach().clone() for k, p in params.items()}
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in (on_device, on_host):
            ema.on_after_optimizer_step(None, step, ["student"])  # type: ignore[arg-type]
        for k, p in params.items():
            reference[k] = p.detach().clone() if step == 1 else torch.lerp(reference[k], p.detach(), 0.1)
        device_shadow, host_shadow = _shadows(on_device), _shadows(on_host)
        assert device_shadow.keys() == host_shadow.keys() == reference.keys()
        for k in reference:
            assert torch.equal(host_shadow[k], device_shadow[k]), (step, k)
            torch.testing.assert_close(host_shadow[k], reference[k], rtol=1e-6, atol=1e-6)
    for k, p in params.items():
        host = _shadows(on_host)[k]
        assert host.device.type == "cpu" and host.dtype == torch.float32
        assert host.is_pinned() == torch.cuda.is_available()
        assert _shadows(on_device)[k].device == p.device
        for shadow in (host, _shadows(on_device)[k]):
            assert shadow.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
        assert not torch.equal(host, p.detach())  # the average lags behind the weights


def test_cpu_shadow_resumes_from_a_checkpoint(tmp_path: Path, single_process_dist: Any) -> None:
    """device=cpu: DCP saves the host shadow and loads it into a fresh run's host shadow, bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from fv_accel.checkpoint.states import CallbackState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3))
    fully_shard(model)
    ema = EMACallback(EMAConfig(decay=0.5, device="cpu"), fake_method(model))
    ema.on_train_start(None)  # type: ignore[arg-type]
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step))
        ema.on_after_optimizer_step(None, step, ["student"])  # type: ignore[arg-type]
    saved = {k: v.clone() for k, v in _shadows(ema).items()}
    dcp.save({"callbacks.ema": CallbackState(ema)}, checkpoint_id=str(tmp_path / "ckpt"))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # the resumed run's fresh shadow starts elsewhere
    resumed = EMACallback(EMAConfig(decay=0.5, device="cpu"), fake_method(model))
    resumed.on_train_start(None)  # type: ignore[arg-type]
    dcp.load({"callbacks.ema": CallbackState(resumed)}, checkpoint_id=str(tmp_path / "ckpt"))
    assert resumed.initialized and resumed.num_updates == 2
    for k, v in _shadows(resumed).items():
        assert torch.equal(v, saved[k]) and v.device.type == "cpu"
