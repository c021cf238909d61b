"""Role-keyed DCP checkpoints, resume resolution, retention."""

from fv_accel.checkpoint.manager import (
    CheckpointManager,
    is_complete,
    list_checkpoints,
    read_metadata,
    resolve_checkpoint,
    set_aside_newer,
)

__all__ = ["CheckpointManager", "is_complete", "list_checkpoints", "read_metadata", "resolve_checkpoint",
           "set_aside_newer"]
