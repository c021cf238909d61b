"""Run a recipe and record what each rank holds and reads, for the layout tests (HSDP, context parallel):

    accelerate launch ... tests/dist_scripts/layout_spy.py distill|finetune RECIPE-ARGS...

Every rank writes to ``$FVR_SPY_DIR``:

- ``rank<r>_start.pt`` / ``rank<r>_loaded.pt`` / ``rank<r>_end.pt``: before ``Trainer.fit`` (the roles as
  loaded from ``init_from``), right after a resume's checkpoint load, and after training: every role's local
  parameter shards (``DTensor.to_local``) with the rank's coordinate on the roles' device mesh and its dimension
  names. The tests rebuild full tensors from them by hand.
- ``rank<r>_rng.pt``: the method's generator states right after a resume restored them.
- ``rank<r>_rows.json``: the topology's data rank and cp rank, and the dataset row indices of every batch the
  rank drew, in order.

The after-training toy quality table is skipped (sampling cost, not under test).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from fv_accel.checkpoint.manager import CheckpointManager
from fv_accel.data.loader import DataStream
from fv_accel.methods.base import TrainingMethod
from fv_accel.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
SPY_DIR = Path(os.environ["FVR_SPY_DIR"])
RANK = int(os.environ["RANK"])  # the launcher's: the process group may be gone at the end
ROWS: list[list[int]] = []


def local_shards(method: TrainingMethod) -> dict[str, Any]:
    params: dict[str, dict[str, torch.Tensor]] = {}
    mesh_names: tuple[str, ...] = ()
    coordinate: list[int] = []
    for role_name, role in method.roles.items():
        for module_name, module in role.modules.items():
            for name, param in module.named_parameters():
                tensor = param.data
                if isinstance(tensor, DTensor):
                    mesh_names = tuple(tensor.device_mesh.mesh_dim_names or ())
                    coordinate = list(tensor.device_mesh.get_coordinate() or [])
                    tensor = tensor.to_local()
                params.setdefault(role_name, {})[f"{module_name}.{name}"] = tensor.detach().cpu().clone()
    return {"mesh_dim_names": mesh_names, "coordinate": coordinate, "params": params}


def install_spy() -> None:
    original_fit = Trainer.fit
    original_next = DataStream.__next__
    original_load = CheckpointManager.load
    original_restore = CheckpointManager.restore_random_state

    def fit(self: Trainer, **kwargs: Any) -> int:
        torch.save(local_shards(self.method), SPY_DIR / f"rank{RANK}_start.pt")
        step = original_fit(self, **kwargs)
        torch.save(local_shards(self.method), SPY_DIR / f"rank{RANK}_end.pt")
        topology = self.topology
        (SPY_DIR / f"rank{RANK}_rows.json").write_text(json.dumps(
            {"data_rank": topology.data_rank, "cp_rank": topology.cp_rank, "rows": ROWS}))
        return step

    def next_batch(self: DataStream) -> Any:
        batch = original_next(self)
        ROWS.append([int(i) for i in batch.index])
        return batch

    def load(self: CheckpointManager, path: Path) -> int:
        step = original_load(self, path)
        torch.save(local_shards(self.method), SPY_DIR / f"rank{RANK}_loaded.pt")
        return step

    def restore_random_state(self: CheckpointManager, path: Path) -> None:
        original_restore(self, path)
        torch.save(self.method.random_state(), SPY_DIR / f"rank{RANK}_rng.pt")

    Trainer.fit = fit  # type: ignore[method-assign]
    DataStream.__next__ = next_batch  # type: ignore[method-assign]
    CheckpointManager.load = load  # type: ignore[method-assign]
    CheckpointManager.restore_random_state = restore_random_state  # type: ignore[method-assign]


def main() -> int:
    import importlib.util

    install_spy()
    name = sys.argv[1]
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "print_toy_quality"):
        module.print_toy_quality = lambda *args: None
    return int(module.main(sys.argv[2:]))


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main())  # skip the teardown where gloo processes may abort
