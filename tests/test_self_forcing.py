"""``method.name: self_forcing``: the block-wise rollout against hand computations on a tiny causal Wan (forwards
per block, which record a graph, exit draws, re-noising, what the cache is fed), the warped steps, config errors,
and on 2 processes one iteration against plain PyTorch and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, run_2proc
from diffusers import WanTransformer3DModel

from fv_accel.config import RunConfig
from fv_accel.errors import ConfigError
from fv_accel.methods.self_forcing import SelfForcingMethod, SelfForcingMethodConfig, denoising_steps
from fv_accel.models.base import ConditionBatch
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel
from fv_accel.models.wan_causal import CausalWanModel
from fv_accel.sampling import DMDSampler

STEPS = [1000, 750, 500, 250]
SHAPE = (16, 6, 4, 4)  # blocks of 2 frames: [2, 2, 2]


def _transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN_CONFIG)


def _config(tmp_path: Path, **method: object) -> RunConfig:
    return RunConfig.model_validate({
        "models": {"student": {"init_from": "unused", "family": "wan_causal", "causal": {"num_frames_per_block": 2}},
                   "teacher": {"init_from": "unused", "trainable": False}},
        "method": {"name": "self_forcing", "dmd_denoising_steps": STEPS, **method},
        "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })


def _method(tmp_path: Path, **method: object) -> SelfForcingMethod:
    cfg = _config(tmp_path, **method)
    roles = {"student": CausalWanModel(role="student", transformer=_transformer(0), config=cfg.models["student"]),
             "teacher": WanModel(role="teacher", transformer=_transformer(1), config=cfg.models["teacher"]),
             "critic": WanModel(role="critic", transformer=_transformer(1), config=cfg.models["critic"])}
    run = SelfForcingMethod(cfg=cfg, role_models=roles)
    run.on_train_start()
    return run


def _cond(b: int = 2) -> ConditionBatch:
    gen = torch.Generator().manual_seed(3)
    text = torch.randn(b, 5, 32, generator=gen)
    return ConditionBatch(latents_bcthw=None, text_embeds_bld=text, text_mask_bl=torch.ones(b, 5),
                          uncond_embeds_bld=torch.zeros_like(text), index=torch.arange(b), latent_shape=SHAPE)


def _spy(model: CausalWanModel) -> list[dict[str, Any]]:
    """Every transformer forward of ``model``: input, timestep, grad mode, output (kept for autograd checks)."""
    calls: list[dict[str, Any]] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        x = kwargs["hidden_states"]
        calls.append({"x": x.detach().clone(), "x_requires_grad": x.requires_grad, "t": float(kwargs["timestep"].flatten()[0]),
                      "grad": torch.is_grad_enabled(), "v": output[0]})

    model.transformer.register_forward_hook(hook, with_kwargs=True)
    return calls


def _copy(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator(device=gen.device)
    out.set_state(gen.get_state())
    return out


def _x0(call: dict[str, Any]) -> torch.Tensor:
    return call["x"] - call["t"] / 1000 * call["v"].detach().float()


def _check_rollout(run: SelfForcingMethod, calls: list[dict[str, Any]], exits: list[int], graded: list[bool],
                   noise_gen: torch.Generator, steps: list[float]) -> None:
    """The forwards of one rollout against the module docstring, re-noising recomputed by hand (noise replayed
    from ``noise_gen``, a copy of the method's cuda generator taken before the rollout)."""
    cfg = run.config
    b = calls[0]["x"].shape[0]
    i = 0
    for block, exit_index in enumerate(exits):
        x = torch.randn((b, 16, 2, 4, 4), generator=noise_gen)
        for k in range(exit_index + 1):
            call = calls[i]
            i += 1
            assert call["t"] == pytest.approx(steps[k]) and call["x"].shape[2] == 2, (block, k)
            torch.testing.assert_close(call["x"], x, rtol=1e-5, atol=1e-5)
            is_exit = k == exit_index
            assert call["grad"] == (is_exit and graded[block]), (block, k)
            assert call["v"].requires_grad == (is_exit and graded[block])
            if not is_exit:
                x0, s, s_next = _x0(call), steps[k] / 1000, steps[k + 1] / 1000
                eps = (torch.randn(x0.shape, generator=noise_gen) if cfg.renoise == "sde"
                       else (call["x"] - (1 - s) * x0) / s)
                x = (1 - s_next) * x0 + s_next * eps
        if block + 1 < len(exits):  # the commit: the block's own x̂0, detached, at t = context_noise
            commit = calls[i]
            i += 1
            x0 = _x0(calls[i - 2])
            s_ctx = cfg.context_noise / 1000
            if s_ctx > 0:
                x0 = (1 - s_ctx) * x0 + s_ctx * torch.randn(x0.shape, generator=noise_gen)
            assert commit["t"] == cfg.context_noise and not commit["grad"] and not commit["x_requires_grad"]
            torch.testing.assert_close(commit["x"], x0, rtol=1e-5, atol=1e-5)
    assert i == len(calls)


@pytest.mark.parametrize("options", [{}, {"renoise": "ode", "context_noise": 100.0, "denoising_step_shift": 5.0}])
def test_rollout_forwards_grads_and_draws_by_hand(tmp_path: Path, options: dict[str, Any]) -> None:
    run = _method(tmp_path, **options)
    calls = _spy(run.causal_student)
    assert run.choice_generator is not None and run.cuda_generator is not None
    seen: set[int] = set()
    for _ in range(3):
        exits = torch.randint(4, (3,), generator=_copy(run.choice_generator)).tolist()  # one draw per block
        noise_gen = _copy(run.cuda_generator)
        calls.clear()
        x0, forwards = run.rollout(_cond(), grad=True)
        assert run.rollouts[-1].exit_indices == exits
        seen |= set(exits)
        _check_rollout(run, calls, exits, [True] * 3, noise_gen, denoising_steps(run.config))
        exit_calls = [c for c in calls if c["grad"]]
        torch.testing.assert_close(x0, torch.cat([_x0(c) for c in exit_calls], dim=2), rtol=1e-5, atol=1e-5)
        # block 1 attends to block 0's committed context: its exit velocity is the masked whole-clip forward of
        # [block 0 as committed, block 1's input] (an oracle without the cache); a dropped commit fails here
        commit0, exit1 = calls[exits[0] + 1], exit_calls[1]
        t_bf = torch.tensor([[commit0["t"]] * 2 + [exit1["t"]] * 2] * 2)
        with torch.no_grad():
            masked = run.causal_student.predict_velocity(torch.cat([commit0["x"], exit1["x"]], dim=2), t_bf,
                                                         _cond().text_embeds_bld)
        torch.testing.assert_close(exit1["v"].detach().float(), masked[:, :, 2:4], rtol=1e-5, atol=1e-5)
        # no gradient path from a later block's output back to an earlier block's exit forward (the cache)
        for block in (1, 2):
            later = torch.autograd.grad(exit_calls[block]["v"].sum(), exit_calls[0]["v"], allow_unused=True,
                                        retain_graph=True)[0]
            assert later is None
        # forwards in clip units: block forwards (e + 1, + 1 commit but for the last) × 2 / 6 frames, rounded
        assert forwards == round(sum(e + 1 for e in exits) / 3 + 2 / 3)
    assert len(seen) > 1


def test_exit_options_and_gradient_range(tmp_path: Path) -> None:
    run = _method(tmp_path, same_step_across_blocks=True)
    calls = _spy(run.causal_student)
    draws = []
    for _ in range(4):
        assert run.choice_generator is not None and run.cuda_generator is not None
        exit_index = int(torch.randint(4, (1,), generator=_copy(run.choice_generator)))
        noise_gen = _copy(run.cuda_generator)
        calls.clear()
        run.rollout(_cond(), grad=True)
        assert run.rollouts[-1].exit_indices == [exit_index] * 3
        _check_rollout(run, calls, [exit_index] * 3, [True] * 3, noise_gen, [float(s) for s in STEPS])
        draws.append(exit_index)
    assert len(set(draws)) > 1

    run = _method(tmp_path, last_step_only=True, grad_last_frames=3)  # blocks [0,2) [2,4) [4,6): last two graded
    calls = _spy(run.causal_student)
    assert run.choice_generator is not None and run.cuda_generator is not None
    before = run.choice_generator.get_state()
    noise_gen = _copy(run.cuda_generator)
    run.rollout(_cond(), grad=True)
    assert torch.equal(run.choice_generator.get_state(), before)  # nothing drawn
    _check_rollout(run, calls, [3, 3, 3], [False, True, True], noise_gen, [float(s) for s in STEPS])
    assert run.rollouts[-1].clip_backwards == pytest.approx(4 / 6)

    calls.clear()
    noise_gen = _copy(run.cuda_generator)
    run.rollout(_cond(), grad=False)  # the critic's rollout: no graph anywhere
    _check_rollout(run, calls, [3, 3, 3], [False] * 3, noise_gen, [float(s) for s in STEPS])


def test_student_passes_count_block_forwards_in_clip_units(tmp_path: Path) -> None:
    from fv_accel.data import LatentBatch

    run = _method(tmp_path, last_step_only=True, generator_update_interval=1, real_score_guidance_scale=1.0)
    b = 3
    gen = torch.Generator().manual_seed(0)
    batch = LatentBatch(latents_bcthw=None, text_embeds_bld=torch.randn(b, 5, 32, generator=gen),
                        text_mask_bl=torch.ones(b, 5), index=torch.arange(b), latent_shape=SHAPE)
    out = run.single_train_step(batch, 1)
    # per rollout: 3 blocks × 4 steps + 2 commits = 14 block forwards of 2 / 6 frames; two rollouts, B = 3
    assert out.passes["student"].forward == round(2 * 14 * 2 / 6 * b)
    assert out.passes["student"].backward == b
    assert out.passes["teacher"].forward == b and out.passes["critic"].forward == 2 * b


def test_warped_steps_by_hand(tmp_path: Path) -> None:
    # shift 5: 1000·5u / (1 + 4u) at u = 0.75, 0.5, 0.25 → 3.75/4, 2.5/3, 1.25/2
    cfg = SelfForcingMethodConfig(name="self_forcing", denoising_step_shift=5.0)
    assert denoising_steps(cfg) == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-9)
    sampler = SelfForcingMethod.sampler(cfg, num_steps=50)
    assert isinstance(sampler, DMDSampler) and sampler.denoising_steps == pytest.approx((1000, 937.5, 2500 / 3, 625))
    plain = SelfForcingMethod.sampler(SelfForcingMethodConfig(name="self_forcing"), num_steps=50)
    assert isinstance(plain, DMDSampler) and plain.denoising_steps == (1000, 750, 500, 250)
    assert plain.context_noise == 0.0
    # validation and recipes/sample.py commit the context at the noise level the rollout trained with
    noisy = SelfForcingMethod.sampler(SelfForcingMethodConfig(name="self_forcing", context_noise=80.0), num_steps=4)
    assert isinstance(noisy, DMDSampler) and noisy.context_noise == 80.0


@pytest.mark.parametrize(("models", "match"), [
    ({"student": {"init_from": "unused"}}, "models.student.family"),
    ({"teacher": {"init_from": "unused", "trainable": False, "family": "wan_causal"}}, "models.teacher.family"),
    ({"critic": {"init_from": "unused", "family": "wan_causal"}}, "models.critic.family"),
])
def test_config_errors(tmp_path: Path, models: dict[str, Any], match: str) -> None:
    from fv_accel.config import resolve_config

    raw = {"models": {"student": {"init_from": "unused", "family": "wan_causal"},
                      "teacher": {"init_from": "unused", "trainable": False}, **models},
           "method": {"name": "self_forcing"},
           "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}}}
    with pytest.raises(ConfigError, match=match) as err:
        resolve_config(raw)
    assert err.value.exit_code == 2


def test_exclusive_options_and_data_latent_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        SelfForcingMethodConfig(name="self_forcing", same_step_across_blocks=True, last_step_only=True)
    with pytest.raises(ValueError, match="rollout_mode"):
        SelfForcingMethodConfig(name="self_forcing", rollout_mode="data_latent")  # type: ignore[arg-type]


# -- 2 processes: one iteration against plain PyTorch, exact resume --------------------------------------------
@pytest.fixture(scope="module")
def causal_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The causal toy world's parquet (6 latent frames of 4×4; no ``world.safetensors``, so no quality table),
    a random tiny Wan as the student's init and another as the teacher's."""
    from fv_accel.toy import CAUSAL_TOY_SPEC, ensure_init_transformer, ensure_toy_data

    root = tmp_path_factory.mktemp("sf_toy")
    ensure_toy_data(root, CAUSAL_TOY_SPEC)
    (root / "data" / "world.safetensors").unlink(missing_ok=True)
    ensure_init_transformer(root)
    ensure_init_transformer(root, seed=1, name="teacher")
    return root


def _recipe(root: Path, out: Path, path: Path, *, max_steps: int, **method: object) -> Path:
    path.write_text(yaml.safe_dump({
        "models": {"student": {"init_from": str(root / "init"), "latent_stats": "identity", "family": "wan_causal",
                               "causal": {"num_frames_per_block": 2}},
                   "teacher": {"init_from": str(root / "teacher"), "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "self_forcing", "dmd_denoising_steps": STEPS, "generator_update_interval": 1,
                   **method},
        "training": {"data": {"data_path": str(root / "data"), "train_batch_size": 2, "text_len": 8, "seed": 0,
                              "num_workers": 0},
                     "loop": {"max_train_steps": max_steps, "max_grad_norm": 1.0},
                     "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out), "save_steps": 2, "keep_last": 0}},
    }))
    return path


def _oracle_losses(root: Path, record: dict[str, Any], cfg: SelfForcingMethodConfig) -> dict[str, float]:
    """The step replayed with plain PyTorch on unsharded copies: each block's forwards as whole-clip masked
    forwards (earlier blocks' x̂0 at t = 0, the block at its step, later frames zero at t = 0), re-noised by
    hand, then DMD2's generator and critic losses written out; noise from the recorded generator state."""
    from fv_accel.config import ModelConfig
    from fv_accel.data import ParquetLatentDataset
    from fv_accel.models import load_role_model

    student = load_role_model("student", ModelConfig(init_from=str(root / "init"), latent_stats="identity",
                                                     family="wan_causal", causal={"num_frames_per_block": 2}),
                              mixed_precision="no")
    teacher = load_role_model("teacher", ModelConfig(init_from=str(root / "teacher"), latent_stats="identity"),
                              mixed_precision="no")
    data = ParquetLatentDataset(str(root / "data"), text_len=8)
    text = torch.stack([data.load(i).text_embeds_ld for i in record["rows"]]).float()
    gen = torch.Generator()
    gen.set_state(record["generator_state"])
    b, (c, f, h, w) = text.shape[0], SHAPE
    steps = [float(s) for s in STEPS]

    def rollout(exits: list[int]) -> torch.Tensor:
        clean: list[torch.Tensor] = []
        for block, exit_index in enumerate(exits):
            start = 2 * block
            x = torch.randn((b, c, 2, h, w), generator=gen)
            for k in range(exit_index + 1):
                clip = torch.cat([*clean, x, torch.zeros(b, c, f - start - 2, h, w)], dim=2)
                t = torch.zeros(b, f)
                t[:, start:start + 2] = steps[k]
                with torch.no_grad():
                    v = student.predict_velocity(clip, t, text)[:, :, start:start + 2]
                x0 = x - steps[k] / 1000 * v
                if k < exit_index:
                    s_next = steps[k + 1] / 1000
                    x = (1 - s_next) * x0 + s_next * torch.randn(x0.shape, generator=gen)
            clean.append(x0)
        return torch.cat(clean, dim=2)

    def score_t() -> torch.Tensor:
        u = torch.rand(b, generator=gen)
        return (1000 * 3 * u / (1 + 2 * u)).clamp(20, 980)  # shift 3, window [0.02, 0.98]

    def noised(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=gen)
        s = t.view(b, 1, 1, 1, 1) / 1000
        return (1 - s) * x0 + s * noise, noise

    with torch.no_grad():
        x0 = rollout(record["exits"][0])
        t = score_t()
        x_t, _ = noised(x0, t)
        s = t.view(b, 1, 1, 1, 1) / 1000
        fake = x_t - s * teacher.predict_velocity(x_t, t, text)  # the critic starts as the teacher
        cond = x_t - s * teacher.predict_velocity(x_t, t, text)
        uncond = x_t - s * teacher.predict_velocity(x_t, t, torch.zeros_like(text))
        real = uncond + cfg.real_score_guidance_scale * (cond - uncond)
        g = (fake - real) / (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        generator_loss = 0.5 * float((g ** 2).mean())
        x0 = rollout(record["exits"][1])
        t = score_t()
        x_t, noise = noised(x0, t)
        critic_loss = float(((teacher.predict_velocity(x_t, t, text) - (noise - x0)) ** 2).mean())
    return {"generator_loss": generator_loss, "critic_loss": critic_loss}


@pytest.mark.distributed
def test_one_iteration_on_two_processes_matches_plain_pytorch(causal_toy: Path, tmp_path: Path) -> None:
    recipe = _recipe(causal_toy, tmp_path / "run", tmp_path / "sf.yaml", max_steps=1)
    spy = tmp_path / "spy"
    spy.mkdir()
    proc = run_2proc(["tests/dist_scripts/self_forcing_step.py", "--config", str(recipe),
                      "--training.checkpoint.save_steps=0"], cwd=REPO, FVR_SPY_DIR=str(spy))
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = SelfForcingMethodConfig(name="self_forcing")
    records = [torch.load(spy / f"rank{r}.pt", weights_only=False)[0] for r in range(2)]
    assert records[0]["exits"] == records[1]["exits"]  # the shared choice generator: same forwards on both ranks
    assert records[0]["rows"] != records[1]["rows"]
    for rank, record in enumerate(records):
        want = _oracle_losses(causal_toy, record, cfg)
        for name, value in want.items():
            assert record["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (rank, name)


def _metrics(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k.endswith("_loss")} for r in rows}


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_is_bitwise_on_two_processes(causal_toy: Path, tmp_path: Path) -> None:
    """4 steps straight against 2 + resume 2 (per-block exit draws, SDE noise and the critic's rollouts must
    all continue their streams): losses of steps 3-4 and the final student and critic weights bit for bit."""
    from test_resume import read_checkpoint

    spy = tmp_path / "spy"
    spy.mkdir()
    runs = {}
    for name, extra in (("full", []), ("resumed", ["--training.checkpoint.resume_from_checkpoint="
                                                     f"{tmp_path / 'full' / 'checkpoint-2'}"])):
        recipe = _recipe(causal_toy, tmp_path / name, tmp_path / f"{name}.yaml", max_steps=4,
                         generator_update_interval=2)
        proc = run_2proc(["tests/dist_scripts/self_forcing_step.py", "--config", str(recipe), *extra], cwd=REPO,
                         FVR_SPY_DIR=str(spy))
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = _metrics(tmp_path / name)
    assert sorted(runs["full"]) == [1, 2, 3, 4] and sorted(runs["resumed"]) == [3, 4]
    assert "generator_loss" in runs["full"][4]
    for step in (3, 4):
        assert runs["resumed"][step] == runs["full"][step], step
    a = read_checkpoint(tmp_path / "full" / "checkpoint-4")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoint-4")
    weights = [k for k in a if k.startswith(("roles.student.", "roles.critic."))]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)
