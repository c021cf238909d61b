"""Run ``recipes/finetune.py`` with an ode_init config and record, per rank, the first step's rows, drawn step
indices and loss: ``tests/test_ode_init.py`` recomputes the loss with plain PyTorch.

    accelerate launch ... tests/dist_scripts/ode_init_step.py --config RECIPE.yaml

Every rank writes ``$FVR_SPY_DIR/rank<r>.json``: ``{"rows": [...], "indices": [[k per frame] per sample], "loss"}``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from fv_accel.methods.ode_init import OdeInitMethod

REPO = Path(__file__).resolve().parents[2]
RECORDS: list[dict[str, Any]] = []


def install_spy() -> None:
    original_step = OdeInitMethod.single_train_step

    def single_train_step(self: OdeInitMethod, batch: Any, step: int) -> Any:
        out = original_step(self, batch, step)
        assert self.last_step_indices_bf is not None
        RECORDS.append({"rows": batch.index.tolist(), "indices": self.last_step_indices_bf.tolist(),
                        "loss": float(out.losses["loss"])})
        return out

    OdeInitMethod.single_train_step = single_train_step  # type: ignore[method-assign]


def main() -> int:
    install_spy()
    spec = importlib.util.spec_from_file_location("recipe_finetune", REPO / "recipes" / "finetune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = int(module.main(sys.argv[1:]))
    rank = int(os.environ.get("RANK", "0"))  # the launcher's: the process group may be gone by now
    (Path(os.environ["FVR_SPY_DIR"]) / f"rank{rank}.json").write_text(json.dumps(RECORDS[0]))
    return rc


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main())  # skip the teardown where gloo processes may abort
