"""Export from a run whose init_from is a complete (tiny) Wan pipeline: the export is a pipeline that
``DiffusionPipeline.from_pretrained`` loads and that samples in the distilled number of steps by default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_tiny_wan_pipeline, run_python
from safetensors.torch import load_file

from fv_accel.export import export_checkpoint

DMD_STEPS = [1000, 750, 500, 250]


@pytest.fixture(scope="module")
def pipeline_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pipe")
    pipe_dir = build_tiny_wan_pipeline(root / "tiny-wan", toy_root / "init" / "transformer")
    out = root / "run"
    # A pipeline: its VAE normalises the toy latents and decodes the validation videos (the toy recipe says identity).
    args = ["recipes/finetune.py", f"--models.student.init_from={pipe_dir}", "--models.student.latent_stats=auto",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=1", "--training.data.train_batch_size=4",
            "--training.optimizer.lr_warmup_steps=0",
            "--callbacks.validation.every_steps=1", "--callbacks.validation.num_samples=2",
            "--callbacks.validation.num_inference_steps=2"]
    proc = run_python(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The export reads the denoising schedule from the run's method section. Present this finetune
    # checkpoint as a DMD2 one (same checkpoint layout: roles.student.transformer) so the test does not
    # need a full distillation run.
    meta_path = out / "checkpoint-1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["method"] = {"name": "dmd2", "dmd_denoising_steps": DMD_STEPS, "generator_update_interval": 5,
                                "real_score_guidance_scale": 4.5, "rollout_mode": "simulate"}
    meta_path.write_text(json.dumps(meta))
    return pipe_dir, out


def test_exported_pipeline_loads_and_samples_in_distilled_steps(pipeline_run: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    pipe_dir, run = pipeline_run
    out = tmp_path / "student-pipeline"
    result = export_checkpoint(run, role="student", output=out, dtype="fp32")
    assert result.is_pipeline and result.denoising_steps == DMD_STEPS

    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    # Other components are hard links of the base's files (no copy of a multi-GB text encoder).
    for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert os.stat(out / rel).st_ino == os.stat(pipe_dir / rel).st_ino, rel
    # The transformer is the trained one, not the base's.
    base = load_file(str(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base)

    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "WanPipeline"
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in trained.items())
    seen: list[float] = []

    def record(_pipe, _i, t, _kwargs):  # type: ignore[no-untyped-def]
        seen.append(float(t))
        return {}

    video = pipe(prompt="a cat walks on the grass", height=16, width=16, num_frames=5,
                 num_inference_steps=len(DMD_STEPS), guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), callback_on_step_end=record).frames
    assert seen == [float(t) for t in DMD_STEPS]  # exactly the distilled schedule, by default config
    assert video.shape == (1, 5, 16, 16, 3)
    assert bool(torch.isfinite(torch.as_tensor(video)).all())

    card = (out / "README.md").read_text()
    assert f"num_inference_steps={len(DMD_STEPS)}, guidance_scale=1.0" in card
    assert "DiffusionPipeline.from_pretrained(" in card and str(DMD_STEPS) in card
    assert "runs exactly this schedule" in card


def test_undistilled_export_keeps_base_scheduler(pipeline_run: tuple[Path, Path], tmp_path: Path) -> None:
    # A finetune run (no distilled steps) exports a pipeline with the base's own scheduler.
    pipe_dir, run = pipeline_run
    meta = json.loads((run / "checkpoint-1" / "metadata.json").read_text())
    meta["config"]["method"] = {"name": "finetune"}
    other = tmp_path / "ft" / "checkpoint-1"
    other.mkdir(parents=True)
    for f in (run / "checkpoint-1").iterdir():
        os.link(f, other / f.name)
    (other / "metadata.json").unlink()
    (other / "metadata.json").write_text(json.dumps(meta))
    result = export_checkpoint(other, role="student", output=tmp_path / "ft-export")
    assert result.is_pipeline and result.denoising_steps is None
    index = json.loads((tmp_path / "ft-export" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert (json.loads((tmp_path / "ft-export" / "scheduler" / "scheduler_config.json").read_text())
            == json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text()))


def test_validation_videos_are_decoded_by_the_pipelines_vae(pipeline_run: tuple[Path, Path]) -> None:
    """init_from is a pipeline: validation decodes with its VAE (not the toy's latent drawing)."""
    import av

    _, run = pipeline_run
    step = run / "validation" / "step-1"
    index = json.loads((step / "index.json").read_text())
    # toy latents [16, 2, 8, 8] through the tiny VAE (8x spatial, 4x temporal): 1 + (2 - 1) * 4 = 5 frames of
    # 64 x 64. Drawing the latents directly would give 2 * 4 = 8 frames of 128 x 128.
    assert index["frames"] == {"student": [5, 64, 64]}
    for name in index["files"]["student"]:
        with av.open(str(step / name)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
