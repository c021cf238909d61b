"""A Hub id as ``init_from`` on a machine without network: the model sits in the Hugging Face cache (as on a
cluster whose nodes are offline, ``HF_HUB_OFFLINE=1``). Training loads it, validation decodes with its VAE,
and the export is a complete pipeline whose card names the Hub id as base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO, build_tiny_wan_pipeline, run_python

REPO_ID = "fv-test/tiny-wan-pipeline"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hf_cache(hf_home: Path, pipeline_dir: Path) -> Path:
    """Lay ``pipeline_dir`` out as huggingface_hub's cache does after a download of ``REPO_ID`` at ``main``."""
    repo = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(pipeline_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_id_from_the_offline_cache_trains_validates_and_exports(toy_root: Path, tmp_path: Path) -> None:
    pipeline = build_tiny_wan_pipeline(tmp_path / "built", toy_root / "init" / "transformer")
    hf_home = tmp_path / "hf"
    snapshot = populate_hf_cache(hf_home, pipeline)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    proc = run_python(["recipes/finetune.py", f"--models.student.init_from={REPO_ID}", "--models.student.latent_stats=auto",
                       f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={run}",
                       "--training.loop.max_train_steps=1", "--training.data.train_batch_size=4",
                       "--callbacks.validation.every_steps=1", "--callbacks.validation.num_samples=1",
                       "--callbacks.validation.num_inference_steps=2"], cwd=REPO, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The VAE of the cached pipeline decoded the validation video (5 frames of 64x64 for toy latents).
    index = json.loads((run / "validation" / "step-1" / "index.json").read_text())
    assert index["frames"] == {"student": [5, 64, 64]}

    out = tmp_path / "export"
    proc = run_python(["recipes/export.py", "--checkpoint", str(run), "--role", "student", "--output", str(out),
                       "--dtype", "fp32"], cwd=REPO, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / component).is_dir(), component
    # Components come from the cached snapshot, not the base transformer (the export carries the trained one).
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (snapshot / vae).read_bytes()
    assert f"base_model: {REPO_ID}" in (out / "README.md").read_text()
