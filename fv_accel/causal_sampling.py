"""Streaming samplers of a causal model (``family: wan_causal``): the clip is generated block by block against
the model's KV cache (:meth:`fv_accel.models.wan_causal.CausalWanModel.stream`).

Per block (blocks of :meth:`CausalWanModel.block_sizes`, remainder first), the block is denoised while it
attends to the committed earlier blocks, then its clean estimate x̂0 is committed to the cache at
``context_noise`` (0: clean context; > 0: x̂0 re-noised with fresh noise to that timestep, as the rollout that
trained the student did). The last block is not committed (nothing reads it).

- :func:`causal_dmd_sample`: the DMD few-step chain per block (x̂0 at t_k, re-noised with fresh noise to
  t_{k+1});
- :func:`causal_euler_sample`: Euler steps of the flow ODE per block along the shifted schedule; with
  classifier-free guidance the conditional and unconditional rows share one stream of batch 2B (each row has
  its own cache rows, so the unconditional branch sees its own context, which is the conditional x̂0 committed
  for both).

Random numbers follow :func:`fv_accel.sampling.randn_rows` (one generator, or one per row): the initial noise of
the whole clip is drawn first, then, block after block, each re-noising draw has the block's shape. With one
block covering the clip this is exactly the draw order of :func:`fv_accel.sampling.dmd_sample`, so a one-block
causal model samples what bidirectional sampling does.

Length: any number of latent frames. The RoPE table is extended past ``rope_max_seq_len`` by the model itself.
With ``local_attn_frames`` set the cache holds at most the window, so memory is flat in the length; without a
window every committed frame stays cached and cache memory (see the ``wan_causal`` module docstring) bounds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fv_accel import flow

if TYPE_CHECKING:
    from fv_accel.models.wan_causal import CausalStream, CausalWanModel
    from fv_accel.sampling import Generators


def _check(latent_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape {list(latent_shape)}: expected [C, F, H, W]")
    _, frames, height, width = (int(x) for x in latent_shape)
    if frames < 1:
        raise ValueError(f"latent_shape {list(latent_shape)}: a stream needs at least one latent frame")
    return frames, height, width


def commit_context(stream: CausalStream, x0: torch.Tensor, start: int, context_noise: float, generator: Generators,
            copies: int = 1) -> None:
    """Commit the block's x̂0 (re-noised to ``context_noise`` when > 0) for ``copies`` stacked halves of the
    stream's batch (2 under guidance: the unconditional rows take the same context)."""
    from fv_accel.sampling import randn_rows

    ctx = x0
    if context_noise > 0:
        b = x0.shape[0]
        noise = randn_rows(x0.shape, generator, x0.device)
        ctx = flow.add_noise(x0, noise, torch.full((b,), float(context_noise), device=x0.device))
    stream.commit(torch.cat([ctx] * copies) if copies > 1 else ctx, frame_start=start, t_ctx=float(context_noise))


@torch.no_grad()
def causal_dmd_sample(
    model: CausalWanModel,
    text_embeds_bld: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    denoising_steps: Sequence[float],
    generator: Generators,
    context_noise: float = 0.0,
) -> torch.Tensor:
    """The few-step DMD sampler streamed block by block; returns x0 [B, C, F, H, W] (normalised space)."""
    from fv_accel.sampling import randn_rows

    frames, height, width = _check(latent_shape)
    device = text_embeds_bld.device
    b = text_embeds_bld.shape[0]
    noise = randn_rows((b, *latent_shape), generator, device)
    out = torch.empty(noise.shape, dtype=torch.float32, device=device)
    with model.stream(text_embeds_bld, num_frames=frames, latent_hw=(height, width)) as stream:
        last = len(stream.block_sizes) - 1
        for block, (start, size) in enumerate(zip(stream.block_starts, stream.block_sizes, strict=True)):
            x = noise[:, :, start:start + size]
            x0 = x
            for k, step in enumerate(denoising_steps):
                t = torch.full((b,), float(step), device=device)
                x0 = stream.predict_x0(x, t, frame_start=start)
                if k + 1 < len(denoising_steps):
                    fresh = randn_rows(x0.shape, generator, device)
                    x = flow.add_noise(x0, fresh, torch.full((b,), float(denoising_steps[k + 1]), device=device))
            out[:, :, start:start + size] = x0
            if block < last:
                commit_context(stream, x0, start, context_noise, generator)
    return out


@torch.no_grad()
def causal_euler_sample(
    model: CausalWanModel,
    text_embeds_bld: torch.Tensor,
    *,
    latent_shape: Sequence[int],
    num_steps: int,
    shift: float,
    generator: Generators,
    guidance_scale: float = 1.0,
    uncond_embeds_bld: torch.Tensor | None = None,
    context_noise: float = 0.0,
) -> torch.Tensor:
    """Euler steps of the flow ODE streamed block by block (optional CFG); returns x0 (normalised space)."""
    from fv_accel.sampling import randn_rows

    frames, height, width = _check(latent_shape)
    device = text_embeds_bld.device
    b = text_embeds_bld.shape[0]
    guided = uncond_embeds_bld is not None and guidance_scale != 1.0
    noise = randn_rows((b, *latent_shape), generator, device)
    schedule = flow.sampling_schedule(num_steps, shift, device=device)
    text = torch.cat([text_embeds_bld, uncond_embeds_bld]) if guided else text_embeds_bld  # type: ignore[list-item]
    rows = text.shape[0]
    out = torch.empty(noise.shape, dtype=torch.float32, device=device)
    with model.stream(text, num_frames=frames, latent_hw=(height, width)) as stream:
        last = len(stream.block_sizes) - 1
        for block, (start, size) in enumerate(zip(stream.block_starts, stream.block_sizes, strict=True)):
            x = noise[:, :, start:start + size]
            for k in range(schedule.shape[0] - 1):
                t = schedule[k].expand(b)
                if guided:
                    v_cond, v_uncond = stream.predict_velocity(torch.cat([x, x]), schedule[k].expand(rows),
                                                               frame_start=start).chunk(2)
                    v = v_uncond + guidance_scale * (v_cond - v_uncond)
                else:
                    v = stream.predict_velocity(x, t, frame_start=start)
                x = flow.euler_step(x, v, t, schedule[k + 1].expand(b))
            out[:, :, start:start + size] = x
            if block < last:
                commit_context(stream, x, start, context_noise, generator, copies=2 if guided else 1)
    return out
