"""Export one role of a DCP training checkpoint as a diffusers model (or a complete diffusers pipeline).

Runs in one plain process with no process group and no GPU: DCP reshards whatever number of ranks wrote the
checkpoint into full tensors here. Only the role's weights are read (not optimizer state), each straight into
its export dtype; the model is built on the meta device from the role's ``init_from`` config, so peak memory is
one copy of the weights in the export dtype.

Output (docs/export.md):
    <output>/transformer/      diffusers config.json + safetensors (sharded with an index past max_shard_size)
    <output>/README.md         model card
    <output>/model_index.json, vae/, text_encoder/, tokenizer/, scheduler/ ...
                               when the role's init_from is a full diffusers pipeline

Everything is written into a temporary sibling directory and renamed into place, so a failed export never
leaves a half-written ``<output>``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fv_accel.checkpoint import resolve_checkpoint
from fv_accel.errors import ConfigError
from fv_accel.export.card import build_model_card
from fv_accel.export.diffusers import (
    DTYPES,
    build_transformer,
    export_dtype_of,
    family_of,
    pipeline_source,
    scheduler_of,
    transformer_class,
    write_pipeline,
)
from fv_accel.export.reader import EXPORT_ROLES, model_role_of, read_export_state_dict, read_run

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    output: Path
    role: str
    step: int
    dtype: str
    is_pipeline: bool
    denoising_steps: list[int] | None
    num_parameters: int
    files: list[str] = field(default_factory=list)


def is_previous_export(path: Path) -> bool:
    return (path / "transformer" / "config.json").is_file() and (path / "README.md").is_file()


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    role: str,
    output: str | os.PathLike[str],
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    repo_id: str | None = None,
) -> ExportResult:
    """Export ``role`` of a checkpoint (or an output dir's newest complete one) into ``output``.

    ``output`` must not exist, be empty, or hold an earlier export (which is then replaced atomically).
    ``repo_id`` only names the model in the card's usage snippet.
    """
    if role not in EXPORT_ROLES:
        raise ConfigError(f"--role must be one of {', '.join(EXPORT_ROLES)}, got {role!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_previous_export(out))):
        raise ConfigError(f"--output {str(out)!r} exists and is not an earlier export; choose a new directory")
    ckpt = resolve_checkpoint(str(checkpoint), "") if str(checkpoint) else None
    if ckpt is None:
        raise ConfigError("--checkpoint is required")
    run = read_run(ckpt, role)
    config, step = run.config, run.step
    model_cfg = config["models"][model_role_of(role)]
    family = family_of(model_cfg)

    # Each tensor is read straight into its export dtype: peak ≈ one copy of the model in that dtype.
    dtype_of = export_dtype_of(transformer_class(family), DTYPES[dtype])
    state = read_export_state_dict(ckpt, role, dtype_of)
    model = build_transformer(model_cfg, state, DTYPES[dtype])
    del state
    num_parameters = sum(p.numel() for p in model.parameters())

    denoising_steps, scheduler_cfg = scheduler_of(config, role)
    base = pipeline_source(model_cfg["init_from"], family)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
        del model
        if base is not None:
            write_pipeline(base, tmp, family=family, subfolder=model_cfg.get("subfolder") or "transformer",
                           scheduler_cfg=scheduler_cfg)
        card = build_model_card(
            config=config, role=role, step=step, world_size=run.world_size, dtype=dtype,
            is_pipeline=base is not None, denoising_steps=denoising_steps, scheduler_cfg=scheduler_cfg,
            base_source=base, repo_id=repo_id, output=out,
        )
        card.save(tmp / "README.md")
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp (and safetensors) create owner-only modes
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s of %s (step %d, %s, %d parameters) to %s", role, ckpt, step, dtype, num_parameters,
                out)
    return ExportResult(output=out, role=role, step=step, dtype=dtype, is_pipeline=base is not None,
                        denoising_steps=denoising_steps, num_parameters=num_parameters, files=files)
