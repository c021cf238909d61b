"""FinetuneMethod's step against a hand computation, over a constructed student whose output is known.

The student records what reaches it and returns v̂ = a·x_t + b, so the timesteps, the noised input and the
loss ‖v̂ − (ε − x0)‖² can all be recomputed here with bare PyTorch from replayed random draws.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fv_accel import flow
from fv_accel.config import RunConfig
from fv_accel.data import LatentBatch
from fv_accel.methods.finetune import FinetuneMethod
from fv_accel.models import ModelBase

SLOPE, BIAS = 0.3, 0.1
GEN_SEED = 1234


class RecordingModel(ModelBase):
    """v̂ = SLOPE·x_t + BIAS (through one trainable scalar, so the loss has a gradient); records every call."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.detach().clone(), t.detach().clone(), text_embeds_bld.detach().clone()))
        return self.transformer.slope * x_t.float() + BIAS


def _slope_module() -> nn.Module:
    module = nn.Module()
    module.slope = nn.Parameter(torch.tensor(SLOPE))
    return module


def _method(tmp_path: Path, *, shift: float, scheme: str) -> tuple[FinetuneMethod, RecordingModel]:
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused", "flow_shift": shift}},  # never loaded
        "method": {"name": "finetune", "weighting_scheme": scheme, "logit_mean": 0.3, "logit_std": 0.8},
        "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })
    student = RecordingModel(role="student", transformer=_slope_module(), config=cfg.models["student"])
    method = FinetuneMethod(cfg=cfg, role_models={"student": student})
    method.on_train_start()
    # A generator of our own (the method draws everything from cuda_generator), so the draws can be replayed.
    method.cuda_generator = torch.Generator().manual_seed(GEN_SEED)
    return method, student


def _batch() -> LatentBatch:
    gen = torch.Generator().manual_seed(0)
    b, shape = 4, (2, 1, 2, 3)
    return LatentBatch(latents_bcthw=torch.randn(b, *shape, generator=gen),
                       text_embeds_bld=torch.randn(b, 3, 5, generator=gen), text_mask_bl=torch.ones(b, 3),
                       index=torch.arange(b), latent_shape=shape)


def _replay(batch: LatentBatch, *, shift: float, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's draws in its order: ε (latent-shaped), then u; t = 1000·s·u / (1 + (s − 1)·u)."""
    gen = torch.Generator().manual_seed(GEN_SEED)
    x0 = batch.latents_bcthw
    assert x0 is not None
    noise = torch.randn(x0.shape, generator=gen)
    if scheme == "uniform":
        u = torch.rand(x0.shape[0], generator=gen)
    else:
        # diffusers' direction: u = sigmoid(z) indexes the descending schedule, so the flow fraction is 1 − u
        u = 1 - torch.sigmoid(torch.randn(x0.shape[0], generator=gen) * 0.8 + 0.3)
    u = u.clamp(1e-4, 1 - 1e-4)
    t = 1000 * shift * u / (1 + (shift - 1) * u)
    return noise, t


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_finetune_timesteps_carry_the_student_flow_shift(tmp_path: Path, scheme: str) -> None:
    method, student = _method(tmp_path, shift=5.0, scheme=scheme)
    batch = _batch()
    method.single_train_step(batch, 1)
    assert len(student.calls) == 1
    x_t, t, text = student.calls[0]
    noise, expected_t = _replay(batch, shift=5.0, scheme=scheme)
    unshifted = _replay(batch, shift=1.0, scheme=scheme)[1]
    assert (expected_t - unshifted).abs().min() > 1.0  # the oracle tells shift 5 from no shift
    torch.testing.assert_close(t, expected_t, rtol=1e-5, atol=1e-3)
    sigma = (expected_t / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * batch.latents_bcthw + sigma * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text, batch.text_embeds_bld)


def test_finetune_loss_regresses_noise_minus_data(tmp_path: Path) -> None:
    method, _ = _method(tmp_path, shift=3.0, scheme="uniform")
    batch = _batch()
    out = method.single_train_step(batch, 1)
    x0 = batch.latents_bcthw
    assert x0 is not None
    noise, t = _replay(batch, shift=3.0, scheme="uniform")
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * noise
    v_hat = SLOPE * x_t + BIAS
    expected = ((v_hat - (noise - x0)) ** 2).mean()
    wrong_sign = ((v_hat - (x0 - noise)) ** 2).mean()
    assert abs(float(expected) - float(wrong_sign)) > 0.1  # the oracle tells the two signs apart
    torch.testing.assert_close(out.losses["loss"], expected, rtol=1e-5, atol=1e-6)
    assert out.loss_roles == {"loss": "student"}
    # the loss trains the student: d loss / d slope = mean(2·(v̂ − (ε − x0))·x_t)
    out.losses["loss"].backward()
    grad = method.student.transformer.slope.grad
    torch.testing.assert_close(grad, (2 * (v_hat - (noise - x0)) * x_t).mean(), rtol=1e-4, atol=1e-6)


def test_velocity_target_is_the_flow_derivative() -> None:
    """v = dx_t/dσ of x_t = (1 − σ)·x0 + σ·ε, i.e. ε − x0, and x_t − σ·v recovers x0."""
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 3, 1, 2, 2, generator=gen), torch.randn(2, 3, 1, 2, 2, generator=gen)
    v = flow.velocity_target(x0, noise)
    t = torch.tensor([300.0, 800.0])
    x_t = (1 - t.view(-1, 1, 1, 1, 1) / 1000) * x0 + t.view(-1, 1, 1, 1, 1) / 1000 * noise
    x_t_later = (1 - (t + 1).view(-1, 1, 1, 1, 1) / 1000) * x0 + (t + 1).view(-1, 1, 1, 1, 1) / 1000 * noise
    torch.testing.assert_close(v, (x_t_later - x_t) * 1000, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x_t - t.view(-1, 1, 1, 1, 1) / 1000 * v, x0, rtol=1e-5, atol=1e-5)
