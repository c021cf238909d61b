"""Sampling an exported causal student (``recipes/export.py`` of a ``family: wan_causal`` run; docs/export.md).

diffusers has no pipeline for a block-causal, KV-cached Wan: its ``WanPipeline`` would run the exported
transformer bidirectionally. :class:`CausalWanPipeline` loads the export (``transformer/`` in diffusers layout,
``causal_config.json``, and ``text_encoder/``, ``tokenizer/``, ``vae/`` when the run's base was a full pipeline)
and streams with :func:`fv_accel.causal_sampling.causal_dmd_sample`, as fv_accel's own validation and
``recipes/sample.py`` do::

    pipe = CausalWanPipeline.from_pretrained("export_dir", device="cuda")
    out = pipe(["a cat walks on the grass"], num_frames=21, height=60, width=104,
               generator=torch.Generator("cuda").manual_seed(0))
    out.frames  # uint8 [B, F, H, W, 3] (decoded when the export has a VAE); out.latents: normalised x0
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fv_accel.causal_sampling import causal_dmd_sample
from fv_accel.config import CausalConfig, ModelConfig
from fv_accel.errors import CheckpointError, ConfigError
from fv_accel.sampling import Generators

CAUSAL_CONFIG_FILE = "causal_config.json"


@dataclass
class CausalOutput:
    latents: torch.Tensor
    """x0 in the model's normalised latent space, float32 [B, C, F, h, w]."""
    frames: np.ndarray | None
    """uint8 [B, F, H, W, 3] when the export has a VAE (and decoding was asked), else None."""


class CausalWanPipeline:
    """A causal student export: its transformer as :class:`fv_accel.models.wan_causal.CausalWanModel`, with the
    export's text encoder and VAE when present."""

    def __init__(self, model: Any, config: dict[str, Any], source: Path) -> None:
        self.model = model
        self.config = config
        self.source = source

    @classmethod
    def from_pretrained(cls, export_dir: str | Path, *, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype = torch.float32) -> CausalWanPipeline:
        from diffusers import WanTransformer3DModel

        from fv_accel.models.wan_causal import CausalWanModel

        root = Path(export_dir).expanduser()
        path = root / CAUSAL_CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{root}: no {CAUSAL_CONFIG_FILE}; not an export of a wan_causal run")
        cfg = json.loads(path.read_text())
        has_vae = (root / "vae" / "config.json").is_file()
        model_cfg = ModelConfig(
            init_from=str(root), family="wan_causal", flow_shift=float(cfg.get("flow_shift", 3.0)),
            latent_stats="auto" if has_vae else "identity",
            causal=CausalConfig(num_frames_per_block=cfg["num_frames_per_block"],
                                local_attn_frames=cfg.get("local_attn_frames"), sink_frames=cfg.get("sink_frames", 0)))
        transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=torch_dtype)
        stats = CausalWanModel.resolve_latent_stats("student", model_cfg)
        model = CausalWanModel(role="student", transformer=transformer, config=model_cfg, latent_stats=stats)
        transformer.to(torch.device(device)).eval().requires_grad_(False)
        return cls(model, cfg, root)

    @property
    def device(self) -> torch.device:
        return next(self.model.transformer.parameters()).device

    def encode_prompts(self, prompts: list[str], text_len: int | None = None) -> torch.Tensor:
        """Prompts → ``[B, text_len, D]`` by the export's text encoder (ConfigError when it has none)."""
        from fv_accel.prompts import encode_prompts, pad_embeddings

        length = int(text_len or self.config.get("text_len") or 512)
        embeddings = encode_prompts(type(self.model), str(self.source), prompts, key="export_dir",
                                    what="CausalWanPipeline", device=self.device, text_len=length)
        return pad_embeddings(embeddings, length)

    @torch.no_grad()
    def __call__(self, prompts: list[str] | None = None, *, num_frames: int, height: int, width: int,
                 generator: Generators, prompt_embeds: torch.Tensor | None = None,
                 denoising_steps: list[int] | None = None, output_type: str = "np") -> CausalOutput:
        """Stream ``num_frames`` LATENT frames of ``height`` × ``width`` latent cells per prompt (or per row of
        ``prompt_embeds``) with the export's DMD schedule (``denoising_steps`` overrides it)."""
        steps = denoising_steps or self.config.get("denoising_steps")
        if not steps:
            raise ConfigError(f"{self.source}/{CAUSAL_CONFIG_FILE}: no denoising_steps (the run was not distilled "
                              "to a step count); pass denoising_steps=")
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompts and prompt_embeds")
        text = self.encode_prompts(prompts) if prompts is not None else prompt_embeds
        assert text is not None
        transformer = self.model.transformer
        channels = int(transformer.config.in_channels)
        latents = causal_dmd_sample(self.model, text.to(self.device, next(transformer.parameters()).dtype),
                                    latent_shape=(channels, num_frames, height, width),
                                    denoising_steps=[int(s) for s in steps], generator=generator,
                                    context_noise=float(self.config.get("context_noise") or 0.0))
        frames = None
        if output_type != "latent":
            vae = self.model.load_vae()
            if vae is not None:
                from fv_accel.video import decode_with_vae

                frames = decode_with_vae(vae, self.model.denormalize_latents(latents))
        return CausalOutput(latents=latents, frames=frames)
