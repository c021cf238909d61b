"""LoRA adapters (peft) on a role's transformer: injection, initialisation after sharding, names, merging.

peft's ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by a ``peft.tuners.lora.Linear`` in
place, so the transformer stays a diffusers model (FSDP2 still wraps it by block class, export still builds
it): the base weight moves to ``<linear>.base_layer.weight`` and the adapter adds ``<linear>.lora_A.<adapter>``
([r, in]) and ``<linear>.lora_B.<adapter>`` ([out, r]) beside it. The adapters are built on the ``meta``
device (``low_cpu_mem_usage``: no allocation, no draw from torch's global generator) and initialised by
:func:`init_adapters` once their storage exists: after the base weights are loaded, or, for a role built on
``meta``, after sharding and filling (``fv_accel.models.materialize_roles``). The initial values are drawn in
full on every rank from a seed of the role and parameter name, and each rank keeps its own shard, so they do
not depend on the world size or the sharding.

Memory at 14B (Wan 2.1 14B: 40 blocks, width 5120, FFN 13824; the default targets, rank r). Each targeted
linear adds r·(in + out) parameters to A and B: per block 8 attention linears of 5120 → 5120 (8·r·10240) and
the two FFN linears (2·r·18944), 119 808·r per block, 4.8 M·r in all (77 M at r = 16, 0.55 % of 14 B).

- frozen base: stored like a frozen role, bf16 under bf16 mixed precision (``frozen_dtype``), 2 bytes per
  parameter: 28 GB for the whole role, sharded over the ranks (3.5 GB per GPU on 8), no gradients, no
  optimizer state.
- adapters: fp32 master weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes per parameter:
  1.2 GB at r = 16 for the whole role (sharded like the base). A full fine-tune of the same role holds
  14 B × 16 bytes = 224 GB of weights, gradients and moments.
- the checkpoint's ``roles.<role>.transformer`` holds the adapters only (:class:`fv_accel.checkpoint.states.
  ModelState` with ``trainable_only``): 4.8 M·r fp32 values, 307 MB at r = 16 (plus the optimizer's 2 × that).
  The base is not saved: a resume re-reads it from ``init_from``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fv_accel.errors import ConfigError

if TYPE_CHECKING:
    from fv_accel.config import LoraConfig
    from fv_accel.models.base import ModelBase

#: peft's name for the (single) adapter; it appears in parameter and checkpoint names (``lora_A.default``)
ADAPTER = "default"
_ADAPTER_PARAM = re.compile(rf"\.lora_[AB]\.{ADAPTER}\.weight$")
# Wrapper segments torch.compile / FSDP1-style wrappers add to parameter names (not in the state dict).
_WRAPPERS = re.compile(r"(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def is_adapter_name(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA A or B weight."""
    return bool(_ADAPTER_PARAM.search(name))


def base_weight_name(name: str) -> str:
    """A base tensor's name in the model's weight files: the name without peft's ``.base_layer`` segment."""
    return name.replace(".base_layer.", ".")


def target_modules(model: ModelBase) -> list[str]:
    """The role's LoRA targets: ``models.<role>.lora.target_modules``, or the family's default."""
    lora = model.config.lora
    assert lora is not None
    return list(lora.target_modules) if lora.target_modules is not None else list(model.lora_target_modules)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")  # peft's rule for a list of target names


def adapted_modules(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``module`` that ``targets`` select (peft's matching)."""
    return [name for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and any(_matches(name, t) for t in targets)]


def peft_config(lora: LoraConfig, targets: Sequence[str]) -> Any:
    """The ``peft.LoraConfig`` of ``models.<role>.lora`` (also written into a LoRA export's metadata)."""
    from peft import LoraConfig as PeftLoraConfig

    # peft annotates lora_alpha as int but only ever divides by it; a float alpha is kept exact.
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha,  # type: ignore[arg-type]
                          lora_dropout=lora.dropout, target_modules=list(targets), init_lora_weights=True)


def seed_key(role: str, module: str) -> str:
    """What :func:`init_adapters` seeds a module's adapters by: the role for its ``transformer`` (so a
    one-transformer role draws as before), ``<role>.<module>`` for another (a second expert draws its own A)."""
    return role if module == "transformer" else f"{role}.{module}"


def inject_adapters(model: ModelBase, transformer: nn.Module) -> None:
    """Add the role's adapters to ``transformer`` (one of ``model.modules()``: a trained expert of a two-expert
    role) in place (on ``meta``; :func:`init_adapters` fills them) and make them its only trainable
    parameters. ConfigError (exit 2) naming the targets that select no linear layer."""
    from peft import inject_adapter_in_model

    lora = model.config.lora
    assert lora is not None
    targets = target_modules(model)
    linears = [name for name, sub in transformer.named_modules() if isinstance(sub, nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if unmatched:
        raise ConfigError(f"models.{model.role}.lora.target_modules: {unmatched} match no linear layer of the "
                          f"{type(transformer).__name__} (its linear layers end in e.g. "
                          f"{sorted({n.rpartition('.')[2] for n in linears})[:8]}; a target is a module name or "
                          "its dotted suffix such as 'to_q' or 'ffn.net.2')")
    inject_adapter_in_model(peft_config(lora, targets), transformer, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    transformer.requires_grad_(False)
    for name, param in transformer.named_parameters():
        if is_adapter_name(name):
            param.requires_grad_(True)


def has_adapters(module: nn.Module) -> bool:
    return any(is_adapter_name(name) for name, _ in module.named_parameters())


def materialize_adapters(module: nn.Module, device: torch.device) -> None:
    """Give the adapters of a transformer whose base weights are loaded storage on ``device`` (uninitialised;
    :func:`init_adapters` fills them)."""
    for sub in module.modules():
        for attr, param in list(sub.named_parameters(recurse=False)):
            if param.is_meta:
                sub.register_parameter(attr, nn.Parameter(torch.empty_like(param, device=device),
                                                          requires_grad=param.requires_grad))


@torch.no_grad()
def init_adapters(module: nn.Module, role: str, lora: LoraConfig) -> None:
    """Initialise every adapter weight of ``module`` (plain or FSDP2-sharded): B = 0, so the adapted model
    starts as the base; A Kaiming-uniform (bound 1/√in, peft's and ``nn.Linear``'s default) or N(0, 1/r²).
    Each full tensor is drawn from a generator seeded by ``role`` (:func:`seed_key` for a role's second
    module) and the parameter's name, and each rank copies its own shard of it: the same values for any
    number of ranks."""
    from fv_accel.models.sharded_load import local_index

    for raw_name, param in module.named_parameters():
        name = _WRAPPERS.sub("", raw_name)
        if not is_adapter_name(name):
            continue
        full = torch.zeros(param.shape, dtype=torch.float32)
        if ".lora_A." in name:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{role}/{name}".encode()))
            if lora.init == "gaussian":
                full.normal_(0.0, 1.0 / lora.rank, generator=generator)
            else:
                bound = 1.0 / math.sqrt(param.shape[1])
                full.uniform_(-bound, bound, generator=generator)
        local, index = local_index(param)
        if local.numel():
            local.copy_(full[index])


@torch.no_grad()
def merge_into(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], *, rank: int,
               alpha: float) -> dict[str, torch.Tensor]:
    """``base`` (a transformer's state dict as in its weight files) with every adapted weight replaced by
    ``W + (alpha / rank)·B A``, computed in fp32 and cast back to W's dtype. ``adapters``: the training names
    (``<linear>.lora_A.default.weight``); every pair must find its base weight."""
    scale = alpha / rank
    merged = dict(base)
    for name_a, lora_a in adapters.items():
        if ".lora_A." not in name_a:
            continue
        linear = name_a.split(f".lora_A.{ADAPTER}.")[0]
        lora_b = adapters[name_a.replace(".lora_A.", ".lora_B.")]
        key = base_weight_name(f"{linear}.weight")
        weight = merged[key]
        merged[key] = (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)
    return merged


def diffusers_lora_state_dict(adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors under the names diffusers' ``load_lora_adapter`` expects for the transformer's own
    modules (peft's names without the adapter name: ``blocks.0.attn1.to_q.lora_A.weight``)."""
    return {name.replace(f".{ADAPTER}.", "."): tensor for name, tensor in adapters.items()}
