"""Flow-matching fine-tuning.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] recipes/finetune.py \
        [--config RECIPE.yaml] [--dotted.key=value ...] [--dry-run]

Without --config it fine-tunes a tiny Wan on the embedded toy world into outputs/toy/finetune/.
"""

from __future__ import annotations

import sys

from fv_accel.cli import run_recipe
from fv_accel.toy import finetune_default_config


def main(argv: list[str] | None = None) -> int:
    return run_recipe("recipes/finetune.py", argv, finetune_default_config)


if __name__ == "__main__":
    sys.exit(main())
