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
A role trained with LoRA (``models.<role>.lora``) instead gives, unless ``--merge-lora``:
    <output>/pytorch_lora_weights.safetensors   the adapters in diffusers' LoRA format (load_lora_weights)
    <output>/transformer_2/pytorch_lora_weights.safetensors
                                                a two-expert role's low-noise expert's adapters, when it
                                                trained (load_lora_weights(..., load_into_transformer_2=True))
    <output>/README.md                          model card naming the base to load them onto

A causal student (``family: wan_causal``) also gets ``<output>/causal_config.json`` (block size, window, sinks,
denoising steps, context noise, fv_accel version: what ``fv_accel/causal_pipeline.py`` streams with) and no
``model_index.json``: no diffusers pipeline samples it (``WanPipeline`` would run it bidirectionally).

Everything is written into a temporary sibling directory and renamed into place, so a failed export never
leaves a half-written ``<output>``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fv_accel.causal_pipeline import CAUSAL_CONFIG_FILE
from fv_accel.checkpoint import resolve_checkpoint
from fv_accel.checkpoint.layout import saved_modules
from fv_accel.config import CausalConfig
from fv_accel.errors import ConfigError
from fv_accel.export.card import build_model_card
from fv_accel.export.diffusers import (
    DTYPES,
    LORA_WEIGHTS_FILE,
    build_transformer,
    expert_components,
    export_dtype_of,
    family_of,
    lora_config_of,
    lora_weight_name,
    merged_state_dict,
    pipeline_source,
    scheduler_of,
    transformer_class,
    write_lora,
    write_pipeline,
)
from fv_accel.export.reader import EXPORT_ROLES, RunRecord, model_role_of, read_export_state_dict, read_run

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
    is_lora: bool = False
    """A diffusers LoRA (``pytorch_lora_weights.safetensors``) to load onto the base, not a full model."""


def is_previous_export(path: Path) -> bool:
    return (path / "README.md").is_file() and ((path / "transformer" / "config.json").is_file()
                                               or (path / LORA_WEIGHTS_FILE).is_file()
                                               or (path / lora_weight_name("transformer_2")).is_file())


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    role: str,
    output: str | os.PathLike[str],
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    repo_id: str | None = None,
    merge_lora: bool = False,
) -> ExportResult:
    """Export ``role`` of a checkpoint (or an output dir's newest complete one) into ``output``.

    ``output`` must not exist, be empty, or hold an earlier export (which is then replaced atomically).
    ``repo_id`` only names the model in the card's usage snippet. A role trained with LoRA is written as a
    diffusers LoRA (``pytorch_lora_weights.safetensors`` + card) to load onto its base; with ``merge_lora`` as
    the base with the adapters merged in, like a full fine-tune's export.
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
    model_role = model_role_of(role)
    model_cfg = config["models"][model_role]
    family = family_of(model_cfg)
    lora = lora_config_of(model_role, model_cfg)
    if merge_lora and lora is None:
        raise ConfigError(f"--merge-lora: models.{model_role} of the run has no lora section (a full fine-tune: "
                          "export it without --merge-lora)")
    if lora is not None and not merge_lora:
        return _export_lora(run, role=role, out=out, dtype=dtype, repo_id=repo_id, lora=lora)

    denoising_steps, scheduler_cfg = scheduler_of(config, role)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    num_parameters = 0

    def write_module(module: str, module_cfg: dict[str, Any]) -> None:
        nonlocal num_parameters
        if lora is not None:  # adapters (fp32 as saved) merged into the base, then exported like a full model
            state = merged_state_dict(model_role, module_cfg, read_export_state_dict(ckpt, role, module=module),
                                      lora[0])
        else:
            # Each tensor is read straight into its export dtype: peak ≈ one copy of the model in that dtype.
            dtype_of = export_dtype_of(transformer_class(family), DTYPES[dtype])
            state = read_export_state_dict(ckpt, role, dtype_of, module=module)
        model = build_transformer(module_cfg, state, DTYPES[dtype])
        del state
        num_parameters += sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / module, safe_serialization=True, max_shard_size=max_shard_size)

    try:
        subfolder = model_cfg.get("subfolder") or "transformer"
        saved = saved_modules(ckpt, model_role)
        if "transformer" in saved:  # first: a base that vanished fails here, naming init_from
            write_module("transformer", model_cfg)
        base = pipeline_source(model_cfg["init_from"], family)
        experts = expert_components(base, family, subfolder)
        # A two-expert role: each trained expert (those with weights in the checkpoint) from the checkpoint.
        written = [m for m in experts if m in saved] if len(experts) > 1 else ["transformer"]
        for module in written:
            if module != "transformer":
                write_module(module, {**model_cfg, "subfolder": module})
            elif "transformer" not in saved:
                write_module("transformer", model_cfg)  # reports the missing weights
        if base is not None:
            write_pipeline(base, tmp, family=family, subfolder=subfolder, scheduler_cfg=scheduler_cfg,
                           experts=experts if len(experts) > 1 else None, written=written)
        causal = causal_config_of(config, model_role, denoising_steps) if family.streams else None
        if causal is not None:
            (tmp / "model_index.json").unlink(missing_ok=True)
            (tmp / CAUSAL_CONFIG_FILE).write_text(json.dumps(causal, indent=2) + "\n")
        card = build_model_card(
            config=config, role=role, step=step, world_size=run.world_size, dtype=dtype,
            is_pipeline=base is not None, denoising_steps=denoising_steps, scheduler_cfg=scheduler_cfg,
            base_source=base, repo_id=repo_id, output=out, causal=causal,
        )
        card.save(tmp / "README.md")
        files = _place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s of %s (step %d, %s, %d parameters) to %s", role, ckpt, step, dtype, num_parameters,
                out)
    return ExportResult(output=out, role=role, step=step, dtype=dtype, is_pipeline=base is not None,
                        denoising_steps=denoising_steps, num_parameters=num_parameters, files=files)


def causal_config_of(config: dict[str, Any], model_role: str, denoising_steps: list[int] | None) -> dict[str, Any]:
    """What an exported causal student streams with (``causal_config.json``)."""
    from importlib.metadata import PackageNotFoundError, version

    model_cfg = config["models"][model_role]
    causal = CausalConfig.model_validate(model_cfg.get("causal") or {})  # its defaults, in one place
    try:
        fv_version = version("fv_accel")
    except PackageNotFoundError:
        fv_version = "unknown"
    return {
        "family": "wan_causal",
        "num_frames_per_block": causal.num_frames_per_block,
        "local_attn_frames": causal.local_attn_frames,
        "sink_frames": causal.sink_frames,
        "denoising_steps": denoising_steps,
        "context_noise": config.get("method", {}).get("context_noise"),
        "flow_shift": model_cfg.get("flow_shift"),
        "text_len": config.get("training", {}).get("data", {}).get("text_len"),
        "fv_accel_version": fv_version,
    }


def _place(tmp: Path, out: Path) -> list[str]:
    """Make ``tmp`` readable and rename it to ``out`` (replacing an earlier export); its files, relative."""
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
    return files


def _export_lora(run: RunRecord, *, role: str, out: Path, dtype: str, repo_id: str | None,
                 lora: tuple[Any, list[str]]) -> ExportResult:
    """A LoRA role's adapters as a diffusers LoRA directory (``pytorch_lora_weights.safetensors``, README); a
    two-expert role's: one file per trained expert (:func:`lora_weight_name`), a frozen expert has none."""
    ckpt, world_size = run.checkpoint, run.world_size
    model_role = model_role_of(role)
    model_cfg = run.config["models"][model_role]
    family = family_of(model_cfg)
    experts = saved_modules(ckpt, model_role) or ["transformer"]  # none saved: the reader names what is missing
    adapters = {module: read_export_state_dict(ckpt, role, module=module) for module in experts}
    num_parameters = sum(t.numel() for state in adapters.values() for t in state.values())
    denoising_steps, scheduler_cfg = scheduler_of(run.config, role)
    local_base = Path(model_cfg["init_from"]).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for module, state in adapters.items():
            write_lora(tmp, family, state, lora[0], lora[1], DTYPES[dtype], module=module)
        card = build_model_card(
            config=run.config, role=role, step=run.step, world_size=world_size, dtype=dtype, is_pipeline=False,
            denoising_steps=denoising_steps, scheduler_cfg=scheduler_cfg,
            base_source=local_base if local_base.is_dir() else None, repo_id=repo_id, output=out, is_lora=True,
            lora_files={module: lora_weight_name(module) for module in adapters},
        )
        card.save(tmp / "README.md")
        files = _place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported the LoRA of %s of %s (step %d, %s, %d adapter parameters) to %s", role, ckpt, run.step,
                dtype, num_parameters, out)
    return ExportResult(output=out, role=role, step=run.step, dtype=dtype, is_pipeline=False,
                        denoising_steps=denoising_steps, num_parameters=num_parameters, files=files, is_lora=True)
