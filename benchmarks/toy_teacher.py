"""How good a toy teacher does a given world / model / training setting make, and in how much time?

Each setting trains the toy teacher from scratch with ``finetune`` in this process (world size 1, FSDP2 over
gloo, the same path as ``ensure_toy_teacher``) in a fresh temporary toy root, then samples teacher@50 (the
50-step Euler ODE, 64 rows spread over all conditions, the quality table's initial noise) and reports:

* distance: mean distance to the nearest same-condition data sample per √dim (``fv_accel.toy.distance_to_data``,
  the quality table's precision metric);
* coverage: the share of (condition, mode) pairs hit by some sample, a sample's mode being the nearest centre of
  its own condition;
* entropy: the normalised entropy of those mode counts, averaged over conditions (1 = balanced);
* train s: the wall time of the fine-tune (data and init included).

Settings are named in ``SETTINGS`` (c = conditions, h = attention heads of 16 dims, ffn = MLP width, lr schedule,
steps); run a few with ``--only``. ``causal ...`` settings train on the causal toy world (``CAUSAL_TOY_SPEC``,
each mode a path over 6 latent frames) and also report teacher@4 and, per block of 2 frames, distance and
the share of samples whose blocks all have one mode (``consistent``; ``fv_accel.quality.per_block_quality``). ``--distill`` instead distills the default toy teacher with the toy DMD2
default plus the given overrides and prints the quality table (how the distill defaults fare on that teacher):

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/toy_teacher.py [--only "c4 h8 cosine 300 (default)"]
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/toy_teacher.py --distill "" \
        --distill="--method.critic_optimizer.learning_rate=8e-4"   # "=": the value starts with --
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def setting(*, conditions: int = 4, heads: int = 8, ffn: int = 128, layers: int = 2, schedule: str = "cosine",
            steps: int = 300, world_seed: int = 0, causal: bool = False, **train: Any) -> dict[str, Any]:
    """A teacher setting, every varied knob named (defaults: today's toy defaults); 768 data rows whatever the
    number of conditions. ``train``: dotted keys over ``teacher_finetune_config`` with ``__`` for dots.
    ``causal``: the causal toy world's shape and trajectories."""
    world: dict[str, Any] = {"num_conditions": conditions, "samples_per_mode": 768 // (3 * conditions),
                             "seed": world_seed}
    if causal:
        world |= {"temporal": "trajectory", "latent_shape": (16, 6, 4, 4)}
    return {"world": world,
            "model": {"num_attention_heads": heads, "ffn_dim": ffn, "num_layers": layers},
            "train": {"training.optimizer.lr_scheduler": schedule, "training.loop.max_train_steps": steps,
                      **{k.replace("__", "."): v for k, v in train.items()}}}


_BEFORE = {"conditions": 8, "heads": 4, "schedule": "constant_with_warmup"}  # the toy teacher until 2026-11-30
_C8H4 = {"conditions": 8, "heads": 4}

#: name → setting; run in this order by default.
SETTINGS: dict[str, dict[str, Any]] = {
    "before (c8 h4 const 300)": setting(**_BEFORE),
    "c8 h4 cosine 300": setting(**_C8H4),
    "c8 h4 cosine 1000": setting(**_C8H4, steps=1000),
    "c8 h4 cosine 1000 logitn": setting(**_C8H4, steps=1000, method__weighting_scheme="logit_normal"),
    "c8 h4 cosine 1000 lr1e-3": setting(**_C8H4, steps=1000, training__optimizer__learning_rate=1e-3),
    "c8 h4 4-layer cosine 1000": setting(**_C8H4, layers=4, steps=1000),
    "c8 h8 ffn256 cosine 1000": setting(conditions=8, ffn=256, steps=1000),
    "c8 h8 ffn256 cosine 500": setting(conditions=8, ffn=256, steps=500),
    "c8 h8 cosine 500": setting(conditions=8, steps=500),
    "c4 h4 cosine 1000": setting(heads=4, steps=1000),
    "c4 h8 ffn256 cosine 500": setting(ffn=256, steps=500),
    "c4 h8 ffn256 cosine 1000": setting(ffn=256, steps=1000),
    "c4 h8 const 300": setting(schedule="constant_with_warmup"),
    "c4 h8 cosine 1000": setting(steps=1000),
    "c4 h8 cosine 500": setting(steps=500),
    "c4 h8 cosine 300 (default)": setting(),
    "c4 h8 cosine 300 world seed 1": setting(world_seed=1),
    "c4 h8 cosine 300 world seed 2": setting(world_seed=2),
    "c4 h8 cosine 500 world seed 1": setting(steps=500, world_seed=1),
    "c4 h8 cosine 500 world seed 2": setting(steps=500, world_seed=2),
    "causal c4 h8 cosine 300": setting(causal=True),
    "causal c4 h8 cosine 600": setting(causal=True, steps=600),
    "causal c4 h8 cosine 1000": setting(causal=True, steps=1000),
    "causal c4 h8 cosine 1500 (default)": setting(causal=True, steps=1500),
}


def mode_stats(latents: torch.Tensor, rows: list[int], data_dir: Path) -> tuple[float, float]:
    """(coverage, mean normalised entropy) of the samples' nearest-centre modes, per their rows' conditions."""
    from fv_accel.toy import load_world

    world = load_world(data_dir)
    centres, cond_of_row = world["centres"], world["row_condition"]
    num_cond, num_modes = centres.shape[:2]
    counts = torch.zeros(num_cond, num_modes)
    for latent, row in zip(latents, rows, strict=True):
        cond = int(cond_of_row[row])
        mode = (centres[cond] - latent.float()).flatten(1).norm(dim=1).argmin()
        counts[cond, mode] += 1
    sampled = counts.sum(1) > 0
    coverage = float((counts[sampled] > 0).float().mean())
    p = counts[sampled] / counts[sampled].sum(1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1) / math.log(num_modes)
    return coverage, float(entropy.mean())


def run_setting(name: str, settings: dict[str, Any], work: Path, num_samples: int) -> dict[str, Any]:
    from fv_accel.config import resolve_config
    from fv_accel.quality import conditioning, sample_stored
    from fv_accel.run import train
    from fv_accel.sampling import EulerSampler, spread_rows
    from fv_accel.toy import (
        TOY_TEACHER_WAN_OVERRIDES,
        ToyWorldSpec,
        distance_to_data,
        ensure_init_transformer,
        ensure_toy_data,
        teacher_finetune_config,
    )

    root = work / name.replace(" ", "_")
    start = time.perf_counter()
    spec = ToyWorldSpec(**settings["world"])
    data = ensure_toy_data(root, spec)
    # its own name: teacher_finetune_config makes (and keeps current) the default architecture's init-toy
    init = ensure_init_transformer(root, name="init-setting",
                                   overrides={**TOY_TEACHER_WAN_OVERRIDES, **settings["model"]})
    tree = teacher_finetune_config(root, spec)
    tree["models"]["student"]["init_from"] = str(init)
    cfg = resolve_config(tree, list(settings["train"].items()))
    with fresh_accelerator() as accelerator:
        trainer = train(cfg, accelerator)
        train_s = time.perf_counter() - start
        rows = spread_rows(len(load_rows(data)), num_samples)
        text, shape = conditioning(data, rows, cfg.training.data.text_len)
        latents = sample_stored(trainer.method.student, text, shape, EulerSampler(50), seed=0)
        few = sample_stored(trainer.method.student, text, shape, EulerSampler(4), seed=0)
    distance = float(distance_to_data(latents, torch.tensor(rows), data).mean())
    coverage, entropy = mode_stats(latents, rows, data)
    out = {"name": name, "distance": distance, "coverage": coverage, "entropy": entropy, "train_s": train_s,
           "steps": cfg.training.loop.max_train_steps, "extra": ""}
    if spec.temporal == "trajectory":
        out["extra"] = "  " + "  ".join(f"{k}: {causal_stats(x, rows, data)}" for k, x in
                                        (("teacher@4", few), ("teacher@50", latents)))
    return out


def causal_stats(latents: torch.Tensor, rows: list[int], data: Path) -> str:
    """Whole-clip distance, consistency and per-block distances of ``latents`` in the causal toy world."""
    from fv_accel.quality import data_latents, per_block_quality
    from fv_accel.toy import CAUSAL_TOY_FRAMES_PER_BLOCK, distance_to_data, load_world

    world = load_world(data)
    cond = world["row_condition"][torch.tensor(rows)].long()
    blocks, consistent = per_block_quality(latents, cond, world["centres"], data_latents(data),
                                           world["row_condition"], CAUSAL_TOY_FRAMES_PER_BLOCK)
    whole = float(distance_to_data(latents, torch.tensor(rows), data).mean())
    return (f"{whole:.3f} consistent {consistent:.3f} blocks "
            + " ".join(f"{b.distance:.3f}" for b in blocks))


def run_distill(overrides: str, root: Path) -> dict[str, Any]:
    """The toy DMD2 default (one process) with ``overrides`` (``--key=value ...``) from the default toy
    teacher in ``root`` (trained there on first use): the quality table's numbers and the wall time."""
    from fv_accel.config import parse_overrides, resolve_config
    from fv_accel.quality import toy_quality
    from fv_accel.run import train
    from fv_accel.toy import distill_default_config, ensure_toy_teacher

    with fresh_accelerator() as accelerator:
        ensure_toy_teacher(accelerator, root)
        tree = distill_default_config(root, output_dir=str(root / "distill"))
        tree["training"]["tracker"] = {"backends": []}
        cfg = resolve_config(tree, parse_overrides(overrides.split()))
        start = time.perf_counter()
        trainer = train(cfg, accelerator)
        train_s = time.perf_counter() - start
        ema = trainer.callbacks.get("ema")
        method = trainer.method
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            quality = toy_quality(method.student, method.role_models["teacher"], root / "data",
                                  dmd_denoising_steps=cfg.method.dmd_denoising_steps)  # type: ignore[union-attr]
    return {"overrides": overrides or "(defaults)", **quality, "train_s": train_s}


@contextlib.contextmanager
def fresh_accelerator() -> Iterator[Any]:
    """A world-size-1 Accelerator with fresh Accelerate state, its process group destroyed afterwards."""
    import torch.distributed as dist

    from fv_accel.runtime import build_accelerator, reset_accelerate_state

    reset_accelerate_state()
    try:
        yield build_accelerator()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        reset_accelerate_state()


def load_rows(data: Path) -> Any:
    from fv_accel.data import ParquetLatentDataset

    return ParquetLatentDataset(str(data), text_len=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma-separated names from SETTINGS")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--distill", action="append", default=None, metavar="OVERRIDES",
                        help="instead: distill the default toy teacher with these overrides ('' = defaults); "
                             "repeatable")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.distill is not None:
            for overrides in args.distill:
                r = run_distill(overrides, Path(tmp) / "toy")
                k = next(name for name in r if name.startswith("teacher@") and name != "teacher@50")
                print(f"DISTILL [{r['overrides']}] student@4 {r['student@4']:.4f}  {k} {r[k]:.4f}  "
                      f"teacher@50 {r['teacher@50']:.4f}  ratio {r['student@4'] / r[k]:.3f}  "
                      f"{r['train_s']:.0f} s  load {os.getloadavg()[0]:.1f}", flush=True)
            return
        header = f"{'setting':<30} {'steps':>5} {'teacher@50':>10} {'coverage':>8} {'entropy':>7} {'train s':>7}"
        results = []
        for name in args.only.split(","):
            r = run_setting(name.strip(), SETTINGS[name.strip()], Path(tmp), args.samples)
            results.append(r)
            print(f"RESULT {r['name']:<30} {r['steps']:>5} {r['distance']:>10.4f} {r['coverage']:>8.3f} "
                  f"{r['entropy']:>7.3f} {r['train_s']:>7.1f}  load {os.getloadavg()[0]:.1f}{r['extra']}", flush=True)
    print(header)
    for r in results:
        print(f"{r['name']:<30} {r['steps']:>5} {r['distance']:>10.4f} {r['coverage']:>8.3f} {r['entropy']:>7.3f} "
              f"{r['train_s']:>7.1f}")


if __name__ == "__main__":
    main()
