"""Model families. Adding a family = one file here + one registry entry."""

from __future__ import annotations

import torch

from fv_accel.config import ModelConfig
from fv_accel.models.base import ConditionBatch, ModelBase
from fv_accel.models.wan import TINY_WAN_CONFIG, WAN_1_3B_CONFIG, WanModel

FAMILIES: dict[str, type[ModelBase]] = {"wan": WanModel}


def load_role_model(role: str, model_cfg: ModelConfig, *, mixed_precision: str) -> ModelBase:
    """Load one role's transformer. Trainable roles hold fp32 master weights; frozen roles may stay bf16."""
    dtype = torch.float32
    if not model_cfg.trainable and mixed_precision == "bf16" and model_cfg.frozen_dtype == "bf16":
        dtype = torch.bfloat16
    family = FAMILIES[model_cfg.family]
    model = family.from_config(role, model_cfg, dtype=dtype)  # type: ignore[attr-defined]
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
