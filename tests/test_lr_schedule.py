"""LR schedules: each schedule's values by hand, and a prepared scheduler in a 2-process recipe run steps once
per optimizer step (not once per process, not once per micro-batch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_2proc

from fv_accel.build import build_lr_scheduler, build_optimizer
from fv_accel.config import OptimizerConfig


def _lrs(schedule: str, warmup: int, num_steps: int, lr: float = 1.0) -> list[float]:
    """lr after each of num_steps optimizer steps (what metrics.jsonl logs at steps 1..num_steps)."""
    cfg = OptimizerConfig(learning_rate=lr, lr_scheduler=schedule, lr_warmup_steps=warmup)  # type: ignore[arg-type]
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([param], cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, num_steps)
    assert scheduler.get_last_lr()[0] == pytest.approx(lr * (0.0 if warmup else 1.0) if schedule != "constant"
                                                       else lr)
    out = []
    for _ in range(num_steps):
        param.grad = torch.zeros(1)
        optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def test_constant() -> None:
    assert _lrs("constant", 0, 4, lr=0.5) == pytest.approx([0.5] * 4)


def test_constant_with_warmup() -> None:
    assert _lrs("constant_with_warmup", 4, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_with_warmup() -> None:
    # warmup k/2, then (N − k)/(N − 2) down to 0 at the last step.
    assert _lrs("linear", 2, 6) == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_cosine_with_warmup() -> None:
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (k - 2) / 4)) for k in range(3, 7)]
    assert _lrs("cosine", 2, 6) == pytest.approx(expected)


@pytest.mark.distributed
def test_recipe_scheduler_steps_once_per_optimizer_step_on_two_processes(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    lr = 2e-3
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=4", "--training.loop.gradient_accumulation_steps=2",
            "--training.data.train_batch_size=4", f"--training.optimizer.learning_rate={lr}",
            "--training.optimizer.lr_scheduler=linear", "--training.optimizer.lr_warmup_steps=2",
            "--training.tracker.backends=[]"]
    proc = run_2proc(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Stepping twice per optimizer step (per process or per micro-batch) would give [2e-3, 1e-3, 0, 0].
    assert [r["lr/student"] for r in rows] == pytest.approx([lr * f for f in (0.5, 1.0, 0.5, 0.0)])
    # 4 per process × 2 micro-batches × 2 processes
    assert all(r["samples_per_s"] == pytest.approx(16 / r["step_time_s"], rel=1e-6) for r in rows)
