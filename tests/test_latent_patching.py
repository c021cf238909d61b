"""A run refuses, before step 1, latents that do not divide into the role transformer's patches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fv_accel.config import resolve_config
from fv_accel.data.preprocess import write_text_rows
from fv_accel.errors import ConfigError, DataError
from fv_accel.toy import ToyWorldSpec, write_toy_dataset

# The tiny Wan transformer's patch_size is (1, 2, 2): W = 5 leaves a column the patching would drop.
ODD_SHAPE = (16, 2, 6, 5)


def _finetune(toy_root: Path, data: Path, out: Path) -> Any:
    return resolve_config({
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(data), "text_len": 8, "train_batch_size": 2},
                     "checkpoint": {"output_dir": str(out)}, "tracker": {"backends": []}},
    })


@pytest.mark.parametrize("shape", [ODD_SHAPE, (16, 2, 6, 4)])
def test_build_run_checks_data_latents_against_the_patch_size(toy_root, tmp_path, single_process_dist, shape):
    from fv_accel.build import build_run

    data = tmp_path / "data"
    write_toy_dataset(data, ToyWorldSpec(num_conditions=1, num_modes=1, samples_per_mode=4, latent_shape=shape))
    cfg = _finetune(toy_root, data, tmp_path / "out")
    if shape == ODD_SHAPE:
        with pytest.raises(DataError) as info:
            build_run(cfg, single_process_dist)
        message = str(info.value)
        assert message.startswith(f"{data / 'part-00000.parquet'}: ")
        assert "[16, 2, 6, 5]" in message and "models.student" in message and "[1, 2, 2]" in message
    else:  # 6 and 4 split into 2×2 patches
        assert build_run(cfg, single_process_dist).data.dataset.latent_shape == shape


def test_build_run_checks_the_text_only_latent_shape(toy_root, tmp_path, single_process_dist):
    from fv_accel.build import build_run

    data = tmp_path / "text" / "rank000-00000.parquet"
    write_text_rows(data, [f"p{i}" for i in range(4)], ["a cat"] * 4, [torch.randn(3, 32) for _ in range(4)])
    init = str(toy_root / "init")
    cfg = resolve_config({
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": [1000, 500]},
        "training": {"data": {"data_path": str(data.parent), "text_len": 8, "train_batch_size": 2,
                              "latent_shape": list(ODD_SHAPE)},
                     "checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })
    with pytest.raises(ConfigError, match=r"^training\.data\.latent_shape: .*\[16, 2, 6, 5\].*\[1, 2, 2\]"):
        build_run(cfg, single_process_dist)
