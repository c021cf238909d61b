"""Video frames out of latents, and mp4 files out of frames.

Two ways to frames:
- :func:`decode_with_vae`: a model whose ``init_from`` is a pipeline has a VAE (``ModelBase.load_vae``, a
  diffusers ``AutoencoderKLWan``) that decodes denormalised latents to RGB, one sample at a time;
- :func:`render_latents`: the toy world has no VAE, so its latents are drawn directly. Each latent frame
  ``[C, H, W]`` is projected onto three fixed directions of channel space (a seeded random orthonormal
  3×C matrix, identical in every run) that become R, G and B; a value v maps to ``0.5 + 0.25·v`` clipped to
  [0, 1] (± 2 standard deviations of the toy world's unit-RMS latents), each latent pixel becomes an
  ``upscale``×``upscale`` block, and each latent frame is held for ``frames_per_latent`` video frames (Wan's VAE
  compresses time 4×). A toy mode is a channel vector times a smooth space-time pattern, so each mode has its
  own colour and its own pattern: a sample that lands on a mode looks like one clean coloured pattern, a
  sample that blurs modes together looks like a greyish mix.

:func:`write_mp4` writes ``uint8 [F, H, W, 3]`` frames with PyAV (H.264 when available, else MPEG-4 part 2),
atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: the channel-space projection of :func:`render_latents` is drawn from this seed
RENDER_SEED = 0


def channel_projection(channels: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(RENDER_SEED)
    basis = torch.randn(channels, max(channels, 3), generator=gen)
    q, _ = torch.linalg.qr(basis)  # orthonormal columns
    return q[:, :3].T.contiguous() if channels >= 3 else torch.eye(3, channels)


def render_latents(latents_bcthw: torch.Tensor, *, upscale: int = 16, frames_per_latent: int = 4) -> np.ndarray:
    """Latents ``[B, C, T, H, W]`` → ``uint8 [B, T·frames_per_latent, H·upscale, W·upscale, 3]``."""
    x = latents_bcthw.detach().float().cpu()
    proj = channel_projection(x.shape[1])
    rgb = torch.einsum("kc,bcthw->bthwk", proj, x)
    rgb = (0.5 + 0.25 * rgb).clamp(0, 1)
    rgb = rgb.repeat_interleave(frames_per_latent, dim=1)
    rgb = rgb.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    return (rgb * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def decode_with_vae(vae: Any, latents_bcthw: torch.Tensor) -> np.ndarray:
    """Denormalised latents → ``uint8 [B, F, H, W, 3]`` through a diffusers video VAE (output in [-1, 1])."""
    param = next(vae.parameters())
    out = []
    for sample in latents_bcthw:  # one at a time: decoder activations of a full-size video are large
        video = vae.decode(sample[None].to(param.device, param.dtype), return_dict=False)[0]  # [1, 3, F, H, W]
        video = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        out.append((video * 255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def write_mp4(frames_fhwc: np.ndarray, path: str | os.PathLike[str], *, fps: int = 16) -> Path:
    """Write ``uint8 [F, H, W, 3]`` frames to ``path`` (an odd height or width gets one edge pixel more: yuv420p needs even sizes)."""
    import av

    frames = np.asarray(frames_fhwc)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, out)
    return out


def frame_grid(videos_bfhwc: np.ndarray, *, max_frames: int = 8) -> np.ndarray:
    """One image ``uint8 [H·B, W·F', 3]``: a row per video, up to ``max_frames`` evenly spaced frames each."""
    b, f = videos_bfhwc.shape[:2]
    picks = np.unique(np.linspace(0, f - 1, min(f, max_frames)).round().astype(int))
    rows = [np.concatenate(list(videos_bfhwc[i, picks]), axis=1) for i in range(b)]
    return np.concatenate(rows, axis=0)
