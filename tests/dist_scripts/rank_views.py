"""Ranks that see different output directories (a node-local disk per node), under torchrun.

``FVR_MODE=recipe``: run ``recipes/finetune.py`` with the given arguments; rank 1 gets
``--training.checkpoint.output_dir=$FVR_RANK1_OUTPUT_DIR`` appended (its "own disk").

``FVR_MODE=save_twice`` (argument: a directory both ranks share): the start-up check passes on the shared
directory and leaves nothing behind; then ``checkpoint-1`` is saved, and saved again while rank 1's view of the
filesystem says it is incomplete: the skip must be rank 0's decision for both ranks (a rank that decides for
itself enters the collective save alone); likewise ``latest`` while rank 1's view shows no checkpoint.

Every rank writes its exit code to ``$FVR_RC_DIR/rc.rank<r>`` (the launcher reports only that one failed).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def recipe(argv: list[str], rank: int) -> int:
    if rank == 1:
        argv = [*argv, f"--training.checkpoint.output_dir={os.environ['FVR_RANK1_OUTPUT_DIR']}"]
    spec = importlib.util.spec_from_file_location("recipe_finetune", REPO / "recipes" / "finetune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(argv))


def save_twice(shared: Path, rank: int) -> int:
    import torch.distributed as dist

    import fv_accel.checkpoint.manager as manager_mod
    from fv_accel.checkpoint.output_dir import check_shared_output_dir, resolve_resume
    from fv_accel.config import CheckpointConfig
    from fv_accel.runtime import Topology

    sys.path.insert(0, str(REPO / "tests"))
    from test_retention import make_manager  # one nn.Linear and its AdamW

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a rank left alone in a collective fails
    try:
        topology = Topology.from_process_group()
        # The launcher's RANK / LOCAL_RANK (one node: equal) and world of two: data ranks are ranks today.
        expected = (rank, 2, int(os.environ["LOCAL_RANK"]), rank, 2, rank == 0)
        got = (topology.rank, topology.world_size, topology.local_rank, topology.data_rank,
               topology.data_world_size, topology.is_main)
        assert got == expected, f"rank {rank}: topology {got}, expected {expected}"
        check_shared_output_dir(str(shared), topology)
        left = [p.name for p in shared.iterdir()]
        # Every rank looks before rank 0 starts writing checkpoint-1 below: without this barrier a slow rank 1
        # listed rank 0's checkpoint staging files and took them for a left-over probe (seen once under load).
        dist.barrier()
        assert left == [], f"rank {rank}: the probe file was left behind: {left}"
        manager = make_manager(shared, keep_last=0)
        manager.save(1)
        if rank == 1:
            manager_mod.is_complete = lambda path: False  # rank 1's disk does not show the finished checkpoint
        manager.save(1)
        dist.barrier()
        assert manager_mod.is_complete(shared / "checkpoint-1") or rank == 1
        # resume_from_checkpoint=latest while rank 1's disk shows no checkpoint: both get rank 0's answer
        if rank == 1:
            manager_mod.list_checkpoints = lambda *args, **kwargs: []
        cfg = CheckpointConfig(output_dir=str(shared), resume_from_checkpoint="latest")
        resolved = resolve_resume(cfg, topology)
        assert resolved == shared / "checkpoint-1", f"rank {rank} resolved {resolved}"
        return 0
    finally:
        dist.destroy_process_group()


def main() -> int:
    rank = int(os.environ["RANK"])
    mode = os.environ["FVR_MODE"]
    code = 1
    try:
        code = recipe(sys.argv[1:], rank) if mode == "recipe" else save_twice(Path(sys.argv[1]), rank)
    finally:
        (Path(os.environ["FVR_RC_DIR"]) / f"rc.rank{rank}").write_text(str(code))
    return code


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main())  # skip the teardown where gloo processes may abort
