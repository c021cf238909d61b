"""Train one step of each given diffusion-forcing config (one launch, one process group, the runs one after
another) and record, per rank and config, the first step's rows, per-frame timesteps and loss:
``tests/test_diffusion_forcing.py`` recomputes the loss with plain PyTorch.

    accelerate launch ... tests/dist_scripts/diffusion_forcing_step.py A.yaml [B.yaml ...]

Every rank writes ``$FVR_SPY_DIR/rank<r>.json``: ``[{"rows": [...], "t": [[t per frame] per sample], "loss"}
per config]``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from fv_accel.methods.diffusion_forcing import DiffusionForcingMethod

RECORDS: list[dict[str, Any]] = []


def install_spy() -> None:
    original_step = DiffusionForcingMethod.single_train_step

    def single_train_step(self: DiffusionForcingMethod, batch: Any, step: int) -> Any:
        out = original_step(self, batch, step)
        assert self.last_timesteps_bf is not None
        RECORDS.append({"rows": batch.index.tolist(), "t": self.last_timesteps_bf.tolist(),
                        "loss": float(out.losses["loss"])})
        return out

    DiffusionForcingMethod.single_train_step = single_train_step  # type: ignore[method-assign]


def main(configs: list[str]) -> int:
    from fv_accel.cli import run_main
    from fv_accel.config import load_config
    from fv_accel.run import run_training
    from fv_accel.runtime import reset_accelerate_state

    install_spy()
    rank = int(os.environ.get("RANK", "0"))
    firsts: list[dict[str, Any]] = []

    def body() -> int:
        for path in configs:
            # run_training leaves the process group up (run_main tears it down once, at the end); each run
            # builds its own Accelerator on it.
            reset_accelerate_state()
            start = len(RECORDS)
            run_training(load_config(path, []))
            firsts.append(RECORDS[start])
        return 0

    rc = run_main(body, rank=rank)
    (Path(os.environ["FVR_SPY_DIR"]) / f"rank{rank}.json").write_text(json.dumps(firsts))
    return rc


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main(sys.argv[1:]))  # skip the teardown where gloo processes may abort
