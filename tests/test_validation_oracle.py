"""Validation decodes latents in the dataset's stored space: x0·std + mean, not the model's normalised x0.

A tiny Wan student with per-channel latent statistics far from (0, 1), and a fake VAE that records what its
``decode`` receives; the expected input is the sampler's x0 (the same seed, run here) denormalised by hand.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fv_accel.callbacks.validation import ValidationCallback
from fv_accel.config import RunConfig
from fv_accel.data import LatentBatch
from fv_accel.methods.finetune import FinetuneMethod
from fv_accel.models.base import LatentStats
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel
from fv_accel.runtime import Topology
from fv_accel.sampling import euler_sample

CHANNELS = 16
MEAN = [0.5 + 0.1 * c for c in range(CHANNELS)]
STD = [2.0 - 0.05 * c for c in range(CHANNELS)]
LATENT_SHAPE = (CHANNELS, 1, 4, 4)


class RecordingVAE(nn.Module):
    """Stands in for the pipeline's VAE: records each latent it decodes, returns a grey [1, 3, 1, 8, 8] video."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.decoded: list[torch.Tensor] = []

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        self.decoded.append(latents.detach().clone())
        return (torch.zeros(latents.shape[0], 3, 1, 8, 8),)


def test_validation_hands_denormalised_latents_to_the_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import WanTransformer3DModel

    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused"}},  # never loaded: the transformer is built here
        "method": {"name": "finetune"},
        "training": {"data": {"train_batch_size": 2}, "checkpoint": {"output_dir": str(tmp_path / "out")},
                     "tracker": {"backends": []}},
        "callbacks": {"validation": {"every_steps": 1, "seed": 7, "num_inference_steps": 2}},
    })
    torch.manual_seed(0)
    student = WanModel(role="student", transformer=WanTransformer3DModel(**TINY_WAN_CONFIG),
                       config=cfg.models["student"],
                       latent_stats=LatentStats(mean=tuple(MEAN), std=tuple(STD), origin="test"))
    method = FinetuneMethod(cfg=cfg, role_models={"student": student})
    vae = RecordingVAE()
    monkeypatch.setattr(student, "load_vae", lambda: vae)

    text = torch.randn(2, 8, TINY_WAN_CONFIG["text_dim"], generator=torch.Generator().manual_seed(1))
    prompts = LatentBatch(latents_bcthw=None, text_embeds_bld=text, text_mask_bl=torch.ones(2, 8),
                          index=torch.arange(2), latent_shape=LATENT_SHAPE)
    assert cfg.callbacks.validation is not None
    callback = ValidationCallback(cfg.callbacks.validation, cfg)
    monkeypatch.setattr(callback, "load_prompts", lambda trainer=None: prompts)
    trainer = SimpleNamespace(method=method, callbacks=SimpleNamespace(get=lambda name: None), is_main=True,
                              output_dir=str(tmp_path / "out"),
                              topology=Topology(), accelerator=SimpleNamespace(trackers=[]))

    written = callback.run(trainer, 3)  # type: ignore[arg-type]

    # prompt i's noise: its own generator seeded 7·2³² + i
    x0 = torch.cat([euler_sample(student, text[i:i + 1], latent_shape=LATENT_SHAPE, num_steps=2,
                                 shift=student.flow_shift, generator=torch.Generator().manual_seed(7 * 2**32 + i))
                    for i in range(2)])
    expected = x0 * torch.tensor(STD).view(1, -1, 1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1, 1)
    assert (expected - x0).abs().max() > 1.0  # the oracle tells stored from normalised latents
    assert len(vae.decoded) == 2 and [p.name for p in written] == ["student-00.mp4", "student-01.mp4"]
    torch.testing.assert_close(torch.cat(vae.decoded), expected, rtol=1e-5, atol=1e-5)
