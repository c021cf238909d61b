"""Run ``recipes/finetune.py`` with a diffusion_forcing config and record, per rank, what the plain-PyTorch
oracle of ``tests/test_diffusion_forcing.py`` needs: the first step's batch rows, the method's noise generator
state before it, the drawn timesteps and the loss.

    accelerate launch ... tests/dist_scripts/diffusion_forcing_step.py --config RECIPE.yaml

Every rank writes ``$FVR_SPY_DIR/rank<r>.pt``: the first step's dict. (One run per launch: a second run in the
same processes hangs re-creating the process group.)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fv_accel.methods.diffusion_forcing import DiffusionForcingMethod

REPO = Path(__file__).resolve().parents[2]
RECORDS: list[dict[str, Any]] = []


def install_spy() -> None:
    original_step = DiffusionForcingMethod.single_train_step

    def single_train_step(self: DiffusionForcingMethod, batch: Any, step: int) -> Any:
        assert self.cuda_generator is not None
        state = self.cuda_generator.get_state()
        out = original_step(self, batch, step)
        assert self.last_timesteps_bf is not None
        RECORDS.append({"rows": batch.index.tolist(), "generator_state": state,
                        "timesteps": self.last_timesteps_bf.cpu(), "loss": float(out.losses["loss"])})
        return out

    DiffusionForcingMethod.single_train_step = single_train_step  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    install_spy()
    spec = importlib.util.spec_from_file_location("recipe_finetune", REPO / "recipes" / "finetune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = int(module.main(argv))
    rank = int(os.environ.get("RANK", "0"))  # the launcher's: the process group may be gone by now
    torch.save(RECORDS[0], Path(os.environ["FVR_SPY_DIR"]) / f"rank{rank}.pt")
    return rc


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main(sys.argv[1:]))  # skip the teardown where gloo processes may abort
