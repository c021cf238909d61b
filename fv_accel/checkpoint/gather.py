"""Collective gather of a sharded module into full tensors, and its diffusers-format save (``save_pretrained``
layout) from rank 0, during a run. The offline export of a checkpoint is ``fv_accel/export/``."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from fv_accel.runtime import Topology


def gather_full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the full (unsharded) state dict on rank 0 (on CPU), an empty dict on other ranks."""
    # full_state_dict gathers every DTensor into a plain tensor: a model's entries are all tensors.
    return cast(dict[str, torch.Tensor],
                get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def save_transformer_pretrained(
    module: torch.nn.Module, output_dir: str | Path, *, dtype: torch.dtype = torch.float32
) -> Path | None:
    """Collective: write ``module`` (FSDP2-sharded or not) as a diffusers model directory from rank 0.

    The model class and config come from the module itself (``module.config``); weights are cast to ``dtype``.
    Returns the directory on rank 0, None elsewhere.
    """
    state = gather_full_state_dict(module)
    rank = Topology.from_process_group().rank
    out = Path(output_dir)
    if rank == 0:
        cls = type(module)
        # FSDP2 swaps the class for a dynamic subclass ("FSDPWanTransformer3DModel"); build the original.
        base = next(c for c in cls.__mro__ if not c.__name__.startswith("FSDP") and hasattr(c, "from_config"))
        model = base.from_config(module.config)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        model.to(dtype)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    if dist.is_initialized():
        dist.barrier()
    return out if rank == 0 else None
