"""Two-expert roles (Wan 2.2 A14B layout): ``transformer`` takes t ≥ boundary·1000, ``transformer_2`` the rest.

Oracles: the routed velocity equals each expert's own plain call on its rows; spies on each expert's forward see
only timesteps of its side; weights that did not train are bitwise the init files'; unsupported layouts are
refused with the missing piece named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import record_calls
from safetensors.torch import load_file

from fv_accel.config import ModelConfig, resolve_config
from fv_accel.errors import ConfigError
from fv_accel.models import WanModel

BOUNDARY = 0.5
#: Wan 2.2 A14B T2V's switch; the tiny pipeline's 2 sampling steps (t = 999, 750) fall on both sides of it
A14B_BOUNDARY = 0.875


def two_expert_dir(root: Path, toy_root: Path, *, boundary: float | None = BOUNDARY,
                   pipeline: str = "WanPipeline") -> Path:
    """A pipeline directory with two different random tiny experts and ``model_index.json`` (no VAE or text
    encoder: the runs use identity latent statistics)."""
    from fv_accel.toy import ensure_init_transformer

    second = ensure_init_transformer(toy_root, seed=1, name="init_expert2")
    out = root / "two_experts"
    shutil.copytree(toy_root / "init" / "transformer", out / "transformer")
    shutil.copytree(second / "transformer", out / "transformer_2")
    index = {"_class_name": pipeline, "_diffusers_version": "0.35.0", "boundary_ratio": boundary,
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def _finetune_config(init: Path, toy_root: Path, out: Path, **student: Any) -> Any:
    return resolve_config({
        "models": {"student": {"init_from": str(init), "latent_stats": "identity", **student}},
        "method": {"name": "finetune", "weighting_scheme": "uniform"},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 4, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-3},
                     "loop": {"max_train_steps": 3, "max_grad_norm": 1.0}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out)}},
    })


def _spy(module: torch.nn.Module, seen: list[torch.Tensor]) -> None:
    def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["timestep"].detach().float().cpu())

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


def test_routed_velocity_equals_each_experts_plain_call(tmp_path: Path, toy_root: Path) -> None:
    """A batch mixing both sides is split and re-joined in order; per-frame timesteps route by their max."""
    init = two_expert_dir(tmp_path, toy_root)
    model = WanModel.from_config("student", ModelConfig(init_from=str(init), latent_stats="identity"),
                                 dtype=torch.float32)
    assert list(model.modules()) == ["transformer", "transformer_2"] and model.boundary_ratio == BOUNDARY
    torch.manual_seed(0)
    x = torch.randn(4, 16, 2, 4, 4)
    text = torch.randn(4, 3, 32)
    t = torch.tensor([900.0, 100.0, 500.0, 499.0])  # 500 = boundary·1000 goes to the high-noise expert
    experts = [model.transformer if float(ti) >= 500 else model.transformer_2 for ti in t]
    with torch.no_grad():
        got = model.predict_velocity(x, t, text)
        want = torch.cat([e(hidden_states=x[i:i + 1], timestep=t[i:i + 1], encoder_hidden_states=text[i:i + 1],
                            return_dict=False)[0] for i, e in enumerate(experts)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # Per frame: sample 0 has its noisiest frame above the boundary, sample 1 none.
        t_bf = torch.tensor([[100.0, 800.0], [400.0, 300.0]])
        got_bf = model.predict_velocity(x[:2], t_bf, text[:2])
        high = model._expert_velocity(model.transformer, x[:1], t_bf[:1], text[:1])
        low = model._expert_velocity(model.transformer_2, x[1:2], t_bf[1:2], text[1:2])
        torch.testing.assert_close(got_bf, torch.cat([high, low]), rtol=1e-5, atol=1e-6)


def test_both_experts_train_each_only_on_its_side(tmp_path: Path, toy_root: Path, fresh_world: Any) -> None:
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.runtime import build_accelerator
    from fv_accel.trainer import Trainer

    init = two_expert_dir(tmp_path, toy_root)
    accelerator = build_accelerator()
    cfg = _finetune_config(init, toy_root, tmp_path / "run")
    built = build_run(cfg, accelerator)
    method = built.method
    student = method.student
    assert set(method.checkpoint_state()) >= {"roles.student.transformer", "roles.student.transformer_2"}
    seen: dict[str, list[torch.Tensor]] = {"transformer": [], "transformer_2": []}
    for name, module in student.modules().items():
        _spy(module, seen[name])
    in_optimizer = {id(p) for g in method.roles["student"].optimizer.param_groups for p in g["params"]}
    for module in student.modules().values():
        assert all(id(p) in in_optimizer for p in module.parameters())
    asked = record_calls(student, "predict_velocity", lambda x_t, t, text: t.detach().cpu())
    before = {name: _full(m) for name, m in student.modules().items()}
    trainer = Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg,
                      callbacks=CallbackList([]), checkpoints=None, show_progress=False)
    trainer.fit()
    high = torch.cat(seen["transformer"])
    low = torch.cat(seen["transformer_2"])
    assert bool((high >= BOUNDARY * 1000).all()), high
    assert bool((low < BOUNDARY * 1000).all()), low
    # Every training timestep reached the expert of its side (an expert without a sample in a batch also runs
    # once at its own edge, with 0 weight, so it steps with zero gradients: not counted here).
    t_all = torch.cat(asked)
    assert t_all.numel() == 3 * 4
    assert set((t_all[t_all >= 500]).tolist()) <= set(high.tolist())
    assert set((t_all[t_all < 500]).tolist()) <= set(low.tolist())
    assert bool((t_all >= 500).any()) and bool((t_all < 500).any())
    for name, module in student.modules().items():
        after = _full(module)
        assert any(not torch.equal(after[n], before[name][n]) for n in after), name


def test_experts_high_trains_transformer_alone(tmp_path: Path, toy_root: Path, fresh_world: Any) -> None:
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.runtime import build_accelerator
    from fv_accel.trainer import Trainer

    init = two_expert_dir(tmp_path, toy_root)
    accelerator = build_accelerator()
    cfg = _finetune_config(init, toy_root, tmp_path / "run", experts="high")
    built = build_run(cfg, accelerator)
    method = built.method
    student = method.student
    assert not any(p.requires_grad for p in student.transformer_2.parameters())
    in_optimizer = {id(p) for g in method.roles["student"].optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in student.transformer_2.parameters())
    assert "roles.student.transformer_2" not in method.checkpoint_state()
    Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg, callbacks=CallbackList([]),
            checkpoints=None, show_progress=False).fit()
    stored = load_file(str(init / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    after = _full(student.transformer_2)
    assert all(torch.equal(after[n], stored[n]) for n in stored)
    trained = load_file(str(init / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(v, trained[n]) for n, v in _full(student.transformer).items())


def test_experts_on_a_one_expert_model_is_a_config_error(toy_root: Path) -> None:
    cfg = ModelConfig(init_from=str(toy_root / "init"), latent_stats="identity", experts="low")
    with pytest.raises(ConfigError, match=r"models.student.experts: .* has one transformer"):
        WanModel.from_config("student", cfg, dtype=torch.float32, on_meta=True)


def test_an_image_to_video_pipeline_is_refused(tmp_path: Path, toy_root: Path) -> None:
    init = two_expert_dir(tmp_path, toy_root, pipeline="WanImageToVideoPipeline")
    index = json.loads((init / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModel"]
    (init / "model_index.json").write_text(json.dumps(index))
    cfg = ModelConfig(init_from=str(init), latent_stats="identity")
    with pytest.raises(ConfigError, match=r"WanImageToVideoPipeline pipeline, which needs image conditioning "
                                          r"\(it has image_encoder\)"):
        WanModel.from_config("student", cfg, dtype=torch.float32, on_meta=True)


def test_an_image_to_video_transformer_is_refused(tmp_path: Path, toy_root: Path) -> None:
    """A bare I2V transformer (36 input channels: noise + first-frame latents and mask; image_dim set)."""
    folder = tmp_path / "i2v"
    shutil.copytree(toy_root / "init", folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config.update(in_channels=36, out_channels=16, image_dim=32)
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    cfg = ModelConfig(init_from=str(folder), latent_stats="identity")
    with pytest.raises(ConfigError, match=r"image-to-video transformer \(image_dim=32, in_channels=36"):
        WanModel.from_config("student", cfg, dtype=torch.float32, on_meta=True)


def test_a_second_expert_without_boundary_is_refused(tmp_path: Path, toy_root: Path) -> None:
    init = two_expert_dir(tmp_path, toy_root, boundary=None)
    cfg = ModelConfig(init_from=str(init), latent_stats="identity")
    with pytest.raises(ConfigError, match=r"lists transformer_2 but .* boundary_ratio None"):
        WanModel.from_config("student", cfg, dtype=torch.float32, on_meta=True)


def test_export_writes_both_experts_and_the_boundary(tmp_path: Path, toy_root: Path, fresh_world: Any) -> None:
    """One step with an EMA: the first EMA update is the weights themselves, so the EMA export must equal the
    student's for both experts; both differ from the base, the pipeline keeps ``boundary_ratio`` and samples."""
    from conftest import build_tiny_wan_pipeline
    from diffusers import DiffusionPipeline

    from fv_accel.checkpoint.layout import EMA_SHADOW_PREFIX, dcp_entries
    from fv_accel.export import export_checkpoint
    from fv_accel.run import train
    from fv_accel.runtime import build_accelerator
    from fv_accel.toy import ensure_init_transformer

    second = ensure_init_transformer(toy_root, seed=1, name="init_expert2")
    pipe_dir = build_tiny_wan_pipeline(tmp_path / "tiny-a14b", toy_root / "init" / "transformer",
                                       second / "transformer", boundary_ratio=A14B_BOUNDARY)
    out = tmp_path / "run"
    cfg = _finetune_config(pipe_dir, toy_root, out).model_dump()
    cfg["training"]["loop"]["max_train_steps"] = 1
    cfg["callbacks"] = {"ema": {"decay": 0.5}}
    train(resolve_config(cfg), build_accelerator())
    ckpt = out / "checkpoint-1"
    shadow = [k for k in dcp_entries(ckpt) if k.startswith(EMA_SHADOW_PREFIX)]
    assert any(k.startswith(EMA_SHADOW_PREFIX + "transformer_2.") for k in shadow)
    assert any(not k.startswith(EMA_SHADOW_PREFIX + "transformer_2.") for k in shadow)

    exports = {role: tmp_path / role for role in ("student", "ema")}
    for role, path in exports.items():
        assert export_checkpoint(ckpt, role=role, output=path, dtype="fp32").is_pipeline
    for module in ("transformer", "transformer_2"):
        base = load_file(str(pipe_dir / module / "diffusion_pytorch_model.safetensors"))
        student = load_file(str(exports["student"] / module / "diffusion_pytorch_model.safetensors"))
        ema = load_file(str(exports["ema"] / module / "diffusion_pytorch_model.safetensors"))
        assert any(not torch.equal(base[k], student[k]) for k in base), module
        assert all(torch.equal(ema[k], student[k]) for k in student), module
    index = json.loads((exports["student"] / "model_index.json").read_text())
    assert index["boundary_ratio"] == A14B_BOUNDARY
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]

    pipe = DiffusionPipeline.from_pretrained(exports["student"])
    assert type(pipe).__name__ == "WanPipeline" and pipe.config.boundary_ratio == A14B_BOUNDARY
    trained_2 = load_file(str(exports["student"] / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipe.transformer_2.state_dict()[k], v) for k, v in trained_2.items())
    seen: dict[str, list[float]] = {"transformer": [], "transformer_2": []}
    for name in seen:
        getattr(pipe, name).register_forward_pre_hook(
            lambda _m, _a, kw, name=name: seen[name].append(float(kw["timestep"].flatten()[0])), with_kwargs=True)
    video = pipe(prompt="a cat walks", height=16, width=16, num_frames=5, num_inference_steps=2,
                 guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 16, 16, 3) and bool(torch.isfinite(torch.as_tensor(video)).all())
    assert seen["transformer"] and seen["transformer_2"]  # 2 steps straddle the boundary: each expert ran


def _dmd2_config(teacher: Path, student: Path, toy_root: Path, out: Path, **loop: Any) -> dict[str, Any]:
    return {
        "models": {"student": {"init_from": str(student), "latent_stats": "identity"},
                   "teacher": {"init_from": str(teacher), "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": [1000, 750, 500, 250],
                   "generator_update_interval": 2, "real_score_guidance_scale": 1.0},
        "training": {"data": {"data_path": str(toy_root / "data"), "seed": 0, "train_batch_size": 4, "text_len": 8,
                              "num_workers": 0},
                     "loop": {"max_train_steps": 4, "max_grad_norm": 1.0, **loop},
                     "checkpoint": {"output_dir": str(out), "save_steps": 2, "keep_last": 0},
                     "tracker": {"backends": []}},
    }


def test_dmd2_teacher_routes_by_the_score_timestep(tmp_path: Path, toy_root: Path, fresh_world: Any) -> None:
    """A one-expert student distilled from a two-expert teacher: every teacher forward goes to the expert of its
    timestep's side, and over a few steps both experts score."""
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.runtime import build_accelerator
    from fv_accel.trainer import Trainer

    teacher = two_expert_dir(tmp_path, toy_root)
    cfg = resolve_config(_dmd2_config(teacher, toy_root / "init", toy_root, tmp_path / "run"))
    accelerator = build_accelerator()
    built = build_run(cfg, accelerator)
    method = built.method
    assert list(method.student.modules()) == ["transformer"]
    teacher_model = method.roles["teacher"].model
    seen: dict[str, list[torch.Tensor]] = {"transformer": [], "transformer_2": []}
    for name, module in teacher_model.modules().items():
        _spy(module, seen[name])
    scored = record_calls(teacher_model, "predict_velocity", lambda x_t, t, text: t.detach().cpu())
    Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg,
            callbacks=CallbackList([]), checkpoints=None, show_progress=False).fit()
    high, low = torch.cat(seen["transformer"]), torch.cat(seen["transformer_2"])
    assert high.numel() > 0 and low.numel() > 0
    assert bool((high >= BOUNDARY * 1000).all()) and bool((low < BOUNDARY * 1000).all())
    asked = torch.cat(scored)  # what the method asked the teacher for: each sample seen by exactly one expert
    assert sorted(asked.tolist()) == sorted(torch.cat([high, low]).tolist())


def test_two_expert_dmd2_resume_reproduces_the_uninterrupted_losses(tmp_path: Path, toy_root: Path) -> None:
    """Student (and critic) with both experts, teacher with both: a resume from step 2 replays steps 3-4 exactly,
    so both experts' weights and the role's one optimizer came back from roles.<role>.transformer(_2)."""
    import yaml
    from conftest import run_recipe_main

    init = two_expert_dir(tmp_path, toy_root)
    data = tmp_path / "data"
    data.mkdir()
    for part in (toy_root / "data").glob("*.parquet"):  # without world.safetensors: no quality table
        (data / part.name).symlink_to(part)
    runs = {}
    for name, extra in (("full", []), ("resumed", [f"--training.checkpoint.resume_from_checkpoint="
                                                    f"{tmp_path / 'full' / 'checkpoint-2'}"])):
        config = _dmd2_config(init, init, toy_root, tmp_path / name)
        config["training"]["data"]["data_path"] = str(data)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert run_recipe_main("distill", ["--config", str(path), *extra]) == 0
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if line]
        runs[name] = {r["step"]: {k: v for k, v in r.items() if k.endswith("_loss")} for r in rows}
    assert sorted(runs["resumed"]) == [3, 4]
    assert "generator_loss" in runs["full"][4]
    for step in (3, 4):
        assert runs["resumed"][step] == runs["full"][step], step


def test_dry_run_shapes_count_both_experts(tmp_path: Path, toy_root: Path) -> None:
    """The memory estimate's parameter counts: both experts' weights, the trained expert's alone as trained."""
    from types import SimpleNamespace

    from fv_accel.memory import role_shapes_from_run
    from fv_accel.models import load_role_model

    init = two_expert_dir(tmp_path, toy_root)
    one = sum(p.numel() for p in load_file(str(init / "transformer" / "diffusion_pytorch_model.safetensors")).values())
    for experts, trained in (("both", 2 * one), ("low", one)):
        cfg = ModelConfig(init_from=str(init), latent_stats="identity", experts=experts)
        model = load_role_model("student", cfg, mixed_precision="bf16", on_meta=True)
        shape = role_shapes_from_run(SimpleNamespace(role_models={"student": model}))["student"]  # type: ignore[index]
        assert (shape.num_params, shape.trainable_params, shape.num_experts) == (2 * one, trained, 2)


def test_memory_spec_counts_a_root_unit_per_expert() -> None:
    """P_root = P − experts·n·B: two Wan experts of P = 1000 + 2·100 each (root 1000, 2 blocks of 100) have
    two root units of 1000, not one root unit holding the whole second expert."""
    from fv_accel.memory import RoleSpec

    spec = RoleSpec(trainable=False, num_params=2 * 1200, num_blocks=2, block_params=100, hidden_dim=8, ffn_dim=8,
                    num_heads=1, patch_size=(1, 2, 2), num_experts=2)
    assert spec.root_params == 2 * 1000


def test_sampling_recipe_loads_both_trained_experts(tmp_path: Path, toy_root: Path, fresh_world: Any) -> None:
    """recipes/sample.py's model of a two-expert checkpoint holds the run's final weights in both experts (student;
    the EMA after its first update equals them)."""
    from conftest import REPO, load_module

    from fv_accel.run import train
    from fv_accel.runtime import build_accelerator

    init = two_expert_dir(tmp_path, toy_root)
    cfg = _finetune_config(init, toy_root, tmp_path / "run").model_dump()
    cfg["training"]["loop"]["max_train_steps"] = 1
    cfg["callbacks"] = {"ema": {"decay": 0.5}}
    trainer = train(resolve_config(cfg), build_accelerator())
    final = {name: _full(m) for name, m in trainer.method.student.modules().items()}
    recipe = load_module(REPO / "recipes" / "sample.py", "sample_recipe_two_experts")
    ckpt = tmp_path / "run" / "checkpoint-1"
    run_cfg, _ = recipe.read_run_config(ckpt)
    for role in ("student", "ema"):
        model = recipe.load_model(run_cfg, ckpt, role)
        for name, module in model.modules().items():
            loaded = dict(module.named_parameters())
            assert all(torch.equal(loaded[n].detach(), v) for n, v in final[name].items()), (role, name)


@pytest.mark.distributed
def test_fsdp2_two_ranks_with_one_sided_batches(tmp_path: Path, toy_root: Path) -> None:
    """Rank 0 all high-noise, rank 1 all low-noise: both experts are sharded, nothing hangs, outputs equal the
    plain expert's, and each expert's gradient is FSDP2's average of the plain per-rank gradients (one rank's
    gradient and a zero)."""
    from conftest import REPO, run_torchrun

    init = two_expert_dir(tmp_path, toy_root)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_torchrun("tests/dist_scripts/two_experts.py", str(init), str(toy_root / "data"), str(out), nproc=2,
                        cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["transformer_sharded"] and report["transformer_2_sharded"]
        assert report["output"] < 1e-5, report
        assert report["transformer_grad"] < 1e-6 and report["transformer_2_grad"] < 1e-6, report
