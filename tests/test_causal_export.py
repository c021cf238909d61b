"""Export of a causal student (``family: wan_causal``) and its fv_accel sampler (``fv_accel/causal_pipeline.py``):
the export is a plain diffusers Wan transformer plus ``causal_config.json``, and CausalWanPipeline streams from
it exactly what the in-process sampler streams from the checkpoint's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, build_tiny_wan_pipeline, load_module, run_recipe_main
from diffusers import WanTransformer3DModel

from fv_accel.causal_pipeline import CausalWanPipeline
from fv_accel.causal_sampling import causal_dmd_sample
from fv_accel.export import export_checkpoint
from fv_accel.models.wan_causal import CausalWanModel

SAMPLE = load_module(REPO / "recipes" / "sample.py", "causal_export_sample_recipe")
DMD_STEPS = [1000, 500]
CAUSAL = {"num_frames_per_block": 1, "local_attn_frames": 3, "sink_frames": 1}


@pytest.fixture(scope="module")
def causal_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-step finetune of a tiny causal Wan (toy latents [16, 2, 8, 8]) whose base is a full tiny pipeline,
    presented as a DMD2 student (the export reads the schedule from the method section)."""
    root = tmp_path_factory.mktemp("causal-export")
    pipe = build_tiny_wan_pipeline(root / "tiny-wan", toy_root / "init" / "transformer")
    out = root / "run"
    recipe = {
        "models": {"student": {"family": "wan_causal", "init_from": str(pipe), "trainable": True,
                               "flow_shift": 3.0, "latent_stats": "auto", "causal": CAUSAL}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 4, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-3, "lr_warmup_steps": 0},
                     "loop": {"max_train_steps": 1},
                     "checkpoint": {"output_dir": str(out), "save_steps": 0},
                     "tracker": {"backends": []}},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    assert run_recipe_main("finetune", ["--config", str(root / "run.yaml")]) == 0
    meta_path = out / "checkpoint-1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["method"] = {"name": "dmd2", "dmd_denoising_steps": DMD_STEPS, "context_noise": 40}
    meta_path.write_text(json.dumps(meta))
    return out / "checkpoint-1"


def test_causal_export_loads_and_streams_like_the_checkpoint(causal_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_checkpoint(causal_run, role="student", output=out, dtype="fp32")

    cfg = json.loads((out / "causal_config.json").read_text())
    assert {k: cfg[k] for k in ("family", "num_frames_per_block", "local_attn_frames", "sink_frames",
                                "denoising_steps", "context_noise", "flow_shift", "text_len")} == {
        "family": "wan_causal", **CAUSAL, "denoising_steps": DMD_STEPS, "context_noise": 40, "flow_shift": 3.0,
        "text_len": 8}
    assert "fv_accel_version" in cfg
    assert not (out / "model_index.json").exists()  # no diffusers pipeline may claim it
    card = (out / "README.md").read_text()
    assert "no diffusers pipeline" in card and "CausalWanPipeline.from_pretrained" in card

    # A plain diffusers Wan transformer with the checkpoint's weights. (The reference loads the checkpoint
    # through recipes/sample.py, whose strict config wants the run's real method back.)
    meta_path = causal_run / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["method"] = {"name": "finetune"}
    meta_path.write_text(json.dumps(meta))
    run_cfg, _ = SAMPLE.read_run_config(causal_run)
    reference = SAMPLE.load_model(run_cfg, causal_run, "student")
    assert isinstance(reference, CausalWanModel)
    plain = WanTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    want_state = reference.transformer.state_dict()
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(tensor, want_state[name].float(), rtol=0, atol=0, msg=name)

    # 5 latent frames (> the 2 trained; the window rolls the cache) through the export vs in-process.
    pipe = CausalWanPipeline.from_pretrained(out)
    text = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4))
    got = pipe(prompt_embeds=text, num_frames=5, height=8, width=8, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).latents
    reference.transformer.float().eval()
    want = causal_dmd_sample(reference, text, latent_shape=(16, 5, 8, 8), denoising_steps=DMD_STEPS,
                             generator=[torch.Generator().manual_seed(s) for s in (7, 8)], context_noise=40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # Prompts through the export's text encoder, decoded by its VAE: by hand 1 + (3 − 1)·4 = 9 frames of 64².
    frames = pipe(["a cat"], num_frames=3, height=8, width=8, generator=torch.Generator().manual_seed(0)).frames
    assert frames is not None and frames.shape == (1, 9, 64, 64, 3)
