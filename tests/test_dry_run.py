"""``--dry-run`` builds everything, prints every role with correct numbers, and exits 0 without training."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, run_2proc, run_python, run_recipe_captured

from fv_accel.flops import format_flops
from fv_accel.models.wan import TINY_WAN_CONFIG, wan_forward_flops


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


def _memory(stdout: str) -> tuple[float, dict[tuple[str, str], float]]:
    """The estimate's peak (MiB) and its terms, (role, term) → MiB, as the dry run prints them."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("estimated peak memory per device"))
    total = float(re.search(r"device: ([\d.]+) MiB", lines[head]).group(1))
    terms: dict[tuple[str, str], float] = {}
    for line in lines[head + 1:]:
        m = re.match(r"  (\S+)\s+[\d.]+ MiB  \((.*)\)$", line)
        if m is None:
            break
        for part in m.group(2).split(", "):
            name, value = part.rsplit(" ", 1)
            terms[(m.group(1), name)] = float(value)
    return total, terms


def _args(toy_root, out, *extra):
    return ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=7", "--callbacks.validation.every_steps=2",
            "--callbacks.ema.decay=0.9", "--dry-run", *extra]


def test_dry_run_prints_roles_and_exits_without_training(toy_root, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    proc = run_recipe_captured("finetune", _args(toy_root, out)[1:], capsys, caplog)
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
    # fp32, one process: weights, AdamW m and v, EMA shadow, 2 unsharded blocks, the root unit unsharded
    total, mem = _memory(stdout)
    w = numel * 4 / 2**20
    assert mem[("student", "weights (fp32 master)")] == pytest.approx(w, abs=0.005)
    assert mem[("student", "AdamW m+v")] == pytest.approx(2 * w, abs=0.005)
    assert mem[("student", "EMA shadow")] == pytest.approx(w, abs=0.005)
    assert mem[("FSDP2", "all-gather (2 blocks)")] == pytest.approx(2 * block_numel * 4 / 2**20, abs=0.005)
    root = numel - TINY_WAN_CONFIG["num_layers"] * block_numel
    assert mem[("student", "root unit (unsharded)")] == pytest.approx(root * 4 / 2**20, abs=0.005)
    assert total == pytest.approx(sum(mem.values()), abs=0.05)
    assert "device memory: no CUDA device" in stdout and "WARNING" not in stdout
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
    # the estimate divides every state by the shard degree, 2 (activations are per rank)
    _, mem = _memory(proc.stdout)
    assert mem[("student", "weights (fp32 master)")] == pytest.approx(numel * 4 / 2 / 2**20, abs=0.005)
    assert mem[("student", "AdamW m+v")] == pytest.approx(numel * 8 / 2 / 2**20, abs=0.005)
    assert not out.exists()


def test_dry_run_dmd2_prints_every_role(toy_root, tmp_path, capsys, caplog):
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
    proc = run_recipe_captured("distill", ["--config", str(tmp_path / "dmd2.yaml"), "--dry-run"], capsys, caplog)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numel, _ = _tiny_counts()
    trainable = {role: _role_line(proc.stdout, role)[2] for role in ("student", "teacher", "critic")}
    assert trainable == {"student": "yes", "teacher": "no", "critic": "yes"}  # the critic defaults from the teacher
    for role in ("student", "teacher", "critic"):
        assert _role_line(proc.stdout, role)[1] == f"{numel:,}"
    # each role's optimizer steps: the critic every step, the student every 5th
    assert re.search(r"optimizer\[student\]: .* steps=2\b", proc.stdout)
    assert re.search(r"optimizer\[critic\]: .* steps=10\b", proc.stdout)
    _, mem = _memory(proc.stdout)
    w = numel * 4 / 2**20
    for role in ("student", "critic"):  # fp32 toy: the teacher is fp32 too, with no optimizer
        assert mem[(role, "weights (fp32 master)")] == pytest.approx(w, abs=0.005)
        assert mem[(role, "AdamW m+v")] == pytest.approx(2 * w, abs=0.005)
    assert mem[("teacher", "weights (frozen)")] == pytest.approx(w, abs=0.005)
    assert ("teacher", "AdamW m+v") not in mem and not any(name == "EMA shadow" for _, name in mem)
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


def test_dry_run_warns_when_the_estimate_exceeds_the_target(toy_root, tmp_path, capsys, caplog):
    """training.target_device_memory_gib far below the toy's estimate: the summary names the largest terms in a
    WARNING and the run still exits 0 (a dry run reports, it does not refuse)."""
    out = tmp_path / "run"
    small = run_recipe_captured("finetune", _args(toy_root, out, "--training.target_device_memory_gib=2.001")[1:],
                                capsys, caplog)
    assert small.returncode == 0, small.stderr[-3000:]
    total, mem = _memory(small.stdout)
    warning = [line for line in small.stdout.splitlines() if line.startswith("WARNING: estimated peak memory")]
    assert len(warning) == 1, small.stdout
    # 2.001 GiB minus the 2 GiB reserve leaves 1.02 MiB, less than the toy's few MiB
    assert "exceeds the 0.00 GiB usable of 2.00 GiB (training.target_device_memory_gib)" in warning[0]
    biggest = max(mem, key=lambda k: mem[k])
    assert f"largest terms: {biggest[0]} {biggest[1]} {mem[biggest]:.2f} MiB" in warning[0]
    assert not out.exists()
