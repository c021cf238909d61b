"""The DMD2 recipe on 2 CPU processes (FSDP2 over gloo): per-step metrics follow the role gating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_2proc


def write_recipe(path: Path, toy_root: Path, out: Path, **extra_method: object) -> Path:
    """A tiny dmd2 recipe over the toy data with the random tiny Wan as teacher (fast; quality irrelevant)."""
    init = str(toy_root / "init")
    recipe = {
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "dmd_denoising_steps": [1000, 750, 500, 250], **extra_method},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 7}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out)}},
        "callbacks": {"ema": {"decay": 0.5}},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.distributed
def test_two_process_metrics_follow_gating(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "dmd2.yaml", toy_root, out)
    proc = run_2proc(["recipes/distill.py", "--config", str(recipe), "--method.generator_update_interval=3"],
                     cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["step"] for r in rows if "generator_loss" in r] == [3, 6]
    assert [r["step"] for r in rows if "grad_norm/student" in r] == [3, 6]
    assert all(r["critic_loss"] > 0 and r["grad_norm/critic"] > 0 for r in rows)
    # each role's LR scheduler counts its own steps: both constant here, but both logged every step
    assert all("lr/student" in r and "lr/critic" in r for r in rows)
    ckpt = out / "checkpoint-7"
    assert {p.name.split("_")[2] for p in ckpt.glob("*.distcp")} == {"0", "1"}
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["config"]["models"]["critic"]["init_from"] == str(toy_root / "init")  # defaulted to the teacher
    # the toy world's after-training quality table (rank 0 writes it): every model, all three metrics, the picture
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["models"]) == {"student@4", "teacher@4", "teacher@50"}
    assert all(set(m) == {"distance", "mode_coverage", "mode_entropy"} for m in quality["models"].values())
    assert quality["samples_per_condition"] * quality["num_conditions"] >= 64
    assert (out / "quality.png").stat().st_size > 0 and "distance  coverage  entropy" in proc.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_per_rank_graded_steps_differ_and_forward_counts_match(toy_root: Path, tmp_path: Path) -> None:
    """``rollout_step_sampling: per_rank`` (the default) on 2 processes, 20 steps, a student update every step:
    each rank draws its own graded step (over 20 steps at least one differs between ranks), yet both run the same
    number of student forwards at every step (K per rollout, two rollouts a step: 8), so FSDP stays aligned."""
    data = tmp_path / "data"  # the toy parquet without world.safetensors: no quality table after training
    data.mkdir()
    for part in (toy_root / "data").glob("*.parquet"):
        (data / part.name).symlink_to(part)
    recipe = write_recipe(tmp_path / "dmd2.yaml", toy_root, tmp_path / "run", generator_update_interval=1)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["training"]["data"]["data_path"] = str(data)
    cfg["training"]["loop"]["max_train_steps"] = 20
    cfg["training"]["checkpoint"]["save_steps"] = 0
    recipe.write_text(yaml.safe_dump(cfg))
    spy = tmp_path / "spy"
    spy.mkdir()
    proc = run_2proc(["tests/dist_scripts/dmd2_rollout_spy.py", "--config", str(recipe)], cwd=REPO,
                     FVR_SPY_DIR=str(spy))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((spy / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in ranks] == [20, 20]
    steps = [1000.0, 750.0, 500.0, 250.0]
    graded: list[list[float]] = [[], []]
    for r, per_step in enumerate(ranks):
        for forwards in per_step:
            assert len(forwards) == 2 * len(steps)  # generator rollout + critic rollout, K forwards each
            with_grad = [t for t, grad in forwards if grad]
            assert len(with_grad) == 1 and with_grad[0] in steps
            graded[r].append(with_grad[0])
    assert [len(a) for a in ranks[0]] == [len(b) for b in ranks[1]]
    assert any(a != b for a, b in zip(graded[0], graded[1], strict=True)), graded
