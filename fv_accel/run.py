"""Assemble and run one training job on an Accelerator: what a recipe does after parsing its arguments.

Order matters: the output directory is checked (collective) and the resolved config written before anything
is loaded; the resume is resolved before the long build, so a bad path or a refused rollback fails in
seconds; then the roles, method, data, callbacks and checkpointer are built around one :class:`Topology`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, overload

from accelerate import Accelerator

from fv_accel.config import RunConfig, write_resolved_config
from fv_accel.runtime import SHARED_STREAM_OFFSET, Topology, derived_seed, seed_everything
from fv_accel.trainer import Trainer

logger = logging.getLogger("fv_accel")


@overload
def build_trainer(cfg: RunConfig, accelerator: Accelerator, *, dry_run: Literal[False] = ...) -> Trainer: ...
@overload
def build_trainer(cfg: RunConfig, accelerator: Accelerator, *, dry_run: bool) -> Trainer | None: ...
def build_trainer(cfg: RunConfig, accelerator: Accelerator, *, dry_run: bool = False) -> Trainer | None:
    """A ready-to-fit Trainer (``trainer.fit()`` resumes from the resolved checkpoint, if any). On a dry run
    nothing is written: the main process prints the run summary and None is returned."""
    from fv_accel.build import build_run
    from fv_accel.callbacks.registry import build_callbacks
    from fv_accel.checkpoint import CheckpointManager
    from fv_accel.checkpoint.manager import resolve_async_save
    from fv_accel.checkpoint.output_dir import check_shared_output_dir, resolve_resume
    from fv_accel.summary import print_run_summary

    topology = Topology.from_accelerator(accelerator)
    if topology.is_main and topology.device_mesh is not None:
        logger.info("layout: %d data rank(s) x context parallel %d (device mesh %s)", topology.data_world_size,
                    topology.cp_size, topology.device_mesh)
    output_dir = cfg.training.checkpoint.output_dir
    if not dry_run:  # before anything is loaded: one view of the output directory, or nothing works
        check_shared_output_dir(output_dir, topology)
        if topology.is_main:
            write_resolved_config(cfg, output_dir)
    # Global RNGs (python, numpy, torch) seeded per data rank, so that a run and its resumed copy start alike and
    # context-parallel peers (one sample, split) draw alike; the method draws from its own generator, these only
    # matter to code outside fv_accel (a resume restores them).
    seed_everything(derived_seed(cfg.training.data.seed, topology.data_rank + SHARED_STREAM_OFFSET))
    resume = None
    if not dry_run:  # before the (long) build: a bad path or a refused rollback fails in seconds
        resume = resolve_resume(cfg.training.checkpoint, topology)
        if cfg.training.checkpoint.resume_from_checkpoint == "latest" and resume is None:
            logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s; starting fresh", output_dir)
    built = build_run(cfg, accelerator, topology=topology)
    if dry_run:
        if topology.is_main:
            print_run_summary(cfg, accelerator, built)
        return None
    callbacks = build_callbacks(cfg, built.method)
    checkpoints = CheckpointManager(
        output_dir=output_dir, method=built.method, data=built.data, callbacks=callbacks,
        config_dump=cfg.model_dump(mode="json"), keep_last=cfg.training.checkpoint.keep_last,
        async_save=resolve_async_save(cfg.training.checkpoint.async_save), topology=topology,
    )
    return Trainer(accelerator=accelerator, method=built.method, data=built.data, cfg=cfg, callbacks=callbacks,
                   checkpoints=checkpoints, topology=topology, resume_path=resume)


@overload
def train(cfg: RunConfig, accelerator: Accelerator, *, dry_run: Literal[False] = ...) -> Trainer: ...
@overload
def train(cfg: RunConfig, accelerator: Accelerator, *, dry_run: bool) -> Trainer | None: ...
def train(cfg: RunConfig, accelerator: Accelerator, *, dry_run: bool = False) -> Trainer | None:
    """Build and fit one training job on an existing Accelerator. Returns the Trainer (None on a dry run)."""
    trainer = build_trainer(cfg, accelerator, dry_run=dry_run)
    if trainer is not None:
        trainer.fit()
    return trainer


def run_training(cfg: RunConfig, *, dry_run: bool = False,
                 after_training: Callable[[RunConfig, Any, Any], None] | None = None) -> None:
    """A recipe's whole run: check the trackers, build the Accelerator, train, then ``after_training(cfg,
    accelerator, trainer)`` (not on a dry run), and end the trackers."""
    from fv_accel.runtime import build_accelerator
    from fv_accel.tracking import check_tracker_backends, init_trackers

    check_tracker_backends(cfg)
    accelerator = build_accelerator(log_with=cfg.training.tracker.backends,
                                    project_dir=cfg.training.checkpoint.output_dir)
    if not dry_run:
        init_trackers(accelerator, cfg)
    trainer = train(cfg, accelerator, dry_run=dry_run)
    if after_training is not None and trainer is not None:
        after_training(cfg, accelerator, trainer)
    accelerator.end_training()


__all__ = ["build_trainer", "run_training", "train"]
