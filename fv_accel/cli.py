"""Entry-point plumbing shared by the recipes: arguments, logging, exit codes. The run itself is
:func:`fv_accel.run.run_training`; no library module imports this one."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from fv_accel.config import RunConfig, dump_config, load_yaml, resolve_config
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
    prepare_config: Callable[[dict[str, Any], bool], dict[str, Any]] | None = None,
) -> int:
    """Parse arguments, run :func:`fv_accel.run.run_training`, and map failures to the contract's exit codes.

    ``default_config(dry_run)`` gives the run without ``--config`` (the toy world); on a dry run it must not
    train anything either. ``prepare_config(tree, dry_run)`` sees the raw config tree with the overrides
    applied and returns the tree to validate (a toy pipeline builds its inputs there: ``fv_accel/toy_pipeline.py``)."""
    import os

    rank = int(os.environ.get("RANK", "0"))  # before any process group exists: only for logging
    setup_logging(rank)

    def body() -> int:
        from fv_accel.config import apply_overrides, parse_overrides
        from fv_accel.run import run_training

        args, rest = parse_recipe_args(prog, argv)
        base = load_yaml(args.config) if args.config else default_config(args.dry_run)
        tree = apply_overrides(base, parse_overrides(rest))
        if prepare_config is not None:
            tree = prepare_config(tree, args.dry_run)
        cfg = resolve_config(tree)
        run_training(cfg, dry_run=args.dry_run, after_training=after_training)
        return EXIT_OK

    return run_main(body, rank=rank)


__all__ = ["dump_config", "exit_process", "run_main", "run_recipe", "setup_logging"]
