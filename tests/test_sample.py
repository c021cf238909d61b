"""recipes/sample.py: roles read from a DCP checkpoint in one process, output layout, determinism, errors."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, load_module, run_recipe_main
from safetensors.torch import load_file
from test_dmd2_distributed import write_recipe


@pytest.fixture(scope="module")
def dmd2_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step single-process dmd2 run (interval 1, EMA on) with its final checkpoint."""
    tmp = tmp_path_factory.mktemp("sample")
    out = tmp / "run"
    recipe = write_recipe(tmp / "dmd2.yaml", toy_root, out, generator_update_interval=1)
    assert run_recipe_main("distill", ["--config", str(recipe), "--training.loop.max_train_steps=3"]) == 0
    return out


def _load_recipe() -> Any:
    return load_module(REPO / "recipes" / "sample.py", "sample_recipe")


SAMPLE = _load_recipe()


def _sample(run: Path, out: Path, role: str, steps: int = 4, n: int = 5, seed: int = 0
            ) -> tuple[int, str, dict[str, torch.Tensor] | None]:
    """recipes/sample.py's main in this process (one plain process is what it is made for): rc, stderr, file."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = SAMPLE.main(["--checkpoint", str(run), "--role", role, "--steps", str(steps), "--num-samples", str(n),
                          "--output", str(out), "--seed", str(seed)])
    return rc, err.getvalue(), load_file(str(out)) if out.exists() else None


def test_roles_layout_and_determinism(dmd2_run: Path, tmp_path: Path) -> None:
    from fv_accel.checkpoint.layout import read_ema_state_dict, read_role_state_dict

    results = {}
    for role in ("student", "ema", "teacher"):
        rc, err, result = _sample(dmd2_run, tmp_path / f"{role}.safetensors", role)
        assert rc == 0, err[-3000:]
        assert result is not None
        assert result["latents"].dtype == torch.float32 and tuple(result["latents"].shape) == (5, 16, 2, 8, 8)
        assert result["data_index"].dtype == torch.int64
        assert result["data_index"].tolist() == [i * 768 // 5 for i in range(5)]
        results[role] = result["latents"]
    # the student trained 3 steps, EMA (decay 0.5) lags it, the teacher is the init: three different samplers
    assert not torch.equal(results["student"], results["teacher"])
    assert not torch.equal(results["student"], results["ema"])
    ckpt = dmd2_run / "checkpoint-3"
    student, ema = read_role_state_dict(ckpt, "student"), read_ema_state_dict(ckpt)
    assert any(not torch.equal(student[k], ema[k]) for k in student)
    # same seed → same latents; another seed → different
    _, _, again = _sample(dmd2_run, tmp_path / "again.safetensors", "student")
    assert again is not None and torch.equal(again["latents"], results["student"])
    _, _, other = _sample(dmd2_run, tmp_path / "other.safetensors", "student", seed=1)
    assert other is not None and not torch.equal(other["latents"], results["student"])


def test_student_reproduces_the_dmd_sampler(dmd2_run: Path, tmp_path: Path) -> None:
    """The file holds exactly dmd_sample of the checkpoint's student, denormalised (identity here)."""
    from fv_accel.checkpoint.layout import read_role_state_dict
    from fv_accel.config import ModelConfig
    from fv_accel.models import load_role_model
    from fv_accel.quality import conditioning
    from fv_accel.sampling import dmd_sample
    from fv_accel.toy import distance_to_data

    rc, err, result = _sample(dmd2_run, tmp_path / "s.safetensors", "student", n=3, seed=7)
    assert rc == 0 and result is not None, err[-3000:]
    import yaml

    cfg = yaml.safe_load((dmd2_run / "resolved_config.yaml").read_text())
    model = load_role_model("student", ModelConfig(**{**cfg["models"]["student"], "trainable": False}),
                            mixed_precision="no")
    model.transformer.load_state_dict(read_role_state_dict(dmd2_run / "checkpoint-3", "student"))
    text, shape = conditioning(cfg["training"]["data"]["data_path"], result["data_index"].tolist(), 8)
    expected = dmd_sample(model, text, latent_shape=shape, denoising_steps=[1000, 750, 500, 250],
                          generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(result["latents"], expected, rtol=1e-5, atol=1e-5)
    assert distance_to_data(result["latents"], result["data_index"], Path(cfg["training"]["data"]["data_path"])
                            ).shape == (3,)


def test_errors(dmd2_run: Path, tmp_path: Path) -> None:
    rc, err, _ = _sample(dmd2_run, tmp_path / "x.safetensors", "student", steps=2)
    assert rc == 2 and "dmd_denoising_steps" in err
    rc, err, _ = _sample(tmp_path / "missing", tmp_path / "y.safetensors", "teacher")
    assert rc == 1 and "does not exist" in err
    rc, err, _ = _sample(dmd2_run, tmp_path / "z.bin", "teacher")
    assert rc == 2 and ".safetensors" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_student_sampler_is_chosen_by_the_method_class() -> None:
    """DMD2's student samples with its few-step schedule (its steps, in order); finetune's with Euler steps and
    the given guidance; training's validation sampler comes from the same place."""
    from fv_accel.methods import method_class
    from fv_accel.methods.dmd2 import DMD2MethodConfig
    from fv_accel.methods.finetune import FinetuneMethodConfig
    from fv_accel.sampling import DMDSampler, EulerSampler

    dmd2 = method_class("dmd2").sampler(DMD2MethodConfig(name="dmd2", dmd_denoising_steps=[1000, 750, 500]),
                                        num_steps=8)
    assert dmd2 == DMDSampler((1000, 750, 500)) and dmd2.num_steps == 3
    euler = method_class("finetune").sampler(FinetuneMethodConfig(name="finetune"), num_steps=8,
                                             guidance_scale=5.0)
    assert euler == EulerSampler(num_steps=8, guidance_scale=5.0)


def test_a_lora_checkpoint_samples_with_its_adapters(toy_root: Path, tmp_path: Path) -> None:
    """A LoRA run's checkpoint holds the adapters alone: sampling puts exactly those on init_from's base (the
    loaded adapters equal the saved tensors, the base equals init_from's), and the student differs from the
    base model (its adapters trained)."""
    from conftest import run_recipe_main

    from fv_accel.checkpoint.layout import read_role_state_dict

    out = tmp_path / "lora"
    rc = run_recipe_main("finetune", [f"--models.student.init_from={toy_root / 'init'}",
                                      "--models.student.latent_stats=identity", "--models.student.lora.rank=4",
                                      f"--training.data.data_path={toy_root / 'data'}",
                                      f"--training.checkpoint.output_dir={out}", "--training.loop.max_train_steps=2",
                                      "--training.tracker.backends=[]", "--training.optimizer.learning_rate=0.01"])
    assert rc == 0
    ckpt = out / "checkpoint-2"
    cfg, _ = SAMPLE.read_run_config(ckpt)
    model = SAMPLE.load_model(cfg, ckpt, "student")
    saved = read_role_state_dict(ckpt, "student")
    params = dict(model.transformer.named_parameters())
    assert set(saved) == {n for n, p in params.items() if p.requires_grad} and saved
    assert all(torch.equal(params[n].detach(), v.float()) for n, v in saved.items())
    base = SAMPLE.load_model(cfg, ckpt, "teacher") if "teacher" in cfg.models else None
    assert base is None  # a finetune run has no teacher: compare against init_from directly
    from safetensors.torch import load_file as read

    init = read(str(toy_root / "init" / "transformer" / "diffusion_pytorch_model.safetensors"))
    q = "blocks.0.attn1.to_q"
    assert torch.equal(params[f"{q}.base_layer.weight"].detach(), init[f"{q}.weight"].float())
    assert any(v.abs().sum() > 0 for n, v in saved.items() if ".lora_B." in n)  # trained: the student moved
    rc, err, result = _sample(out, tmp_path / "s.safetensors", "student", steps=2, n=2)
    assert rc == 0, err[-2000:]
    assert result is not None and tuple(result["latents"].shape) == (2, 16, 2, 8, 8)
