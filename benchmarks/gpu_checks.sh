#!/usr/bin/env bash
# Every GPU check of fv_accel in one call of the device tool (one H100/H200, < 8 minutes), logs under $OUT.
# Prepare here (needs network to PyPI):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 \
#       typing_inspection==0.4.2 annotated_types==0.7.0
# (the device image already has torch, accelerate, transformers, pyarrow, tqdm, tensorboard, safetensors)
# Run (device tool): carry [".whl"], command: bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/fv_accel_gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, accelerate; print(torch.__version__, diffusers.__version__, accelerate.__version__)" \
  > "$OUT/versions.txt" 2>&1
run() {  # name, timeout seconds, args...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 benchmarks/dmd2_step.py --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit=$?" >> "$OUT/summary.txt"
}
# 1. the issue's configuration: full AC, default attention, fused AdamW, fv_accel vs bare
run baseline 260 --cycles 1 --warmup-cycles 1
# 2. cuDNN attention (fastest forward kernel at this shape), fv_accel only
run cudnn 150 --cycles 1 --warmup-cycles 1 --attn _native_cudnn --only fv
# 3. reuse the generator rollout for the critic (algorithm change; FLOP saving reported separately)
run reuse 120 --cycles 1 --warmup-cycles 1 --attn _native_cudnn --reuse-rollout --only fv
# 4. selective activation checkpointing (matmul and attention outputs kept), only if time is left
if (( SECONDS < 330 )); then
  run selective 110 --cycles 1 --warmup-cycles 1 --attn _native_cudnn --ac selective --only fv
else
  echo "selective skipped (elapsed ${SECONDS}s)" >> "$OUT/summary.txt"
fi
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(open(out / "gpu.txt").read().strip(), "|", open(out / "versions.txt").read().strip())
print(f"{'run':<10}{'side':<10}{'gen s':>8}{'critic s':>10}{'cycle s':>9}{'MFU':>8}{'GiB':>7}")
for name in ("baseline", "cudnn", "reuse", "selective"):
    p = out / f"{name}.json"
    if not p.exists():
        print(f"{name:<10}(no result; see {name}.log)"); continue
    r = json.loads(p.read_text())
    for side in ("fv_accel", "bare"):
        if side in r:
            s = r[side]
            print(f"{name:<10}{side:<10}{s.get('generator_s', 0):>8.2f}{s.get('critic_s', 0):>10.2f}"
                  f"{s.get('cycle_s', 0):>9.2f}{s.get('mfu', 0):>8.1%}{s.get('peak_mem_gib') or 0:>7.1f}")
    if "fv_over_bare_time_per_flop" in r:
        print(f"{'':<10}fv_accel / bare = {r['fv_over_bare_time_per_flop']:.3f}")
PY
