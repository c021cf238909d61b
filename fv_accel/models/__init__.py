"""Model families. Adding a family = one file here + one registry entry."""

from __future__ import annotations

import logging

import torch

from fv_accel.config import ModelConfig
from fv_accel.errors import CheckpointError, FvAccelError
from fv_accel.models.base import ConditionBatch, ModelBase
from fv_accel.models.wan import TINY_WAN_CONFIG, WAN_1_3B_CONFIG, WanModel

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type[ModelBase]] = {"wan": WanModel}


def load_role_model(role: str, model_cfg: ModelConfig, *, mixed_precision: str) -> ModelBase:
    """Load one role's transformer. Trainable roles hold fp32 master weights; frozen roles may stay bf16."""
    dtype = torch.float32
    if not model_cfg.trainable and mixed_precision == "bf16" and model_cfg.frozen_dtype == "bf16":
        dtype = torch.bfloat16
    family = FAMILIES[model_cfg.family]
    try:
        model = family.from_config(role, model_cfg, dtype=dtype)  # type: ignore[attr-defined]
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
    "ModelBase",
    "WanModel",
    "load_role_model",
]
