"""Global-norm gradient clipping for FSDP2 (DTensor) and plain parameters, on local shards.

``torch.nn.utils.clip_grad_norm_`` accepts DTensors, but every op then goes through DTensor dispatch (sharding
propagation, placement bookkeeping), which costs more than the arithmetic itself on small models. Here the
squared norms of the local shards are summed with foreach kernels, all-reduced once over the mesh dimensions the
gradients are sharded on (replicated dimensions already hold identical values), and the local shards are scaled
in place: the same numbers as the DTensor path, one collective per call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeAlias

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DeviceMesh, Placement

#: A DTensor gradient's (mesh, placements); None for a plain tensor.
_Layout: TypeAlias = "tuple[DeviceMesh, tuple[Placement, ...]] | None"


def _local_grads_and_groups(
    params: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[tuple[_Layout, list[int]]]]:
    """Local gradient tensors, and their indices grouped by (mesh, placements) (plain tensors: layout None)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    layouts: dict[_Layout, int] = {}
    groups: list[tuple[_Layout, list[int]]] = []
    local: list[torch.Tensor] = []
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            if not all(isinstance(pl, (Shard, Replicate)) for pl in grad.placements):
                raise NotImplementedError(f"gradient placements {grad.placements} (Partial) are not supported")
            key: _Layout = (grad.device_mesh, tuple(grad.placements))
            # The local shard itself: ``to_local()`` is an autograd Function call per gradient (~20 µs each),
            # pointless under no_grad; in-place scaling of this tensor scales the DTensor.
            grad = grad._local_tensor
        else:
            key = None
        if key not in layouts:
            layouts[key] = len(groups)
            groups.append((key, []))
        groups[layouts[key]][1].append(len(local))
        local.append(grad)
    return local, groups


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of ``params`` to a global L2 norm of ``max_norm`` (``<= 0``: only measure).

    Returns the global norm before clipping as a 0-dim float32 tensor (identical on every rank; no host
    sync), or None when no parameter has a gradient. Non-finite norms propagate (the loop decides).
    """
    from torch.distributed.tensor import Shard

    local, groups = _local_grads_and_groups(params)
    if not local:
        return None
    device = local[0].device
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for layout, members in groups:
        norms = torch._foreach_norm([local[i] for i in members], 2.0)
        sq = torch.stack([n.float() for n in norms]).square().sum()
        if layout is not None:
            mesh, placements = layout
            for dim, placement in enumerate(placements):
                if isinstance(placement, Shard) and mesh.size(dim) > 1:
                    dist.all_reduce(sq, group=mesh.get_group(dim))
        total_sq = total_sq + sq
    total = total_sq.sqrt()
    if max_norm > 0:
        # Same rule as torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for dtype in {g.dtype for g in local}:
            same = [g for g in local if g.dtype == dtype]
            torch._foreach_mul_(same, coef.to(dtype))
    return total
