"""A two-expert role under FSDP2 on 2 ranks whose batches fall on different sides of the boundary: rank 0's
samples are all high-noise, rank 1's all low-noise, so each rank has one expert without a sample.

    torchrun --nproc_per_node 2 tests/dist_scripts/two_experts.py INIT_DIR DATA_DIR OUT_DIR

Both experts must still run on both ranks (their collectives), and the gradients must be what FSDP2's average
of the plain per-rank gradients is: (gradient from the rank with samples + 0) / 2 for each expert. The plain
reference is ``WanTransformer3DModel.from_pretrained`` of each expert, unsharded. Every rank writes
``OUT_DIR/rank<r>.json``; ``tests/test_two_experts.py`` checks them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(init_dir: str, data_dir: str, out_dir: str) -> None:
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    from fv_accel.build import build_run
    from fv_accel.config import resolve_config
    from fv_accel.runtime import build_accelerator

    accelerator = build_accelerator()
    cfg = resolve_config({
        "models": {"student": {"init_from": init_dir, "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": data_dir, "train_batch_size": 2, "text_len": 8},
                     "checkpoint": {"output_dir": str(Path(out_dir) / "run")}, "tracker": {"backends": []}},
    })
    model = build_run(cfg, accelerator, with_data=False).method.student
    rank = dist.get_rank()
    torch.manual_seed(rank)
    x = torch.randn(2, 16, 2, 4, 4)
    text = torch.randn(2, 8, 32)
    t = torch.tensor([900.0, 700.0]) if rank == 0 else torch.tensor([100.0, 300.0])
    out = model.predict_velocity(x, t, text)
    out.square().mean().backward()

    plain = {name: WanTransformer3DModel.from_pretrained(init_dir, subfolder=name) for name in model.modules()}
    expert = plain["transformer" if rank == 0 else "transformer_2"]
    ref = expert(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    ref.square().mean().backward()
    report: dict[str, float | bool] = {"output": float((out - ref).abs().max())}
    for name, module in model.modules().items():
        sharded = dict(module.named_parameters())
        report[f"{name}_sharded"] = all(hasattr(p, "full_tensor") for p in sharded.values())
        worst = 0.0
        for n, p in plain[name].named_parameters():
            expected = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(expected)
            expected /= dist.get_world_size()
            grad = sharded[n].grad
            assert grad is not None, (name, n)
            worst = max(worst, float((grad.full_tensor() - expected).abs().max()))
        report[f"{name}_grad"] = worst
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    main(*sys.argv[1:4])
    exit_process(0)  # skip the teardown where gloo processes may abort (fv_accel/cli.py exit_process)
