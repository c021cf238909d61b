"""The ``--dry-run`` summary: roles, parameters, dtype, sharding, optimizers, data, memory estimate."""

from __future__ import annotations

from typing import Any

import torch

from fv_accel.config import RunConfig


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


def _largest_block_numel(module: torch.nn.Module, block_class_names: tuple[str, ...]) -> int:
    """Parameters of the largest FSDP unit (a transformer block), the unit FSDP2 all-gathers at once."""
    sizes = [sum(p.numel() for p in m.parameters()) for m in module.modules()
             if type(m).__name__.removeprefix("FSDP") in block_class_names]
    return max(sizes, default=0)


def memory_estimate(cfg: RunConfig, accelerator: Any, method: Any) -> dict[str, int]:
    """Bytes per device, before activations: each role's weight shard; for a trainable role its gradient
    shard and AdamW's two moment shards (each as large as the fp32 weight shard); an EMA shadow of the
    student when ``callbacks.ema`` is on; and FSDP2's unsharded working set: the largest block all-gathered
    in the compute dtype, twice (the block running plus the one prefetched)."""
    compute_bytes = 2 if accelerator.mixed_precision == "bf16" else 4
    parts = {"weights": 0, "grads_and_adamw": 0, "ema": 0, "unsharded_blocks": 0}
    largest_block = 0
    for role, model in method.role_models.items():
        _, trainable, local_bytes, _ = _local_numel_bytes(model.transformer)
        parts["weights"] += local_bytes
        if trainable:
            parts["grads_and_adamw"] += 3 * local_bytes
            if role == "student" and cfg.callbacks.ema is not None:
                parts["ema"] += local_bytes
        largest_block = max(largest_block,
                            _largest_block_numel(model.transformer, tuple(model.block_class_names)))
    parts["unsharded_blocks"] = 2 * largest_block * compute_bytes
    parts["total"] = sum(parts.values())
    return parts


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
        total, trainable, local_bytes, dtypes = _local_numel_bytes(model.transformer)
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
    mem = memory_estimate(cfg, accelerator, method)
    lines.append("estimated memory per device, before activations: "
                 f"{mem['total'] / 2**20:.2f} MiB (weights {mem['weights'] / 2**20:.2f}, "
                 f"grads+AdamW {mem['grads_and_adamw'] / 2**20:.2f}, EMA {mem['ema'] / 2**20:.2f}, "
                 f"unsharded blocks {mem['unsharded_blocks'] / 2**20:.2f})")
    return lines


def print_run_summary(cfg: RunConfig, accelerator: Any, built: Any) -> None:
    print("\n".join(run_summary_lines(cfg, accelerator, built)), flush=True)
