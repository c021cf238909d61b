"""Command line of the export: ``recipes/export.py`` and ``python -m fv_accel.export`` (the training-time Hub
push runs the latter in a subprocess). Exit codes: 0 done, 2 bad arguments or options (``ConfigError``), 1 an
unusable checkpoint or a failed push (see ``fv_accel/errors.py``)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import traceback
from pathlib import Path

from fv_accel.checkpoint import resolve_checkpoint
from fv_accel.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, FvAccelError
from fv_accel.export.diffusers import DTYPES
from fv_accel.export.exporter import export_checkpoint
from fv_accel.export.reader import EXPORT_ROLES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recipes/export.py",
        description="Export a trained role to diffusers format (and optionally push it to the Hugging Face Hub).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint-<step> dir or a run's output dir")
    parser.add_argument("--role", required=True, choices=EXPORT_ROLES)
    parser.add_argument("--output", required=True, help="directory to write (new, empty, or an earlier export)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="a LoRA run: write the base with the adapters merged in (W + alpha/rank·B·A) as a full "
                             "transformer / pipeline instead of a diffusers LoRA")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the export to this repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", default=None, help="Hub branch to push to (default main)")
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision need --push-to-hub")
    return args


def retry_command(args: argparse.Namespace, checkpoint: Path) -> str:
    """The exact command that redoes this export and push (what a failed push tells the user to run)."""
    cmd = ["python", "recipes/export.py", "--checkpoint", str(checkpoint), "--role", args.role,
           "--output", str(args.output), "--dtype", args.dtype, "--push-to-hub", args.push_to_hub]
    if args.merge_lora:
        cmd.append("--merge-lora")
    if args.max_shard_size != "5GB":
        cmd += ["--max-shard-size", args.max_shard_size]
    if args.private:
        cmd.append("--private")
    if args.revision:
        cmd += ["--revision", args.revision]
    return shlex.join(cmd)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: bad arguments
        return EXIT_CONFIG if exc.code not in (0, None) else EXIT_OK
    from fv_accel.hub import push_folder, redact

    try:
        result = export_checkpoint(args.checkpoint, role=args.role, output=args.output, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, repo_id=args.push_to_hub,
                                   merge_lora=args.merge_lora)
        kind = (" as a diffusers LoRA" if result.is_lora else
                " as a complete diffusers pipeline" if result.is_pipeline else "")
        print(f"exported {result.role} (step {result.step}, {result.dtype}) to {result.output}{kind}", flush=True)
        if args.push_to_hub:
            checkpoint = resolve_checkpoint(args.checkpoint, "") or Path(args.checkpoint)
            pushed = push_folder(result.output, args.push_to_hub, private=args.private, revision=args.revision,
                                 commit_message=f"fv_accel export: {result.role} at step {result.step}",
                                 retry_command=retry_command(args, checkpoint))
            print(f"pushed to {pushed.repo_id}@{pushed.revision}: {pushed.commit_url}", flush=True)
        return EXIT_OK
    except FvAccelError as exc:
        print(f"fv_accel: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        print(redact(traceback.format_exc()), file=sys.stderr)
        return EXIT_FAILURE
