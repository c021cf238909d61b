"""Role-keyed DCP checkpoints: ``<output_dir>/checkpoint-<step>/``.

A checkpoint is written into ``checkpoint-<step>.partial/`` and renamed into place by rank 0 once every
rank has finished, so ``checkpoint-<step>/.metadata`` (DCP's own completion marker) only ever exists in a
checkpoint whose every file is there. Per-rank random state is captured after the collective save (collectives
may advance device RNG) and restored last.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from fv_accel.errors import CheckpointError

if TYPE_CHECKING:
    from fv_accel.callbacks import CallbackList
    from fv_accel.data import DataStream
    from fv_accel.methods import TrainingMethod

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "metadata.json").is_file()


def list_checkpoints(output_dir: Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CKPT_RE.match(child.name)
        if match and child.is_dir() and (not complete_only or is_complete(child)):
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike[str]) -> Path | None:
    """``""`` → None; ``latest`` → newest complete checkpoint in output_dir (None if there is none);
    a ``checkpoint-<step>`` directory → itself (must be complete); an output directory → its newest one."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(Path(output_dir))
        return found[-1][1] if found else None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {spec!r} does not exist")
    if _CKPT_RE.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {spec!r} is incomplete (no .metadata / metadata.json)")
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{spec!r} holds no complete checkpoint-<step> directory")
    return found[-1][1]


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata.json ({exc})") from None


class _CallbackState(Stateful):
    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.callback.load_state_dict(state_dict)


def capture_rng_state(method: TrainingMethod) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "method": method.random_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(method: TrainingMethod, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    method.load_random_state(state["method"])


class CheckpointManager:
    def __init__(
        self,
        *,
        output_dir: str | os.PathLike[str],
        method: TrainingMethod,
        data: DataStream | None,
        callbacks: CallbackList,
        config_dump: dict[str, Any],
        keep_last: int = 0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = method
        self.data = data
        self.callbacks = callbacks
        self.config_dump = config_dump
        self.keep_last = keep_last

    # -- state --------------------------------------------------------------------------------------------
    def _states(self) -> dict[str, Any]:
        states: dict[str, Any] = dict(self.method.checkpoint_state())
        for cb in self.callbacks:
            states[f"callbacks.{cb.name}"] = _CallbackState(cb)
        if self.data is not None:
            # The loader position is per rank (each rank has its own shard).
            states[f"dataloader.rank{_rank()}"] = self.data
        return states

    def path_for(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    # -- save -----------------------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        final = self.path_for(step)
        if is_complete(final):
            return final  # e.g. the end-of-run save right after a periodic save of the same step
        partial = final.with_name(final.name + ".partial")
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        dcp.save(self._states(), checkpoint_id=str(partial))
        rng = capture_rng_state(self.method)  # after the collective save
        with open(partial / f"random_state.rank{_rank()}.pt.tmp", "wb") as fh:
            pickle.dump(rng, fh)
        os.replace(partial / f"random_state.rank{_rank()}.pt.tmp", partial / f"random_state.rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "config": self.config_dump}
            (partial / "metadata.json").write_text(json.dumps(meta, indent=2))
            if final.exists():  # an incomplete directory of the same step
                shutil.rmtree(final)
            os.replace(partial, final)
            self._apply_retention()
        _barrier()
        return final

    def _apply_retention(self) -> None:
        complete = list_checkpoints(self.output_dir)
        if self.keep_last > 0 and len(complete) > self.keep_last:
            for _, path in complete[: len(complete) - self.keep_last]:
                shutil.rmtree(path, ignore_errors=True)
        newest = complete[-1][0] if complete else -1
        for step, path in list_checkpoints(self.output_dir, complete_only=False):
            if step < newest and not is_complete(path):
                shutil.rmtree(path, ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------------------
    def load(self, path: Path) -> int:
        """Load everything but the random state into the freshly built run; returns the checkpoint's step."""
        meta = read_metadata(path)
        self.method.seed_optimizer_state_for_resume()
        states = self._states()
        key = f"dataloader.rank{_rank()}"
        if key in states and meta.get("world_size") != (dist.get_world_size() if dist.is_initialized() else 1):
            logger.warning("checkpoint was written by %s ranks; the data position restarts at epoch 0",
                           meta.get("world_size"))
            states.pop(key)
        try:
            dcp.load(states, checkpoint_id=str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from exc
        self.method.check_optimizer_state_loaded()
        return int(meta["step"])

    def restore_random_state(self, path: Path) -> None:
        """Restore per-rank RNG; call last, after the data iterator and everything else are set up."""
        rng_file = path / f"random_state.rank{_rank()}.pt"
        if not rng_file.is_file():
            logger.warning("%s has no random state for rank %d; continuing with fresh RNG", path, _rank())
            return
        with open(rng_file, "rb") as fh:
            restore_rng_state(self.method, pickle.load(fh))  # noqa: S301 - our own file
