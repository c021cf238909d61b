"""Two trainable roles (student, critic) and a frozen teacher, FSDP2-sharded through fv_accel.build.shard_roles,
trained for a few steps by the real Trainer.

    torchrun --nproc_per_node 2 tests/dist_scripts/fsdp2_roles.py OUT_DIR

Every rank writes ``OUT_DIR/rank<r>.json`` (sharding facts, the clip norm it computed at each step, frozen-role
checks); rank 0 writes ``OUT_DIR/out/metrics.jsonl``. ``tests/test_fsdp2_roles.py`` imports this module to run
the same method unsharded in one process as the reference.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from fv_accel import flow
from fv_accel.config import OptimizerConfig, RunConfig
from fv_accel.methods import StepOutput, TrainingMethod
from fv_accel.models import TINY_WAN_CONFIG, ModelBase, WanModel
from fv_accel.trainer import Trainer

GLOBAL_BATCH = 4
LATENT_SHAPE = (16, 2, 4, 4)
TEXT_SHAPE = (8, 32)
NUM_STEPS = 4
MAX_GRAD_NORM = 0.05  # small enough that both roles are clipped at every step
STUDENT_OPT = {"learning_rate": 1e-3, "lr_scheduler": "linear", "lr_warmup_steps": 2}
CRITIC_OPT = {"learning_rate": 2e-3, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 3}
INIT_SEEDS = {"student": 0, "critic": 1, "teacher": 2}


def run_config(output_dir: str) -> RunConfig:
    fake = {"family": "wan", "init_from": "unused"}  # roles are built in memory; nothing is read
    return RunConfig.model_validate({
        "models": {"student": fake, "critic": fake, "teacher": {**fake, "trainable": False,
                                                                   "frozen_dtype": "fp32"}},
        "method": {"name": "finetune"},
        "training": {
            "data": {"train_batch_size": GLOBAL_BATCH // 2},
            "optimizer": STUDENT_OPT,
            "loop": {"max_train_steps": NUM_STEPS, "max_grad_norm": MAX_GRAD_NORM},
            "checkpoint": {"output_dir": output_dir},
            "tracker": {"backends": []},
        },
    })


def build_roles(cfg: RunConfig) -> dict[str, ModelBase]:
    from diffusers import WanTransformer3DModel

    roles: dict[str, ModelBase] = {}
    for role, seed in INIT_SEEDS.items():
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_WAN_CONFIG)
        trainable = cfg.models[role].trainable
        transformer.requires_grad_(trainable)
        transformer.train(trainable)
        roles[role] = WanModel(role=role, transformer=transformer, config=cfg.models[role])
    return roles


class TwoRoleMethod(TrainingMethod):
    """Student regresses the frozen teacher's velocity; critic regresses the flow-matching target."""

    name: ClassVar[str] = "two_role_test"
    required_roles: ClassVar[tuple[str, ...]] = ("student", "critic", "teacher")
    trainable_roles: ClassVar[tuple[str, ...]] = ("student", "critic")

    def optimizer_configs(self) -> dict[str, OptimizerConfig]:
        return {"student": OptimizerConfig(**STUDENT_OPT), "critic": OptimizerConfig(**CRITIC_OPT)}

    def single_train_step(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        roles = self.role_models
        x0, noise, t, text = batch["x0"], batch["noise"], batch["t"], batch["text"]
        x_t = flow.add_noise(x0, noise, t)
        with torch.no_grad():
            v_teacher = roles["teacher"].predict_velocity(x_t, t, text)
        student_loss = torch.mean((roles["student"].predict_velocity(x_t, t, text) - v_teacher) ** 2)
        critic_loss = torch.mean((roles["critic"].predict_velocity(x_t, t, text) - flow.velocity_target(x0, noise)) ** 2)
        return StepOutput(losses={"student_loss": student_loss, "critic_loss": critic_loss},
                          loss_roles={"student_loss": "student", "critic_loss": "critic"})


def batches(rank: int, world_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The same global batch per step whatever the world size; each rank takes its contiguous slice."""
    per_rank = GLOBAL_BATCH // world_size
    step = 0
    while True:
        step += 1
        gen = torch.Generator().manual_seed(1000 + step)
        full = {
            "x0": torch.randn(GLOBAL_BATCH, *LATENT_SHAPE, generator=gen),
            "noise": torch.randn(GLOBAL_BATCH, *LATENT_SHAPE, generator=gen),
            "t": torch.rand(GLOBAL_BATCH, generator=gen) * 1000,
            "text": torch.randn(GLOBAL_BATCH, *TEXT_SHAPE, generator=gen),
        }
        yield {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in full.items()}


class RecordingTrainer(Trainer):
    """Remembers the clip norm this rank computed at each step (before any cross-rank averaging)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip_norms: list[dict[str, float]] = []

    def _clip(self, step: int) -> dict[str, torch.Tensor]:
        norms = super()._clip(step)
        self.clip_norms.append({role: float(norm) for role, norm in norms.items()})
        return norms


def full_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


def main(out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    from fv_accel.build import shard_roles
    from fv_accel.runtime import build_accelerator

    out = Path(out_dir)
    accelerator = build_accelerator()
    rank, world_size = accelerator.process_index, accelerator.num_processes
    cfg = run_config(str(out / "out"))
    method = TwoRoleMethod(cfg=cfg, role_models=build_roles(cfg))
    teacher_before = full_params(method.role_models["teacher"].transformer)
    shard_roles(accelerator, method, cfg)

    report: dict[str, Any] = {"rank": rank, "world_size": world_size}
    for role, model in method.role_models.items():
        params = list(model.transformer.named_parameters())
        report[f"{role}_all_dtensor"] = all(isinstance(p, DTensor) for _, p in params)
        report[f"{role}_local_numel"] = sum(p.to_local().numel() for _, p in params if isinstance(p, DTensor))
        report[f"{role}_numel"] = sum(p.numel() for _, p in params)
        report[f"{role}_requires_grad"] = any(p.requires_grad for _, p in params)
    report["num_optimizers"] = len(method.optimizers())
    report["optimizer_roles"] = sorted(method.optimizers())
    teacher_module = method.role_models["teacher"].transformer

    trainer = RecordingTrainer(accelerator=accelerator, method=method, data=batches(rank, world_size), cfg=cfg,
                               show_progress=False)
    trainer.fit()
    report["clip_norms"] = trainer.clip_norms
    report["teacher_grad_none"] = all(p.grad is None for p in teacher_module.parameters())
    after = full_params(teacher_module)
    report["teacher_unchanged"] = all(torch.equal(after[n], teacher_before[n]) for n in teacher_before)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def reference(out_dir: str) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The same run unsharded in this process (no process group, plain modules). Returns (rows, clip norms)."""
    from types import SimpleNamespace

    from fv_accel.build import build_lr_scheduler, build_optimizer

    cfg = run_config(out_dir)
    cfg.training.data.train_batch_size = GLOBAL_BATCH
    method = TwoRoleMethod(cfg=cfg, role_models=build_roles(cfg))
    for role, opt_cfg in method.optimizer_configs().items():
        module = method.role_models[role].transformer
        optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], opt_cfg)
        method.attach_prepared(role, {"transformer": module}, optimizer, build_lr_scheduler(optimizer, opt_cfg, NUM_STEPS))
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"), mixed_precision="no",
                                  log=lambda *args, **kwargs: None)
    trainer = RecordingTrainer(accelerator=accelerator, method=method, data=batches(0, 1), cfg=cfg,
                               show_progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, trainer.clip_norms


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    main(sys.argv[1])
    exit_process(0)  # skip the interpreter teardown where FSDP2-on-gloo processes may abort (-6)
