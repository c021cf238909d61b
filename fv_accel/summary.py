"""The ``--dry-run`` summary: roles, parameters, dtype, sharding, optimizers, data, peak-memory estimate."""

from __future__ import annotations

from typing import Any

import torch

from fv_accel.config import RunConfig
from fv_accel.memory import DEVICE_RESERVE_GIB, GiB, estimate_run, role_shapes_from_run


def _local_numel_bytes(module: torch.nn.Module) -> tuple[int, int, int, str]:
    from torch.distributed.tensor import DTensor

    total, local_bytes, trainable = 0, 0, 0
    dtypes: set[str] = set()
    for p in module.parameters():
        total += p.numel()
        local = p.to_local() if isinstance(p, DTensor) else p
        local_bytes += local.numel() * local.element_size()
        if p.requires_grad:
            trainable += p.numel()
        dtypes.add(str(p.dtype).replace("torch.", ""))
    return total, trainable, local_bytes, "/".join(sorted(dtypes))


def _device_memory_gib(cfg: RunConfig, accelerator: Any) -> tuple[float, str] | None:
    """The memory the estimate is checked against, and where the number comes from."""
    target = cfg.training.target_device_memory_gib
    if target is not None:
        return target, "training.target_device_memory_gib"
    device = accelerator.device
    if getattr(device, "type", "") == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory / GiB, props.name
    return None


def _shard_degree(method: Any, default: int) -> int:
    """Over how many ranks FSDP2 shards the student's parameters (the world size, or the shard group of an
    HSDP mesh); ``default`` when they are not DTensors."""
    from torch.distributed.tensor import DTensor

    for p in method.student.transformer.parameters():
        if isinstance(p, DTensor):
            degree = 1
            for dim, placement in enumerate(p.placements):
                if placement.is_shard():
                    degree *= p.device_mesh.size(dim)
            return degree
    return default


def memory_lines(cfg: RunConfig, accelerator: Any, built: Any) -> list[str]:
    """The peak-memory estimate (``fv_accel/memory.py``): per role, the largest terms, and a WARNING naming
    them when it does not fit the device (or ``training.target_device_memory_gib``)."""
    method = built.method
    mixed_precision = accelerator.mixed_precision
    shapes = role_shapes_from_run(method)
    if shapes is None:
        return ["estimated peak memory per device: unknown (no activation model for this model family)"]
    if built.data is None:
        return ["estimated peak memory per device: unknown (no data, so no latent shape)"]
    estimate = estimate_run(cfg, shapes, latent_shape=tuple(built.data.dataset.latent_shape),
                            shard_degree=_shard_degree(method, accelerator.num_processes),
                            mixed_precision=mixed_precision,
                            eager_backward=method.eager_backward,
                            backward_order=[r for r in method.trainable_roles if r in shapes],
                            cp_size=method.topology.cp_size if method.topology is not None else 1)
    mib = 2**20
    largest = ", ".join(f"{t.role} {t.name} {t.bytes / mib:.2f} MiB" for t in estimate.largest(3))
    lines = [f"estimated peak memory per device: {estimate.peak_bytes / mib:.2f} MiB "
             f"({estimate.peak_bytes / GiB:.2f} GiB) in the {estimate.phase}, activations included "
             f"(fv_accel/memory.py)"]
    for role, total in estimate.per_role().items():
        parts = ", ".join(f"{t.name} {t.bytes / mib:.2f}" for t in estimate.terms if t.role == role)
        lines.append(f"  {role:<10}{total / mib:>12.2f} MiB  ({parts})")
    lines.append(f"  largest terms: {largest}")
    budget = _device_memory_gib(cfg, accelerator)
    if budget is None:
        lines.append("  device memory: no CUDA device; set training.target_device_memory_gib to check a GPU")
        return lines
    gib, source = budget
    usable = gib - DEVICE_RESERVE_GIB
    if estimate.fits(gib):
        lines.append(f"  fits {gib:.2f} GiB ({source}) with {usable - estimate.peak_bytes / GiB:.2f} GiB to spare "
                     f"after a {DEVICE_RESERVE_GIB:g} GiB reserve")
    else:
        lines.append(f"WARNING: estimated peak memory {estimate.peak_bytes / GiB:.2f} GiB per device exceeds the "
                     f"{usable:.2f} GiB usable of {gib:.2f} GiB ({source}); largest terms: {largest}")
    return lines


def run_summary_lines(cfg: RunConfig, accelerator: Any, built: Any) -> list[str]:
    from torch.distributed.fsdp import FSDPModule

    from fv_accel.flops import format_flops, model_forward_flops

    method = built.method
    lines = [f"method: {cfg.method.name}   processes: {accelerator.num_processes}   "
             f"mixed precision: {accelerator.mixed_precision}   device: {accelerator.device}"]
    lines.append(f"{'role':<10}{'params':>14}{'trainable':>11}{'dtype':>18}{'sharding':>22}{'MiB/device':>12}"
                 f"{'fwd/sample':>16}")
    latent_shape = tuple(built.data.dataset.latent_shape) if built.data is not None else None
    for role, model in method.role_models.items():
        # every module of the role (both experts of a two-expert role)
        total, trainable, local_bytes, dtypes = _local_numel_bytes(torch.nn.ModuleDict(model.modules()))
        sharding = f"FSDP2 x{accelerator.num_processes}" if isinstance(model.transformer, FSDPModule) else "none"
        fwd = model_forward_flops(model, latent_shape, cfg.training.data.text_len) if latent_shape else None
        lines.append(f"{role:<10}{total:>14,}{'yes' if trainable else 'no':>11}{dtypes:>18}{sharding:>22}"
                     f"{local_bytes / 2**20:>12.2f}{format_flops(fwd) if fwd else '-':>16}")
    for role, opt_cfg in method.optimizer_configs().items():
        lines.append(f"optimizer[{role}]: AdamW lr={opt_cfg.learning_rate:g} betas={tuple(opt_cfg.betas)} "
                     f"wd={opt_cfg.weight_decay:g} schedule={opt_cfg.lr_scheduler} "
                     f"steps={method.num_optimizer_steps(role, cfg.training.loop.max_train_steps)}")
    if built.data is not None:
        ds = built.data.dataset
        lines.append(f"data: {len(ds)} rows ({ds.kind}) in {len(ds.files)} file(s), latent shape "
                     f"{list(ds.latent_shape)}, {built.data.batches_per_epoch} batches/epoch/rank of "
                     f"{cfg.training.data.train_batch_size}")
    loop = cfg.training.loop
    lines.append(f"steps: {loop.max_train_steps} x {loop.gradient_accumulation_steps} micro-batch(es); "
                 f"output: {cfg.training.checkpoint.output_dir}")
    validation = cfg.callbacks.validation
    if validation is not None and (validation.every_steps > 0 or validation.at_start):
        lines.append(f"validation: every {validation.every_steps} steps{' and at step 0' if validation.at_start else ''}"
                     f", {validation.num_samples} prompt(s), seed {validation.seed} -> "
                     f"{cfg.training.checkpoint.output_dir}/validation/step-<step>/")
    else:
        lines.append("validation: off")
    lines.append(f"trackers: {', '.join(cfg.training.tracker.backends) or 'none'}")
    lines += memory_lines(cfg, accelerator, built)
    return lines


def print_run_summary(cfg: RunConfig, accelerator: Any, built: Any) -> None:
    print("\n".join(run_summary_lines(cfg, accelerator, built)), flush=True)
