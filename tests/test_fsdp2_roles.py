"""2-process FSDP2 on CPU (gloo): two trainable roles with their own optimizers and a frozen role, sharded by
fv_accel.build.shard_roles and trained by the real Trainer, against the same run unsharded in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, run_torchrun

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
import fsdp2_roles  # noqa: E402

SCRIPT = str(Path(__file__).parent / "dist_scripts" / "fsdp2_roles.py")


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp2_roles")
    proc = run_torchrun(SCRIPT, str(out), nproc=2, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = [json.loads(line) for line in (out / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "rows": rows}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    return fsdp2_roles.reference(str(tmp_path_factory.mktemp("reference")))


@pytest.mark.distributed
def test_every_role_is_sharded_and_only_trainable_roles_get_optimizers(two_proc: dict[str, Any]) -> None:
    for rep in two_proc["ranks"]:
        assert rep["world_size"] == 2
        for role in ("student", "critic", "teacher"):
            assert rep[f"{role}_all_dtensor"], f"{role} has plain (non-DTensor) parameters on rank {rep['rank']}"
            # Really sharded: each rank holds about half of the parameters.
            assert rep[f"{role}_local_numel"] < 0.6 * rep[f"{role}_numel"]
        assert rep["optimizer_roles"] == ["critic", "student"] and rep["num_optimizers"] == 2
        assert rep["teacher_requires_grad"] is False
    r0, r1 = two_proc["ranks"]
    assert r0["student_local_numel"] + r1["student_local_numel"] == r0["student_numel"]


@pytest.mark.distributed
def test_frozen_role_never_gets_gradients_or_updates(two_proc: dict[str, Any]) -> None:
    for rep in two_proc["ranks"]:
        assert rep["teacher_grad_none"] is True
        assert rep["teacher_unchanged"] is True


@pytest.mark.distributed
def test_clip_norm_is_global_and_matches_single_process(two_proc: dict[str, Any], single: Any) -> None:
    _, ref_norms = single
    r0, r1 = (rep["clip_norms"] for rep in two_proc["ranks"])
    assert len(r0) == len(ref_norms) == fsdp2_roles.NUM_STEPS
    # Both ranks computed the same global norm (not their local shard's) ...
    assert r0 == r1
    for step, (mine, ref) in enumerate(zip(r0, ref_norms, strict=True), start=1):
        assert set(mine) == {"student", "critic"}
        for role in mine:
            # ... equal to the unsharded model's norm; all above max_grad_norm, so clipping acted every step.
            assert mine[role] == pytest.approx(ref[role], rel=2e-5), f"step {step} {role}"
            assert mine[role] > fsdp2_roles.MAX_GRAD_NORM


@pytest.mark.distributed
def test_losses_match_single_process_run(two_proc: dict[str, Any], single: Any) -> None:
    ref_rows, _ = single
    rows = two_proc["rows"]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3, 4]
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("student_loss", "critic_loss", "grad_norm/student", "grad_norm/critic"):
            assert row[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-7), f"step {row['step']} {key}"
    # The training actually moved the weights: losses after 3 updates differ from the first step's.
    assert rows[3]["critic_loss"] != pytest.approx(rows[0]["critic_loss"], rel=1e-3)
    assert rows[3]["student_loss"] != pytest.approx(rows[0]["student_loss"], rel=1e-3)


@pytest.mark.distributed
def test_each_prepared_scheduler_steps_once_per_optimizer_step(two_proc: dict[str, Any], single: Any) -> None:
    """Both schedulers went through accelerator.prepare(); with 2 processes they must still step once per step."""
    lr_s, lr_c = fsdp2_roles.STUDENT_OPT["learning_rate"], fsdp2_roles.CRITIC_OPT["learning_rate"]
    rows = two_proc["rows"]
    # student: linear, 2 warmup steps over 4 → k/2 then (4 − k)/2 ; critic: constant_with_warmup, 3 warmup steps.
    assert [r["lr/student"] for r in rows] == pytest.approx([lr_s * f for f in (0.5, 1.0, 0.5, 0.0)])
    assert [r["lr/critic"] for r in rows] == pytest.approx([lr_c * f for f in (1 / 3, 2 / 3, 1.0, 1.0)])
    ref_rows, _ = single
    assert [r["lr/student"] for r in rows] == [r["lr/student"] for r in ref_rows]
