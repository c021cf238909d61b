"""Role models: one instance per role (student, teacher, critic, ...), each owning its own transformer.

A family (``wan.py``) knows how to load its transformer, how to call it, how its latent space is normalised,
its encoders and clip sizes, and its FLOPs; it never knows which method uses it. :class:`ModelBase` lists
everything a family answers (``fv_accel/models/README.md`` is the checklist for adding one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fv_accel import flow
from fv_accel.config import ModelConfig
from fv_accel.errors import ConfigError

if TYPE_CHECKING:
    from fv_accel.data.dataset import LatentBatch
    from fv_accel.memory import Checkpointing, RoleSpec


@dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics mapping stored latents into the transformer's space: ``(x − mean) / std``."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    """None for both: identity (mean 0, std 1 on every channel; ``models.<role>.latent_stats: identity``)."""
    origin: str
    """Where they were read (a file, a Hub file, or "identity"); named in error messages."""
    vae_source: str | None = None
    """The pipeline / VAE these statistics belong to, which decodes validation videos; None: no VAE."""
    vae_subfolder: str = ""

    def values(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.mean is None or self.std is None:
            return (0.0,) * channels, (1.0,) * channels
        return self.mean, self.std

    def same_space(self, other: LatentStats) -> bool:
        channels = len(self.mean or other.mean or ())
        return self.values(channels) == other.values(channels)


def check_shared_latent_space(stats: Mapping[str, LatentStats]) -> None:
    """Every role works on the same latents (a method hands one role's samples to another, and the batch is
    normalised once): statistics that differ between roles would silently mix two spaces (exit 2)."""
    roles = list(stats)
    for role in roles[1:]:
        if not stats[role].same_space(stats[roles[0]]):
            raise ConfigError(
                f"models.{roles[0]} and models.{role} have different latent statistics ({stats[roles[0]].origin} "
                f"vs {stats[role].origin}); all roles share one latent space: set models.<role>.latent_stats so "
                "they agree")


@dataclass(frozen=True)
class FrameRule:
    """Clip sizes a family's VAE and patching accept; preprocessing refuses others before encoding anything."""

    temporal_factor: int
    """Pixel frames per latent frame after the first, which a causal video VAE encodes alone: clips have
    k·``temporal_factor`` + 1 frames."""
    spatial_factor: int
    """Pixels per latent cell side."""
    pixel_multiple: int
    """Frame height and width must be multiples of this (the spatial factor times the transformer's spatial
    patch, or the patching drops the last row/column of an odd latent side)."""

    @property
    def num_frames_text(self) -> str:
        return f"{self.temporal_factor}k+1"

    def valid_num_frames(self, num_frames: int) -> bool:
        return num_frames >= 1 and (num_frames - 1) % self.temporal_factor == 0

    def nearest_num_frames(self, num_frames: int) -> tuple[int, int]:
        """The valid frame counts just below (at least 1) and just above ``num_frames``, for error messages."""
        below = max(1, (num_frames - 1) // self.temporal_factor * self.temporal_factor + 1)
        return below, below + self.temporal_factor


class Encoders(ABC):
    """A family's preprocessing encoders on one device (:meth:`ModelBase.load_encoders`): the text encoder, and
    the VAE when loaded with a ``vae_dtype``. They write what training reads, so their outputs are stored as is."""

    @abstractmethod
    def encode_text(self, captions: list[str]) -> list[torch.Tensor]:
        """Each caption → ``[L_i, D]`` float32 on the host, L_i its real token count (≤ ``text_len``; the
        dataset pads)."""

    @abstractmethod
    def encode_video(self, pixels_cthw: torch.Tensor) -> torch.Tensor:
        """``[3, T, H, W]`` in [-1, 1] → latents ``[C, t, h, w]`` float32 on the host, unnormalised (as stored)."""


@dataclass
class ConditionBatch:
    """A batch on device, in the model's (normalised) latent space."""

    latents_bcthw: torch.Tensor | None
    """Clean latents, normalised; None for text-only data."""
    text_embeds_bld: torch.Tensor
    text_mask_bl: torch.Tensor
    uncond_embeds_bld: torch.Tensor
    """Text embedding of the unconditional branch (zeros or a negative prompt)."""
    index: torch.Tensor
    """Dataset row of each sample, int64 [B]."""
    latent_shape: tuple[int, int, int, int]
    """[C, T, H, W] of one sample (also for text-only data)."""

    @property
    def batch_size(self) -> int:
        return self.text_embeds_bld.shape[0]


class ModelBase(ABC):
    """A role's model: the transformer plus its noise-schedule conventions (flow matching, ``fv_accel/flow.py``).

    Generic modules ask the family through this interface instead of testing its type. Construction only wraps
    a built transformer; :func:`fv_accel.models.prepare.prepare_transformer` then prepares it (requires_grad,
    attention backend, activation checkpointing, compile) in one order for every family.
    """

    #: Class names of the transformer blocks that FSDP2 wraps one by one (``fv_accel.build.shard_roles`` sets
    #: them on the plugin per role).
    block_class_names: tuple[str, ...] = ()
    #: The linear layers ``models.<role>.lora`` adapts when its ``target_modules`` is null (peft's matching: a
    #: module name or its dotted suffix); ``fv_accel/models/lora.py``.
    lora_target_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, role: str, transformer: torch.nn.Module, config: ModelConfig) -> None:
        self.role = role
        self.transformer = transformer
        self.config = config
        self.flow_shift = config.flow_shift
        self.compute_dtype = torch.float32
        """The dtype the transformer's blocks compute in (set when it is sharded: bf16 under bf16 mixed
        precision). ``predict_velocity`` casts hidden states and text to it; FSDP2 does not cast inputs."""

    # -- lifecycle ------------------------------------------------------------------------------------------
    def init_preprocessors(self, training_config: object) -> None:  # noqa: B027 - optional hook
        """Student only: attach heavy shared handles (VAE, text encoder). Default: nothing to attach."""

    def load_vae(self) -> torch.nn.Module | None:
        """The family's VAE, on this model's device, for decoding validation videos; None when the model has
        none (validation then draws the latents directly). Called on the main process only, once."""
        return None

    def fp32_modules(self, module: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """Submodules of ``module`` (one of :meth:`modules`; None: ``transformer``) that store and compute in
        fp32 under bf16 mixed precision (each becomes its own FSDP2 unit with an fp32 policy). Default: none."""
        return []

    def modules(self) -> dict[str, torch.nn.Module]:
        """The role's trainable/shardable modules by name: ``transformer``, plus ``transformer_2`` for a family
        with a second expert. Methods, checkpoints, EMA and export iterate over this, never assume one."""
        return {"transformer": self.transformer}

    def trained_modules(self) -> tuple[str, ...]:
        """Names in :meth:`modules` whose parameters train (``prepare_transformer`` sets requires_grad from it):
        all of them for a trainable role, none for a frozen one; a two-expert family may train one expert."""
        return tuple(self.modules()) if self.config.trainable else ()

    def lora_modules(self) -> tuple[str, ...]:
        """Names in :meth:`modules` that ``models.<role>.lora`` adapts: those the role trains, also when it is
        loaded frozen to sample a LoRA checkpoint (``recipes/sample.py``). Default: all of them."""
        return tuple(self.modules())

    def module_config(self, name: str) -> ModelConfig:
        """``models.<role>`` as it applies to module ``name`` (its ``subfolder`` in ``init_from``): what
        :meth:`weight_files` reads it from."""
        if name != "transformer":
            raise KeyError(f"{type(self).__name__} has no module {name!r}")
        return self.config

    #: Generates block by block against a KV cache (``fv_accel/causal_sampling.py``): the samplers of
    #: ``fv_accel/sampling.py`` stream when True.
    streams: ClassVar[bool] = False

    #: whether :meth:`role_memory_spec` models this family's activations (the dry run's memory estimate)
    has_memory_model: ClassVar[bool] = False

    @classmethod
    def role_memory_spec(cls, config: Mapping[str, Any], *, num_params: int, block_params: int, trainable: bool,
                         weight_bytes: int, activation_checkpointing: Checkpointing = "off", checkpoint_every: int = 1,
                         attention_backend: str | None = None) -> RoleSpec:
        """The dry run's memory model of one role (``fv_accel/memory.py``) from the transformer's config and
        its global parameter counts. Families with ``has_memory_model`` implement it."""
        raise NotImplementedError(f"{cls.__name__} has no activation memory model")

    @classmethod
    def diffusers_model_class(cls) -> str:
        """Name of the diffusers class an exported transformer is written as (``diffusers.<name>``)."""
        raise NotImplementedError(f"{cls.__name__} names no diffusers model class")

    @classmethod
    def diffusers_pipeline_class(cls) -> str:
        """Name of the diffusers pipeline class that runs an exported transformer (used in the model card)."""
        raise NotImplementedError(f"{cls.__name__} names no diffusers pipeline class")

    def transformer_blocks(self, module: torch.nn.Module | None = None) -> Sequence[torch.nn.Module]:
        """The repeated blocks of ``module`` (one of :meth:`modules`; None: ``transformer``), in order: what
        activation checkpointing and regional compilation act on (``fv_accel/models/prepare.py``)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its transformer blocks")

    def enable_context_parallel(self, mesh: Any) -> None:
        """Split the token sequence of every forward over ``mesh``, the 1-D ``cp`` sub-mesh of the run's device
        mesh (``Topology.cp_mesh``). Called on every role after :func:`fv_accel.models.prepare.prepare_transformer`
        and before sharding, while the weights are still on ``meta``: a configuration the family cannot split
        (head count, attention backend) fails with a ConfigError before any weight is read. Every rank of the
        group must then get the same inputs, and every forward returns the full (gathered) output on each.
        A family that supports it overrides this; the default refuses (exit 2) rather than silently running
        unsplit."""
        raise ConfigError(f"models.{self.role}: context parallel is not supported by family "
                          f"{self.config.family!r} yet")

    def forward_flops(self, latent_shape: Sequence[int], text_len: int) -> int | None:
        """Forward FLOPs of one sample with latents ``[C, T, H, W]`` and ``text_len`` text tokens (matmuls only,
        the convention of ``fv_accel/flops.py``); None when the family has no FLOP model (no MFU is logged)."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # -- data: clip sizes and encoders (preprocessing, validation prompts) ----------------------------------
    @classmethod
    def frame_rule(cls, patch_size: tuple[int, ...] | None = None, *, source: str | None = None) -> FrameRule:
        """The clip sizes this family's VAE and a transformer with ``patch_size`` (None: the family's usual
        one) accept; ``source``: the pipeline whose VAE encodes (its config may set the factors; None: the
        family's usual VAE). Every family that preprocesses videos implements it."""
        raise NotImplementedError(f"{cls.__name__} states no frame rule")

    #: subfolders of a pipeline that :meth:`load_encoders` needs to encode text (checked before anything loads)
    text_encoder_components: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def load_encoders(cls, source: str, *, key: str, device: torch.device, text_len: int, text_dtype: torch.dtype,
                      vae_dtype: torch.dtype | None = None, vae_tiling: bool = False) -> Encoders:
        """The text encoder (and with ``vae_dtype`` the VAE) of the pipeline ``source``, on ``device``, for
        preprocessing and validation prompts. ``key`` names ``source`` in errors (a config key or flag);
        ``vae_tiling`` trades exactness for bounded memory on large frames."""
        raise NotImplementedError(f"{cls.__name__} has no encoders")

    @classmethod
    def weight_files(cls, role: str, model_cfg: ModelConfig) -> list[Path]:
        """The safetensors files a transformer built ``on_meta`` is filled from
        (:func:`fv_accel.models.materialize_roles`). Every family that loads ``on_meta`` implements it."""
        raise NotImplementedError(f"{cls.__name__} names no weight files")

    # -- latent space -------------------------------------------------------------------------------------
    @property
    def latent_patch_size(self) -> tuple[int, int, int]:
        """(T, H, W) latent cells the transformer folds into one token; data latents must divide by it."""
        return 1, 1, 1

    @property
    def latent_channels(self) -> int | None:
        """Channels C of the ``[C, T, H, W]`` latents the transformer takes (Wan 2.1: 16, Wan 2.2 TI2V-5B: 48);
        data latents must have as many. None: not stated, not checked."""
        return None

    @classmethod
    def resolve_latent_stats(cls, role: str, model_cfg: ModelConfig, *, include_hub: bool = True
                             ) -> LatentStats | None:
        """The statistics ``models.<role>.latent_stats`` names, read without touching weights; ConfigError
        (exit 2) when they cannot be found. None when they live on the Hub and ``include_hub`` is false.
        Every family that loads from ``init_from`` implements it."""
        raise NotImplementedError(f"{cls.__name__} does not resolve latent statistics")

    @classmethod
    def from_config(cls, role: str, model_cfg: ModelConfig, *, dtype: torch.dtype,
                    latent_stats: LatentStats | None = None, on_meta: bool = False,
                    frozen_dtype: torch.dtype | None = None) -> ModelBase:
        """Load ``init_from`` in ``dtype`` (``fv_accel.models.load_role_model``); with ``on_meta`` build it without
        reading weights (parameters on the meta device, filled after sharding). Every family implements it.
        ``frozen_dtype``: the storage dtype of a module that does not train in a trained role (None: ``dtype``).
        The model comes back unprepared: ``load_role_model`` runs ``prepare_transformer`` on it."""
        raise NotImplementedError(f"{cls.__name__} does not load from init_from")

    @abstractmethod
    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        """Dataset latents (as stored by preprocessing) → the space the transformer is trained in."""

    @abstractmethod
    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latents`."""

    def prepare_batch(self, raw: LatentBatch, device: torch.device) -> ConditionBatch:
        """Move a collated :class:`fv_accel.data.LatentBatch` to ``device`` and normalise its latents. Methods
        call it on one role for all: every role has the same statistics (:func:`check_shared_latent_space`)."""
        latents = raw.latents_bcthw
        if latents is not None:
            latents = self.normalize_latents(latents.to(device, torch.float32, non_blocking=True))
        text = raw.text_embeds_bld.to(device, non_blocking=True)
        uncond = raw.uncond_embeds_bld
        uncond = torch.zeros_like(text) if uncond is None else uncond.to(device, non_blocking=True)
        return ConditionBatch(
            latents_bcthw=latents,
            text_embeds_bld=text,
            text_mask_bl=raw.text_mask_bl.to(device, non_blocking=True),
            uncond_embeds_bld=uncond,
            index=raw.index,
            latent_shape=raw.latent_shape,
        )

    # -- flow matching ------------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` for timesteps ``t`` of shape [B] or [B, F] (one per latent frame)."""
        return flow.add_noise(x0, noise, t)

    @abstractmethod
    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity prediction v̂ ≈ ε − x0 for latents ``x_t`` [B, C, F, H, W], returned in
        float32. ``t`` in [0, 1000]: [B], or [B, F] for a noise level per latent frame."""

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        """The clean latents the velocity prediction implies; ``t`` of shape [B] or [B, F]."""
        return flow.x0_from_velocity(x_t.float(), self.predict_velocity(x_t, t, text_embeds_bld), t)
