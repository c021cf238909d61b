"""Flow-matching fine-tuning.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] recipes/finetune.py \
        [--config RECIPE.yaml] [--dotted.key=value ...] [--dry-run]

Without --config it fine-tunes a tiny Wan on the embedded toy world into outputs/toy/finetune/.
"""

from __future__ import annotations

from typing import Any

from fv_accel.cli import exit_process, run_recipe
from fv_accel.toy import finetune_default_config


def toy_default_config(dry_run: bool) -> dict[str, Any]:
    """The toy world's data and random-init tiny Wan (written on first use), then the toy fine-tuning config."""
    return finetune_default_config()


def main(argv: list[str] | None = None) -> int:
    return run_recipe("recipes/finetune.py", argv, toy_default_config)


if __name__ == "__main__":
    exit_process(main())
