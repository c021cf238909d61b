"""A ``wan_causal`` student built by ``fv_accel.build.build_run`` (loaded on meta, sharded by FSDP2 over 2 ranks,
filled, activation checkpointing on) against the same transformer unsharded in one process (the oracle, a plain
``from_pretrained`` load wrapped in ``CausalWanModel``).

    torchrun --nproc_per_node 2 tests/dist_scripts/causal_wan.py INIT_DIR OUT_DIR

Both ranks get the same inputs, so FSDP2's averaged gradient equals the oracle's. Every rank writes
``OUT_DIR/rank<r>.json`` (max abs differences); ``tests/test_causal_wan.py`` checks them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CAUSAL = {"num_frames_per_block": 2, "local_attn_frames": 4, "sink_frames": 1}
FRAMES = 7  # blocks [1, 2, 2, 2]; the window drops frames 1-2 for the last block
HW = (4, 4)


def streamed(model: Any, x: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    outs = []
    with torch.no_grad(), model.stream(text, num_frames=FRAMES, latent_hw=HW) as stream:
        for start, size in zip(stream.block_starts, stream.block_sizes, strict=True):
            outs.append(stream.predict_velocity(x[:, :, start:start + size], t, frame_start=start))
            stream.commit(x[:, :, start:start + size], frame_start=start)
    return torch.cat(outs, dim=2)


def streamed_loss(model: Any, x: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with model.stream(text, num_frames=FRAMES, latent_hw=HW) as stream:
        stream.commit(x[:, :, :1], frame_start=0)
        first = stream.predict_velocity(x[:, :, 1:3], t, frame_start=1).square().mean()
        stream.commit(x[:, :, 1:3], frame_start=1)
        return first + stream.predict_x0(x[:, :, 3:5], t, frame_start=3).square().mean()


def main(init_dir: str, out_dir: str) -> None:
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    from fv_accel.build import build_run
    from fv_accel.config import RunConfig
    from fv_accel.models.wan_causal import CausalWanModel
    from fv_accel.runtime import build_accelerator

    accelerator = build_accelerator()
    cfg = RunConfig.model_validate({
        "models": {"student": {"family": "wan_causal", "init_from": init_dir, "subfolder": "",
                               "latent_stats": "identity", "activation_checkpointing": "full", "causal": CAUSAL}},
        "method": {"name": "finetune"},
        "training": {"data": {"train_batch_size": 1}, "loop": {"max_train_steps": 1},
                     "tracker": {"backends": []}, "checkpoint": {"output_dir": str(Path(out_dir) / "run")}},
    })
    model = build_run(cfg, accelerator, with_data=False).method.student
    plain = CausalWanModel(role="student", transformer=WanTransformer3DModel.from_pretrained(init_dir),
                           config=cfg.models["student"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, FRAMES, *HW, generator=gen)
    x_clean = torch.randn(1, 16, FRAMES, *HW, generator=gen)
    text = torch.randn(1, 6, 32, generator=gen)
    t_bf = torch.tensor([[900.0, 700, 700, 500, 500, 300, 300]])
    t = torch.tensor([600.0])
    report: dict[str, Any] = {
        "type": type(model).__name__,
        "sharded": all(hasattr(p, "full_tensor") for p in model.transformer.parameters()),
    }
    with torch.no_grad():
        report["mask"] = float((model.predict_velocity(x, t_bf, text) - plain.predict_velocity(x, t_bf, text))
                               .abs().max())
        report["teacher"] = float((model.predict_velocity_teacher_forced(x, t_bf, x_clean, text)
                                   - plain.predict_velocity_teacher_forced(x, t_bf, x_clean, text)).abs().max())
    report["stream"] = float((streamed(model, x, text, t) - streamed(plain, x, text, t)).abs().max())
    streamed_loss(model, x, text, t).backward()
    streamed_loss(plain, x, text, t).backward()
    sharded = dict(model.transformer.named_parameters())
    worst, scale = 0.0, 0.0
    for name, p in plain.transformer.named_parameters():
        assert p.grad is not None and sharded[name].grad is not None, name
        worst = max(worst, float((sharded[name].grad.full_tensor() - p.grad).abs().max()))
        scale = max(scale, float(p.grad.abs().max()))
    report["grad"], report["grad_scale"] = worst, scale
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from fv_accel.cli import exit_process

    main(*sys.argv[1:3])
    exit_process(0)  # skip the teardown where gloo processes may abort (fv_accel/cli.py exit_process)
