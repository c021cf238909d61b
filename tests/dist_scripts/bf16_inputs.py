"""bf16 mixed precision through fv_accel.build.shard_roles: a trainable student and a frozen teacher (stored in
bf16 the way diffusers loads it), tiny Wan, what each unit's forward receives and computes in.

    accelerate launch --config_file accelerate_configs/cpu_fsdp2_2proc_bf16.yaml \
        tests/dist_scripts/bf16_inputs.py OUT_DIR

Every rank writes ``OUT_DIR/rank<r>.json``: the dtypes and values forward pre-hooks saw, stored parameter
dtypes, whether every parameter is sharded again after a forward, and the student's time-embedder gradients
next to those of the same model unsharded in fp32 (the oracle, computed in the same process).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, ClassVar

import accelerate
import torch
import torch.distributed as dist
from torch import nn

from fv_accel.config import OptimizerConfig, RunConfig
from fv_accel.methods import StepOutput, TrainingMethod
from fv_accel.models import TINY_WAN_CONFIG, ModelBase, WanModel

GLOBAL_BATCH = 4
LATENT_SHAPE = (16, 2, 4, 4)
TEXT_SHAPE = (8, 32)
#: Near t = 1000, where a bf16 timestep moves by up to 2 (bf16 spacing is 4 in [512, 1024)) and the sinusoidal
#: embedding's fastest channels turn by whole radians.
TIMESTEPS = (999.0, 998.5, 997.0, 995.0)
PROBE_T = 750.0  # bf16 would make it 752
#: The time embedder's parameters; their gradients are compared with the fp32 oracle.
TIME_EMBEDDER = ("condition_embedder.time_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.bias",
                 "condition_embedder.time_embedder.linear_2.weight", "condition_embedder.time_embedder.linear_2.bias")


def run_config(output_dir: str) -> RunConfig:
    fake = {"family": "wan", "init_from": "unused"}  # roles are built in memory
    return RunConfig.model_validate({
        "models": {"student": fake, "teacher": {**fake, "trainable": False}},
        "method": {"name": "finetune"},
        "training": {"data": {"train_batch_size": GLOBAL_BATCH // 2}, "checkpoint": {"output_dir": output_dir},
                     "tracker": {"backends": []}},
    })


class StudentTeacher(TrainingMethod):
    """Only here to be sharded by shard_roles; the script drives the forwards itself."""

    name: ClassVar[str] = "bf16_inputs_test"
    required_roles: ClassVar[tuple[str, ...]] = ("student", "teacher")
    trainable_roles: ClassVar[tuple[str, ...]] = ("student",)

    def optimizer_configs(self) -> dict[str, OptimizerConfig]:
        return {"student": OptimizerConfig()}

    def single_train_step(self, batch: Any, step: int) -> StepOutput:
        raise NotImplementedError


def tiny_wan(seed: int) -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN_CONFIG)


def stored_like_diffusers_bf16(transformer: nn.Module, folder: Path) -> nn.Module:
    """A frozen role as ``from_pretrained(torch_dtype=bf16)`` gives it: bf16 except ``_keep_in_fp32_modules``."""
    from diffusers import WanTransformer3DModel

    transformer.save_pretrained(folder)
    return WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)


def global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {"x_t": torch.randn(GLOBAL_BATCH, *LATENT_SHAPE, generator=gen),
            "text": torch.randn(GLOBAL_BATCH, *TEXT_SHAPE, generator=gen),
            "target": torch.randn(GLOBAL_BATCH, *LATENT_SHAPE, generator=gen),
            "t": torch.tensor(TIMESTEPS)}


def loss_of(model: ModelBase, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.mean((model.predict_velocity(batch["x_t"], batch["t"], batch["text"]) - batch["target"]) ** 2)


def dtype_name(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")


class Probes:
    """Forward pre-hooks (registered after FSDP2's own, so they see what the module's forward receives)."""

    def __init__(self, transformer: nn.Module) -> None:
        self.seen: dict[str, Any] = {}
        embedder = transformer.condition_embedder
        block = transformer.blocks[0]
        self.handles = [
            embedder.register_forward_pre_hook(self._embedder, with_kwargs=True),
            block.register_forward_pre_hook(self._block, with_kwargs=True),
            embedder.time_embedder.linear_1.register_forward_pre_hook(self._linear("time_embedder.linear_1")),
            block.attn1.to_q.register_forward_pre_hook(self._linear("blocks.0.attn1.to_q")),
            block.norm2.register_forward_pre_hook(self._linear("blocks.0.norm2")),
        ]

    def _embedder(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep, text = args[0], args[1]
        self.seen["embedder_timestep"] = {"dtype": dtype_name(timestep), "values": timestep.double().tolist()}
        self.seen["embedder_text_dtype"] = dtype_name(text)

    def _block(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, _, temb, rotary = args
        self.seen["block_hidden_dtype"] = dtype_name(hidden)
        self.seen["block_temb_dtype"] = dtype_name(temb)
        self.seen["block_rope_dtypes"] = [dtype_name(r) for r in rotary]

    def _linear(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.seen[name] = {"input": dtype_name(args[0]), "weight": dtype_name(module.weight)}
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def all_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in module.parameters())


def main(out_dir: str) -> None:
    from fv_accel.build import shard_roles
    from fv_accel.runtime import build_accelerator

    out = Path(out_dir)
    accelerator = build_accelerator()
    rank, world_size = accelerator.process_index, accelerator.num_processes
    cfg = run_config(str(out / "out"))
    student_fp32 = tiny_wan(0)
    oracle = WanModel(role="student", transformer=copy.deepcopy(student_fp32), config=cfg.models["student"])
    teacher = stored_like_diffusers_bf16(tiny_wan(2), out / f"teacher_rank{rank}")
    teacher.requires_grad_(False).eval()
    roles = {"student": WanModel(role="student", transformer=student_fp32, config=cfg.models["student"]),
             "teacher": WanModel(role="teacher", transformer=teacher, config=cfg.models["teacher"])}
    report: dict[str, Any] = {"rank": rank, "world_size": world_size, "accelerate": accelerate.__version__,
                              "mixed_precision": accelerator.mixed_precision}
    report["teacher_loaded_dtypes"] = {n: dtype_name(p) for n, p in teacher.named_parameters()}
    method = StudentTeacher(cfg=cfg, role_models=roles)
    shard_roles(accelerator, method, cfg)
    student, teacher_model = method.role_models["student"], method.role_models["teacher"]
    for role, model in (("student", student), ("teacher", teacher_model)):
        report[f"{role}_dtypes"] = {n: dtype_name(p) for n, p in model.transformer.named_parameters()}

    # What the units see: one sample per rank at t = 750.
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, *LATENT_SHAPE, generator=gen)
    text = torch.randn(1, *TEXT_SHAPE, generator=gen)
    for role, model in (("student", student), ("teacher", teacher_model)):
        probes = Probes(model.transformer)
        with torch.no_grad():
            v = model.predict_velocity(x, torch.tensor([PROBE_T]), text)
        probes.remove()
        report[f"{role}_seen"] = probes.seen
        report[f"{role}_output_dtype"] = dtype_name(v)
        # After a forward (no backward follows), every unit, the root included, is sharded again.
        report[f"{role}_resharded_after_forward"] = all_sharded(model.transformer)

    # Time-embedder gradients near t = 1000: this rank's half of the global batch under bf16, the whole batch
    # unsharded in fp32 (FSDP2 averages the two halves' gradients, which is the whole batch's mean loss).
    batch = global_batch()
    per_rank = GLOBAL_BATCH // world_size
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    loss_of(student, mine).backward()
    loss_of(oracle, batch).backward()
    grads = dict(student.transformer.named_parameters())
    oracle_grads = dict(oracle.transformer.named_parameters())
    report["time_embedder_grad_rel_err"] = {}
    for name in TIME_EMBEDDER:
        got, want = grads[name].grad.full_tensor().double(), oracle_grads[name].grad.double()
        report["time_embedder_grad_rel_err"][name] = float((got - want).norm() / want.norm())
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    main(sys.argv[1])
    exit_process(0)  # skip the interpreter teardown where FSDP2-on-gloo processes may abort (-6)
