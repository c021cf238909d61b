"""What an export reads from a checkpoint: the run it came from (``metadata.json``) and one role's weights.

The tensors come from the one-process readers of ``fv_accel/checkpoint/layout.py``, each straight into its
export dtype; only the role's weights are read (no optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fv_accel.checkpoint import layout, read_metadata
from fv_accel.errors import CheckpointError

#: roles an export can write: a trainable role of the run, or the EMA of :data:`layout.EMA_ROLE`
EXPORT_ROLES = ("student", "critic", "ema")
#: the role module an export writes (as diffusers' ``transformer/``); the EMA averages the same module
EXPORTED_MODULE = layout.EMA_MODULE


def model_role_of(role: str) -> str:
    """The run's role whose model (architecture, base) an exported role has: the EMA shares the student's."""
    return layout.EMA_ROLE if role == "ema" else role


@dataclass
class RunRecord:
    """The run behind a checkpoint, as its ``metadata.json`` records it."""

    checkpoint: Path
    config: dict[str, Any]
    step: int
    world_size: int


def read_run(checkpoint: Path, role: str) -> RunRecord:
    """The checkpoint's run, checked to have ``role``'s model (``CheckpointError`` naming the file otherwise)."""
    meta = read_metadata(checkpoint)
    config = meta.get("config")
    if not isinstance(config, dict) or "models" not in config:
        raise CheckpointError(f"{checkpoint}: metadata.json has no run config; cannot tell which model was trained")
    model_role = model_role_of(role)
    if model_role not in config["models"]:
        raise CheckpointError(f"{checkpoint}: the run has no {model_role!r} role "
                              f"(roles: {', '.join(config['models'])})")
    return RunRecord(checkpoint=checkpoint, config=config, step=int(meta.get("step", -1)),
                     world_size=int(meta.get("world_size", 1)))


def read_export_state_dict(checkpoint: Path, role: str, dtype_of: layout.DtypeOf | None = None,
                           module: str = EXPORTED_MODULE) -> dict[str, torch.Tensor]:
    """The full state dict of ``module`` (a two-expert role: each trained expert in turn) an export writes for
    ``role`` (``ema``: the EMA weights completed by the student's untracked tensors), each tensor read directly
    in ``dtype_of(name, saved dtype)``."""
    if role == "ema":
        return layout.read_ema_state_dict(checkpoint, dtype_of, module=module)
    return layout.read_role_state_dict(checkpoint, role, dtype_of, module=module)
