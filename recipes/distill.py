"""DMD2 distillation of a many-step video diffusion model into a few-step student.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] recipes/distill.py \
        [--config RECIPE.yaml] [--dotted.key=value ...] [--dry-run]

Without --config it runs the embedded toy default: on first use it writes the toy dataset to outputs/toy/data/,
trains the tiny teacher with `finetune` into outputs/toy/teacher/, then distills into outputs/toy/distill/ and
prints the quality table (student@K vs teacher@K vs teacher@50: precision distance, mode coverage, mode balance),
also written to <output_dir>/quality.json, with a picture of the samples in <output_dir>/quality.png.
Later runs reuse the data and the teacher. Real recipes: recipes/configs/*.yaml.

`--config recipes/configs/toy_self_forcing.yaml` is the causal toy proof: its `toy_pipeline` section builds what
is missing (causal toy data, teacher, ODE pairs, ODE-init student: fv_accel/toy_pipeline.py), then self-forcing
runs and prints the same table with per-block columns (docs/causal.md "The toy proof").
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from fv_accel.cli import exit_process, run_recipe
from fv_accel.config import RunConfig

logger = logging.getLogger("fv_accel")


def toy_default_config(dry_run: bool) -> dict[str, Any]:
    """Data and teacher of the toy world (made on first use, collectively), then the toy DMD2 config.

    A dry run trains nothing: without a trained toy teacher it summarises the run with the teacher's untrained
    initialisation in its place (the same architecture, so the same numbers)."""
    from fv_accel.toy import (
        TOY_ROOT,
        distill_default_config,
        ensure_teacher_init,
        ensure_toy_data,
        ensure_toy_teacher,
        toy_teacher_dir,
    )

    ensure_toy_data(TOY_ROOT)
    teacher = toy_teacher_dir(TOY_ROOT)
    if not (teacher / "transformer" / "config.json").is_file():
        if dry_run:
            teacher = ensure_teacher_init(TOY_ROOT)
            logger.info("dry run: the toy teacher is not trained yet (the first real run trains it); the summary "
                        "uses its untrained initialisation %s, same architecture", teacher)
        else:
            from fv_accel.runtime import build_accelerator

            # The same process group and Accelerate state that the distillation then uses.
            ensure_toy_teacher(build_accelerator(), TOY_ROOT)
    return distill_default_config(TOY_ROOT, teacher_dir=teacher)


def _toy_data_dir(cfg: RunConfig) -> Path | None:
    """The data directory when the run trains on a toy world (it has ``world.safetensors``), else None."""
    path = cfg.training.data.data_path
    if isinstance(path, str) and path and (Path(path) / "world.safetensors").is_file():
        return Path(path)
    return None


def print_toy_quality(cfg: RunConfig, accelerator: Any, trainer: Any) -> None:
    """After a toy-world distillation: the quality table (EMA student when EMA is on), on stdout and in JSON,
    and its picture (PNG, also logged to the trackers that take images)."""
    from fv_accel.methods.dmd2 import DMD2MethodConfig
    from fv_accel.quality import (
        format_quality_table,
        log_quality_image,
        toy_quality,
        write_quality_json,
        write_quality_png,
    )

    data_dir = _toy_data_dir(cfg)
    if data_dir is None or not isinstance(cfg.method, DMD2MethodConfig):
        return
    method = trainer.method
    ema = trainer.callbacks.get("ema")
    # Every rank samples (FSDP2 forwards are collectives); the EMA swap is per rank too.
    # A causal student's table adds the per-block columns, over its own blocks.
    student_cfg = cfg.models["student"]
    frames_per_block = (student_cfg.causal_or_default.num_frames_per_block if student_cfg.family == "wan_causal"
                        else None)
    # The student samples as its method says (self-forcing: warped steps, blocks streamed and committed at its
    # context noise); for DMD2 that is the DMD sampler over dmd_denoising_steps.
    steps = cfg.method.dmd_denoising_steps
    student_sampler = type(method).sampler(cfg.method, num_steps=len(steps))
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        results = toy_quality(method.student, method.role_models["teacher"], data_dir, dmd_denoising_steps=steps,
                              text_len=cfg.training.data.text_len, frames_per_block=frames_per_block,
                              student_sampler=student_sampler)
    if trainer.topology.is_main:
        output_dir = cfg.training.checkpoint.output_dir
        path = write_quality_json(results, output_dir)
        png, image = write_quality_png(results, data_dir, output_dir)
        log_quality_image(accelerator, image, step=trainer.step)
        student = "EMA student" if ema is not None else "student"
        print(f"toy quality ({student}; written to {path}, picture {png.name}):\n{format_quality_table(results)}",
              flush=True)


def prepare_config(tree: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """A config with a ``toy_pipeline`` section (``recipes/configs/toy_self_forcing.yaml``) first builds its
    missing stages (causal toy data, teacher, ODE pairs, ODE-init student; ``fv_accel/toy_pipeline.py``)."""
    from fv_accel.toy_pipeline import prepare_toy_pipeline

    return prepare_toy_pipeline(tree, dry_run)


def main(argv: list[str] | None = None) -> int:
    return run_recipe("recipes/distill.py", argv, toy_default_config, after_training=print_toy_quality,
                      prepare_config=prepare_config)


if __name__ == "__main__":
    exit_process(main())
