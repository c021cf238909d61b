"""DMD2 maths against hand computations, and the role gating of a real (tiny Wan) DMD2 run in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fv_accel import flow
from fv_accel.config import RunConfig, resolve_config
from fv_accel.errors import ConfigError
from fv_accel.methods.dmd2 import (
    DMD2MethodConfig,
    cfg_combine,
    dmd_gradient,
    dmd_loss,
    is_generator_step,
    num_generator_steps,
    score_timesteps,
)


def test_generator_loss_gradient_is_the_normalised_score_difference() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 1, 2, 2, generator=gen).requires_grad_(True)
    fake = torch.randn(2, 3, 1, 2, 2, generator=gen)
    real = torch.randn(2, 3, 1, 2, 2, generator=gen)
    g = dmd_gradient(x0.detach(), fake, real)
    # per-sample normaliser mean|x̂0 − r| over C, T, H, W, computed by hand
    for b in range(2):
        norm = sum(abs(float(x0.detach()[b].flatten()[i] - real[b].flatten()[i])) for i in range(12)) / 12
        expected = (fake[b] - real[b]) / norm
        torch.testing.assert_close(g[b], expected, rtol=1e-6, atol=1e-6)
    loss = dmd_loss(x0, g)
    torch.testing.assert_close(loss, 0.5 * (g**2).mean())
    loss.backward()
    torch.testing.assert_close(x0.grad, g / x0.numel(), rtol=1e-5, atol=1e-8)


def test_dmd_gradient_keeps_non_finite_values() -> None:
    x0 = torch.zeros(1, 2, 1, 1, 1)
    real = torch.zeros(1, 2, 1, 1, 1)  # normaliser 0
    g = dmd_gradient(x0, torch.ones(1, 2, 1, 1, 1), real)
    assert not torch.isfinite(g).any()  # surfaced to the loop's non-finite check, not hidden


def test_cfg_is_the_standard_form() -> None:
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    torch.testing.assert_close(cfg_combine(cond, uncond, 3.0), torch.tensor([0.5 + 3 * 1.5, 1.0 + 3 * -2.0]))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)


def test_score_timesteps_in_shifted_window() -> None:
    cfg = DMD2MethodConfig(name="dmd2", min_timestep_ratio=0.2, max_timestep_ratio=0.9, score_timestep_shift=3.0)
    t = score_timesteps(4096, cfg, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
    assert float(t.min()) >= 200.0 and float(t.max()) <= 900.0
    u = torch.rand(4096, generator=torch.Generator().manual_seed(1))
    expected = (1000 * flow.shift_unit((200 + 700 * u) / 1000, 3.0)).clamp(200, 900)
    torch.testing.assert_close(t, expected)
    assert float((t == 900).float().mean()) > 0.1  # shift 3 pushes the mass to the top of the window


def test_gating_over_seven_steps() -> None:
    assert [s for s in range(1, 8) if is_generator_step(s, interval=3)] == [3, 6]
    assert num_generator_steps(7, interval=3) == 2
    assert [s for s in range(1, 8) if is_generator_step(s, interval=3, warmup=3)] == [6]
    assert num_generator_steps(7, interval=3, warmup=3) == 1
    assert num_generator_steps(2, interval=1, warmup=5) == 0


def _config(toy_root: Path, out: Path, **method: Any) -> RunConfig:
    init = str(toy_root / "init")
    return resolve_config({
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "generator_update_interval": 3, "dmd_denoising_steps": [1000, 500], **method},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 7},
                     "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out)}},
    })


def test_critic_defaults_to_the_teacher(toy_root: Path, tmp_path: Path) -> None:
    cfg = _config(toy_root, tmp_path)
    assert cfg.models["critic"].init_from == cfg.models["teacher"].init_from
    assert cfg.models["critic"].trainable and not cfg.models["teacher"].trainable
    assert cfg.method.critic_optimizer.learning_rate == 4e-5  # type: ignore[union-attr]


def test_negative_prompt_needs_a_file(toy_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training.data.negative_prompt_path"):
        _config(toy_root, tmp_path, uncond="negative_prompt")


def test_roles_step_only_when_gated(toy_root: Path, tmp_path: Path, single_process_dist: Any) -> None:
    """7 steps, interval 3: critic changes every step, student at 3 and 6 only, teacher never; losses named."""
    from fv_accel.build import build_run
    from fv_accel.callbacks import Callback, CallbackList
    from fv_accel.trainer import Trainer

    cfg = _config(toy_root, tmp_path, real_score_guidance_scale=3.0)
    built = build_run(cfg, single_process_dist)
    method = built.method
    assert method.num_optimizer_steps("student", 7) == 2 and method.num_optimizer_steps("critic", 7) == 7

    def snapshot(role: str) -> dict[str, torch.Tensor]:
        module = method.role_models[role].transformer
        return {n: p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                for n, p in module.named_parameters()}

    history: list[dict[str, dict[str, torch.Tensor]]] = []
    losses: list[dict[str, float]] = []

    class Snap(Callback):
        name = "snap"

        def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
            history.append({r: snapshot(r) for r in ("student", "critic", "teacher")})
            losses.append(metrics)

    before = {r: snapshot(r) for r in ("student", "critic", "teacher")}
    trainer = Trainer(accelerator=single_process_dist, method=method, data=built.data, cfg=cfg,
                      callbacks=CallbackList([Snap()]), checkpoints=None, show_progress=False)
    trainer.fit()
    assert len(history) == 7
    prev = before
    for step, now in enumerate(history, start=1):
        def changed(role: str, now: dict = now, prev: dict = prev) -> bool:
            return any(not torch.equal(now[role][n], prev[role][n]) for n in now[role])

        assert changed("critic"), step
        assert changed("student") == (step in (3, 6)), step
        assert not changed("teacher"), step
        assert ("generator_loss" in losses[step - 1]) == (step in (3, 6))
        assert losses[step - 1]["critic_loss"] > 0
        prev = now
    for n, p in before["teacher"].items():
        assert torch.equal(history[-1]["teacher"][n], p)
    # each role's LR schedule counts its own steps: the student's scheduler stepped twice
    assert method.roles["student"].scheduler.scheduler.last_epoch == 2
    assert method.roles["critic"].scheduler.scheduler.last_epoch == 7


def test_teacher_cfg_is_one_batched_forward(toy_root: Path, tmp_path: Path, single_process_dist: Any) -> None:
    """cond and uncond go through the teacher in ONE forward of 2B samples, combined as uncond + w(cond − uncond)."""
    from fv_accel.build import build_run

    cfg = _config(toy_root, tmp_path, real_score_guidance_scale=2.5)
    method = build_run(cfg, single_process_dist, with_data=False).method
    teacher = method.role_models["teacher"]
    calls: list[int] = []
    original = teacher.predict_velocity

    def counting(x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        calls.append(x_t.shape[0])
        return original(x_t, t, text)

    teacher.predict_velocity = counting  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 16, 2, 8, 8, generator=gen)
    t = torch.tensor([300.0, 800.0])
    text = torch.randn(2, 8, 32, generator=gen)
    from fv_accel.models.base import ConditionBatch

    cond = ConditionBatch(latents_bcthw=None, text_embeds_bld=text, text_mask_bl=torch.ones(2, 8, dtype=torch.bool),
                          uncond_embeds_bld=torch.zeros_like(text), index=torch.arange(2),
                          latent_shape=(16, 2, 8, 8))
    r, samples = method.teacher_x0(x_t, t, cond)
    assert calls == [4] and samples == 4
    with torch.no_grad():
        r_c = teacher.predict_x0(x_t, t, text)
        r_u = teacher.predict_x0(x_t, t, torch.zeros_like(text))
    torch.testing.assert_close(r, r_u + 2.5 * (r_c - r_u), rtol=1e-4, atol=1e-5)


def test_teacher_must_be_frozen(toy_root: Path, tmp_path: Path) -> None:
    tree: dict[str, Any] = {"models": {"student": {"init_from": str(toy_root / "init")},
                                       "teacher": {"init_from": str(toy_root / "init")}},
                            "method": {"name": "dmd2"}}
    with pytest.raises(ConfigError, match="models.teacher.trainable must be false"):
        resolve_config(tree)


@pytest.mark.parametrize("reuse", [False, True])
def test_data_latent_pass_counts(toy_root: Path, tmp_path: Path, single_process_dist: Any, reuse: bool) -> None:
    """data_latent: one graded student forward; the critic trains on a fresh no-grad rollout unless reuse is on;
    the teacher sees 2B samples (cond + uncond batched) and the critic B (score) + B (its own loss)."""
    from fv_accel.build import build_run
    from fv_accel.flops import PassCount

    cfg = _config(toy_root, tmp_path, rollout_mode="data_latent", generator_update_interval=1,
                  real_score_guidance_scale=2.5, reuse_generator_rollout_for_critic=reuse)
    built = build_run(cfg, single_process_dist)
    method = built.method
    method.on_train_start()
    assert built.data is not None
    out = method.single_train_step(next(built.data), 1)
    b = 2
    assert set(out.losses) == {"generator_loss", "critic_loss"}
    assert out.loss_roles == {"generator_loss": "student", "critic_loss": "critic"}
    assert out.passes["student"] == PassCount(forward=b if reuse else 2 * b, backward=b)
    assert out.passes["teacher"] == PassCount(forward=2 * b)
    assert out.passes["critic"] == PassCount(forward=2 * b, backward=b)
    # generator-first: the generator loss was differentiated inside the step; the critic's is left to backward
    assert out.backpropagated == {"generator_loss"} and not out.losses["generator_loss"].requires_grad
    assert out.losses["critic_loss"].requires_grad


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    return {n: local(p.grad).clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accum", [1, 2])
def test_generator_first_backward_gives_the_combined_gradients_bitwise(
        toy_root: Path, tmp_path: Path, single_process_dist: Any, accum: int) -> None:
    """The oracle is today's ordering: one backward of generator_loss + critic_loss (``eager_backward = False``)
    on the same weights, batch and random draws. fp32 on CPU: every gradient of student and critic is equal."""
    from fv_accel.build import build_run

    cfg = _config(toy_root, tmp_path, real_score_guidance_scale=2.5)
    cfg.training.loop.gradient_accumulation_steps = accum
    built = build_run(cfg, single_process_dist)
    method = built.method
    assert built.data is not None
    batch = next(built.data)
    student, critic = (method.role_models[r].transformer for r in ("student", "critic"))
    runs: dict[bool, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
    for eager in (False, True):
        method.eager_backward = eager  # type: ignore[misc]
        method.optimizers_zero_grad(3)
        method.on_train_start()  # the same seeds → the same rollout, timesteps and noise
        out = method.single_train_step(batch, 3)  # a generator step (interval 3)
        assert set(out.losses) == {"generator_loss", "critic_loss"}
        if eager:
            assert out.backpropagated == {"generator_loss"}
            assert not out.losses["generator_loss"].requires_grad
            assert _grads(student) and not _grads(critic)  # the student's backward already ran
        else:
            assert out.backpropagated == frozenset() and not _grads(student)
        method.backward(out, grad_accum_rounds=accum)
        runs[eager] = (_grads(student), _grads(critic), {n: v.detach() for n, v in out.losses.items()})
    method.eager_backward = True  # type: ignore[misc]
    (ref_s, ref_c, ref_l), (new_s, new_c, new_l) = runs[False], runs[True]
    n_student = sum(1 for p in student.parameters() if p.requires_grad)
    assert len(ref_s) == len(new_s) == n_student and len(ref_c) == len(new_c) > 0
    assert any(bool(g.abs().sum() > 0) for g in ref_s.values())
    for name in ref_s:
        assert torch.equal(new_s[name], ref_s[name]), f"student {name}"
    for name in ref_c:
        assert torch.equal(new_c[name], ref_c[name]), f"critic {name}"
    for name in ref_l:
        assert torch.equal(new_l[name], ref_l[name]), name


def test_backward_refuses_a_scale_other_than_the_early_one(toy_root: Path, tmp_path: Path,
                                                           single_process_dist: Any) -> None:
    from fv_accel.build import build_run

    cfg = _config(toy_root, tmp_path, generator_update_interval=1)
    built = build_run(cfg, single_process_dist)
    method = built.method
    method.on_train_start()
    assert built.data is not None
    out = method.single_train_step(next(built.data), 1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        method.backward(out, grad_accum_rounds=2)
