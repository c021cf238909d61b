"""Run ``recipes/distill.py`` with a self_forcing config and record, per rank and step, what the plain-PyTorch
oracle of ``tests/test_self_forcing.py`` needs to replay it: the batch rows, the method's noise generator state
before the step, each rollout's exit steps, and the step's losses.

    accelerate launch ... tests/dist_scripts/self_forcing_step.py --config RECIPE.yaml

Every rank writes ``$FVR_SPY_DIR/rank<r>.pt``: a list with one dict per step. The after-training toy quality
table is skipped (sampling cost, not under test).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fv_accel.methods.self_forcing import SelfForcingMethod

REPO = Path(__file__).resolve().parents[2]
RECORDS: list[dict[str, Any]] = []


def install_spy() -> None:
    original_step = SelfForcingMethod.single_train_step

    def single_train_step(self: SelfForcingMethod, batch: Any, step: int) -> Any:
        assert self.cuda_generator is not None
        state = self.cuda_generator.get_state()
        out = original_step(self, batch, step)
        RECORDS.append({"step": step, "rows": batch.index.tolist(), "generator_state": state,
                        "exits": [r.exit_indices for r in self.rollouts],
                        "losses": {k: float(v) for k, v in out.losses.items()}})
        return out

    SelfForcingMethod.single_train_step = single_train_step  # type: ignore[method-assign]


def main() -> int:
    install_spy()
    spec = importlib.util.spec_from_file_location("recipe_distill", REPO / "recipes" / "distill.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.print_toy_quality = lambda *args: None
    rc = int(module.main(sys.argv[1:]))
    rank = int(os.environ.get("RANK", "0"))  # the launcher's: the process group may be gone by now
    torch.save(RECORDS, Path(os.environ["FVR_SPY_DIR"]) / f"rank{rank}.pt")
    return rc


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main())  # skip the teardown where gloo processes may abort
