"""DMD2 maths against hand computations, and the role gating of a real (tiny Wan) DMD2 run in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import record_calls

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


def test_score_timesteps_window_then_shift() -> None:
    cfg = DMD2MethodConfig(name="dmd2", min_timestep_ratio=0.2, max_timestep_ratio=0.9, score_timestep_shift=3.0,
                           score_timestep_sampling="window_then_shift")
    t = score_timesteps(4096, cfg, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
    assert float(t.min()) >= 200.0 and float(t.max()) <= 900.0
    u = torch.rand(4096, generator=torch.Generator().manual_seed(1))
    expected = (1000 * flow.shift_unit((200 + 700 * u) / 1000, 3.0)).clamp(200, 900)
    torch.testing.assert_close(t, expected)
    assert float((t == 900).float().mean()) > 0.1  # shift 3 pushes the mass to the top of the window


def test_score_timesteps_shift_then_clamp_is_the_default() -> None:
    cfg = DMD2MethodConfig(name="dmd2", min_timestep_ratio=0.2, max_timestep_ratio=0.9, score_timestep_shift=3.0)
    assert cfg.score_timestep_sampling == "shift_then_clamp"
    t = score_timesteps(4096, cfg, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"))
    u = torch.rand(4096, generator=torch.Generator().manual_seed(1))
    # shift(1000·u) = 1000·3u / (1 + 2u), then clamped into [200, 900]
    torch.testing.assert_close(t, (1000 * 3 * u / (1 + 2 * u)).clamp(200, 900))
    # shift(t) < 200 ⇔ 3u/(1+2u) < 0.2 ⇔ u < 0.2/2.6: that share of draws sits exactly on the lower end
    assert float((t == 200).float().mean()) == pytest.approx(0.2 / 2.6, abs=0.02)


def test_score_timesteps_with_the_13b_recipe_reach_low_noise() -> None:
    """The 1.3B recipe's window (0.02–0.98) and shift (8), 10⁵ draws. shift_then_clamp: shift(1000·u) < 30 ⇔
    8u/(1 + 7u) < 0.03 ⇔ u < 0.03/7.79 (0.385 % of draws), < 20 ⇔ u < 0.02/7.86 (clamped to 20).
    window_then_shift: the smallest t is shift(20) = 1000·0.16/1.14 = 140.35."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes/configs/wan2.1_t2v_1.3b_dmd2.yaml").read_text())
    method = recipe["method"]
    assert (method["min_timestep_ratio"], method["max_timestep_ratio"], method["score_timestep_shift"]) == \
        (0.02, 0.98, 8.0)  # the numbers the hand computation uses
    n = 100_000
    draws = {}
    for sampling in ("shift_then_clamp", "window_then_shift"):
        cfg = DMD2MethodConfig.model_validate({**method, "score_timestep_sampling": sampling})
        draws[sampling] = score_timesteps(n, cfg, generator=torch.Generator().manual_seed(0),
                                          device=torch.device("cpu"))
    t = draws["shift_then_clamp"]
    assert float(t.min()) == pytest.approx(20.0) and float(t.max()) == pytest.approx(980.0)  # the window holds
    below_30 = int((t < 30).sum())
    assert below_30 == pytest.approx(n * 0.03 / 7.79, rel=0.25)  # ≈ 385
    assert int((t <= 20.0 + 1e-3).sum()) == pytest.approx(n * 0.02 / 7.86, rel=0.25)  # ≈ 254 on the lower end
    old = draws["window_then_shift"]
    assert float(old.min()) >= 140.35 - 1e-3 and float(old.max()) <= 980.0
    assert float(old.min()) < 141.0  # the bound is reached (u near 0): it is the window's real lower end


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


def _reference_rollout(method: Any, cond: Any, index: int) -> torch.Tensor:
    """FastVideo's simulate rollout written out: noise, ALL K − 1 no-grad steps with every re-noised latent kept,
    then the step ``index`` from the kept latent that reached it (the noise itself for index 0)."""
    student, steps, b = method.student, method.config.dmd_denoising_steps, cond.batch_size
    gen = method.cuda_generator
    full = lambda s: torch.full((b,), float(s))  # noqa: E731
    x = torch.randn((b, *cond.latent_shape), generator=gen)
    kept = [x]
    with torch.no_grad():
        for j in range(len(steps) - 1):
            x0 = student.predict_x0(x, full(steps[j]), cond.text_embeds_bld)
            x = student.add_noise(x0, torch.randn(x0.shape, generator=gen), full(steps[j + 1]))
            kept.append(x)
        return student.predict_x0(kept[index], full(steps[index]), cond.text_embeds_bld)


@pytest.mark.parametrize("sampling", ["per_rank", "shared"])
def test_simulate_rollout_forwards_and_graded_step(toy_root: Path, tmp_path: Path, single_process_dist: Any,
                                                   sampling: str) -> None:
    """per_rank: K student forwards whatever step was drawn, and x̂0 equals the FastVideo-style reference (all
    K − 1 no-grad steps, graded input taken from the chain); shared: index + 1 forwards. The graded forward (the
    one run with grad) is at the drawn step."""
    from fv_accel.build import build_run

    steps = [1000, 750, 500, 250]
    cfg = _config(toy_root, tmp_path, dmd_denoising_steps=steps, rollout_step_sampling=sampling)
    built = build_run(cfg, single_process_dist)
    method = built.method
    method.on_train_start()
    assert built.data is not None
    cond = method.student.prepare_batch(next(built.data), method.student.device)
    calls: list[tuple[float, bool]] = []
    original = method.student.predict_x0

    def spy(x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        calls.append((float(t[0]), torch.is_grad_enabled()))
        return original(x_t, t, text)

    seen: set[int] = set()
    for _ in range(12):
        choice_state = (method.rank_choice_generator if sampling == "per_rank" else method.choice_generator)
        assert choice_state is not None and method.cuda_generator is not None
        index = int(torch.randint(len(steps), (1,), generator=torch.Generator().set_state(choice_state.get_state())))
        noise_state = method.cuda_generator.get_state()
        calls.clear()
        method.student.predict_x0 = spy  # type: ignore[method-assign]
        x0, num_forwards = method.rollout(cond, grad=True)
        method.student.predict_x0 = original  # type: ignore[method-assign]
        seen.add(index)
        assert num_forwards == len(calls) == (len(steps) if sampling == "per_rank" else index + 1)
        assert [t for t, grad in calls if grad] == [float(steps[index])]  # one graded forward, at the drawn step
        assert x0.requires_grad
        if sampling == "per_rank":
            after = method.cuda_generator.get_state()
            method.cuda_generator.set_state(noise_state)
            torch.testing.assert_close(x0.detach(), _reference_rollout(method, cond, index), rtol=0, atol=0)
            assert torch.equal(method.cuda_generator.get_state(), after)  # the same draws as the reference
    assert len(seen) > 1  # several graded steps were exercised


def test_rank_choice_generator_is_in_the_random_state(toy_root: Path, tmp_path: Path,
                                                      single_process_dist: Any) -> None:
    """The per-rank graded-step draws resume where they were: a saved random state replays them exactly."""
    from fv_accel.build import build_run

    method = build_run(_config(toy_root, tmp_path, dmd_denoising_steps=[1000, 750, 500, 250]),
                       single_process_dist, with_data=False).method
    method.on_train_start()
    for _ in range(3):
        method.graded_step_index()
    state = method.random_state()
    assert "rank_choice_generator" in state
    expected = [method.graded_step_index() for _ in range(20)]
    method.on_train_start()  # re-seeded: the stream starts over
    method.load_random_state(state)
    assert [method.graded_step_index() for _ in range(20)] == expected


def _pipeline_with_eos(toy_root: Path, where: Path) -> Path:
    """The tiny Wan pipeline (tests/conftest.py), its tokenizer ending every text with ``</s>`` as UMT5's does,
    so "" encodes to one real token (the tiny tokenizer alone gives none, i.e. zeros)."""
    from conftest import build_tiny_wan_pipeline
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    pipe = build_tiny_wan_pipeline(where, toy_root / "init" / "transformer")
    tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save_pretrained(pipe / "tokenizer")
    return pipe


@pytest.mark.parametrize("uncond", ["zeros", "negative_prompt", "empty_prompt"])
def test_uncond_is_what_the_teachers_unconditional_branch_sees(toy_root: Path, tmp_path: Path,
                                                               single_process_dist: Any, uncond: str) -> None:
    """The unconditional half of the teacher's batched CFG forward: zeros (even with a negative-prompt file
    configured), the negative prompt's embedding from its file, or "" encoded by the pipeline's own tokenizer and
    text encoder (called directly here), zero-padded to text_len."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from fv_accel.build import build_run
    from fv_accel.data.preprocess import write_text_rows

    pipe = _pipeline_with_eos(toy_root, tmp_path / "pipe")
    negative = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    write_text_rows(tmp_path / "neg.parquet", ["negative_prompt"], ["blurry"], [negative])
    cfg = resolve_config({
        "models": {"student": {"init_from": str(pipe), "latent_stats": "identity"},
                   "teacher": {"init_from": str(pipe), "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "dmd_denoising_steps": [1000, 500], "real_score_guidance_scale": 2.5,
                   "uncond": uncond},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8,
                              "negative_prompt_path": str(tmp_path / "neg.parquet")},
                     "tracker": {"backends": []}, "checkpoint": {"output_dir": str(tmp_path / "out")}},
    })
    built = build_run(cfg, single_process_dist)
    method = built.method
    method.on_train_start()
    assert built.data is not None
    cond = method.student.prepare_batch(next(built.data), method.student.device)
    teacher = method.role_models["teacher"]
    seen = record_calls(teacher, "predict_x0", lambda x_t, t, text: text.detach().clone())
    x_t = torch.randn(2, *cond.latent_shape, generator=torch.Generator().manual_seed(0))
    method.teacher_x0(x_t, torch.tensor([300.0, 800.0]), cond)
    (text,) = seen
    assert torch.equal(text[:2], cond.text_embeds_bld)
    expected = torch.zeros(8, 32)
    if uncond == "negative_prompt":
        expected[:3] = negative
    elif uncond == "empty_prompt":
        tokenizer = AutoTokenizer.from_pretrained(pipe / "tokenizer")
        ids = tokenizer([""], return_tensors="pt").input_ids
        assert ids.tolist() == [[1]]  # just </s>
        with torch.no_grad():
            hidden = UMT5EncoderModel.from_pretrained(pipe / "text_encoder").eval()(ids).last_hidden_state[0]
        expected[:1] = hidden
        assert bool(hidden.abs().sum() > 0)
    torch.testing.assert_close(text[2:], expected.expand(2, -1, -1), rtol=1e-5, atol=1e-6)


def test_empty_prompt_needs_a_text_encoder(toy_root: Path, tmp_path: Path) -> None:
    """The toy init is a transformer alone: no tokenizer/ or text_encoder/ to encode "" with (exit 2)."""
    with pytest.raises(ConfigError, match=r"method\.uncond=empty_prompt.*tokenizer/"):
        _config(toy_root, tmp_path, uncond="empty_prompt")
