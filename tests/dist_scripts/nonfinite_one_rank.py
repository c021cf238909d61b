"""Two ranks, the real Trainer, one plain nn.Linear student: at step 2 only rank 0's loss is NaN.

    torchrun --nproc_per_node 2 tests/dist_scripts/nonfinite_one_rank.py OUT_DIR

Runs twice in the same processes: ``training.loop.nonfinite=skip`` for 3 steps, then ``stop``. Both ranks
get identical data and weights, so every rank computes the same update and the weights stay equal across
ranks unless the ranks disagree about skipping. The NaN is added as a constant: the loss value is NaN but the
gradient stays finite, so only the loop's all-reduced loss check can see it on rank 1.

Every rank writes ``OUT_DIR/rank<r>.json``: ``skip`` (student weight after each step, which steps returned no
row, ``num_skipped``) and ``stop`` (the step and message of the NonFiniteError, or what happened instead).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from fv_accel.build import build_lr_scheduler, build_optimizer
from fv_accel.config import RunConfig
from fv_accel.errors import NonFiniteError
from fv_accel.methods import StepOutput, TrainingMethod
from fv_accel.runtime import build_accelerator
from fv_accel.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the loop tests' one-Linear role
from test_loop import LinearModel  # noqa: E402

NAN_STEP = 2
NUM_STEPS = 3


class NaNOnRankZero(TrainingMethod):
    name: ClassVar[str] = "nan_on_rank_zero"

    def single_train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> StepOutput:
        x, y = batch
        loss = ((self.student.transformer(x) - y) ** 2).mean()
        if step == NAN_STEP and dist.get_rank() == 0:
            loss = loss + float("nan")  # NaN value, finite gradient
        return StepOutput(losses={"loss": loss}, loss_roles={"loss": "student"})


def build_trainer(accelerator: Any, out: Path, nonfinite: str) -> tuple[Trainer, nn.Linear]:
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused"}},  # built in memory below; nothing is read
        "method": {"name": "finetune"},
        "training": {"data": {"train_batch_size": 4},
                     "optimizer": {"learning_rate": 0.1},
                     "loop": {"max_train_steps": NUM_STEPS, "nonfinite": nonfinite, "max_consecutive_skips": 3},
                     "checkpoint": {"output_dir": str(out / nonfinite)}, "tracker": {"backends": []}},
    })
    torch.manual_seed(0)  # the same weights and batches on every rank
    linear = nn.Linear(3, 2)
    method = NaNOnRankZero(cfg=cfg, role_models={
        "student": LinearModel(role="student", transformer=linear, config=cfg.models["student"])})
    optimizer = build_optimizer(list(linear.parameters()), cfg.training.optimizer)
    method.attach_prepared("student", {"transformer": linear}, optimizer,
                           build_lr_scheduler(optimizer, cfg.training.optimizer, NUM_STEPS))
    method.on_train_start()
    batches = [(torch.randn(4, 3), torch.randn(4, 2)) for _ in range(NUM_STEPS)]
    trainer = Trainer(accelerator=accelerator, method=method, data=iter(batches), cfg=cfg, show_progress=False)
    return trainer, linear


def main(out: Path) -> None:
    # A short collective timeout: a rank left alone in a collective fails in seconds instead of hanging.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    accelerator = build_accelerator()
    rank = dist.get_rank()
    result: dict[str, Any] = {"rank": rank}

    trainer, linear = build_trainer(accelerator, out, "skip")
    weights, no_row = [linear.weight.detach().tolist()], []
    for step in range(1, NUM_STEPS + 1):
        if trainer.train_step(step) is None:
            no_row.append(step)
        weights.append(linear.weight.detach().tolist())
    result["skip"] = {"weights": weights, "no_row": no_row, "num_skipped": trainer.num_skipped}

    trainer, _ = build_trainer(accelerator, out, "stop")
    try:
        for step in range(1, NUM_STEPS + 1):
            trainer.train_step(step)
        result["stop"] = {"outcome": "finished"}
    except NonFiniteError as exc:
        result["stop"] = {"outcome": "nonfinite", "step": step, "message": str(exc)}
    except Exception as exc:  # e.g. the peer left a collective: recorded, so the test can say what happened
        result["stop"] = {"outcome": type(exc).__name__, "step": step, "message": str(exc)[:500]}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    main(Path(sys.argv[1]))
    exit_process(0)  # skip the interpreter teardown where FSDP2-on-gloo processes may abort (-6)
