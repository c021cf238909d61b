"""Flow-matching maths (fv_accel/flow.py) against values computed by hand.

Conventions: x_t = (1 − σ)·x0 + σ·ε, v = ε − x0, σ = t / 1000, shift(u) = s·u / (1 + (s − 1)·u).
"""

from __future__ import annotations

import math

import pytest
import torch

from fv_accel import flow


def test_add_noise_velocity_and_x0_roundtrip_by_hand() -> None:
    x0 = torch.tensor([2.0])
    noise = torch.tensor([-1.0])
    t = torch.tensor([250.0])  # σ = 0.25
    x_t = flow.add_noise(x0, noise, t)
    assert x_t.item() == pytest.approx(0.75 * 2.0 + 0.25 * -1.0)  # 1.25
    v = flow.velocity_target(x0, noise)
    assert v.item() == pytest.approx(-3.0)
    assert flow.x0_from_velocity(x_t, v, t).item() == pytest.approx(2.0)


def test_add_noise_endpoints_and_per_sample_sigma() -> None:
    x0 = torch.arange(2 * 3 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 3, 1, 2, 2)
    noise = torch.full_like(x0, 10.0)
    # Sample 0 at t=0 (clean), sample 1 at t=1000 (pure noise): σ broadcasts per sample, not per element.
    x_t = flow.add_noise(x0, noise, torch.tensor([0.0, 1000.0]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1])
    # t = 600 → σ = 0.6 on every element of every sample.
    x_t = flow.add_noise(x0, noise, torch.tensor([600.0, 600.0]))
    torch.testing.assert_close(x_t, 0.4 * x0 + 0.6 * noise)


def test_add_noise_keeps_bf16_dtype() -> None:
    x0 = torch.ones(1, 2, dtype=torch.bfloat16)
    out = flow.add_noise(x0, torch.zeros_like(x0), torch.tensor([500.0]))
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == [[0.5, 0.5]]


def test_shift_by_hand() -> None:
    # 3·0.5 / (1 + 2·0.5) = 0.75 ; 3·0.25 / (1 + 2·0.25) = 0.5 ; endpoints fixed.
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(flow.shift_unit(u, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(flow.shift_timestep(torch.tensor([500.0]), 3.0), torch.tensor([750.0]))
    # shift 1 is the identity; shift < 1 moves mass toward low noise: 0.5·0.5 / (1 − 0.5·0.5) = 1/3.
    torch.testing.assert_close(flow.shift_unit(u, 1.0), u)
    assert flow.shift_unit(torch.tensor(0.5), 0.5).item() == pytest.approx(1 / 3)


def test_euler_step_by_hand() -> None:
    x = torch.tensor([[1.0]])
    v = torch.tensor([[2.0]])
    # σ goes 1.0 → 0.75: x + (0.75 − 1)·v = 1 − 0.5.
    out = flow.euler_step(x, v, torch.tensor([1000.0]), torch.tensor([750.0]))
    assert out.item() == pytest.approx(0.5)


def test_one_euler_step_with_the_exact_velocity_recovers_x0() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 1, 2, 2, generator=gen)
    noise = torch.randn(3, 4, 1, 2, 2, generator=gen)
    x_t = flow.add_noise(x0, noise, torch.full((3,), 1000.0))
    out = flow.euler_step(x_t, flow.velocity_target(x0, noise), torch.full((3,), 1000.0), torch.zeros(3))
    torch.testing.assert_close(out, x0)
    # From an intermediate t the straight-line path also lands on x0.
    t = torch.tensor([100.0, 420.0, 930.0])
    x_t = flow.add_noise(x0, noise, t)
    out = flow.euler_step(x_t, flow.velocity_target(x0, noise), t, torch.zeros(3))
    torch.testing.assert_close(out, x0)


def test_sampling_schedule_by_hand() -> None:
    torch.testing.assert_close(flow.sampling_schedule(4, 1.0), torch.tensor([1000.0, 750.0, 500.0, 250.0, 0.0]))
    # u = [1, .75, .5, .25, 0] → 3u / (1 + 2u) = [1, .9, .75, .5, 0]
    torch.testing.assert_close(flow.sampling_schedule(4, 3.0), torch.tensor([1000.0, 900.0, 750.0, 500.0, 0.0]))
    one = flow.sampling_schedule(1, 5.0)
    assert one.tolist() == [1000.0, 0.0]


def _sample(scheme: str, shift: float, n: int = 20000, seed: int = 0, **kw: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return flow.sample_training_timesteps(n, scheme=scheme, shift=shift, generator=gen,
                                          device=torch.device("cpu"), **kw)


def test_uniform_timesteps_range_and_quantiles() -> None:
    t = _sample("uniform", 1.0)
    assert t.shape == (20000,)
    # u is clamped to [1e-4, 1 − 1e-4]: never exactly clean, never exactly pure noise.
    assert t.min().item() >= 0.1 - 1e-4 and t.max().item() <= 999.9 + 1e-3
    assert t.mean().item() == pytest.approx(500.0, abs=10.0)
    # With shift s, P(t ≤ 1000·shift(q)) = q: the median moves from 500 to 750 for s = 3.
    t3 = _sample("uniform", 3.0)
    assert (t3 <= 750.0).float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert (t3 <= 500.0).float().mean().item() == pytest.approx(0.25, abs=0.015)  # shift(0.25) = 0.5


def test_logit_normal_timesteps_range_and_quantiles() -> None:
    t = _sample("logit_normal", 1.0)
    assert t.min().item() >= 0.1 - 1e-4 and t.max().item() <= 999.9 + 1e-3
    # u = sigmoid(z), z ~ N(0, 1): P(u ≤ sigmoid(1)) = Φ(1) ≈ 0.8413, median 0.5.
    assert (t <= 500.0).float().mean().item() == pytest.approx(0.5, abs=0.015)
    assert (t <= 1000 * torch.sigmoid(torch.tensor(1.0)).item()).float().mean().item() == pytest.approx(
        0.8413, abs=0.015)
    # logit_mean moves the median to 1000·(1 − sigmoid(1.5)) = 1000 / (1 + e^1.5) ≈ 182: a positive mean means
    # *less* noise (diffusers' direction; this line used to expect sigmoid(1.5) ≈ 818, the reversed convention).
    tm = _sample("logit_normal", 1.0, logit_mean=1.5)
    assert tm.median().item() == pytest.approx(1000 / (1 + math.exp(1.5)), rel=0.02)
    # A huge std piles samples onto the clamp boundaries, which keep t inside (0, 1000).
    wide = _sample("logit_normal", 1.0, logit_std=50.0)
    assert wide.min().item() == pytest.approx(0.1, abs=1e-3)
    assert wide.max().item() == pytest.approx(999.9, abs=1e-2)


def test_logit_normal_median_follows_diffusers_direction_by_hand() -> None:
    # diffusers/FastVideo: u = sigmoid(N(1, 1)) indexes the descending schedule, so σ = shift(1 − u) and the
    # median is 1000·shift(1 − sigmoid(1)) with shift 3: 1 − sigmoid(1) = 0.268941,
    # 3·0.268941 / (1 + 2·0.268941) = 0.524633 → t ≈ 524.6 (the reversed convention gives ≈ 890.7).
    t = _sample("logit_normal", 3.0, n=40000, logit_mean=1.0)
    assert t.median().item() == pytest.approx(524.6, abs=6.0)
    # Quartiles by hand too: z = 1 ± 0.674490 → u = sigmoid(z); t = 1000·shift(1 − u).
    for q, z in ((0.25, 1.0 + 0.674490), (0.75, 1.0 - 0.674490)):
        v = 1 - 1 / (1 + math.exp(-z))
        assert t.quantile(q).item() == pytest.approx(1000 * 3 * v / (1 + 2 * v), abs=8.0)


def test_logit_normal_matches_the_diffusers_training_recipe() -> None:
    # The recipe of diffusers' flow-matching training scripts, run with diffusers' own code: u from
    # compute_density_for_timestep_sampling indexes FlowMatchEulerDiscreteScheduler(shift).timesteps.
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = compute_density_for_timestep_sampling("logit_normal", 40000, logit_mean=1.0, logit_std=0.7,
                                              generator=torch.Generator().manual_seed(1))
    ref = scheduler.timesteps[(u * 1000).long()]
    ours = _sample("logit_normal", 3.0, n=40000, logit_mean=1.0, logit_std=0.7)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert ours.quantile(q).item() == pytest.approx(ref.quantile(q).item(), abs=8.0), q


def test_timestep_sampling_is_deterministic_per_generator() -> None:
    a = _sample("uniform", 3.0, n=8, seed=7)
    b = _sample("uniform", 3.0, n=8, seed=7)
    c = _sample("uniform", 3.0, n=8, seed=8)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="unknown timestep weighting scheme"):
        _sample("cosine", 1.0, n=2)
