"""Flow-matching conventions shared by every model family and method (README "Conventions").

    x_t = (1 − σ)·x0 + σ·ε        v = ε − x0        x0 = x_t − σ·v        σ = t / 1000

Timesteps ``t`` live in [0, 1000] (what diffusers transformers take), one per sample ([B]) or one per latent
frame ([B, F], for per-frame noise levels); ``shift_timestep`` is the one source of the rational shift
``s·u / (1 + (s − 1)·u)``.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A timestep-shaped ``x`` against latents ``like`` [B, C, F, H, W]: one value per sample ([B] →
    [B, 1, 1, 1, 1]) or per latent frame ([B, F] → [B, 1, F, 1, 1])."""
    if x.ndim == 2:
        return x.reshape(x.shape[0], 1, x.shape[1], *([1] * (like.ndim - 3))).to(like.dtype)
    return x.reshape(x.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t / NUM_TRAIN_TIMESTEPS


def shift_unit(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift u ∈ [0, 1]: s·u / (1 + (s − 1)·u). shift > 1 moves mass toward high noise."""
    return shift * u / (1 + (shift - 1) * u)


def shift_timestep(t: torch.Tensor, shift: float) -> torch.Tensor:
    return NUM_TRAIN_TIMESTEPS * shift_unit(t / NUM_TRAIN_TIMESTEPS, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    sigma = _bcast(sigma_of(t), x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_t - _bcast(sigma_of(t), x_t) * v


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One deterministic Euler step of the flow ODE dx/dσ = v from t to t_next."""
    return x_t + _bcast(sigma_of(t_next) - sigma_of(t), x_t) * v


def sample_training_timesteps(
    batch_size: int,
    *,
    scheme: str,
    shift: float,
    generator: torch.Generator,
    device: torch.device,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Draw t ∈ (0, 1000) for flow-matching training: u ~ scheme, then the role's shift.

    ``logit_normal`` follows diffusers' and FastVideo's training scripts: there ``sigmoid(N(mean, std))`` is a
    position along the scheduler's *descending* timesteps (position 0 = pure noise), so σ = shift(1 − sigmoid(z)).
    A positive ``logit_mean`` therefore moves mass toward *low* noise (median t = 1000·shift(1 − sigmoid(mean))),
    and recipes tuned there mean the same here. Unlike those scripts, t is not rounded to a 1000-step grid.
    """
    if scheme == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    elif scheme == "logit_normal":
        z = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        u = torch.sigmoid(-z)  # = 1 − sigmoid(z): the diffusers position counted from the low-noise end
    else:
        raise ValueError(f"unknown timestep weighting scheme {scheme!r}")
    u = u.clamp(1e-4, 1 - 1e-4)
    return shift_timestep(u * NUM_TRAIN_TIMESTEPS, shift)


def sampling_schedule(num_steps: int, shift: float, device: torch.device | None = None) -> torch.Tensor:
    """Descending timesteps for a K-step Euler sampler: shifted linspace(1000, 0), K+1 points (last is 0)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, device=device)
    return NUM_TRAIN_TIMESTEPS * shift_unit(u, shift)
