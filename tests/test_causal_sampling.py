"""Streaming samplers (``fv_accel/causal_sampling.py``) through the shared ``dmd_sample`` / ``euler_sample``:
against a plain loop that runs the MASKED whole-clip forward on [committed context | current noisy block] per
block (no cache), and against bidirectional sampling when one block covers the clip."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from fv_accel import flow
from fv_accel.config import CausalConfig, ModelConfig
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel
from fv_accel.models.wan_causal import CausalStream, CausalWanModel
from fv_accel.sampling import DMDSampler, EulerSampler, dmd_sample, euler_sample

HW = (4, 4)
TOL = {"rtol": 1e-4, "atol": 1e-4}
STEPS = [1000, 750, 500]


def _transformer(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def _causal(per_block: int, window: int | None = None, sink: int = 0) -> CausalWanModel:
    cfg = ModelConfig(init_from="unused", family="wan_causal",
                      causal=CausalConfig(num_frames_per_block=per_block, local_attn_frames=window, sink_frames=sink))
    return CausalWanModel(role="student", transformer=_transformer(), config=cfg)


def _text(batch: int = 2, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, 32, generator=gen), torch.randn(batch, 6, 32, generator=gen)


def _gens(batch: int, seed: int = 11) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def _randn(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    # one generator per row, each row drawn alone (the documented per-row semantics)
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


def _sizes(frames: int, per_block: int) -> list[int]:
    rem = frames % per_block
    return ([rem] if rem else []) + [per_block] * (frames // per_block)


def _masked_block(model: CausalWanModel, context: torch.Tensor | None, t_ctx: float, x: torch.Tensor,
                  t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Velocity of the current block from the masked whole-clip forward over [context | block], per-frame t."""
    b, f = x.shape[0], x.shape[2]
    if context is None:
        return model.predict_velocity(x, t[:, None].expand(b, f), text)
    n = context.shape[2]
    t_bf = torch.cat([torch.full((b, n), t_ctx), t[:, None].expand(b, f)], dim=1)
    return model.predict_velocity(torch.cat([context, x], dim=2), t_bf, text)[:, :, n:]


def _loop_dmd(model: CausalWanModel, text: torch.Tensor, frames: int, per_block: int, ctx_noise: float,
              gens: list[torch.Generator]) -> torch.Tensor:
    b = text.shape[0]
    noise = _randn((b, 16, frames, *HW), gens)
    context: torch.Tensor | None = None
    outs = []
    start = 0
    for size in _sizes(frames, per_block):
        x = noise[:, :, start:start + size]
        for k, step in enumerate(STEPS):
            t = torch.full((b,), float(step))
            x0 = x - (step / 1000) * _masked_block(model, context, ctx_noise, x, t, text)
            if k + 1 < len(STEPS):
                s = STEPS[k + 1] / 1000
                x = (1 - s) * x0 + s * _randn(tuple(x0.shape), gens)
        outs.append(x0)
        committed = x0
        if ctx_noise > 0 and start + size < frames:
            s = ctx_noise / 1000
            committed = (1 - s) * x0 + s * _randn(tuple(x0.shape), gens)
        context = committed if context is None else torch.cat([context, committed], dim=2)
        start += size
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize(("per_block", "frames", "window", "sink", "ctx_noise"), [
    (2, 5, None, 0, 0.0),      # blocks [1, 2, 2]
    (2, 7, 4, 1, 0.0),         # window and sink: the cache rolls
    (3, 8, None, 0, 100.0),    # context re-noised before the commit
])
def test_streamed_dmd_equals_masked_block_loop(per_block: int, frames: int, window: int | None, sink: int,
                                               ctx_noise: float) -> None:
    model = _causal(per_block, window, sink)
    text, _ = _text()
    with torch.no_grad():
        want = _loop_dmd(model, text, frames, per_block, ctx_noise, _gens(2))
    got = DMDSampler(tuple(STEPS), context_noise=ctx_noise)(model, text, None, (16, frames, *HW), _gens(2))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL)


def test_streamed_euler_with_guidance_equals_masked_block_loop() -> None:
    per_block, frames, steps, scale, shift = 2, 5, 3, 3.0, 2.0
    model = _causal(per_block)
    text, uncond = _text()
    gens = _gens(2)
    schedule = flow.sampling_schedule(steps, shift)
    with torch.no_grad():
        noise = _randn((2, 16, frames, *HW), gens)
        ctx_c: torch.Tensor | None = None
        ctx_u: torch.Tensor | None = None
        outs, start = [], 0
        for size in _sizes(frames, per_block):
            x = noise[:, :, start:start + size]
            for k in range(steps):
                t = schedule[k].expand(2)
                v_c = _masked_block(model, ctx_c, 0.0, x, t, text)
                v_u = _masked_block(model, ctx_u, 0.0, x, t, uncond)  # own context: the same committed x0
                v = v_u + scale * (v_c - v_u)
                x = x + (schedule[k + 1] - schedule[k]) / 1000 * v
            outs.append(x)
            ctx_c = x if ctx_c is None else torch.cat([ctx_c, x], dim=2)
            ctx_u = ctx_c
            start += size
        want = torch.cat(outs, dim=2)
    model.flow_shift = shift
    got = EulerSampler(steps, scale)(model, text, uncond, (16, frames, *HW), _gens(2))
    torch.testing.assert_close(got, want, **TOL)


def test_one_block_covering_the_clip_samples_as_bidirectional_wan() -> None:
    frames = 3
    causal = _causal(per_block=frames)
    wan = WanModel(role="student", transformer=_transformer(), config=ModelConfig(init_from="unused"))
    text, uncond = _text()
    shape = (16, frames, *HW)
    got = dmd_sample(causal, text, latent_shape=shape, denoising_steps=STEPS, generator=_gens(2))
    want = dmd_sample(wan, text, latent_shape=shape, denoising_steps=STEPS, generator=_gens(2))
    torch.testing.assert_close(got, want, **TOL)
    got = euler_sample(causal, text, latent_shape=shape, num_steps=3, shift=3.0, generator=torch.Generator()
                       .manual_seed(3), guidance_scale=2.0, uncond_embeds_bld=uncond)
    want = euler_sample(wan, text, latent_shape=shape, num_steps=3, shift=3.0, generator=torch.Generator()
                        .manual_seed(3), guidance_scale=2.0, uncond_embeds_bld=uncond)
    torch.testing.assert_close(got, want, **TOL)


def test_longer_than_the_rope_table_with_a_window_keeps_the_cache_bounded() -> None:
    # 40 latent frames > rope_max_seq_len (32): the model extends its RoPE table; the window bounds the cache.
    model = _causal(per_block=4, window=8, sink=2)
    text, _ = _text(batch=1)
    peak: list[int] = []
    commit = CausalStream.commit

    def spy(self: CausalStream, *args: object, **kwargs: object) -> None:
        commit(self, *args, **kwargs)  # type: ignore[arg-type]
        peak.append(self.cache_bytes())

    mp = pytest.MonkeyPatch()
    mp.setattr(CausalStream, "commit", spy)
    try:
        out = dmd_sample(model, text, latent_shape=(16, 40, *HW), denoising_steps=[1000, 500], generator=_gens(1))
    finally:
        mp.undo()
    assert out.shape == (1, 16, 40, *HW) and torch.isfinite(out).all()
    per_frame = 2 * 2 * (HW[0] // 2) * (HW[1] // 2) * 32 * 4  # layers · (k, v) · tokens · heads·dim · fp32
    assert max(peak) == 4 * per_frame  # sinks 2 + (window 8 − sinks 2 − block 4) = 4 frames at most
    assert len(peak) == 40 // 4 - 1  # the last block is not committed


def test_too_short_a_clip_is_refused() -> None:
    text, _ = _text(batch=1)
    with pytest.raises(ValueError, match="at least one latent frame"):
        dmd_sample(_causal(2), text, latent_shape=(16, 0, *HW), denoising_steps=STEPS, generator=_gens(1))
