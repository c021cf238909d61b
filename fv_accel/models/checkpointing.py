"""Activation checkpointing of transformer blocks (``models.<role>.activation_checkpointing``, trainable roles).

- ``full``: each block keeps only its inputs; backward re-runs the whole block first.
- ``selective``: each block keeps the outputs of its FLOP-heavy ops (matrix multiplies and attention) and
  recomputes the rest in backward (norms, activations, rotary embedding, modulation, dtype casts). Those
  elementwise ops produce most of a block's saved bytes but cost a few percent of its FLOPs, so selective sits
  between ``off`` (fastest, most memory) and ``full`` (least memory, one extra forward).

Both go through diffusers' own hook (``enable_gradient_checkpointing``) with non-reentrant
``torch.utils.checkpoint``; selective adds a policy (``create_selective_checkpoint_contexts``) that decides per
ATen op whether its output is saved or recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

#: ATen ops whose outputs selective checkpointing keeps (those a block spends its FLOPs in); names that a
#: build of PyTorch lacks are skipped.
SAVED_OP_NAMES = (
    "mm", "addmm", "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",
)


def _saved_ops() -> frozenset[Any]:
    ops = []
    for name in SAVED_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.append(packet.default)
    return frozenset(ops)


_SAVED_OPS = _saved_ops()


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_policy)


def selective_checkpoint(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' ``gradient_checkpointing_func`` signature: run ``module(*args)`` under selective checkpointing."""
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=_selective_context)


def full_checkpoint(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' ``gradient_checkpointing_func`` signature: run ``module(*args)`` keeping only its inputs."""
    return checkpoint(module.__call__, *args, use_reentrant=False)


def apply_activation_checkpointing(transformer: ModelMixin, mode: str, every: int = 1, *,
                                   blocks: Sequence[torch.nn.Module] | None = None) -> None:
    """Set a diffusers transformer's block checkpointing: ``off``, ``full`` or ``selective``, applied to blocks
    0, ``every``, 2·``every``, ... of ``blocks`` (the family's ``transformer_blocks()``; None: the
    transformer's ``blocks`` list); the others run as usual."""
    if mode == "off":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing mode {mode!r}: expected off, full or selective")
    if every < 1:
        raise ValueError(f"activation checkpointing every {every} blocks: expected >= 1")
    policy = full_checkpoint if mode == "full" else selective_checkpoint
    # Blocks keep their identity through FSDP2's fully_shard and Module.compile (both act in place).
    if blocks is None:
        blocks = transformer.blocks
    chosen = {id(block) for i, block in enumerate(blocks) if i % every == 0}

    def checkpoint_some(module: Any, *args: Any) -> Any:
        return policy(module, *args) if id(module) in chosen else module(*args)

    transformer.enable_gradient_checkpointing(checkpoint_some if every > 1 else policy)
