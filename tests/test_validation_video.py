"""Frames from latents (toy rendering, VAE decoding) and mp4 files that decode back to the same frames."""

from __future__ import annotations

from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from fv_accel.video import channel_projection, decode_with_vae, frame_grid, render_latents, write_mp4


def test_render_latents_maps_channel_directions_to_colours():
    proj = channel_projection(16)
    assert torch.allclose(proj @ proj.T, torch.eye(3), atol=1e-5)  # orthonormal rows
    assert torch.equal(proj, channel_projection(16))  # the same colours in every run
    # a latent equal to 2 × the red direction everywhere → R = 0.5 + 0.25·2 = 1, G = B = 0.5
    latents = (2 * proj[0]).view(1, 16, 1, 1, 1).expand(1, 16, 2, 3, 4)
    frames = render_latents(latents, upscale=4, frames_per_latent=3)
    assert frames.shape == (1, 6, 12, 16, 3) and frames.dtype == np.uint8
    assert (frames[..., 0] == 255).all()
    assert (np.abs(frames[..., 1:].astype(int) - 127.5) <= 0.5).all()  # 0.5·255 up to float rounding
    # zero latents are mid-grey; values beyond ±2 clip
    assert (np.abs(render_latents(torch.zeros(1, 16, 1, 2, 2)).astype(int) - 127.5) <= 0.5).all()
    assert render_latents((10 * proj[1]).view(1, 16, 1, 1, 1))[..., 1].min() == 255


def test_write_mp4_roundtrip_and_odd_sizes(tmp_path):
    rng = np.random.default_rng(0)
    # smooth frames (codecs blur noise): a moving gradient
    yy, xx = np.mgrid[0:64, 0:96]
    frames = np.stack([np.stack([(xx * 2 + 10 * f) % 256, yy * 3, np.full_like(xx, 100 + f)], -1)
                       for f in range(6)]).astype(np.uint8)
    path = write_mp4(frames, tmp_path / "a" / "v.mp4", fps=8)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 8
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (64, 96, 3)
    assert np.abs(decoded[3].astype(int) - frames[3]).mean() < 8
    odd = rng.integers(0, 255, size=(2, 33, 35, 3), dtype=np.uint8)
    with av.open(str(write_mp4(odd, tmp_path / "odd.mp4"))) as container:
        assert [f.to_ndarray(format="rgb24").shape for f in container.decode(video=0)] == [(34, 36, 3)] * 2
    with pytest.raises(ValueError, match="uint8 frames"):
        write_mp4(frames.astype(np.float32), tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()


def test_frame_grid_rows_are_samples():
    videos = np.zeros((3, 10, 4, 5, 3), dtype=np.uint8)
    for b in range(3):
        for f in range(10):
            videos[b, f] = 10 * b + f
    grid = frame_grid(videos, max_frames=4)
    assert grid.shape == (3 * 4, 4 * 5, 3)
    # row 1 holds sample 1, columns frames 0, 3, 6, 9
    assert [int(grid[4, 5 * k, 0]) for k in range(4)] == [10, 13, 16, 19]


def test_vae_decoding_is_used_when_the_student_has_one():
    from diffusers import AutoencoderKLWan

    from fv_accel.callbacks.validation import ValidationCallback
    from fv_accel.config import ValidationConfig

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                           temperal_downsample=[True], attn_scales=[]).eval()
    latents = torch.randn(2, 4, 3, 4, 4)
    frames = decode_with_vae(vae, latents)
    # one temporal and one spatial 2× stage: 3 latent frames → 1 + 2·2 = 5 frames of 8×8
    assert frames.shape == (2, 5, 8, 8, 3) and frames.dtype == np.uint8
    expected = vae.decode(latents, return_dict=False)[0]
    expected = ((expected.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert np.array_equal(frames, expected)
    loads: list[int] = []
    trainer = SimpleNamespace(method=SimpleNamespace(student=SimpleNamespace(
        load_vae=lambda: loads.append(1) or vae)))
    callback = ValidationCallback(ValidationConfig(every_steps=1), SimpleNamespace())  # type: ignore[arg-type]
    assert np.array_equal(callback.to_frames(trainer, latents), frames)
    assert np.array_equal(callback.to_frames(trainer, latents), frames)
    assert loads == [1]  # loaded once, at the first validation
    callback = ValidationCallback(ValidationConfig(every_steps=1), SimpleNamespace())  # type: ignore[arg-type]
    trainer.method.student = SimpleNamespace(load_vae=lambda: None)  # no VAE: the toy rendering
    assert callback.to_frames(trainer, latents).shape == (2, 12, 64, 64, 3)
