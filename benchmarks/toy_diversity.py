"""Does the toy DMD2 student keep the data's diversity? The toy distillation over several seeds, one table.

    python benchmarks/toy_diversity.py [--seeds 0 1 2] [--processes 2] [--root outputs/toy] \
        [--set method.generator_update_interval=5 ...] [--tag NAME]

Each seed runs ``recipes/distill.py`` (the toy default: the cached toy data and teacher under ``--root``, made on
first use) with ``--training.data.seed=<seed>`` into ``<root>/diversity-seed<seed>/`` and reads the quality table
it writes (``quality.json``: precision distance, mode coverage, mode-balance entropy of student@K, teacher@K and
teacher@50; ``fv_accel/quality.py``). Printed per seed with the wall time, then the issue's targets checked:
coverage 100%, student entropy ≥ 0.9 × teacher@50's, student distance ≤ 0.8 × teacher@K's.

``--set key=value`` (repeatable) is passed to the recipe as ``--key=value``, to try a lever against the toy
default; ``--tag`` names the run directories (``<root>/diversity-<tag>-seed<seed>/``) so runs do not overwrite
each other. ``--processes 1`` runs the recipe in one plain process (no launcher, no FSDP collectives).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, processes: int, out: Path,
             overrides: list[str]) -> tuple[dict[str, dict[str, float]], float]:
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch"]
    if processes > 1:
        launcher += ["--config_file", str(REPO / "accelerate_configs" / "cpu_fsdp2_2proc.yaml")]
    else:
        launcher = [sys.executable]
    cmd = [*launcher, str(REPO / "recipes" / "distill.py"), f"--training.data.seed={seed}",
           f"--training.checkpoint.output_dir={out}", "--training.tracker.backends=[]",
           *(f"--{kv}" for kv in overrides)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "quality.json").read_text())["models"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "toy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted config override passed to recipes/distill.py as --KEY=VALUE (repeatable)")
    parser.add_argument("--tag", default="", help="run directories <root>/diversity-<tag>-seed<seed>/")
    args = parser.parse_args()
    for kv in args.overrides:
        if "=" not in kv:
            parser.error(f"--set {kv!r}: expected KEY=VALUE")
    prefix = f"diversity-{args.tag}-" if args.tag else "diversity-"
    if args.overrides:
        print("overrides: " + " ".join(args.overrides))
    print("seed  model        distance  coverage  entropy   wall_s")
    verdicts = []
    for seed in args.seeds:
        models, wall = run_seed(seed, args.processes, args.root / f"{prefix}seed{seed}",
                                args.overrides)
        student = next(k for k in models if k.startswith("student@"))
        k = student.split("@")[1]
        teacher_k, teacher_many = models[f"teacher@{k}"], models[next(m for m in models if m.startswith("teacher@")
                                                                      and m != f"teacher@{k}")]
        for name, m in models.items():
            print(f"{seed:>4}  {name:<11} {m['distance']:>9.4f} {m['mode_coverage']:>9.1%} {m['mode_entropy']:>8.3f}"
                  f"  {wall:>7.0f}")
        s = models[student]
        verdicts.append((seed, s["mode_coverage"] >= 1.0, s["mode_entropy"] >= 0.9 * teacher_many["mode_entropy"],
                         s["distance"] <= 0.8 * teacher_k["distance"]))
    print("\nseed  coverage=100%  entropy>=0.9x teacher@many  distance<=0.8x teacher@K")
    for seed, cov, ent, dist in verdicts:
        print(f"{seed:>4}  {str(cov):<14} {str(ent):<27} {dist}")


if __name__ == "__main__":
    main()
