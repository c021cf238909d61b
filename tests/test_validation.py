"""Validation videos: a toy run writes decodable mp4 files at the right steps and logs curves and images to
TensorBoard; sampling is deterministic, leaves the training RNG alone, and covers the EMA weights."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import REPO, run_2proc, run_recipe_main

from fv_accel.models.wan import TINY_WAN_CONFIG, wan_forward_flops


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _tb_events(logs: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    images: dict[str, list[int]] = {}
    for f in sorted(logs.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    return scalars, images


def test_toy_finetune_writes_validation_videos_and_tensorboard(toy_root, tmp_path):
    out = tmp_path / "run"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=4", "--training.data.train_batch_size=4",
            "--callbacks.validation.every_steps=2", "--callbacks.validation.num_samples=3",
            "--callbacks.validation.num_inference_steps=2", "--callbacks.ema.decay=0.5"]
    assert run_recipe_main("finetune", args[1:]) == 0  # in this process

    # mp4 files at steps 2 and 4 only; the toy rendering: T=2 latent frames × 4, 8×8 latent pixels × 16
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-4"]
    for step in (2, 4):
        step_dir = out / "validation" / f"step-{step}"
        # the student's weights and, with callbacks.ema on, the EMA weights
        assert sorted(p.name for p in step_dir.glob("*.mp4")) == [
            "ema-00.mp4", "ema-01.mp4", "ema-02.mp4", "student-00.mp4", "student-01.mp4", "student-02.mp4"]
        for name in ("student-01.mp4", "ema-02.mp4"):
            frames = _decode(step_dir / name)
            assert len(frames) == 8
            assert frames[0].shape == (128, 128, 3)
        index = json.loads((step_dir / "index.json").read_text())
        # 3 rows spread over the 768 toy rows: 768 / 3 = 256 apart from row 0
        assert index["step"] == step and index["rows"] == [0, 256, 512]
        assert index["frames"] == {"student": [8, 128, 128], "ema": [8, 128, 128]}

    # metrics.jsonl: the step-time split adds up, FLOPs match the FLOP model, memory is reported
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    per_sample = wan_forward_flops(TINY_WAN_CONFIG, (16, 2, 8, 8), 8)
    for r in rows:
        parts = r["data_wait_s"] + r["compute_s"] + r["optimizer_s"]
        assert 0 < parts <= r["step_time_s"] and r["step_time_s"] - parts < 0.05 * r["step_time_s"] + 1e-3
        # finetune: 4 samples forward + backward = 3 forwards each
        assert r["tflops_per_device"] * 1e12 * r["step_time_s"] == pytest.approx(3 * 4 * per_sample, rel=1e-9)
        assert "mfu" not in r  # CPU, no configured peak
        assert 0.05 < r["peak_rss_gib"] < 64

    # TensorBoard under <output_dir>/logs: the curves and, without moviepy, a frame-grid image per validation
    scalars, images = _tb_events(out / "logs")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [s for s, _ in scalars["grad_norm/student"]] == [1, 2, 3, 4]
    assert "tflops_per_device" in scalars and "compute_s" in scalars
    assert sorted(images["validation/student"]) == [2, 4]
    assert sorted(images["validation/ema"]) == [2, 4]


def _plain(p: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps the root's parameters unsharded (plain tensors) after a forward, the blocks' as DTensors
    return p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()


@pytest.mark.distributed
def test_validation_two_processes(toy_root, tmp_path):
    """Rank r samples prompts r, r + W, ... (padded so both ranks run the same sharded forwards; a rank that
    skipped them would deadlock the other); rank 0 gathers and writes. 3 prompts in chunks of the batch size 2
    and the EMA pass: uneven shares, two variants, at step 0 too."""
    out = tmp_path / "run"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=2", "--training.data.train_batch_size=2",
            "--callbacks.validation.every_steps=2", "--callbacks.validation.at_start=true",
            "--callbacks.validation.num_samples=3", "--callbacks.validation.num_inference_steps=2",
            "--callbacks.ema.decay=0.5", "--training.tracker.backends=[]"]
    proc = run_2proc(args, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-0", "step-2"]
    for step in (0, 2):
        files = sorted((out / "validation" / f"step-{step}").glob("*.mp4"))
        assert [p.name for p in files] == [f"{v}-{i:02d}.mp4" for v in ("ema", "student") for i in range(3)]
        assert all(len(_decode(p)) == 8 for p in files)
    # at step 0 nothing has trained: the EMA weights are the student's, so the videos are identical
    step0 = out / "validation" / "step-0"
    for a, b in zip(_decode(step0 / "ema-01.mp4"), _decode(step0 / "student-01.mp4"), strict=True):
        assert np.array_equal(a, b)


class _FakeEMA:
    """Stands in for the EMA callback: swaps scaled weights in, then restores them."""

    name = "ema"

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.entered = 0

    @contextlib.contextmanager
    def swapped_in(self):
        self.entered += 1
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.module.parameters()]
            for p in self.module.parameters():
                p.mul_(0.5)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.module.parameters(), saved, strict=True):
                    p.copy_(s)


def test_sampling_is_fixed_seed_and_leaves_training_rng_alone(toy_root, tmp_path, single_process_dist):
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.callbacks.validation import ValidationCallback
    from fv_accel.config import resolve_config
    from fv_accel.sampling import euler_sample
    from fv_accel.trainer import Trainer

    cfg = resolve_config({
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "text_len": 8, "train_batch_size": 2},
                     "checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
        "callbacks": {"validation": {"every_steps": 1, "num_samples": 3, "seed": 7, "num_inference_steps": 3}},
    })
    accelerator = single_process_dist
    built = build_run(cfg, accelerator)
    method = built.method
    callback = ValidationCallback(cfg.callbacks.validation, cfg)
    ema = _FakeEMA(method.student.transformer)
    trainer = Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg,
                      callbacks=CallbackList([callback, ema]), show_progress=False)  # type: ignore[list-item]
    method.on_train_start()
    callback.on_train_start(trainer)
    params_before = [_plain(p).clone() for p in method.student.transformer.parameters()]
    gen_state = method.cuda_generator.get_state()
    torch_state = torch.get_rng_state()

    first = callback.sample(trainer)
    second = callback.sample(trainer)
    assert sorted(first) == ["ema", "student"] and ema.entered == 2
    for name in first:
        assert first[name].shape == (3, 16, 2, 8, 8)
        assert torch.equal(first[name], second[name])  # fixed seed: comparable across steps
    assert not torch.allclose(first["student"], first["ema"])  # the EMA weights really were used
    # the training RNG streams and the weights are untouched
    assert torch.equal(method.cuda_generator.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), torch_state)
    for p, q in zip(method.student.transformer.parameters(), params_before, strict=True):
        assert torch.equal(_plain(p), q)

    # finetune's sampler is the flow ODE with num_inference_steps Euler steps; prompt i's noise comes from its
    # own generator seeded 7·2³² + i, whatever batch it is sampled in (here: alone)
    student = method.student
    cond = student.prepare_batch(callback.prompts, student.device)
    expected = torch.cat([
        euler_sample(student, cond.text_embeds_bld[i:i + 1], latent_shape=(16, 2, 8, 8), num_steps=3,
                     shift=student.flow_shift, generator=torch.Generator().manual_seed(7 * 2**32 + i))
        for i in range(3)
    ])
    assert torch.allclose(first["student"], student.denormalize_latents(expected), atol=1e-6)

    # rank 0 writes one mp4 per prompt and variant
    written = callback.run(trainer, 5)
    assert sorted(p.name for p in written) == ["ema-00.mp4", "ema-01.mp4", "ema-02.mp4",
                                               "student-00.mp4", "student-01.mp4", "student-02.mp4"]
    assert all(len(_decode(p)) == 8 for p in written)


def test_should_run_schedule(toy_root):
    from fv_accel.callbacks.validation import ValidationCallback
    from fv_accel.config import ValidationConfig, resolve_config
    from fv_accel.sampling import spread_rows

    cfg = resolve_config({"models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
                          "method": {"name": "finetune"}})
    cb = ValidationCallback(ValidationConfig(every_steps=3, at_start=False), cfg)
    assert [s for s in range(10) if cb.should_run(s)] == [3, 6, 9]
    cb = ValidationCallback(ValidationConfig(every_steps=0, at_start=True), cfg)
    assert [s for s in range(10) if cb.should_run(s)] == [0]
    assert spread_rows(768, 4) == [0, 192, 384, 576]  # 768 / 4 = 192 apart
    assert spread_rows(10, 4) == [0, 2, 5, 7]  # 2.5 apart, rounded down
    assert spread_rows(3, 5) == [0, 1, 2]  # never a row twice
    # 8 equal groups of 96 rows (the toy world's conditions), 64 samples: 8 from each group
    assert [r // 96 for r in spread_rows(768, 64)] == [g for g in range(8) for _ in range(8)]


@pytest.mark.skipif(not (REPO / "fv_accel" / "methods" / "dmd2.py").is_file(), reason="needs the dmd2 method")
def test_toy_distillation_validation_and_critic_curves(toy_root, tmp_path):
    """DMD2 on the toy world (random tiny teacher: mechanics only): validation every 2 of 4 steps with the
    few-step sampler, and TensorBoard holds the critic's curves."""
    import yaml

    data = tmp_path / "data"  # the parquet without world.safetensors: no toy quality table after training
    data.mkdir()
    for f in (toy_root / "data").glob("*.parquet"):
        (data / f.name).symlink_to(f)
    out = tmp_path / "run"
    init = str(toy_root / "init")
    config = {
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "dmd_denoising_steps": [1000, 500], "generator_update_interval": 2,
                   "real_score_guidance_scale": 1.0},
        "training": {"data": {"data_path": str(data), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 4}, "checkpoint": {"output_dir": str(out)}},
        "callbacks": {"validation": {"every_steps": 2, "num_samples": 2}},
    }
    (tmp_path / "dmd2.yaml").write_text(yaml.safe_dump(config))
    assert run_recipe_main("distill", ["--config", str(tmp_path / "dmd2.yaml")]) == 0  # in this process

    for step in (2, 4):
        step_dir = out / "validation" / f"step-{step}"
        assert sorted(p.name for p in step_dir.glob("*.mp4")) == ["student-00.mp4", "student-01.mp4"]
        assert len(_decode(step_dir / "student-00.mp4")) == 8
        assert json.loads((step_dir / "index.json").read_text())["method"] == "dmd2"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-4"]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scalars, _ = _tb_events(out / "logs")
    assert [s for s, _ in scalars["critic_loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["critic_loss"]] == pytest.approx([r["critic_loss"] for r in rows], rel=1e-6)
    assert [s for s, _ in scalars["grad_norm/critic"]] == [1, 2, 3, 4]
    # the student steps only on generator steps; its curves have exactly those points
    gen_steps = [r["step"] for r in rows if "generator_loss" in r]
    assert gen_steps and len(gen_steps) < 4
    assert [s for s, _ in scalars["generator_loss"]] == gen_steps
    assert [s for s, _ in scalars["grad_norm/student"]] == gen_steps
    # every step reports FLOPs: the method counts its rollouts, teacher and critic forwards
    assert all(r["tflops_per_device"] > 0 for r in rows)
