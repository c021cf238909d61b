"""What does fv_accel's fine-tuning loop cost over a bare PyTorch loop doing the same work?

Both sides train the same tiny Wan (the toy world's init) with the same per-step work: one batch of toy
latents, uniform timesteps with shift 3, flow-matching MSE, backward, global-norm clipping to 1.0, AdamW with
the same hyper-parameters, a constant-with-warmup LR schedule, and one host sync for the logged loss.

* fv_accel: the real path — ``build_accelerator`` (FSDP2, world size 1 over gloo), ``build_run`` (role loading,
  ``accelerator.prepare``, the parquet ``DataStream``), ``Trainer.fit`` (metrics.jsonl row per step). The step
  time is the wall time between consecutive ``on_step_end`` callbacks, so everything the loop does per step
  counts (data loading, the metrics row, the progress bookkeeping).
* bare: ``WanTransformer3DModel`` as a plain module, no FSDP, no Accelerate, the batch already collated in memory.
* bare+FSDP2: the same bare loop with the model wrapped by ``fully_shard`` (per block, then the root) on the same
  world-size-1 process group, and ``torch.nn.utils.clip_grad_norm_`` on its DTensors: what a hand-written loop
  pays for FSDP2 everywhere. fv_accel / bare+FSDP2 is the framework's own cost; fv_accel / bare is the whole
  cost including FSDP2's per-parameter hooks at world size 1.

Steps are measured in alternating rounds (fv_accel, bare, fv_accel, ...) in one process, so machine load that
changes over time hits both sides alike. Reported: median seconds per step of each side and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_overhead.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from fv_accel import flow  # noqa: E402
from fv_accel.callbacks import Callback, CallbackList  # noqa: E402
from fv_accel.config import parse_overrides, resolve_config  # noqa: E402


class StepClock(Callback):
    """Timestamps the end of every step: consecutive differences are the loop's full per-step wall time."""

    name = "step_clock"

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []  # (wall, this process's CPU time)

    def on_train_start(self, trainer: Any) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        self.stamps.append((time.perf_counter(), time.process_time()))


def fv_accel_side(root: Path, out_dir: Path, batch_size: int, num_workers: int = 0) -> tuple[Any, StepClock, Any]:
    from fv_accel.build import build_run
    from fv_accel.runtime import build_accelerator
    from fv_accel.toy import finetune_default_config
    from fv_accel.trainer import Trainer

    base = finetune_default_config(root, output_dir=str(out_dir))
    cfg = resolve_config(base, parse_overrides([
        f"--training.data.train_batch_size={batch_size}", f"--training.data.num_workers={num_workers}",
        "--training.tracker.backends=[]",
    ]))
    accelerator = build_accelerator()
    built = build_run(cfg, accelerator)
    clock = StepClock()
    trainer = Trainer(accelerator=accelerator, method=built.method, data=built.data, cfg=cfg,
                      callbacks=CallbackList([clock]), checkpoints=None, show_progress=False)
    return trainer, clock, cfg


class BareLoop:
    """The same step written directly against PyTorch (``fsdp2``: with the model ``fully_shard``-ed)."""

    def __init__(self, cfg: Any, batch: Any, *, fsdp2: bool = False) -> None:
        from diffusers import WanTransformer3DModel
        from diffusers.optimization import get_constant_schedule_with_warmup

        opt = cfg.training.optimizer
        student = cfg.models["student"]  # the very weights the fv_accel side loaded
        self.model = WanTransformer3DModel.from_pretrained(student.init_from, subfolder=student.subfolder or None,
                                                           torch_dtype=torch.float32)
        self.model.train()
        if fsdp2:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.learning_rate, betas=tuple(opt.betas),
                                           weight_decay=opt.weight_decay, eps=opt.eps, foreach=True)
        self.scheduler = get_constant_schedule_with_warmup(self.optimizer, opt.lr_warmup_steps)
        self.max_grad_norm = cfg.training.loop.max_grad_norm
        self.shift = cfg.models["student"].flow_shift
        self.x0 = batch.latents_bcthw.float()
        self.text = batch.text_embeds_bld
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> float:
        x0 = self.x0
        noise = torch.randn(x0.shape, generator=self.gen)
        t = flow.shift_timestep(torch.rand(x0.shape[0], generator=self.gen).clamp(1e-4, 1 - 1e-4) * 1000,
                                self.shift)
        x_t = (1 - (t / 1000).view(-1, 1, 1, 1, 1)) * x0 + (t / 1000).view(-1, 1, 1, 1, 1) * noise
        v = self.model(hidden_states=x_t, timestep=t, encoder_hidden_states=self.text, return_dict=False)[0]
        loss = torch.mean((v.float() - (noise - x0)) ** 2)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(torch.stack([loss.detach(), grad_norm])[0])  # one host sync, as the loop's logging does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps of each side discarded before round 1")
    parser.add_argument("--batch-size", type=int, default=32, help="the toy default's per-process batch")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="training.data.num_workers of the fv_accel side (loader processes)")
    parser.add_argument("--root", default=None, help="toy world directory (default: a temporary one)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the fv_accel rounds")
    args = parser.parse_args()


    tmp = Path(tempfile.mkdtemp(prefix="fv_bench_"))
    root = Path(args.root) if args.root else tmp / "toy"

    trainer, clock, cfg = fv_accel_side(root, tmp / "run", args.batch_size, args.num_workers)
    batch = next(iter(trainer.data))
    bare = BareLoop(cfg, batch)
    bare_fsdp2 = BareLoop(cfg, batch, fsdp2=True)
    fv_numel = sum(p.numel() for p in trainer.method.student.transformer.parameters())
    if not fv_numel == sum(p.numel() for p in bare.params) == sum(p.numel() for p in bare_fsdp2.params):
        raise RuntimeError("the sides train different models")

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    def fv_round(start: int, num: int) -> list[tuple[float, float]]:
        trainer.cfg.training.loop.max_train_steps = start + num
        first = len(clock.stamps)
        if profiler is not None:
            profiler.enable()
        trainer.fit(start_step=start)
        if profiler is not None:
            profiler.disable()
        stamps = clock.stamps[first:]
        # drop fit()'s set-up step
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps[1:], stamps[2:], strict=False)]

    def bare_round(loop: BareLoop, num: int) -> list[tuple[float, float]]:
        times = []
        for _ in range(num):
            t0, c0 = time.perf_counter(), time.process_time()
            loop.step()
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        return times

    done = 0
    fv_round(done, args.warmup)
    done += args.warmup
    bare_round(bare, args.warmup)
    bare_round(bare_fsdp2, args.warmup)
    times: dict[str, list[tuple[float, float]]] = {"fv_accel": [], "bare": [], "bare+FSDP2": []}
    for _ in range(args.rounds):
        times["fv_accel"] += fv_round(done, args.steps)
        done += args.steps
        times["bare"] += bare_round(bare, args.steps)
        times["bare+FSDP2"] += bare_round(bare_fsdp2, args.steps)

    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"toy Wan ({fv_numel} params, {cfg.models['student'].init_from}), batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps per side after {args.warmup} warm-up steps")
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for side, measured in times.items():
        walls = [t[0] for t in measured]
        wall[side] = statistics.median(walls)
        # CPU time of this process: far less sensitive than wall time to other jobs on a shared machine.
        cpu[side] = statistics.median(t[1] for t in measured)
        print(f"{side:<11} step (median wall): {wall[side] * 1e3:6.2f} ms  (p10 {_pct(walls, 10) * 1e3:.2f}, "
              f"p90 {_pct(walls, 90) * 1e3:.2f}); CPU {cpu[side] * 1e3:.2f} ms")
    for ref in ("bare", "bare+FSDP2"):
        print(f"ratio fv_accel / {ref}: wall {wall['fv_accel'] / wall[ref]:.3f}, "
              f"CPU {cpu['fv_accel'] / cpu[ref]:.3f}  (target <= 1.15)")
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


if __name__ == "__main__":
    main()
