"""Wan 2.1 / 2.2 family: diffusers ``WanTransformer3DModel``."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from fv_accel.config import ModelConfig
from fv_accel.models.base import ModelBase
from fv_accel.models.checkpointing import apply_activation_checkpointing

logger = logging.getLogger(__name__)

# Only WanModel.predict_noise calls the transformer, and it never hands out the output view (see there).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPWanTransformer3DModel\) returned a view",
                        category=UserWarning)

#: A ~41k-parameter Wan transformer for tests and the toy world (text embeddings of width 32).
TINY_WAN_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}

#: Wan2.1-T2V-1.3B transformer configuration (for benchmarks with random weights).
WAN_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


def _read_vae_config(model_cfg: ModelConfig) -> dict[str, Any] | None:
    """The pipeline's ``vae/config.json`` when ``init_from`` is a pipeline (local directory or Hub id)."""
    local = Path(model_cfg.init_from).expanduser()
    if local.exists():
        vae_cfg = local / "vae" / "config.json"
        if not vae_cfg.is_file():
            return None
        path = str(vae_cfg)
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(model_cfg.init_from, "vae/config.json")
        except EntryNotFoundError:
            return None
    data: dict[str, Any] = json.loads(Path(path).read_text())
    return data


class WanModel(ModelBase):
    block_class_names = ("WanTransformerBlock",)
    #: Wan's VAE (``AutoencoderKLWan``) maps 8×8 pixels to one latent cell and 4 frames to one latent frame
    #: (the first frame alone: clips have 4k+1 frames).
    vae_spatial_factor = 8
    vae_temporal_factor = 4
    #: ``patch_size`` (t, h, w) of every published Wan 2.1 / 2.2 transformer.
    default_patch_size = (1, 2, 2)

    @classmethod
    def pixel_multiple(cls, patch_size: tuple[int, ...] | None = None) -> int:
        """Frame height and width must be multiples of this (16 for Wan): the VAE's spatial factor times the
        transformer's spatial patch, or the patching drops the last row/column of an odd latent side."""
        _, patch_h, patch_w = patch_size or cls.default_patch_size
        return cls.vae_spatial_factor * math.lcm(patch_h, patch_w)

    @property
    def latent_patch_size(self) -> tuple[int, int, int]:
        t, h, w = (int(p) for p in self.transformer.config.patch_size)
        return t, h, w

    def __init__(
        self,
        *,
        role: str,
        transformer: torch.nn.Module,
        config: ModelConfig,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        vae_source: str | None = None,
    ) -> None:
        super().__init__(role=role, transformer=transformer, config=config)
        self.vae_source = vae_source
        """Pipeline (directory or Hub id) whose ``vae`` subfolder decodes this model's latents; None: no VAE."""
        channels = transformer.config.in_channels
        mean = torch.tensor(latents_mean or [0.0] * channels, dtype=torch.float32)
        std = torch.tensor(latents_std or [1.0] * channels, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ValueError(f"latent statistics have {mean.numel()} channels, transformer expects {channels}")
        self._mean = mean.view(1, channels, 1, 1, 1)
        self._std = std.view(1, channels, 1, 1, 1)

    @classmethod
    def from_config(cls, role: str, model_cfg: ModelConfig, *, dtype: torch.dtype) -> WanModel:
        from diffusers import WanTransformer3DModel

        transformer = WanTransformer3DModel.from_pretrained(
            model_cfg.init_from, subfolder=model_cfg.subfolder or None, torch_dtype=dtype
        )
        vae_cfg = _read_vae_config(model_cfg)
        stats = None
        if vae_cfg is not None and "latents_mean" in vae_cfg and "latents_std" in vae_cfg:
            stats = (list(vae_cfg["latents_mean"]), list(vae_cfg["latents_std"]))
        else:
            logger.info("%s: no VAE latent statistics under %s; latents are used as stored", role,
                        model_cfg.init_from)
        return cls.from_transformer(role, transformer, model_cfg, latent_stats=stats,
                                    vae_source=model_cfg.init_from if vae_cfg is not None else None)

    @classmethod
    def from_transformer(
        cls,
        role: str,
        transformer: torch.nn.Module,
        model_cfg: ModelConfig,
        *,
        latent_stats: tuple[list[float], list[float]] | None = None,
        vae_source: str | None = None,
    ) -> WanModel:
        """Wrap an already built transformer, applying the role's attention backend, activation checkpointing
        and compilation (benchmarks build random-weight transformers this way)."""
        if model_cfg.attention_backend:
            transformer.set_attention_backend(model_cfg.attention_backend)
        if model_cfg.trainable:
            apply_activation_checkpointing(transformer, model_cfg.activation_checkpointing,
                                           model_cfg.activation_checkpointing_every)
        if model_cfg.compile == "regional":
            # Per block, before fully_shard: FSDP2's hooks stay outside the compiled regions.
            for block in transformer.blocks:
                block.compile()
        mean, std = latent_stats if latent_stats is not None else (None, None)
        return cls(role=role, transformer=transformer, config=model_cfg, latents_mean=mean, latents_std=std,
                   vae_source=vae_source)

    def load_vae(self) -> torch.nn.Module | None:
        if self.vae_source is None:
            return None
        from diffusers import AutoencoderKLWan

        # fp32: Wan's VAE is decoded in fp32 by diffusers' own pipelines too (bf16 decoding bands colours).
        vae = AutoencoderKLWan.from_pretrained(self.vae_source, subfolder="vae", torch_dtype=torch.float32)
        logger.info("%s: decoding validation videos with the VAE of %s", self.role, self.vae_source)
        return vae.to(self.device).eval().requires_grad_(False)

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return (latents_bcthw - self._mean.to(latents_bcthw.device)) / self._std.to(latents_bcthw.device)

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw * self._std.to(latents_bcthw.device) + self._mean.to(latents_bcthw.device)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        out = self.transformer(
            hidden_states=x_t,
            timestep=t,
            encoder_hidden_states=text_embeds_bld,
            return_dict=False,
        )[0]
        # The transformer's output is a view (its final reshape), which FSDP2 warns about: an in-place op on
        # it would drop the pre-backward hook. Callers get a tensor of their own, so it never happens.
        return out.float() if out.dtype != torch.float32 else out.clone()
