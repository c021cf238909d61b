"""Fill FSDP2-sharded transformers straight from their safetensors files, each rank reading only its rows.

Roles are built on the ``meta`` device, sharded there (no memory), then materialised here: the host never holds
a full copy of any role, so peak host RAM per rank is the roles' shards plus one tensor slice. See
:func:`fv_accel.build.load_roles` for why this path and not Accelerate's ``cpu_ram_efficient_loading``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fv_accel.errors import CheckpointError
from fv_accel.models.lora import base_weight_name, is_adapter_name

#: diffusers' file names for a model's weights (one file, or shards listed by an index).
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def diffusers_weight_files(init_from: str, subfolder: str, *, key: str) -> list[Path]:
    """The safetensors files of a diffusers model (``init_from``/``subfolder``): a local directory, or a Hub id
    whose ``subfolder`` alone is fetched (or found in the cache under ``HF_HUB_OFFLINE=1``)."""
    local = Path(init_from).expanduser()
    if local.exists():
        folder = local / subfolder
    else:
        from huggingface_hub import snapshot_download

        prefix = f"{subfolder}/" if subfolder else ""
        patterns = [f"{prefix}config.json", f"{prefix}diffusion_pytorch_model*.safetensors", f"{prefix}{WEIGHTS_INDEX}"]
        folder = Path(snapshot_download(init_from, allow_patterns=patterns)) / subfolder
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{key}: cannot read {index} ({type(exc).__name__}: {exc})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    raise CheckpointError(f"{key}: {folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX} (only safetensors weights "
                          "are supported)")


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built (sharded) module's parameters on ``device``, uninitialised. Buffers keep the values
    the constructor computed: Wan's RoPE tables are non-persistent, no file has them."""
    buffers = {name: buf for name, buf in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name])


def local_index(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """``tensor``'s local storage and the slice of the full tensor it holds (FSDP2/HSDP placements: ``Shard``
    along a dim, as ``torch.chunk`` splits it; ``Replicate``). A plain tensor holds all of it."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor, tuple(slice(0, n) for n in tensor.shape)
    index = [slice(0, n) for n in tensor.shape]
    local = tensor.to_local()
    sharded_dims: set[int] = set()
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard() or placement.dim in sharded_dims:  # type: ignore[attr-defined]
            raise CheckpointError(f"cannot load into placements {tensor.placements}: only Shard and Replicate")
        dim = placement.dim  # type: ignore[attr-defined]
        sharded_dims.add(dim)
        chunk = math.ceil(tensor.shape[dim] / tensor.device_mesh.size(mesh_dim))
        start = min(chunk * tensor.device_mesh.get_local_rank(mesh_dim), tensor.shape[dim])
        index[dim] = slice(start, start + local.shape[dim])
    return local, tuple(index)


@contextmanager
def _open(file: Path) -> Iterator[Any]:
    """``safe_open``, naming the file in its errors (safetensors' own messages do not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            yield handle
    except CheckpointError:
        raise
    except Exception as exc:  # SafetensorError, OSError: unreadable or truncated file
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise OSError(f"{file}: {type(exc).__name__}: {first_line}") from exc


def fill_from_safetensors(modules: Sequence[nn.Module], files: Sequence[Path], *, key: str) -> None:
    """Copy every parameter and persistent buffer of ``modules`` (same architecture, materialised) from
    ``files``, cast to each destination's dtype (LoRA adapters excepted). Each slice is read once for all
    modules (roles with the same ``init_from``) and the file is mapped per tensor, so at most one slice sits in
    host memory."""
    location: dict[str, Path] = {}
    for file in files:
        with _open(file) as handle:
            location.update(dict.fromkeys(handle.keys(), file))
    # Keyed by the names in the files: LoRA adapters are in none, and a base weight under peft's ``base_layer``
    # has its plain name there (fv_accel/models/lora.py); roles with and without adapters share the reads.
    states = [{base_weight_name(name): tensor for name, tensor in module.state_dict(keep_vars=True).items()
               if not is_adapter_name(name)} for module in modules]
    with torch.no_grad():
        for name, first in states[0].items():
            if name not in location:
                raise CheckpointError(f"{key}: {files[0].parent} has no tensor {name!r}")
            with _open(location[name]) as handle:
                stored = handle.get_slice(name)
                if list(stored.get_shape()) != list(first.shape):
                    raise CheckpointError(f"{key}: {name!r} has shape {stored.get_shape()} in {location[name]}, "
                                          f"the model expects {list(first.shape)}")
                read: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}
                for state in states:
                    local, index = local_index(state[name])
                    if local.numel() == 0:
                        continue
                    bounds = tuple((part.start, part.stop) for part in index)
                    if bounds not in read:
                        read[bounds] = stored[index] if index else handle.get_tensor(name)
                    local.copy_(read[bounds])
