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
from fv_accel.models.wan_causal import CausalWanModel

logger = logging.getLogger(__name__)

#: ``models.<role>.family`` → its class; the config's ``family`` Literal lists the same names
#: (``tests/test_family_interface.py`` checks that they agree).
FAMILIES: dict[str, type[ModelBase]] = {"wan": WanModel, "wan_causal": CausalWanModel}


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
    frozen_dtype = torch.float32
    if mixed_precision == "bf16" and model_cfg.frozen_dtype == "bf16":
        frozen_dtype = torch.bfloat16
    frozen_base = not model_cfg.trainable or model_cfg.lora is not None
    dtype = frozen_dtype if frozen_base else torch.float32
    family = FAMILIES[model_cfg.family]
    try:
        model = family.from_config(role, model_cfg, dtype=dtype, latent_stats=latent_stats, on_meta=on_meta,
                                   frozen_dtype=frozen_dtype)
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
    from fv_accel.models.lora import init_adapters, seed_key
    from fv_accel.models.sharded_load import fill_from_safetensors, materialize

    # (family, init_from, subfolder) → the (role, module) pairs filled from those files: a two-expert role's
    # experts come from two subfolders.
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for role, model in models.items():
        for name, module in model.modules().items():
            if is_on_meta(module):
                cfg = model.module_config(name)
                groups.setdefault((cfg.family, cfg.init_from, cfg.subfolder), []).append((role, name))
    for (family, _, _), pairs in groups.items():
        first_role, first_name = pairs[0]
        first_cfg = models[first_role].module_config(first_name)
        modules = [models[role].modules()[name] for role, name in pairs]
        try:
            files = FAMILIES[family].weight_files(first_role, first_cfg)
            for module in modules:
                materialize(module, device)
            fill_from_safetensors(modules, files, key=f"models.{first_role}.init_from")
            for (role, name), module in zip(pairs, modules, strict=True):  # adapters are in no file: drawn now
                lora_cfg = models[role].config.lora
                if lora_cfg is not None:
                    init_adapters(module, seed_key(role, name), lora_cfg)
        except FvAccelError:
            raise
        except Exception as exc:  # safetensors/huggingface_hub errors for unusable weights
            raise _load_error(first_role, first_cfg, exc) from None
        logger.info("filled %s from %s (%d file(s))", ", ".join(f"{r}.{n}" for r, n in pairs), files[0].parent,
                    len(files))


__all__ = [
    "CausalWanModel",
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
