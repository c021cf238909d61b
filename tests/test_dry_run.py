"""``--dry-run`` builds everything, prints every role with correct numbers, and exits 0 without training."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, run_2proc, run_python

from fv_accel.flops import format_flops, wan_forward_flops
from fv_accel.models.wan import TINY_WAN_CONFIG


def _tiny_counts() -> tuple[int, int]:
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**TINY_WAN_CONFIG)
    return model.num_parameters(), sum(p.numel() for p in model.blocks[0].parameters())


def _role_line(stdout: str, role: str) -> list[str]:
    lines = [line.split() for line in stdout.splitlines() if line.startswith(role + " ")]
    assert len(lines) == 1, stdout
    return lines[0]


def _memory(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("estimated memory per device"))
    total = float(re.search(r"activations: ([\d.]+) MiB", line).group(1))
    parts = dict(re.findall(r"(weights|grads\+AdamW|EMA|unsharded blocks) ([\d.]+)", line))
    return {"total": total, **{k: float(v) for k, v in parts.items()}}


def _args(toy_root, out, *extra):
    return ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=7", "--callbacks.validation.every_steps=2",
            "--callbacks.ema.decay=0.9", "--dry-run", *extra]


def test_dry_run_prints_roles_and_exits_without_training(toy_root, tmp_path):
    out = tmp_path / "run"
    proc = run_python(_args(toy_root, out), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    numel, block_numel = _tiny_counts()
    role, params, trainable, dtype, fsdp, shards, mib, *fwd = _role_line(stdout, "student")
    assert (params, trainable, dtype, fsdp, shards) == (f"{numel:,}", "yes", "float32", "FSDP2", "x1")
    assert float(mib) == pytest.approx(numel * 4 / 2**20, abs=0.005)
    assert " ".join(fwd) == format_flops(wan_forward_flops(TINY_WAN_CONFIG, (16, 2, 8, 8), 8))  # toy text_len 8
    assert "optimizer[student]: AdamW" in stdout and "steps=7" in stdout
    assert "data: 768 rows (t2v)" in stdout
    assert "validation: every 2 steps" in stdout and "trackers: tensorboard" in stdout
    # fp32, one process: weights + 3× (grads, AdamW m and v) + EMA shadow + 2 unsharded blocks
    mem = _memory(stdout)
    w = numel * 4 / 2**20
    assert mem["weights"] == pytest.approx(w, abs=0.005)
    assert mem["grads+AdamW"] == pytest.approx(3 * w, abs=0.005)
    assert mem["EMA"] == pytest.approx(w, abs=0.005)
    assert mem["unsharded blocks"] == pytest.approx(2 * block_numel * 4 / 2**20, abs=0.005)
    assert mem["total"] == pytest.approx(5 * w + 2 * block_numel * 4 / 2**20, abs=0.01)
    # nothing trained, nothing written
    assert not out.exists()


@pytest.mark.distributed
def test_dry_run_two_processes_shards_the_estimate(toy_root, tmp_path):
    out = tmp_path / "run"
    proc = run_2proc(_args(toy_root, out), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numel, _ = _tiny_counts()
    role, params, _, _, fsdp, shards, mib, *_ = _role_line(proc.stdout, "student")
    assert (params, fsdp, shards) == (f"{numel:,}", "FSDP2", "x2")  # printed once, by the main process
    # rank 0's shard: FSDP2 splits each parameter along dim 0 (the first rank gets the larger half)
    assert numel * 4 / 2 / 2**20 - 0.01 < float(mib) < numel * 4 / 2**20 * 0.6
    assert not out.exists()


def test_dry_run_dmd2_prints_every_role(toy_root, tmp_path):
    import yaml

    out = tmp_path / "run"
    init = str(toy_root / "init")
    config = {
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "generator_update_interval": 5},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 4, "text_len": 8},
                     "loop": {"max_train_steps": 10}, "checkpoint": {"output_dir": str(out)}},
    }
    (tmp_path / "dmd2.yaml").write_text(yaml.safe_dump(config))
    proc = run_python(["recipes/distill.py", "--config", str(tmp_path / "dmd2.yaml"), "--dry-run"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numel, _ = _tiny_counts()
    trainable = {role: _role_line(proc.stdout, role)[2] for role in ("student", "teacher", "critic")}
    assert trainable == {"student": "yes", "teacher": "no", "critic": "yes"}  # the critic defaults from the teacher
    for role in ("student", "teacher", "critic"):
        assert _role_line(proc.stdout, role)[1] == f"{numel:,}"
    # each role's optimizer steps: the critic every step, the student every 5th
    assert re.search(r"optimizer\[student\]: .* steps=2\b", proc.stdout)
    assert re.search(r"optimizer\[critic\]: .* steps=10\b", proc.stdout)
    mem = _memory(proc.stdout)
    w = numel * 4 / 2**20
    assert mem["weights"] == pytest.approx(3 * w, abs=0.005)
    assert mem["grads+AdamW"] == pytest.approx(6 * w, abs=0.005)  # student and critic, not the teacher
    assert mem["EMA"] == 0
    assert not out.exists()


def test_dry_run_of_the_toy_default_trains_nothing(tmp_path):
    """On a fresh checkout the toy distillation's teacher does not exist yet: a dry run must not train it."""
    from diffusers import WanTransformer3DModel

    from fv_accel.toy import TOY_TEACHER_WAN_OVERRIDES

    proc = run_python([str(REPO / "recipes" / "distill.py"), "--dry-run"], cwd=tmp_path)  # toy world in tmp_path
    assert proc.returncode == 0, proc.stderr[-3000:]
    toy = tmp_path / "outputs" / "toy"
    assert not (toy / "teacher").exists() and not (toy / "teacher-train").exists() and not (toy / "distill").exists()
    assert "the toy teacher is not trained yet" in proc.stderr
    with torch.device("meta"):
        numel = WanTransformer3DModel(**{**TINY_WAN_CONFIG, **TOY_TEACHER_WAN_OVERRIDES}).num_parameters()
    for role in ("student", "teacher", "critic"):
        assert _role_line(proc.stdout, role)[1] == f"{numel:,}"
