"""Wan 2.1 / 2.2 family: diffusers ``WanTransformer3DModel``."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fv_accel.config import ModelConfig, is_hub_id
from fv_accel.errors import CheckpointError, ConfigError
from fv_accel.models.base import LatentStats, ModelBase
from fv_accel.models.checkpointing import apply_activation_checkpointing

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

logger = logging.getLogger(__name__)

# Only WanModel.predict_velocity calls the transformer, and it never hands out the output view (see there).
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


def _read_json(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({type(exc).__name__}: {exc})") from None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("diffusion_pytorch_model*"))


def read_latent_stats(role: str, model_cfg: ModelConfig, *, include_hub: bool = True) -> LatentStats | None:
    """``models.<role>.latent_stats`` → the statistics (see ``ModelConfig.latent_stats``). Reads JSON only."""
    key = f"models.{role}.latent_stats"
    choice = model_cfg.latent_stats
    if choice == "identity":
        return LatentStats(mean=None, std=None, origin="identity")
    names: tuple[str, ...]  # config files that may hold the statistics, in order
    if choice == "auto":
        source, names = model_cfg.init_from, ("vae/config.json",)
        missing = (f"'auto' needs vae/config.json with latents_mean/latents_std in models.{role}.init_from "
                   f"{source!r}, which has none (a transformer-only model?)")
    else:
        source, names = choice, ("vae/config.json", "config.json")
        missing = f"{source!r} has no vae/config.json or config.json with latents_mean/latents_std"
    fix = (f"set {key} to a pipeline or VAE directory (or Hub id) that has them, or to 'identity' if the data "
           "is already normalised")
    local = Path(source).expanduser()
    found: tuple[str, dict[str, Any]] | None = None
    if local.exists():
        for name in names:
            if (local / name).is_file():
                found = (name, _read_json(local / name, key))
                break
    elif not is_hub_id(source):
        raise ConfigError(f"{key}: local path {source!r} does not exist")
    elif not include_hub:
        return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        for name in names:
            try:
                path = hf_hub_download(source, name)
            except EntryNotFoundError:  # also: not in the cache under HF_HUB_OFFLINE=1
                continue
            except RepositoryNotFoundError:
                raise ConfigError(f"{key}: Hub repository {source!r} not found") from None
            except Exception as exc:  # network, HTTP: not a configuration problem
                raise CheckpointError(f"{key}: cannot read {name} of {source!r} ({type(exc).__name__}: "
                                      f"{(str(exc).strip().splitlines() or [''])[0]})") from None
            found = (name, _read_json(Path(path), key))
            break
    if found is None:
        raise ConfigError(f"{key}: {missing}; {fix}")
    name, data = found
    if not isinstance(data, dict) or "latents_mean" not in data or "latents_std" not in data:
        raise ConfigError(f"{key}: {name} of {source!r} has no latents_mean/latents_std; {fix}")
    subfolder = name.rpartition("/")[0]
    has_vae = not local.exists() or _has_weights(local / subfolder)
    return LatentStats(mean=tuple(float(v) for v in data["latents_mean"]),
                       std=tuple(float(v) for v in data["latents_std"]), origin=f"{source}/{name}",
                       vae_source=source if has_vae else None, vae_subfolder=subfolder)


class WanModel(ModelBase):
    block_class_names = ("WanTransformerBlock",)
    transformer: WanTransformer3DModel
    #: Wan's VAE (``AutoencoderKLWan``) maps 8×8 pixels to one latent cell and 4 frames to one latent frame
    #: (the first frame alone: clips have 4k+1 frames).
    vae_spatial_factor = 8
    vae_temporal_factor = 4
    #: ``patch_size`` (t, h, w) of every published Wan 2.1 / 2.2 transformer.
    default_patch_size = (1, 2, 2)

    @classmethod
    def diffusers_model_class(cls) -> str:
        return "WanTransformer3DModel"

    @classmethod
    def diffusers_pipeline_class(cls) -> str:
        return "WanPipeline"

    @classmethod
    def pixel_multiple(cls, patch_size: tuple[int, ...] | None = None) -> int:
        """Frame height and width must be multiples of this (16 for Wan): the VAE's spatial factor times the
        transformer's spatial patch, or the patching drops the last row/column of an odd latent side."""
        _, patch_h, patch_w = patch_size or cls.default_patch_size
        return cls.vae_spatial_factor * math.lcm(patch_h, patch_w)

    @property
    def latent_patch_size(self) -> tuple[int, int, int]:
        t, h, w = (int(p) for p in self.transformer.config["patch_size"])
        return t, h, w

    def __init__(
        self,
        *,
        role: str,
        transformer: WanTransformer3DModel,
        config: ModelConfig,
        latent_stats: LatentStats | None = None,
    ) -> None:
        super().__init__(role=role, transformer=transformer, config=config)
        self.latent_stats = latent_stats or LatentStats(mean=None, std=None, origin="identity")
        """Statistics of this model's latent space (``models.<role>.latent_stats``); None given: identity."""
        channels = transformer.config["in_channels"]
        mean_c, std_c = self.latent_stats.values(channels)
        mean = torch.tensor(mean_c, dtype=torch.float32)
        std = torch.tensor(std_c, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ConfigError(f"models.{role}.latent_stats: {self.latent_stats.origin} has {mean.numel()} "
                              f"channels, the transformer expects {channels}")
        self._mean = mean.view(1, channels, 1, 1, 1)
        self._std = std.view(1, channels, 1, 1, 1)

    @classmethod
    def resolve_latent_stats(cls, role: str, model_cfg: ModelConfig, *, include_hub: bool = True
                             ) -> LatentStats | None:
        return read_latent_stats(role, model_cfg, include_hub=include_hub)

    @classmethod
    def from_config(cls, role: str, model_cfg: ModelConfig, *, dtype: torch.dtype,
                    latent_stats: LatentStats | None = None, on_meta: bool = False) -> WanModel:
        """Load ``init_from``; the statistics are resolved first (when not given), so a role without them stops
        before its weights are read. ``on_meta``: build the transformer without reading any weight (see
        :meth:`empty_transformer`); :func:`fv_accel.build.shard_roles` fills it after sharding."""
        from diffusers import WanTransformer3DModel

        stats = latent_stats or read_latent_stats(role, model_cfg)
        if on_meta:
            transformer = cls.empty_transformer(model_cfg, dtype=dtype)
        else:
            transformer = WanTransformer3DModel.from_pretrained(
                model_cfg.init_from, subfolder=model_cfg.subfolder or None, torch_dtype=dtype
            )
        return cls.from_transformer(role, transformer, model_cfg, latent_stats=stats)

    @staticmethod
    def empty_transformer(model_cfg: ModelConfig, *, dtype: torch.dtype) -> WanTransformer3DModel:
        """The transformer ``from_pretrained(init_from, torch_dtype=dtype)`` returns, with its parameters on the
        ``meta`` device: same default dtype at construction, same fp32 parameters (``_keep_in_fp32_modules``),
        and the buffers computed on the host as its constructor computes them (the non-persistent RoPE tables,
        which no weight file holds). Reads ``config.json`` only."""
        from accelerate import init_empty_weights
        from diffusers import WanTransformer3DModel

        config = WanTransformer3DModel.load_config(model_cfg.init_from, subfolder=model_cfg.subfolder or None)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with init_empty_weights(include_buffers=False):
                transformer = WanTransformer3DModel.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        keep_fp32 = set(transformer._keep_in_fp32_modules or ())
        for name, param in transformer.named_parameters():
            if param.is_floating_point():
                wanted = torch.float32 if keep_fp32 & set(name.split(".")) else dtype
                param.data = param.data.to(wanted)
        transformer.register_to_config(_name_or_path=model_cfg.init_from)
        return transformer.eval()

    @classmethod
    def weight_files(cls, role: str, model_cfg: ModelConfig) -> list[Path]:
        """The safetensors files :meth:`empty_transformer`'s parameters are filled from."""
        from fv_accel.models.sharded_load import diffusers_weight_files

        return diffusers_weight_files(model_cfg.init_from, model_cfg.subfolder, key=f"models.{role}.init_from")

    @classmethod
    def from_transformer(
        cls,
        role: str,
        transformer: WanTransformer3DModel,
        model_cfg: ModelConfig,
        *,
        latent_stats: LatentStats | None = None,
    ) -> WanModel:
        """Wrap an already built transformer, applying the role's attention backend, activation checkpointing
        and compilation (benchmarks build random-weight transformers this way). No ``latent_stats``: identity."""
        if model_cfg.attention_backend:
            transformer.set_attention_backend(model_cfg.attention_backend)
        if model_cfg.trainable:
            apply_activation_checkpointing(transformer, model_cfg.activation_checkpointing,
                                           model_cfg.activation_checkpointing_every)
        if model_cfg.compile == "regional":
            # Per block, before fully_shard: FSDP2's hooks stay outside the compiled regions.
            for block in transformer.blocks:
                block.compile()
        return cls(role=role, transformer=transformer, config=model_cfg, latent_stats=latent_stats)

    def load_vae(self) -> torch.nn.Module | None:
        """The VAE the latent statistics came from (identity: none)."""
        source = self.latent_stats.vae_source
        if source is None:
            return None
        from diffusers import AutoencoderKLWan

        # fp32: Wan's VAE is decoded in fp32 by diffusers' own pipelines too (bf16 decoding bands colours).
        vae = AutoencoderKLWan.from_pretrained(source, subfolder=self.latent_stats.vae_subfolder or None,
                                               torch_dtype=torch.float32)
        logger.info("%s: decoding validation videos with the VAE of %s", self.role, source)
        return vae.to(self.device).eval().requires_grad_(False)

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return (latents_bcthw - self._mean.to(latents_bcthw.device)) / self._std.to(latents_bcthw.device)

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw * self._std.to(latents_bcthw.device) + self._mean.to(latents_bcthw.device)

    def fp32_modules(self) -> list[torch.nn.Module]:
        """The modules diffusers keeps in fp32 (``_keep_in_fp32_modules``: the time embedder, the blocks'
        affine ``norm2``) that hold parameters, outermost only. Parameterless ones (RoPE, ``norm1``/``norm3``,
        which compute in fp32 anyway) need no unit. ``scale_shift_table`` is a parameter of the block (and the
        root) itself, not a module: FSDP2's policy is per unit, so it is gathered in bf16 with its unit."""
        keep = set(getattr(self.transformer, "_keep_in_fp32_modules", None) or ())
        found: list[tuple[str, torch.nn.Module]] = []
        for name, module in self.transformer.named_modules():
            if name.rpartition(".")[2] not in keep or not any(True for _ in module.parameters()):
                continue
            if not any(name.startswith(f"{outer}.") for outer, _ in found):
                found.append((name, module))
        return [module for _, module in found]

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        # FSDP2 leaves inputs alone (runtime.mixed_precision_policy): the latents and text go in the blocks'
        # compute dtype, the timestep in fp32 exactly as given (the sinusoidal embedding at t ≈ 1000 changes
        # completely with a bf16 rounding of t).
        dtype = self.compute_dtype
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=t.float(),
            encoder_hidden_states=text_embeds_bld.to(dtype),
            return_dict=False,
        )[0]
        # The transformer's output is a view (its final reshape), which FSDP2 warns about: an in-place op on
        # it would drop the pre-backward hook. Callers get a tensor of their own, so it never happens.
        return out.float() if out.dtype != torch.float32 else out.clone()
