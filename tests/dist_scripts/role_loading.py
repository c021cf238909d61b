"""Build a 3-role DMD2 run (student, critic, frozen bf16 teacher, all from one transformer directory) through
``fv_accel.build.build_run`` and report what each rank holds.

    accelerate launch --config_file accelerate_configs/cpu_fsdp2_2proc.yaml --mixed_precision bf16 \
        tests/dist_scripts/role_loading.py {rss|compare} INIT_DIR OUT_DIR [CRITIC_INIT]

``rss``: every rank writes ``OUT_DIR/rank<r>.json`` with its peak RSS (``ru_maxrss``) after the build.
``compare``: every rank also loads each role in full with ``diffusers.from_pretrained`` (the oracle) and records,
per role, the parameters and buffers whose full tensor or dtype differs, before and after a forward, and
whether each optimizer holds its role's sharded parameters; and whether the shard offsets are right for
HSDP-shaped placements. ``CRITIC_INIT`` (optional): the critic's
``init_from`` (a Hub id in the test).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fv_accel.config import RunConfig


def run_config(init_dir: str, out_dir: str, critic_init: str | None = None) -> RunConfig:
    base = {"family": "wan", "init_from": init_dir, "latent_stats": "identity"}
    return RunConfig.model_validate({
        "models": {
            # Activation checkpointing is applied before sharding, on the empty student.
            "student": {**base, "activation_checkpointing": "full"},
            "critic": {**base, "init_from": critic_init or init_dir},
            "teacher": {**base, "trainable": False, "frozen_dtype": "bf16"},
        },
        "method": {"name": "dmd2", "dmd_denoising_steps": [1000, 500]},
        "training": {"data": {"train_batch_size": 2}, "loop": {"max_train_steps": 2},
                     "tracker": {"backends": []}, "checkpoint": {"output_dir": out_dir}},
    })


def differences(sharded: torch.nn.Module, oracle: torch.nn.Module) -> dict[str, list[str]]:
    """Names of the parameters and buffers whose full value or dtype differs from the oracle's."""
    got = {n: t.detach() for n, t in [*sharded.named_parameters(), *sharded.named_buffers()]}
    want = {n: t.detach() for n, t in [*oracle.named_parameters(), *oracle.named_buffers()]}
    differ = []
    for name in sorted(set(want) & set(got)):
        full = got[name].full_tensor() if hasattr(got[name], "full_tensor") else got[name]
        if full.dtype != want[name].dtype or not torch.equal(full.cpu(), want[name]):
            differ.append(name)
    return {"missing": sorted(set(want) - set(got)), "extra": sorted(set(got) - set(want)), "differ": differ}


def forward(model: Any, config: Any) -> torch.Tensor:
    """Through the role's own call (it casts inputs for the compute dtype, as training does)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.in_channels, 2, 4, 4, generator=gen)
    text = torch.randn(1, 8, config.text_dim, generator=gen)
    with torch.no_grad():
        return model.predict_velocity(x, torch.tensor([750.0]), text)


def compare(method: Any, cfg: RunConfig, mixed_precision: str) -> dict[str, Any]:
    """Every role against a plain ``from_pretrained`` load of its ``init_from`` in the role's dtype (the
    oracle): right after the build, and after a forward (FSDP2's lazy init re-pads the shards it all-gathers)
    and a reshard."""
    from diffusers import WanTransformer3DModel

    # The optimizers must step the sharded parameters themselves, in order (checked before any forward: the
    # root FSDP unit may stay unsharded after one). A generator step of DMD2 steps both trainable roles.
    step = next(s for s in range(1, 100) if len(method.get_optimizers(s)) == 2)
    stepped = [[id(p) for g in opt.param_groups for p in g["params"]] for opt in method.get_optimizers(step)]
    report: dict[str, Any] = {"optimizer_params": {
        role: [id(p) for p in method.role_models[role].transformer.parameters() if p.requires_grad] in stepped
        for role in ("student", "critic")}}
    for role, model in method.role_models.items():
        mcfg = cfg.models[role]
        dtype = torch.bfloat16 if (not mcfg.trainable and mixed_precision == "bf16") else torch.float32
        oracle = WanTransformer3DModel.from_pretrained(mcfg.init_from, subfolder=mcfg.subfolder, torch_dtype=dtype)
        before = differences(model.transformer, oracle)
        forward(model, oracle.config)
        model.transformer.reshard()  # the root unit may stay unsharded (in the compute dtype) after a forward
        report[role] = {"before_forward": before, "after_forward": differences(model.transformer, oracle),
                        "num_compared": len([*oracle.parameters(), *oracle.buffers()]),
                        "buffers": sorted(n for n, _ in oracle.named_buffers())}
    return report


def hsdp_slices_match() -> bool:
    """``local_index`` on HSDP-shaped placements ``(Replicate, Shard(0))`` over 2-D meshes (2 × 1 and 1 × 2),
    uneven and empty shards included: the slice it names holds what DTensor itself put on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fv_accel.models.sharded_load import local_index

    ok = True
    for mesh_shape in ((2, 1), (1, 2)):
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
        for shape in ((5, 3), (1, 4)):
            full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
            local, index = local_index(distribute_tensor(full, mesh, [Replicate(), Shard(0)]))
            ok = ok and torch.equal(local, full[index])
    return ok


def main(mode: str, init_dir: str, out_dir: str, critic_init: str | None = None) -> None:
    from fv_accel.build import build_run
    from fv_accel.runtime import build_accelerator

    out = Path(out_dir)
    accelerator = build_accelerator()
    cfg = run_config(init_dir, str(out / "run"), critic_init)
    built = build_run(cfg, accelerator, with_data=False)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    report: dict[str, Any] = {"rank": accelerator.process_index, "peak_rss_bytes": peak_kib * 1024,
                              "mixed_precision": accelerator.mixed_precision,
                              "num_params": sum(p.numel() for p in built.method.student.transformer.parameters())}
    if mode == "compare":
        report["compare"] = compare(built.method, cfg, accelerator.mixed_precision)
        report["hsdp_slices_match"] = hsdp_slices_match()
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    main(*sys.argv[1:])
    exit_process(0)  # skip the interpreter teardown where FSDP2-on-gloo processes may abort (-6)
