"""Model families. Adding a family = one file here + one registry entry (checklist: ``README.md`` here)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from fv_accel.config import ModelConfig
from fv_accel.errors import CheckpointError, FvAccelError
from fv_accel.models.base import (
    ConditionBatch,
    Encoders,
    FrameRule,
    LatentStats,
    ModelBase,
    check_shared_latent_space,
)
from fv_accel.models.prepare import prepare_transformer
from fv_accel.models.wan import TINY_WAN_CONFIG, WAN_1_3B_CONFIG, WanModel

logger = logging.getLogger(__name__)

#: ``models.<role>.family`` → its class; the config's ``family`` Literal lists the same names
#: (``tests/test_family_interface.py`` checks that they agree).
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
                    latent_stats: LatentStats | None = None, on_meta: bool = False) -> ModelBase:
    """Load one role's transformer and prepare it (:func:`prepare_transformer`; sharding comes next). Trainable
    roles hold fp32 master weights; frozen roles, and the frozen base of a LoRA role (its adapters are fp32),
    may stay bf16. ``latent_stats`` already resolved (:func:`resolve_latent_stats`); None: the family resolves
    them. ``on_meta``: read no weights, parameters on the ``meta`` device (shard, then
    :func:`materialize_roles`)."""
    dtype = torch.float32
    frozen_base = not model_cfg.trainable or model_cfg.lora is not None
    if frozen_base and mixed_precision == "bf16" and model_cfg.frozen_dtype == "bf16":
        dtype = torch.bfloat16
    family = FAMILIES[model_cfg.family]
    try:
        model = family.from_config(role, model_cfg, dtype=dtype,
                                   latent_stats=latent_stats, on_meta=on_meta)
    except FvAccelError:
        raise
    except Exception as exc:  # diffusers/safetensors/huggingface_hub raise many types for unusable weights
        raise _load_error(role, model_cfg, exc) from None
    prepare_transformer(model)
    return model


def _load_error(role: str, model_cfg: ModelConfig, exc: Exception) -> CheckpointError:
    logger.debug("loading models.%s failed", role, exc_info=True)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return CheckpointError(f"models.{role}.init_from {model_cfg.init_from!r}: cannot load the transformer "
                           f"({type(exc).__name__}: {first_line})")


def is_on_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize_roles(models: Mapping[str, ModelBase], device: torch.device) -> None:
    """Allocate on ``device`` and fill from ``init_from`` every role built ``on_meta`` (and sharded since).
    Roles with the same weights (DMD2's student, critic and teacher) share one read of each slice; every rank
    reads only the rows of its own shards. LoRA adapters, in no file, are initialised here (after the fill)."""
    from fv_accel.models.lora import init_adapters
    from fv_accel.models.sharded_load import fill_from_safetensors, materialize

    groups: dict[tuple[str, str, str], list[str]] = {}
    for role, model in models.items():
        if is_on_meta(model.transformer):
            cfg = model.config
            groups.setdefault((cfg.family, cfg.init_from, cfg.subfolder), []).append(role)
    for (family, _, _), roles in groups.items():
        first = models[roles[0]]
        try:
            files = FAMILIES[family].weight_files(roles[0], first.config)
            for role in roles:
                materialize(models[role].transformer, device)
            fill_from_safetensors([models[role].transformer for role in roles], files,
                                  key=f"models.{roles[0]}.init_from")
            for role in roles:  # adapters are in no weight file: drawn now that their shards exist
                lora_cfg = models[role].config.lora
                if lora_cfg is not None:
                    init_adapters(models[role].transformer, role, lora_cfg)
        except FvAccelError:
            raise
        except Exception as exc:  # safetensors/huggingface_hub errors for unusable weights
            raise _load_error(roles[0], first.config, exc) from None
        logger.info("filled %s from %s (%d file(s))", ", ".join(roles), files[0].parent, len(files))


__all__ = [
    "FAMILIES",
    "TINY_WAN_CONFIG",
    "WAN_1_3B_CONFIG",
    "ConditionBatch",
    "Encoders",
    "FrameRule",
    "LatentStats",
    "ModelBase",
    "WanModel",
    "is_on_meta",
    "load_role_model",
    "materialize_roles",
    "prepare_transformer",
    "resolve_latent_stats",
]
