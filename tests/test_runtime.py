"""build_accelerator: the launcher's FSDP settings reach fully_shard; every model ends up FSDP2-sharded."""

from __future__ import annotations

import pytest
import torch

from fv_accel.runtime import assert_fsdp2_sharded, build_accelerator


def _plain_tiny_wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    from fv_accel.models.wan import TINY_WAN_CONFIG

    return WanTransformer3DModel(**TINY_WAN_CONFIG)


def _prepare(accelerator, transformer: torch.nn.Module) -> torch.nn.Module:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    model = fsdp2_prepare_model(accelerator, transformer)
    assert_fsdp2_sharded("student", model)
    return model


def _prepared_tiny_wan(accelerator):
    torch.manual_seed(0)
    return _prepare(accelerator, _plain_tiny_wan())


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


def test_predict_velocity_returns_a_tensor_of_its_own(single_process_dist) -> None:
    """FSDP2 warns when a wrapped module returns a view (an in-place op on it would drop the pre-backward hook).
    WanModel.predict_velocity hands out its own tensor, so an in-place op there keeps the gradients right."""
    from fv_accel.config import ModelConfig
    from fv_accel.models.wan import WanModel

    def grads(in_place: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = WanModel.from_transformer("student", _plain_tiny_wan(), ModelConfig(init_from="unused"))
        model.transformer = _prepare(single_process_dist, model.transformer)
        x = torch.randn(2, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
        v = model.predict_velocity(x, torch.tensor([100.0, 900.0]), torch.ones(2, 8, 32))
        assert not v._is_view()
        if in_place:
            v.mul_(2.0)
        else:
            v = v * 2.0
        v.square().mean().backward()
        return [p.grad.full_tensor() for p in model.transformer.parameters()]

    for a, b in zip(grads(in_place=True), grads(in_place=False), strict=True):
        torch.testing.assert_close(a, b)


def test_topology_of_a_world_of_one(single_process_dist) -> None:
    """An in-process world of one: rank 0 of 1, the data rank too, the main process; the same answer with and
    without the Accelerator. (Two gloo ranks: ``tests/dist_scripts/rank_views.py`` checks each rank's.)"""
    from fv_accel.runtime import Topology

    topology = Topology.from_accelerator(single_process_dist)
    fields = (topology.rank, topology.world_size, topology.local_rank, topology.data_rank,
              topology.data_world_size, topology.is_main)
    assert fields == (0, 1, 0, 0, 1, True)
    plain = Topology.from_process_group()
    assert (plain.rank, plain.world_size, plain.local_rank, plain.data_rank, plain.data_world_size,
            plain.is_main) == fields
    assert Topology(rank=3, world_size=4).is_main is False


def test_topology_without_a_process_group() -> None:
    import torch.distributed as dist

    from fv_accel.runtime import Topology

    if dist.is_initialized():
        pytest.skip("a process group is left over from another test")
    assert Topology.from_process_group() == Topology(rank=0, world_size=1, local_rank=0, data_rank=0,
                                                      data_world_size=1, device_mesh=None)


def test_derived_seed_keeps_the_historical_values() -> None:
    """The seeds every random stream had before the helper existed (seed·1_000_003 + offset), by hand."""
    from fv_accel.runtime import SHARED_STREAM_OFFSET, derived_seed

    assert derived_seed(0, 0) == 0
    assert derived_seed(3, 1) == 3_000_010  # the method's per-rank generator of rank 1, seed 3
    assert derived_seed(3, SHARED_STREAM_OFFSET) == 3_007_928  # its rank-independent choices: 3_000_009 + 7_919
    assert derived_seed(2, 1 + SHARED_STREAM_OFFSET) == 2_007_926  # global RNGs of rank 1, seed 2
    assert derived_seed(42, 0) == 42_000_126


def test_no_library_module_imports_cli() -> None:
    """``fv_accel/cli.py`` is the recipes' entry-point plumbing: a library module that imports it ties the
    library to argument parsing and exit codes (the toy teacher once trained through ``cli.train``)."""
    import ast
    from pathlib import Path

    import fv_accel

    offenders = []
    for path in sorted(Path(fv_accel.__file__).parent.rglob("*.py")):
        if path.name == "cli.py" and path.parent.name == "fv_accel":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "fv_accel":
                names = [f"fv_accel.{a.name}" for a in node.names]
            if any(n == "fv_accel.cli" or n.startswith("fv_accel.cli.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
