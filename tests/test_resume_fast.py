"""Exact resume in the fast tier: one process, the tiny Wan, DMD2 (which draws from two of the method's
generators: ``cuda_generator`` for noise and timesteps, ``rank_choice_generator`` for the rollout step).

The reference is the uninterrupted run: its per-step losses from the checkpoint on are what a correct resume
must reproduce, exactly on CPU. A resume that re-seeds any random stream instead of restoring it replays that
stream from its start and draws other noise, timesteps or rollout lengths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from conftest import run_recipe_main

MAX_STEPS = 6
CHECKPOINT_STEP = 3


def _config(toy_root: Path, data: Path, out: Path) -> dict[str, Any]:
    init = str(toy_root / "init")
    return {
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        # Four rollout steps: a replayed choice stream picks other rollout lengths at the resumed steps.
        "method": {"name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                   "generator_update_interval": 2, "real_score_guidance_scale": 1.0},
        "training": {"data": {"data_path": str(data), "seed": 0, "train_batch_size": 2, "text_len": 8,
                              "num_workers": 0},
                     "loop": {"max_train_steps": MAX_STEPS, "max_grad_norm": 1.0},
                     "checkpoint": {"output_dir": str(out), "save_steps": CHECKPOINT_STEP, "keep_last": 0},
                     "tracker": {"backends": []}},
    }


def _losses(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("_loss")} for r in rows}


def _run(config: dict[str, Any], path: Path, *extra: str) -> None:
    path.write_text(yaml.safe_dump(config))
    assert run_recipe_main("distill", ["--config", str(path), *extra]) == 0


def test_resume_reproduces_the_uninterrupted_losses(toy_root: Path, tmp_path: Path) -> None:
    # The toy parquet without the toy world's ``world.safetensors``: the distill recipe then skips its
    # after-training quality table, which costs more than the run itself.
    data = tmp_path / "data"
    data.mkdir()
    for part in (toy_root / "data").glob("*.parquet"):
        (data / part.name).symlink_to(part)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run(_config(toy_root, data, full), tmp_path / "full.yaml")
    checkpoint = full / f"checkpoint-{CHECKPOINT_STEP}"
    assert (checkpoint / "metadata.json").is_file()
    _run(_config(toy_root, data, resumed), tmp_path / "resumed.yaml",
         f"--training.checkpoint.resume_from_checkpoint={checkpoint}")

    reference, after = _losses(full), _losses(resumed)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    assert sorted(after) == list(range(CHECKPOINT_STEP + 1, MAX_STEPS + 1))
    assert {"generator_loss", "critic_loss"} <= set(reference[CHECKPOINT_STEP + 1])  # step 4 steps both roles
    for step in after:
        if torch.cuda.is_available():  # GPU kernels need not be bitwise reproducible
            assert after[step] == pytest.approx(reference[step], rel=1e-5, abs=0), step
        else:
            assert after[step] == reference[step], step


def test_a_data_position_saved_without_the_shuffle_keys_still_resumes(toy_root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written before ``shuffle`` / ``shuffle_window_groups`` / ``row_groups_sha256`` were part of the
    data position (a row permutation then) loads: DCP is asked only for the saved entries, the epoch restarts."""
    from fv_accel.data.loader import DataStream

    new_keys = ("shuffle", "shuffle_window_groups", "row_groups_sha256")
    full_state = DataStream.state_dict
    monkeypatch.setattr(DataStream, "state_dict",
                        lambda self: {k: v for k, v in full_state(self).items() if k not in new_keys})
    data = tmp_path / "data"
    data.mkdir()
    for part in (toy_root / "data").glob("*.parquet"):
        (data / part.name).symlink_to(part)
    config = _config(toy_root, data, tmp_path / "old")
    config["training"]["loop"]["max_train_steps"] = CHECKPOINT_STEP
    _run(config, tmp_path / "old.yaml")
    checkpoint = tmp_path / "old" / f"checkpoint-{CHECKPOINT_STEP}"
    saved = set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert "dataloader.rank0.epoch" in saved and not any(k.endswith(".shuffle") for k in saved)

    monkeypatch.setattr(DataStream, "state_dict", full_state)
    config["training"]["loop"]["max_train_steps"] = CHECKPOINT_STEP + 1
    with caplog.at_level("INFO"):
        _run(config, tmp_path / "resume.yaml", f"--training.checkpoint.resume_from_checkpoint={checkpoint}")
    assert "restarting epoch" in caplog.text  # the old position meant a row permutation: another order
    rows = [json.loads(line) for line in (tmp_path / "old" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, CHECKPOINT_STEP + 2))  # no step logged twice: resumed
    assert f"at step {CHECKPOINT_STEP}" in caplog.text  # "resumed from ... at step 3", not a fresh start
