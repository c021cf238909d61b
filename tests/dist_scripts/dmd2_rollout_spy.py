"""Run the distill recipe and record, per rank and per step, every student forward (its timestep and whether it
ran with grad): ``tests/test_dmd2_distributed.py`` checks the graded-step sampling across ranks.

    accelerate launch ... tests/dist_scripts/dmd2_rollout_spy.py --config RECIPE.yaml

Every rank writes ``$FVR_SPY_DIR/rank<r>.json``: ``[[[t, grad], ...] per step]``. The after-training toy quality
table is skipped (sampling cost, not under test).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fv_accel.methods.dmd2 import DMD2Method

REPO = Path(__file__).resolve().parents[2]
FORWARDS: list[list[tuple[float, bool]]] = []


def install_spy() -> None:
    original_start = DMD2Method.on_train_start
    original_step = DMD2Method.single_train_step

    def on_train_start(self: DMD2Method) -> None:
        original_start(self)
        predict = self.student.predict_x0

        def spy(x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            FORWARDS[-1].append((float(t[0]), torch.is_grad_enabled()))
            return predict(x_t, t, text)

        self.student.predict_x0 = spy  # type: ignore[method-assign]

    def single_train_step(self: DMD2Method, batch: Any, step: int) -> Any:
        FORWARDS.append([])
        return original_step(self, batch, step)

    DMD2Method.on_train_start = on_train_start  # type: ignore[method-assign]
    DMD2Method.single_train_step = single_train_step  # type: ignore[method-assign]


def main() -> int:
    install_spy()
    spec = importlib.util.spec_from_file_location("recipe_distill", REPO / "recipes" / "distill.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.print_toy_quality = lambda *args: None
    rc = int(module.main(sys.argv[1:]))
    rank = int(os.environ.get("RANK", "0"))  # the launcher's: the process group may be gone by now
    (Path(os.environ["FVR_SPY_DIR"]) / f"rank{rank}.json").write_text(json.dumps(FORWARDS))
    return rc


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main())  # skip the teardown where gloo processes may abort
