"""How long does one checkpoint save block the training loop, synchronous vs async (issue 14)?

A random ``WanTransformer3DModel`` (default: dim 1024 = 8 heads × 128, 6 blocks, FFN 4096: ~112 M parameters)
in fp32 with an AdamW state (one step taken on random gradients: exp_avg, exp_avg_sq, step), saved through
fv_accel's real ``CheckpointManager`` (world size 1 over gloo, the DCP writer with ``WRITER_THREADS`` threads):

* sync: ``save(step, blocking=True)``: the loop is blocked for the whole write (stage + write + fsync + rename).
* async: ``save(step)`` returns after staging (the state copied to CPU memory); a simulated training loop then
  runs steps of fixed CPU work (matmuls) and calls ``maybe_finalize()`` at each step boundary, as the trainer
  does, until the checkpoint is complete. Blocked time = the ``save`` call + every ``maybe_finalize`` call
  (its collective poll, and the final metadata/rename/retention). ``keep_last=1``: both modes' finalisation
  deletes the previous checkpoint.

Reported per mode: seconds blocked, total seconds until the checkpoint is complete, the checkpoint size, and for
async the ratio async/sync blocked and the simulated step time during the write vs before it (the background
writer shares the CPU cores with training). Saves alternate (sync, async, sync, ...) for ``--rounds`` rounds;
medians are reported.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint_stall.py [--layers 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fv_accel.callbacks import CallbackList  # noqa: E402
from fv_accel.checkpoint import CheckpointManager, layout  # noqa: E402
from fv_accel.checkpoint.manager import WRITER_THREADS  # noqa: E402
from fv_accel.checkpoint.states import ModelState, OptimizerState, RoleModuleContainer  # noqa: E402


class OneRole:
    """The part of the TrainingMethod API the checkpoint manager uses: one trainable role and its AdamW."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def optimizers(self) -> dict[str, Any]:
        return {"student": self.optimizer}

    def checkpoint_state(self) -> dict[str, Any]:
        return {layout.role_module_key("student", "transformer"): ModelState(self.model),
                layout.optimizer_key("student"): OptimizerState(RoleModuleContainer({"transformer": self.model}),
                                                                self.optimizer)}

    def random_state(self) -> dict[str, Any]:
        return {}

    def take_step(self) -> None:
        for p in self.model.parameters():
            p.grad = torch.randn_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_model(layers: int, dim: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    heads = dim // 128
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=4 * dim,
                                 num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 eps=1e-6, rope_max_seq_len=1024)


def work_step(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """One simulated training step: fixed CPU work. Returns its wall time."""
    start = time.perf_counter()
    for _ in range(repeats):
        a = torch.tanh(a @ b)
    return time.perf_counter() - start


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work-repeats", type=int, default=4, help="matmuls per simulated step")
    parser.add_argument("--output-dir", default="", help="where checkpoints go (default: a temp dir, removed)")
    args = parser.parse_args()

    store = tempfile.mkdtemp(prefix="checkpoint_stall_store_")
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
    torch.manual_seed(0)
    method = OneRole(build_model(args.layers, args.dim))
    num_params = sum(p.numel() for p in method.model.parameters())
    method.take_step()  # AdamW state exists: 3 fp32 tensors per parameter in the checkpoint
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="checkpoint_stall_"))
    manager = CheckpointManager(output_dir=out, method=method, data=None,  # type: ignore[arg-type]
                                callbacks=CallbackList(), config_dump={}, keep_last=1, async_save=True)
    a, b = torch.randn(512, 512), torch.randn(512, 512) / 512**0.5
    base_steps = [work_step(a, b, args.work_repeats) for _ in range(10)]
    base_step = statistics.median(base_steps)

    sync_blocked: list[float] = []
    async_blocked: list[float] = []
    async_total: list[float] = []
    steps_during: list[float] = []
    async_parts: list[tuple[float, float, float]] = []
    size = 0
    step = 0
    for _ in range(args.rounds):
        step += 1
        start = time.perf_counter()
        path = manager.save(step, blocking=True)
        sync_blocked.append(time.perf_counter() - start)
        size = dir_bytes(path)

        step += 1
        start = time.perf_counter()
        manager.save(step)
        staging = time.perf_counter() - start
        polls = finalise = 0.0
        while manager.pending_step is not None:
            steps_during.append(work_step(a, b, args.work_repeats))
            t = time.perf_counter()
            done = manager.maybe_finalize()
            if done:
                finalise = time.perf_counter() - t
            else:
                polls += time.perf_counter() - t
        async_total.append(time.perf_counter() - start)
        async_blocked.append(staging + polls + finalise)
        async_parts.append((staging, polls, finalise))

    sync_s, async_s = statistics.median(sync_blocked), statistics.median(async_blocked)
    print(f"# checkpoint stall: {num_params / 1e6:.1f} M parameters (dim {args.dim}, {args.layers} blocks), "
          f"fp32 + AdamW, checkpoint {size / 2**30:.2f} GiB; {WRITER_THREADS} writer threads; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}; {args.rounds} rounds")
    print("| mode | loop blocked (s) | until complete (s) | note |")
    print("|---|---|---|---|")
    print(f"| sync | {sync_s:.2f} | {sync_s:.2f} | runs: {', '.join(f'{v:.2f}' for v in sync_blocked)} |")
    parts = ", ".join(f"{v:.2f} = {x:.2f} + {y:.3f} + {z:.2f}" for v, (x, y, z) in zip(async_blocked, async_parts,
                                                                                       strict=True))
    print(f"| async | {async_s:.2f} | {statistics.median(async_total):.2f} | runs (save call + polls while writing "
          f"+ finalisation): {parts} |")
    print(f"ratio async/sync blocked: {async_s / sync_s:.3f}")
    if steps_during:
        print(f"simulated step: {base_step * 1e3:.1f} ms before, {statistics.median(steps_during) * 1e3:.1f} ms "
              f"(median of {len(steps_during)}) while a write was in flight")
    dist.destroy_process_group()
    shutil.rmtree(store, ignore_errors=True)
    if not args.output_dir:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
