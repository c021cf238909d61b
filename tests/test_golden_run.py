"""Golden run: the toy fine-tune and DMD2 losses of the first 20 steps, bit for bit, against recorded values.

A refactor that claims to change no behaviour (issue 13) must leave these numbers exactly as they were. They
were recorded with ``python tests/test_golden_run.py --record`` on the commit that introduced this file (one
process, CPU, ``OMP_NUM_THREADS=1``); a deliberate change of the maths, the data order or the random streams
re-records them in the same commit, saying why.

The runs are the toy recipes' configurations with 20 steps and nothing else on (no validation, no quality
table, no checkpoint): what they exercise is the data order, the random streams, the method's maths and the
loop's clip/step order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Before torch is imported: torch reads OMP_NUM_THREADS once, and another thread count changes the last bits
    # of the fine-tune losses (the suite runs with 1, tests/conftest.py).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

GOLDEN = Path(__file__).with_name("golden") / "toy_losses_20_steps.json"
STEPS = 20


def _data_without_world(toy_root: Path, where: Path) -> Path:
    """The toy parquet files without ``world.safetensors``: the distill recipe then skips its quality table."""
    where.mkdir(parents=True, exist_ok=True)
    for part in (toy_root / "data").glob("*.parquet"):
        (where / part.name).symlink_to(part.resolve())
    return where


def _config(toy_root: Path, data: Path, out: Path, method: str) -> dict[str, Any]:
    init = str(toy_root / "init")
    models: dict[str, Any] = {"student": {"init_from": init, "latent_stats": "identity", "flow_shift": 3.0}}
    if method == "finetune":
        method_cfg: dict[str, Any] = {"name": "finetune"}
    else:
        models["teacher"] = {"init_from": init, "trainable": False, "latent_stats": "identity"}
        method_cfg = {"name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                      "generator_update_interval": 2, "real_score_guidance_scale": 3.0}
    return {
        "models": models,
        "method": method_cfg,
        "training": {"data": {"data_path": str(data), "seed": 7, "train_batch_size": 4, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-3},
                     "loop": {"max_train_steps": STEPS, "max_grad_norm": 1.0},
                     "checkpoint": {"output_dir": str(out)},
                     "tracker": {"backends": []}},
    }


def run_losses(toy_root: Path, work: Path, method: str) -> dict[str, dict[str, float]]:
    import yaml
    from conftest import run_recipe_main

    recipe = "finetune" if method == "finetune" else "distill"
    out = work / method
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(_config(toy_root, _data_without_world(toy_root, work / "data"), out, method)))
    assert run_recipe_main(recipe, ["--config", str(path)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {str(r["step"]): {k: v for k, v in r.items() if k.endswith("loss")} for r in rows}


@pytest.mark.parametrize("method", ["finetune", "dmd2"])
def test_losses_equal_the_recorded_golden_run(toy_root: Path, tmp_path: Path, method: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("the golden values are CPU numbers (GPU kernels need not be bitwise equal)")
    golden = json.loads(GOLDEN.read_text())[method]
    got = run_losses(toy_root, tmp_path, method)
    assert list(got) == [str(s) for s in range(1, STEPS + 1)]
    for step, losses in golden.items():
        assert got[step] == losses, f"{method} step {step}: {got[step]} != recorded {losses}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from fv_accel.toy import ensure_init_transformer, ensure_toy_data

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "toy"
        ensure_toy_data(root)
        ensure_init_transformer(root)
        record = {m: run_losses(root, Path(tmp) / m, m) for m in ("finetune", "dmd2")}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
