"""The causal toy proof (issue 19 item 6) over several seeds: is the streamed self-forcing student@K at most 0.8×
teacher@K's distance to the data?

    python benchmarks/toy_self_forcing.py [--seeds 0 1 2] [--set method.generator_update_interval=2 ...] \
        [--tag NAME]

Each seed runs ``recipes/distill.py --config recipes/configs/toy_self_forcing.yaml`` on 2 CPU processes
(``accelerate_configs/cpu_fsdp2_2proc.yaml``) with ``--training.data.seed=<seed>`` into
``outputs/toy/causal/self_forcing-<tag>seed<seed>/``; the first builds whatever stage of the toy pipeline is
missing (data, teacher, ODE pairs, ODE-init student: ``fv_accel/toy_pipeline.py``), the others reuse them, so
every seed distills the same ODE-init student. Printed per seed: the recipe's quality table (streamed
student@K, teacher@K, teacher@50, per block) and its wall time; then the ODE-init student's own table (kept
beside it when the stage was built) and the target checked on every seed. Exit 1 when a seed misses it.

``--set key=value`` (repeatable) is passed to the recipe as ``--key=value``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "configs" / "toy_self_forcing.yaml"
ROOT = Path("outputs/toy/causal")
#: the issue's target: streamed student@K distance ≤ this × teacher@K's
TARGET_RATIO = 0.8


def run_seed(seed: int, out: Path, overrides: list[str]) -> tuple[str, dict[str, Any], float]:
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(REPO / "accelerate_configs" / "cpu_fsdp2_2proc.yaml"), str(REPO / "recipes" / "distill.py"),
           "--config", str(CONFIG), f"--training.data.seed={seed}", f"--training.checkpoint.output_dir={out}",
           *(f"--{kv}" for kv in overrides)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"seed {seed}: recipes/distill.py exited {proc.returncode}")
    table = proc.stdout[proc.stdout.index("toy quality"):] if "toy quality" in proc.stdout else proc.stdout
    return table.strip(), json.loads((out / "quality.json").read_text()), wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    tag = f"{args.tag}-" if args.tag else ""
    rows = []
    for seed in args.seeds:
        out = ROOT / f"self_forcing-{tag}seed{seed}"
        table, quality, wall = run_seed(seed, out, args.overrides)
        print(f"== seed {seed} ({wall:.0f} s, {out})\n{table}\n", flush=True)
        student = next(k for k in quality["models"] if k.startswith("student@"))
        teacher = "teacher@" + student.split("@")[1]
        ratio = quality[student] / quality[teacher]
        rows.append((seed, quality[student], quality[teacher], ratio, wall))
    ode_init = ROOT / "ode_init" / "quality.json"
    if ode_init.is_file():
        q = json.loads(ode_init.read_text())
        student = next(k for k in q["models"] if k.startswith("student@"))
        print(f"ODE-init student (the start of every seed): {student} {q[student]:.4f}, consistency "
              f"{q['models'][student].get('consistency')}", flush=True)
    print("seed  student@K  teacher@K  ratio  wall s")
    for seed, s, t, ratio, wall in rows:
        print(f"{seed:4d}  {s:9.4f}  {t:9.4f}  {ratio:5.2f}  {wall:6.0f}")
    missed = [seed for seed, _, _, ratio, _ in rows if ratio > TARGET_RATIO]
    print(f"target student@K <= {TARGET_RATIO} x teacher@K: " + (f"MISSED on seeds {missed}" if missed else "met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
