"""The one order every family's transformer is prepared in, between loading and sharding.

:func:`prepare_transformer` runs on every role right after ``family.from_config`` (``fv_accel.models.
load_role_model``); :func:`fv_accel.build.shard_roles` shards the prepared transformer next. It asks the family
only for its blocks (``ModelBase.transformer_blocks``), and drives the transformer through diffusers'
``ModelMixin`` hooks (``set_attention_backend``, ``enable_gradient_checkpointing``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from fv_accel.models.checkpointing import apply_activation_checkpointing

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

    from fv_accel.models.base import ModelBase


def prepare_transformer(model: ModelBase) -> None:
    """Prepare each of ``model.modules()`` (the transformer; both experts of a two-expert role) in place from
    ``models.<role>``, in this order:

    1. ``requires_grad`` and train mode from ``trainable``: first, because adapters decide trainability on top
       of it and dynamo's guards see requires_grad as it stays for the run.
    2. LoRA adapters (``lora``; ``fv_accel/models/lora.py``): after ``requires_grad``, which they override
       (only they train), before checkpointing and compilation act on the blocks that hold them. A transformer
       with loaded weights gets its adapters initialised here; one built on ``meta`` after it is filled.
    3. The attention backend (``attention_backend``), which compilation then traces.
    4. Activation checkpointing of the blocks (trainable roles; ``activation_checkpointing[_every]``).
    5. Regional compilation (``compile: regional``): each block, before ``fully_shard`` so FSDP2's hooks stay
       outside the compiled regions.
    6. Sharding follows in :func:`fv_accel.build.shard_roles`.
    """
    trained = model.trained_modules()
    adapted = model.lora_modules() if model.config.lora is not None else ()
    for name, module in model.modules().items():
        _prepare_module(model, name, cast("ModelMixin", module), trainable=name in trained, adapted=name in adapted)


def _prepare_module(model: ModelBase, name: str, transformer: ModelMixin, *, trainable: bool,
                    adapted: bool) -> None:
    """One of the role's modules (a two-expert role prepares each expert; only a trained one is checkpointed
    and, with ``lora``, adapted: a frozen expert of a LoRA role stays the plain base)."""
    cfg = model.config
    transformer.requires_grad_(trainable)
    transformer.train(trainable)
    if cfg.lora is not None and adapted:
        from fv_accel.models import lora

        lora.inject_adapters(model, transformer)
        base = next(p for n, p in transformer.named_parameters() if not lora.is_adapter_name(n))
        if not base.is_meta:
            lora.materialize_adapters(transformer, base.device)
            lora.init_adapters(transformer, lora.seed_key(model.role, name), cfg.lora)
    if cfg.attention_backend:
        transformer.set_attention_backend(cfg.attention_backend)
    blocks = model.transformer_blocks(transformer)
    if trainable:
        apply_activation_checkpointing(transformer, cfg.activation_checkpointing,
                                       cfg.activation_checkpointing_every, blocks=blocks)
    if cfg.compile == "regional":
        for block in blocks:
            block.compile()
