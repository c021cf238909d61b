"""Export a trained role to diffusers format (and optionally push it to the Hugging Face Hub).

    python recipes/export.py --checkpoint PATH --role student|critic|ema --output DIR \
        [--dtype bf16|fp32] [--push-to-hub REPO_ID [--private] [--revision REV]]

PATH is a checkpoint-<step> directory or a run's output directory (its newest complete checkpoint). One plain
process, no GPU, any number of ranks in the checkpoint. Exit codes: 0 ok, 1 failure, 2 bad arguments.
See docs/export.md.
"""

from __future__ import annotations

from fv_accel.cli import exit_process
from fv_accel.export import main

if __name__ == "__main__":
    exit_process(main())
