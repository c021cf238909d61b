"""Run a recipe (``recipes/<FVR_RECIPE>.py``, default finetune) with test-only fault injection.

The distill recipe's after-training toy quality table is skipped (sampling cost, not under test).

Environment switches (all optional):
- ``FVR_SIGKILL_AFTER_SAVE=N``: every rank SIGKILLs itself right after ``checkpoint-N`` is complete (a crash
  with no chance to clean up).
- ``FVR_SIGTERM_RANK=r`` + ``FVR_SIGTERM_STEP=s``: rank r (only) sends itself SIGTERM in the middle of step s
  (a preemption notice that reaches one rank).
- ``FVR_DUMP_EMA=FILE``: after training, gather the full EMA weights (a collective) and write them to FILE
  (safetensors) from rank 0: the reference the resharded single-process read is compared with.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from fv_accel.checkpoint.manager import CheckpointManager
from fv_accel.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def install_hooks() -> None:
    kill_after = os.environ.get("FVR_SIGKILL_AFTER_SAVE")
    if kill_after:
        original_save = CheckpointManager.save

        def save(self: CheckpointManager, step: int, **kwargs):  # type: ignore[no-untyped-def]
            path = original_save(self, step, **kwargs)
            if step == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        CheckpointManager.save = save  # type: ignore[method-assign]

    term_rank, term_step = os.environ.get("FVR_SIGTERM_RANK"), os.environ.get("FVR_SIGTERM_STEP")
    if term_rank and term_step:
        original_step = Trainer.train_step

        def train_step(self: Trainer, step: int):  # type: ignore[no-untyped-def]
            if step == int(term_step) and _rank() == int(term_rank):
                os.kill(os.getpid(), signal.SIGTERM)  # delivered now; the loop sees it at the step boundary
            return original_step(self, step)

        Trainer.train_step = train_step  # type: ignore[method-assign]

    dump = os.environ.get("FVR_DUMP_EMA")
    if dump:
        original_fit = Trainer.fit

        def fit(self: Trainer, **kwargs):  # type: ignore[no-untyped-def]
            step = original_fit(self, **kwargs)
            ema = self.callbacks.get("ema")
            assert ema is not None, "FVR_DUMP_EMA needs callbacks.ema"
            full = ema.shadow_full()  # type: ignore[attr-defined]
            if _rank() == 0:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in full.items()}, dump)
            return step

        Trainer.fit = fit  # type: ignore[method-assign]


def main() -> int:
    install_hooks()
    recipe = os.environ.get("FVR_RECIPE", "finetune")
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", REPO / "recipes" / f"{recipe}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "print_toy_quality"):  # distill's after-training quality table: not what is tested here
        module.print_toy_quality = lambda *args: None
    return int(module.main(sys.argv[1:]))


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    exit_process(main())  # skip the teardown where gloo processes may abort
