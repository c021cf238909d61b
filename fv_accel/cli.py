"""Entry-point plumbing shared by the recipes: arguments, logging, exit codes, the training run."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from fv_accel.config import (
    CheckpointConfig,
    RunConfig,
    dump_config,
    load_yaml,
    resolve_config,
    write_resolved_config,
)
from fv_accel.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, FvAccelError

logger = logging.getLogger("fv_accel")


def setup_logging(rank: int | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO if rank in (None, 0) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def parse_recipe_args(prog: str, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train with fv_accel. Any config key can be overridden: --training.loop.max_train_steps=10",
    )
    parser.add_argument("--config", default=None, help="recipe YAML (default: the embedded toy run)")
    parser.add_argument("--dry-run", action="store_true", help="build everything, print a summary, exit 0")
    return parser.parse_known_args(argv)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


#: tracker backend → (package it imports, how to install it)
_TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'fv_accel[wandb]'"),
    "trackio": ("trackio", "pip install 'fv_accel[trackio]'"),
}


def check_tracker_backends(cfg: RunConfig) -> None:
    """Fail with a ConfigError (exit 2) before anything is built when a tracker's package is missing."""
    import importlib.util

    from fv_accel.errors import ConfigError

    for backend in cfg.training.tracker.backends:
        package, hint = _TRACKER_PACKAGES[backend]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"training.tracker.backends: {backend!r} needs the {package!r} package, which is not "
                              f"installed ({hint}, or remove {backend!r} from the list)")


def check_shared_output_dir(output_dir: str, *, rank: int, world_size: int) -> None:
    """Collective: exit 2 (``ConfigError``) unless every rank sees the file rank 0 writes into ``output_dir``.

    With a node-local directory each node would write its own part of a checkpoint (rank 0 renames a copy whose
    shards live on other disks) and each rank would resolve ``latest`` on its own disk, then hang in the load."""
    import secrets
    import socket
    import time

    import torch.distributed as dist

    from fv_accel.errors import ConfigError

    if world_size == 1 or not dist.is_initialized():
        return
    probe: list[Any] = [None, None, None]  # file name, its content, rank 0's error
    if rank == 0:
        probe[:2] = [f".fv_accel-shared-check-{secrets.token_hex(8)}", secrets.token_hex(16)]
        try:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / probe[0]).write_text(probe[1])
        except OSError as exc:
            probe[2] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(probe, src=0)  # sent once rank 0 has written: the barrier before reading
    name, nonce, error = probe
    if error:
        raise ConfigError(f"training.checkpoint.output_dir: rank 0 cannot write into {output_dir!r} ({error})")
    path = Path(output_dir) / name
    seen = False
    for attempt in range(5):  # a network filesystem may show a new file to other clients a moment later
        try:
            seen = path.read_text() == nonce
        except OSError:
            seen = False
        if seen:
            break
        time.sleep(0.2 * (attempt + 1))
    views: list[Any] = [None] * world_size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if rank == 0:
        path.unlink(missing_ok=True)  # every rank has looked
    dist.barrier()  # and no rank goes on while the probe is still there
    blind = [f"{r} ({host})" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(f"training.checkpoint.output_dir {output_dir!r} must be a directory shared by all nodes: "
                          f"rank(s) {', '.join(blind)} cannot see the file rank 0 wrote there (a node-local disk?)")


def resolve_resume(ckpt: CheckpointConfig, *, rank: int) -> Path | None:
    """Collective: rank 0 resolves ``resume_from_checkpoint`` and sets a rolled-back timeline aside (see
    ``set_aside_newer``); every rank gets its answer, or its error, so that all enter the load or none does."""
    import torch.distributed as dist

    from fv_accel.checkpoint import resolve_checkpoint, set_aside_newer
    from fv_accel.errors import CheckpointError

    outcome: list[Any] = [None]
    if rank == 0:
        try:
            path = resolve_checkpoint(ckpt.resume_from_checkpoint, ckpt.output_dir)
            if path is not None:
                set_aside_newer(ckpt.output_dir, path, on_newer=ckpt.on_newer)
            outcome = [str(path) if path is not None else None]
        except FvAccelError as exc:
            outcome = [exc]
        except OSError as exc:
            outcome = [CheckpointError(f"{ckpt.output_dir}: cannot prepare the resume ({exc})")]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)  # sent after the renames: the barrier before training
    if isinstance(outcome[0], FvAccelError):
        raise outcome[0]
    return Path(outcome[0]) if outcome[0] is not None else None


def train(cfg: RunConfig, accelerator: Any, *, dry_run: bool = False) -> Any:
    """Build and run one training job on an existing Accelerator. Returns the Trainer (None on dry run)."""
    from fv_accel.build import build_run
    from fv_accel.callbacks.registry import build_callbacks
    from fv_accel.checkpoint import CheckpointManager
    from fv_accel.checkpoint.manager import resolve_async_save
    from fv_accel.summary import print_run_summary
    from fv_accel.trainer import Trainer

    output_dir = cfg.training.checkpoint.output_dir
    if not dry_run:  # before anything is loaded: one view of the output directory, or nothing works
        check_shared_output_dir(output_dir, rank=accelerator.process_index, world_size=accelerator.num_processes)
    if accelerator.is_main_process and not dry_run:
        write_resolved_config(cfg, output_dir)
    # Global RNGs (python, numpy, torch) seeded per rank, so that a run and its resumed copy start alike; the
    # method draws from its own generator, these only matter to code outside fv_accel (a resume restores them).
    from fv_accel.runtime import seed_everything

    seed_everything(cfg.training.data.seed * 1_000_003 + accelerator.process_index + 7_919)
    resume = None
    if not dry_run:  # before the (long) build: a bad path or a refused rollback fails in seconds
        resume = resolve_resume(cfg.training.checkpoint, rank=accelerator.process_index)
        if cfg.training.checkpoint.resume_from_checkpoint == "latest" and resume is None:
            logger.info("resume_from_checkpoint=latest: no complete checkpoint in %s; starting fresh", output_dir)
    built = build_run(cfg, accelerator)
    if dry_run:
        if accelerator.is_main_process:
            print_run_summary(cfg, accelerator, built)
        return None
    callbacks = build_callbacks(cfg, built.method)
    checkpoints = CheckpointManager(
        output_dir=output_dir, method=built.method, data=built.data, callbacks=callbacks,
        config_dump=cfg.model_dump(mode="json"), keep_last=cfg.training.checkpoint.keep_last,
        async_save=resolve_async_save(cfg.training.checkpoint.async_save),
    )
    trainer = Trainer(accelerator=accelerator, method=built.method, data=built.data, cfg=cfg,
                      callbacks=callbacks, checkpoints=checkpoints)
    trainer.fit(resume_path=resume)
    return trainer


def exit_process(code: int) -> NoReturn:
    """End a recipe's process with ``code``: the atexit handlers (loggers, trackers, loader workers) run and the
    streams are flushed, then ``os._exit`` skips the interpreter's own teardown. About 10–20% of FSDP2-on-gloo
    processes abort there after ``destroy_process_group`` ("terminate called without an active exception",
    exit -6) although everything before it was correct, which turns a finished run into a failed one for the
    launcher."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_main(body: Callable[[], int], *, rank: int = 0) -> int:
    """Run an entry point's body, map failures to the contract's exit codes, and tear down the process group.

    Bad arguments (argparse) and ``ConfigError`` → 2, other ``FvAccelError`` → its code, anything else → 1 with
    the traceback. A configuration error is printed by rank 0 only (every rank hits the same one)."""
    import torch.distributed as dist

    try:
        return body()
    except SystemExit as exc:  # argparse
        return EXIT_CONFIG if exc.code not in (0, None) else EXIT_OK
    except FvAccelError as exc:
        if rank == 0 or exc.exit_code != EXIT_CONFIG:
            print(f"fv_accel: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_recipe(
    prog: str,
    argv: list[str] | None,
    default_config: Callable[[bool], dict[str, Any]],
    after_training: Callable[[RunConfig, Any, Any], None] | None = None,
) -> int:
    """Parse arguments, build the Accelerator, train, and map failures to the contract's exit codes.

    ``default_config(dry_run)`` gives the run without ``--config`` (the toy world); on a dry run it must not
    train anything either."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)

    def body() -> int:
        from fv_accel.config import parse_overrides
        from fv_accel.runtime import build_accelerator

        args, rest = parse_recipe_args(prog, argv)
        base = load_yaml(args.config) if args.config else default_config(args.dry_run)
        cfg = resolve_config(base, parse_overrides(rest))
        check_tracker_backends(cfg)
        accelerator = build_accelerator(log_with=cfg.training.tracker.backends,
                                        project_dir=cfg.training.checkpoint.output_dir)
        if not args.dry_run:
            accelerator.init_trackers(cfg.training.tracker.project_name,
                                      config=_flat(cfg.model_dump(mode="json")))
        trainer = train(cfg, accelerator, dry_run=args.dry_run)
        if after_training is not None and trainer is not None:
            after_training(cfg, accelerator, trainer)
        accelerator.end_training()
        return EXIT_OK

    return run_main(body, rank=rank)


__all__ = ["dump_config", "run_main", "run_recipe", "train"]
