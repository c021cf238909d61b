"""End to end on the toy world, in one process: train the toy teacher with finetune, distill it with DMD2 (EMA
on), and check that the 4-step student lands clearly closer to the data than the teacher's 4-step ODE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_dmd2_student_beats_teacher_at_same_steps(tmp_path: Path, single_process_dist: Any) -> None:
    from fv_accel.config import resolve_config
    from fv_accel.quality import toy_quality
    from fv_accel.run import train
    from fv_accel.toy import distill_default_config, ensure_toy_teacher

    accelerator = single_process_dist
    teacher = ensure_toy_teacher(accelerator, tmp_path)
    assert (teacher / "transformer" / "config.json").is_file()
    tree = distill_default_config(tmp_path)
    tree["training"]["tracker"] = {"backends": []}
    cfg = resolve_config(tree, [("training.loop.max_train_steps", 150)])
    trainer = train(cfg, accelerator)
    assert trainer is not None
    method = trainer.method
    ema = trainer.callbacks.get("ema")
    assert ema is not None
    steps = cfg.method.dmd_denoising_steps  # type: ignore[union-attr]
    with ema.swapped_in():  # type: ignore[attr-defined]
        after = toy_quality(method.student, method.role_models["teacher"], tmp_path / "data",
                            dmd_denoising_steps=steps, samples_per_condition=6).models
    # the same sampler with the teacher's weights (the student before distillation) as a baseline
    before = toy_quality(method.role_models["teacher"], method.role_models["teacher"], tmp_path / "data",
                         dmd_denoising_steps=steps, samples_per_condition=6).models
    print("toy e2e:", after, "student before distillation:", before["student@4"])
    assert after["student@4"].distance < 0.8 * after["teacher@4"].distance, after
    assert after["student@4"].distance < before["student@4"].distance, (after, before)
    assert after["teacher@4"] == before["teacher@4"]  # the teacher is frozen: all three metrics unchanged
