"""One view of the filesystem: ranks that see different output directories stop at start with exit 2, and
decisions that lead into collectives are rank 0's (2 CPU processes under torchrun, gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, REPO, free_port, subprocess_env

pytestmark = pytest.mark.distributed

SCRIPT = "tests/dist_scripts/rank_views.py"


def _torchrun(args: list[str], *, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """torchrun with 2 processes; a hang fails the test after ``timeout`` s and is stopped with its workers (they
    run in sessions of their own: SIGTERM to torchrun, which stops them, then SIGKILL)."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           SCRIPT, *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - start


def _codes(rc_dir: Path) -> list[str]:
    return [(rc_dir / f"rc.rank{r}").read_text() if (rc_dir / f"rc.rank{r}").exists() else "none" for r in (0, 1)]


def test_ranks_that_see_different_output_dirs_exit_2_at_start(toy_root, tmp_path) -> None:
    shared, own = tmp_path / "rank0-disk" / "run", tmp_path / "rank1-disk" / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 4, "text_len": 8},
                     "loop": {"max_train_steps": 2},
                     "checkpoint": {"output_dir": str(shared), "resume_from_checkpoint": "latest"},
                     "tracker": {"backends": []}},
    }))
    rc_dir = tmp_path / "rc"
    rc_dir.mkdir()
    proc, seconds = _torchrun(["--config", str(config)], timeout=90, FVR_MODE="recipe",
                              FVR_RANK1_OUTPUT_DIR=str(own), FVR_RC_DIR=str(rc_dir))
    assert _codes(rc_dir) == ["2", "2"], proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fv_accel: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]  # printed by rank 0 only, one line
    assert "training.checkpoint.output_dir" in lines[0] and "must be a directory shared by all nodes" in lines[0]
    assert "rank(s) 1 (" in lines[0] and "rank(s) 0" not in lines[0]
    assert not list(shared.iterdir())  # the probe is gone, and nothing was written before the check
    assert not own.exists()
    assert seconds < 45, f"exit 2 only after {seconds:.1f} s (interpreter starts included)"


def test_skipping_a_saved_step_and_resolving_latest_are_rank_0s_decisions(tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    rc_dir = tmp_path / "rc"
    rc_dir.mkdir()
    proc, _ = _torchrun([str(shared)], timeout=90, FVR_MODE="save_twice", FVR_RC_DIR=str(rc_dir))
    assert _codes(rc_dir) == ["0", "0"], proc.stderr[-3000:]
    assert sorted(p.name for p in shared.iterdir()) == ["checkpoint-1"]
