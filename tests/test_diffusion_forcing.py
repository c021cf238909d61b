"""``method.name: diffusion_forcing``: per-block timesteps, the noised input and the loss against hand
computations from replayed draws (a constructed causal student, in process); one step on 2 processes (FSDP2
over gloo), with and without teacher forcing, against the same loss computed with plain PyTorch on an unsharded
copy of the tiny causal Wan; the config error for a student that is not causal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_2proc, run_recipe_main
from torch import nn

from fv_accel.causal_blocks import block_sizes
from fv_accel.config import RunConfig
from fv_accel.data import LatentBatch
from fv_accel.errors import ConfigError
from fv_accel.methods.diffusion_forcing import DiffusionForcingMethod
from fv_accel.models import ModelBase

SLOPE, BIAS, CLEAN_WEIGHT = 0.3, 0.1, 0.7
GEN_SEED = 1234
SHIFT = 3.0
FRAMES = 5  # blocks of 2, remainder first: [1, 2, 2]


class BlockModel(ModelBase):
    """A causal stand-in: blocks of 2 frames; v̂ = SLOPE·x_t + BIAS (mask path) and SLOPE·x_t + CLEAN_WEIGHT·x_clean
    + BIAS (teacher forced); records every call."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.calls: list[dict[str, object]] = []

    def block_sizes(self, num_frames: int) -> list[int]:
        return block_sizes(num_frames, 2)

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone()})
        return self.transformer.slope * x_t.float() + BIAS

    def predict_velocity_teacher_forced(self, x_t: torch.Tensor, t: torch.Tensor, x_clean: torch.Tensor,
                                        text_embeds_bld: torch.Tensor, *, t_clean: float = 0.0) -> torch.Tensor:
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "x_clean": x_clean.clone(),
                           "t_clean": t_clean})
        return self.transformer.slope * x_t.float() + CLEAN_WEIGHT * x_clean + BIAS


def _method(tmp_path: Path, **method: object) -> tuple[DiffusionForcingMethod, BlockModel]:
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused", "family": "wan_causal", "flow_shift": SHIFT}},  # not loaded
        "method": {"name": "diffusion_forcing", **method},
        "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })
    module = nn.Module()
    module.slope = nn.Parameter(torch.tensor(SLOPE))
    student = BlockModel(role="student", transformer=module, config=cfg.models["student"])
    run = DiffusionForcingMethod(cfg=cfg, role_models={"student": student})
    run.on_train_start()
    # A generator of our own (the method draws everything from cuda_generator), so the draws can be replayed.
    run.cuda_generator = torch.Generator().manual_seed(GEN_SEED)
    return run, student


def _batch(b: int = 3) -> LatentBatch:
    gen = torch.Generator().manual_seed(0)
    shape = (2, FRAMES, 2, 3)
    return LatentBatch(latents_bcthw=torch.randn(b, *shape, generator=gen),
                       text_embeds_bld=torch.randn(b, 3, 4, generator=gen), text_mask_bl=torch.ones(b, 3),
                       index=torch.arange(b), latent_shape=shape)


def _replayed_t(gen: torch.Generator, batch_size: int, num_blocks: int, scheme: str, shift: float,
                logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """[B, num_blocks] drawn by hand: u uniform or 1 − sigmoid(N(mean, std)), clamped, shifted s·u/(1+(s−1)u)."""
    if scheme == "uniform":
        u = torch.rand(batch_size * num_blocks, generator=gen)
    else:
        u = 1 - torch.sigmoid(torch.randn(batch_size * num_blocks, generator=gen) * logit_std + logit_mean)
    u = u.clamp(1e-4, 1 - 1e-4)
    return (1000 * shift * u / (1 + (shift - 1) * u)).view(batch_size, num_blocks)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_one_timestep_per_block_drawn_independently(tmp_path: Path, scheme: str) -> None:
    run, student = _method(tmp_path, weighting_scheme=scheme, logit_mean=0.4, logit_std=0.7)
    replay = torch.Generator().manual_seed(GEN_SEED)
    batch = _batch()
    x0 = batch.latents_bcthw
    assert x0 is not None
    for _ in range(3):
        out = run.single_train_step(batch, 1)
        noise = torch.randn(x0.shape, generator=replay)
        t_blocks = _replayed_t(replay, 3, 3, scheme, SHIFT, 0.4, 0.7)  # 3 samples × blocks [1, 2, 2]
        t = run.last_timesteps_bf
        assert t is not None and t.shape == (3, FRAMES)
        torch.testing.assert_close(t[:, 0], t_blocks[:, 0])
        torch.testing.assert_close(t[:, 1], t_blocks[:, 1])
        torch.testing.assert_close(t[:, 2], t_blocks[:, 1])  # constant inside a block
        torch.testing.assert_close(t[:, 3], t_blocks[:, 2])
        torch.testing.assert_close(t[:, 4], t_blocks[:, 2])
        assert len(set(t_blocks.flatten().tolist())) == 9  # every sample and block its own draw
        call = student.calls[-1]
        assert "x_clean" not in call and torch.equal(call["t"], t)
        sigma = t.view(3, 1, FRAMES, 1, 1) / 1000
        x_t = (1 - sigma) * x0 + sigma * noise
        torch.testing.assert_close(call["x_t"], x_t)
        expected = ((SLOPE * x_t + BIAS - (noise - x0)) ** 2).mean()
        torch.testing.assert_close(out.losses["loss"], expected, rtol=1e-6, atol=1e-7)
    assert out.passes["student"].forward == 3


@pytest.mark.parametrize("t_clean", [0.0, 100.0])
def test_teacher_forcing_sees_clean_context(tmp_path: Path, t_clean: float) -> None:
    run, student = _method(tmp_path, teacher_forcing=True, clean_context_timestep=t_clean)
    replay = torch.Generator().manual_seed(GEN_SEED)
    batch = _batch()
    x0 = batch.latents_bcthw
    assert x0 is not None
    out = run.single_train_step(batch, 1)
    noise = torch.randn(x0.shape, generator=replay)
    t = _replayed_t(replay, 3, 3, "uniform", SHIFT).repeat_interleave(torch.tensor([1, 2, 2]), dim=1)
    x_clean = x0
    if t_clean:
        x_clean = (1 - t_clean / 1000) * x0 + t_clean / 1000 * torch.randn(x0.shape, generator=replay)
    call = student.calls[-1]
    assert call["t_clean"] == t_clean
    torch.testing.assert_close(call["t"], t)
    torch.testing.assert_close(call["x_clean"], x_clean)
    sigma = t.view(3, 1, FRAMES, 1, 1) / 1000
    x_t = (1 - sigma) * x0 + sigma * noise
    torch.testing.assert_close(call["x_t"], x_t)
    expected = ((SLOPE * x_t + CLEAN_WEIGHT * x_clean + BIAS - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(out.losses["loss"], expected, rtol=1e-6, atol=1e-7)
    assert out.passes["student"].forward == 6  # the doubled sequence


def test_student_that_is_not_causal_is_a_config_error(tmp_path: Path, fresh_world: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "df.yaml"
    recipe.write_text(yaml.safe_dump({
        "models": {"student": {"init_from": str(tmp_path / "missing")}},
        "method": {"name": "diffusion_forcing"},
        "training": {"checkpoint": {"output_dir": str(tmp_path / "run")}},
    }))
    assert run_recipe_main("finetune", ["--config", str(recipe)]) == 2
    assert "models.student.family must be wan_causal" in capsys.readouterr().err
    from fv_accel.config import resolve_config

    with pytest.raises(ConfigError, match=r"models\.student\.family .*got 'wan'"):
        resolve_config(yaml.safe_load(recipe.read_text()))


@pytest.mark.distributed
def test_one_step_on_two_processes_matches_plain_pytorch(toy_root: Path, tmp_path: Path) -> None:
    """Blocks of one frame over the toy's 2 latent frames; A: mask path, uniform t; B: teacher forcing with
    context noise, logit-normal t. Both runs in one launch (tests/dist_scripts/diffusion_forcing_step.py)."""
    student = {"init_from": str(toy_root / "init"), "latent_stats": "identity", "family": "wan_causal",
               "causal": {"num_frames_per_block": 1}}
    training = {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                "loop": {"max_train_steps": 1}, "tracker": {"backends": []}}
    methods = [{"name": "diffusion_forcing"},
               {"name": "diffusion_forcing", "teacher_forcing": True, "clean_context_timestep": 100.0,
                "weighting_scheme": "logit_normal", "logit_mean": 0.5}]
    recipes = []
    for i, method in enumerate(methods):
        recipes.append(tmp_path / f"df{i}.yaml")
        recipes[-1].write_text(yaml.safe_dump({
            "models": {"student": student}, "method": method,
            "training": {**training, "checkpoint": {"output_dir": str(tmp_path / f"run{i}"), "save_steps": 0}}}))
    spy = tmp_path / "spy"
    spy.mkdir()
    proc = run_2proc(["tests/dist_scripts/diffusion_forcing_step.py", *map(str, recipes)], cwd=REPO,
                     FVR_SPY_DIR=str(spy))
    assert proc.returncode == 0, proc.stderr[-4000:]

    # plain PyTorch on one process: the init weights unsharded, the rows, the draws replayed, the MSE
    from fv_accel.config import ModelConfig
    from fv_accel.data import ParquetLatentDataset
    from fv_accel.models import load_role_model
    from fv_accel.runtime import derived_seed

    model = load_role_model("student", ModelConfig(**student), mixed_precision="no")
    data = ParquetLatentDataset(str(toy_root / "data"), text_len=8)
    seed = RunConfig.model_validate({"models": {"student": student}, "method": methods[0]}).training.data.seed
    records = [json.loads((spy / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank in range(2):
        assert len(records[rank]) == 2
        for method, record in zip(methods, records[rank], strict=True):
            samples = [data.load(i) for i in record["rows"]]
            x0 = torch.stack([s.latents_cthw for s in samples]).float()
            text = torch.stack([s.text_embeds_ld for s in samples])
            gen = torch.Generator().manual_seed(derived_seed(seed, rank))  # the rank's cuda_generator
            noise = torch.randn(x0.shape, generator=gen)
            t = _replayed_t(gen, 2, 2, method.get("weighting_scheme", "uniform"), model.flow_shift,
                            method.get("logit_mean", 0.0))  # blocks of one frame: t [B, F] as drawn
            torch.testing.assert_close(torch.tensor(record["t"]), t)
            sigma = t.view(2, 1, 2, 1, 1) / 1000
            x_t = (1 - sigma) * x0 + sigma * noise
            with torch.no_grad():
                if method.get("teacher_forcing"):
                    t_clean = float(method["clean_context_timestep"])
                    x_clean = (1 - t_clean / 1000) * x0 + t_clean / 1000 * torch.randn(x0.shape, generator=gen)
                    v = model.predict_velocity_teacher_forced(x_t, t, x_clean, text, t_clean=t_clean)
                    # the same by streaming, per sample: block 1 sees block 0's clean copy in the cache
                    for b in range(2):
                        with model.stream(text[b:b + 1], num_frames=2, latent_hw=x0.shape[3:]) as stream:
                            first = stream.predict_velocity(x_t[b:b + 1, :, :1], t[b:b + 1, :1], frame_start=0)
                            stream.commit(x_clean[b:b + 1, :, :1], frame_start=0, t_ctx=t_clean)
                            second = stream.predict_velocity(x_t[b:b + 1, :, 1:], t[b:b + 1, 1:], frame_start=1)
                        torch.testing.assert_close(torch.cat([first, second], dim=2), v[b:b + 1],
                                                   rtol=1e-4, atol=1e-5)
                else:
                    v = model.predict_velocity(x_t, t, text)
                loss = float(((v - (noise - x0)) ** 2).mean())
            assert math.isclose(loss, record["loss"], rel_tol=1e-5), (rank, method, loss, record["loss"])
    assert records[0][0]["rows"] != records[1][0]["rows"]  # the ranks took different rows
