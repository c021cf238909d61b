"""The run's output directory before training: one directory every rank sees, and the checkpoint to resume.

Both are collectives that rank 0 decides and broadcasts, so that every rank takes the same branch into the
(collective) load, or none does.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fv_accel.checkpoint.manager import resolve_checkpoint, set_aside_newer
from fv_accel.config import CheckpointConfig
from fv_accel.errors import CheckpointError, ConfigError
from fv_accel.runtime import Topology, rank0_result


def check_shared_output_dir(output_dir: str, topology: Topology) -> None:
    """Collective: exit 2 (``ConfigError``) unless every rank sees the file rank 0 writes into ``output_dir``.

    With a node-local directory each node would write its own part of a checkpoint (rank 0 renames a copy whose
    shards live on other disks) and each rank would resolve ``latest`` on its own disk, then hang in the load."""
    if topology.world_size == 1:
        return

    def write_probe() -> tuple[str, str]:
        name, nonce = f".fv_accel-shared-check-{secrets.token_hex(8)}", secrets.token_hex(16)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / name).write_text(nonce)
        return name, nonce

    # Sent once rank 0 has written: the barrier before the other ranks read.
    name, nonce = rank0_result(write_probe, topology=topology, wrap=lambda exc: ConfigError(
        f"training.checkpoint.output_dir: rank 0 cannot write into {output_dir!r} ({type(exc).__name__}: {exc})"))
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
    views: list[Any] = [None] * topology.world_size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if topology.is_main:
        path.unlink(missing_ok=True)  # every rank has looked
    dist.barrier()  # and no rank goes on while the probe is still there
    blind = [f"{r} ({host})" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise ConfigError(f"training.checkpoint.output_dir {output_dir!r} must be a directory shared by all nodes: "
                          f"rank(s) {', '.join(blind)} cannot see the file rank 0 wrote there (a node-local disk?)")


def resolve_resume(ckpt: CheckpointConfig, topology: Topology) -> Path | None:
    """Collective: rank 0 resolves ``resume_from_checkpoint`` and sets a rolled-back timeline aside (see
    ``set_aside_newer``); every rank gets its answer, or its error, so that all enter the load or none does."""
    def resolve() -> str | None:
        path = resolve_checkpoint(ckpt.resume_from_checkpoint, ckpt.output_dir)
        if path is not None:
            set_aside_newer(ckpt.output_dir, path, on_newer=ckpt.on_newer)
        return str(path) if path is not None else None

    # Sent after the renames: the barrier before training.
    found = rank0_result(resolve, topology=topology, wrap=lambda exc: CheckpointError(
        f"{ckpt.output_dir}: cannot prepare the resume ({exc})"))
    return Path(found) if found is not None else None
