"""Model families. Adding a family = one file here + one registry entry."""

from __future__ import annotations

import logging

import torch

from fv_accel.config import ModelConfig
from fv_accel.errors import CheckpointError, FvAccelError
from fv_accel.models.base import ConditionBatch, LatentStats, ModelBase, check_shared_latent_space
from fv_accel.models.wan import TINY_WAN_CONFIG, WAN_1_3B_CONFIG, WanModel

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type[ModelBase]] = {"wan": WanModel}


def resolve_latent_stats(models: dict[str, ModelConfig], *, include_hub: bool = True) -> dict[str, LatentStats]:
    """Every role's latent statistics (JSON reads only), checked to be one shared space; ConfigError (exit 2)
    naming the role when they are missing or differ. ``include_hub=False`` skips roles whose statistics live
    on the Hub (the config-time check)."""
    stats: dict[str, LatentStats] = {}
    for role, model_cfg in models.items():
        found = FAMILIES[model_cfg.family].resolve_latent_stats(role, model_cfg, include_hub=include_hub)
        if found is not None:
            stats[role] = found
    check_shared_latent_space(stats)
    return stats


def load_role_model(role: str, model_cfg: ModelConfig, *, mixed_precision: str,
                    latent_stats: LatentStats | None = None) -> ModelBase:
    """Load one role's transformer. Trainable roles hold fp32 master weights; frozen roles may stay bf16.
    ``latent_stats`` already resolved (:func:`resolve_latent_stats`); None: the family resolves them."""
    dtype = torch.float32
    if not model_cfg.trainable and mixed_precision == "bf16" and model_cfg.frozen_dtype == "bf16":
        dtype = torch.bfloat16
    family = FAMILIES[model_cfg.family]
    try:
        model = family.from_config(role, model_cfg, dtype=dtype,
                                   latent_stats=latent_stats)
    except FvAccelError:
        raise
    except Exception as exc:  # diffusers/safetensors/huggingface_hub raise many types for unusable weights
        logger.debug("loading models.%s failed", role, exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"models.{role}.init_from {model_cfg.init_from!r}: cannot load the transformer "
                              f"({type(exc).__name__}: {first_line})") from None
    model.transformer.requires_grad_(model_cfg.trainable)
    model.transformer.train(model_cfg.trainable)
    return model


__all__ = [
    "FAMILIES",
    "TINY_WAN_CONFIG",
    "WAN_1_3B_CONFIG",
    "ConditionBatch",
    "LatentStats",
    "ModelBase",
    "WanModel",
    "load_role_model",
    "resolve_latent_stats",
]
