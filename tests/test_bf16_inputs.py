"""bf16 mixed precision, prepared by Accelerate with fv_accel's FSDP2 plugin: the timestep reaches the model in
fp32 exactly as given, RoPE keeps its precision, the modules diffusers keeps in fp32 store and compute in fp32,
frozen roles stay bf16, trainable masters fp32, every unit (the root included) reshards after forward, and the
time embedder's gradients near t = 1000 match the same model's in fp32.

The 2-process run uses ``accelerate_configs/cpu_fsdp2_2proc_bf16.yaml``; the behaviours tested there are the
Accelerate ones pyproject.toml pins (frozen dtype, resharding, kept-fp32 units).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ACCELERATE, REPO, free_port, subprocess_env

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
import bf16_inputs  # noqa: E402

SCRIPT = str(Path(__file__).parent / "dist_scripts" / "bf16_inputs.py")
CPU_2PROC_BF16 = str(REPO / "accelerate_configs" / "cpu_fsdp2_2proc_bf16.yaml")
ROLES = ("student", "teacher")


def _kept_in_fp32(name: str) -> bool:
    """diffusers' rule for ``_keep_in_fp32_modules``: a parameter whose dotted name has a listed component."""
    from diffusers import WanTransformer3DModel

    return any(part in WanTransformer3DModel._keep_in_fp32_modules for part in name.split("."))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("bf16_inputs")
    cmd = [ACCELERATE, "launch", "--config_file", CPU_2PROC_BF16, "--main_process_port", str(free_port()),
           SCRIPT, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(rep["world_size"], rep["mixed_precision"]) for rep in reports] == [(2, "bf16")] * 2
    return reports


@pytest.mark.distributed
@pytest.mark.parametrize("role", ROLES)
def test_timestep_reaches_the_condition_embedder_in_fp32_exactly(ranks: list[dict[str, Any]], role: str) -> None:
    for rep in ranks:
        seen = rep[f"{role}_seen"]["embedder_timestep"]
        # 750 is not a bf16 number (it would arrive as 752).
        assert seen == {"dtype": "float32", "values": [bf16_inputs.PROBE_T]}


@pytest.mark.distributed
@pytest.mark.parametrize("role", ROLES)
def test_blocks_get_rope_in_its_own_precision_and_compute_in_bf16(ranks: list[dict[str, Any]], role: str) -> None:
    from diffusers import WanTransformer3DModel

    from fv_accel.models import TINY_WAN_CONFIG

    rope = WanTransformer3DModel(**TINY_WAN_CONFIG).rope
    expected = [str(t.dtype).removeprefix("torch.") for t in rope(torch.zeros(1, *bf16_inputs.LATENT_SHAPE))]
    assert all(torch.finfo(getattr(torch, d)).bits >= 32 for d in expected)
    for rep in ranks:
        seen = rep[f"{role}_seen"]
        assert seen["block_rope_dtypes"] == expected
        # bf16 really is on: hidden states, text and the block's matmuls are bf16.
        assert seen["embedder_text_dtype"] == seen["block_hidden_dtype"] == "bfloat16"
        assert seen["blocks.0.attn1.to_q"] == {"input": "bfloat16", "weight": "bfloat16"}
        assert rep[f"{role}_output_dtype"] == "float32"


@pytest.mark.distributed
@pytest.mark.parametrize("role", ROLES)
def test_kept_fp32_modules_compute_in_fp32(ranks: list[dict[str, Any]], role: str) -> None:
    for rep in ranks:
        seen = rep[f"{role}_seen"]
        assert seen["time_embedder.linear_1"] == {"input": "float32", "weight": "float32"}
        assert seen["blocks.0.norm2"] == {"input": "float32", "weight": "float32"}


@pytest.mark.distributed
def test_frozen_role_stays_bf16_and_trainable_masters_are_fp32(ranks: list[dict[str, Any]]) -> None:
    for rep in ranks:
        teacher = rep["teacher_dtypes"]
        assert teacher == rep["teacher_loaded_dtypes"]  # prepare changed no dtype
        assert {n: d for n, d in teacher.items() if _kept_in_fp32(n)} == {
            n: "float32" for n in teacher if _kept_in_fp32(n)}
        assert {n: d for n, d in teacher.items() if not _kept_in_fp32(n)} == {
            n: "bfloat16" for n in teacher if not _kept_in_fp32(n)}
        assert any(_kept_in_fp32(n) for n in teacher) and not all(_kept_in_fp32(n) for n in teacher)
        assert set(rep["student_dtypes"].values()) == {"float32"}


@pytest.mark.distributed
@pytest.mark.parametrize("role", ROLES)
def test_every_unit_reshards_after_forward(ranks: list[dict[str, Any]], role: str) -> None:
    """Accelerate ≥ 1.14 leaves the root unit gathered after forward; a frozen role never runs a backward that
    would reshard it. fv_accel sets the launcher's reshard_after_forward (true here) on the root too."""
    for rep in ranks:
        assert rep[f"{role}_resharded_after_forward"] is True


@pytest.mark.distributed
def test_time_embedder_gradients_match_fp32_near_t_1000(ranks: list[dict[str, Any]]) -> None:
    """The oracle is the same model, unsharded and in fp32, on the whole batch. With the timestep cast to bf16
    these gradients are ~24% off on this tiny Wan; bf16 block compute alone leaves < 1%."""
    for rep in ranks:
        errors = rep["time_embedder_grad_rel_err"]
        assert set(errors) == set(bf16_inputs.TIME_EMBEDDER)
        for name, err in errors.items():
            assert err < 0.03, f"{name}: {err:.1%} off the fp32 gradient"


def test_policy_leaves_forward_inputs_alone() -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fv_accel.runtime import FP32_POLICY, mixed_precision_policy

    assert mixed_precision_policy("bf16") == MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=None, cast_forward_inputs=False)
    assert mixed_precision_policy("no").param_dtype is None
    assert (FP32_POLICY.param_dtype, FP32_POLICY.reduce_dtype) == (torch.float32, torch.float32)


def test_accelerator_carries_the_bf16_policy(fresh_world, monkeypatch: pytest.MonkeyPatch) -> None:
    from fv_accel.runtime import build_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    policy = build_accelerator().state.fsdp_plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (
        torch.bfloat16, torch.float32, False)


def test_wan_lists_its_parameterised_fp32_modules() -> None:
    from diffusers import WanTransformer3DModel

    from fv_accel.config import ModelConfig
    from fv_accel.models import TINY_WAN_CONFIG, WanModel

    transformer = WanTransformer3DModel(**TINY_WAN_CONFIG)
    model = WanModel(role="student", transformer=transformer, config=ModelConfig(init_from="unused"))
    names = {id(m): n for n, m in transformer.named_modules()}
    # Tiny Wan: 2 blocks with cross_attn_norm (an affine norm2); norm1/norm3/rope have no parameters.
    assert [names[id(m)] for m in model.fp32_modules()] == [
        "condition_embedder.time_embedder", "blocks.0.norm2", "blocks.1.norm2"]


def test_a_dtype_changed_by_prepare_stops_the_run() -> None:
    """What Accelerate 1.10–1.12 did to a frozen bf16 role (upcast to fp32) is refused, naming the role."""
    from types import SimpleNamespace

    from fv_accel.build import finish_prepare

    module = torch.nn.Linear(2, 2)
    stored = {"weight": torch.bfloat16, "bias": torch.float32}
    with pytest.raises(RuntimeError, match=r"role 'teacher' \(weight: torch.bfloat16 → torch.float32; 1 in all\)"):
        finish_prepare(SimpleNamespace(), "teacher", module, stored)  # type: ignore[arg-type]
    finish_prepare(SimpleNamespace(), "teacher", module, {"weight": torch.float32})  # type: ignore[arg-type]
