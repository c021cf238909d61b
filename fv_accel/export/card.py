"""The model card (``README.md``) of an export: what was trained, its denoising schedule, a usage snippet with
the family's diffusers pipeline and model classes, and the run's settings."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fv_accel.checkpoint.layout import METADATA_FILE, checkpoint_dir_name
from fv_accel.config import is_hub_id
from fv_accel.export.diffusers import LORA_WEIGHTS_FILE, family_of
from fv_accel.export.reader import model_role_of
from fv_accel.sampling import scheduler_timesteps

CARD_TAGS = ["fv-accel", "diffusers", "text-to-video", "distillation"]
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def hub_id_of(source: str) -> str | None:
    """A Hub repo id for ``source``: itself if it is one, or the repo of an HF-cache snapshot path."""
    if not Path(source).expanduser().exists():
        return source if is_hub_id(source) else None
    match = _HF_CACHE_SNAPSHOT.search(str(Path(source).expanduser().resolve()))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _base_license(source: Path | None) -> str | None:
    if source is None or not (source / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(source / "README.md").data.to_dict().get("license")
    except Exception:  # a base README without card metadata
        return None


def method_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that define what a run did, for the card (method section plus the training knobs)."""
    method = dict(config.get("method", {}))
    training = config.get("training", {})
    settings: dict[str, Any] = {k: v for k, v in method.items() if not isinstance(v, dict)}
    optimizer = training.get("optimizer", {})
    settings["learning_rate"] = optimizer.get("learning_rate")
    settings["train_batch_size (per process)"] = training.get("data", {}).get("train_batch_size")
    settings["gradient_accumulation_steps"] = training.get("loop", {}).get("gradient_accumulation_steps")
    return settings


def build_model_card(
    *,
    config: dict[str, Any],
    role: str,
    step: int,
    world_size: int,
    dtype: str,
    is_pipeline: bool,
    denoising_steps: list[int] | None,
    scheduler_cfg: dict[str, Any] | None,
    base_source: Path | None,
    repo_id: str | None,
    output: Path,
    is_lora: bool = False,
    causal: dict[str, Any] | None = None,
    lora_files: dict[str, str] | None = None,
) -> Any:
    """``lora_files``: a LoRA export's ``{module: file}`` (default: ``transformer``'s one file at the top);
    the snippet loads each into its module (``load_into_transformer_2`` for the low-noise expert)."""
    from huggingface_hub import ModelCard, ModelCardData

    models = config["models"]
    model_role = model_role_of(role)
    family = family_of(models[model_role])
    pipeline_cls, model_cls = family.diffusers_pipeline_class(), family.diffusers_model_class()
    base_init = models.get("teacher", models[model_role])["init_from"]
    base_id = hub_id_of(base_init) or hub_id_of(models[model_role]["init_from"])
    method = config.get("method", {}).get("name", "unknown")
    card_data = ModelCardData(
        base_model=base_id,
        license=_base_license(base_source) or "other",
        library_name="diffusers",
        pipeline_tag="text-to-video",
        tags=list(CARD_TAGS) + [method] + (["lora"] if is_lora else []),
    )
    where = repo_id or str(output)
    settings = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in method_settings(config).items())
    ema = config.get("callbacks", {}).get("ema")
    what = {"student": "the student (generator)", "critic": "the critic (fake score model)",
            "ema": f"the EMA of the student (decay {ema['decay'] if ema else '?'})"}[role]
    num_steps = len(denoising_steps) if denoising_steps else None
    if denoising_steps:
        uniform = scheduler_cfg is not None and [round(t) for t in scheduler_timesteps(
            scheduler_cfg, len(denoising_steps))] == list(denoising_steps)
        schedule = (f"Few-step sampling at timesteps `{denoising_steps}` (σ = t/1000, no shift): at each step the "
                    "model's x0 prediction is re-noised to the next timestep with fresh noise.")
        if is_pipeline:
            schedule += (f" The bundled scheduler (`FlowMatchEulerDiscreteScheduler`, `stochastic_sampling=True`, "
                         f"`shift=1.0`{', `shift_terminal=' + str(scheduler_cfg.get('shift_terminal')) + '`' if scheduler_cfg and 'shift_terminal' in scheduler_cfg else ''}) "
                         f"runs {'exactly this schedule' if uniform else 'the evenly spaced schedule closest to it'} "
                         f"with `num_inference_steps={num_steps}`.")
        schedule += " The student was distilled to absorb classifier-free guidance: sample with `guidance_scale=1.0`."
    else:
        schedule = ("Not distilled to a fixed step count: sample like the base model (its scheduler, its number "
                    "of steps and guidance).")
    steps_arg = f"num_inference_steps={num_steps}, guidance_scale=1.0" if num_steps else "num_inference_steps=50"
    if is_pipeline:
        snippet = f'''```python
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video

pipe = DiffusionPipeline.from_pretrained("{where}", torch_dtype=torch.bfloat16).to("cuda")
video = pipe(prompt="A cat walks on the grass, realistic", {steps_arg}).frames[0]
export_to_video(video, "sample.mp4", fps=16)
```'''
    else:
        base_ref = base_id or base_init
        sched = ""
        if scheduler_cfg is not None:
            kwargs = ", ".join(f"{k}={v!r}" for k, v in scheduler_cfg.items() if not k.startswith("_"))
            sched = f"pipe.scheduler = FlowMatchEulerDiscreteScheduler({kwargs})\n"
        snippet = f'''```python
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, {pipeline_cls}, {model_cls}
from diffusers.utils import export_to_video

transformer = {model_cls}.from_pretrained("{where}", subfolder="transformer", torch_dtype=torch.bfloat16)
pipe = {pipeline_cls}.from_pretrained("{base_ref}", transformer=transformer, torch_dtype=torch.bfloat16).to("cuda")
{sched}video = pipe(prompt="A cat walks on the grass, realistic", {steps_arg}).frames[0]
export_to_video(video, "sample.mp4", fps=16)
```'''
    if is_lora:
        files = lora_files or {"transformer": LORA_WEIGHTS_FILE}
        loads = []
        for module, file in files.items():
            if module == "transformer":  # the default file: a plain load_lora_weights(dir) reads it
                side = " (high-noise expert)" if len(files) > 1 else ""
                loads.append(f'pipe.load_lora_weights("{where}")  # the adapters of this repo onto the base '
                             f'transformer{side}')
            else:
                loads.append(f'pipe.load_lora_weights("{where}", weight_name="{file}",\n'
                             f'                       load_into_transformer_2=True)  # onto {module} (low-noise expert)')
        load_lines = "\n".join(loads)
        snippet = f'''```python
import torch
from diffusers import {pipeline_cls}
from diffusers.utils import export_to_video

pipe = {pipeline_cls}.from_pretrained("{base_id or base_init}", torch_dtype=torch.bfloat16)
{load_lines}
pipe.to("cuda")
video = pipe(prompt="A cat walks on the grass, realistic", {steps_arg}).frames[0]
export_to_video(video, "sample.mp4", fps=16)
```'''
        what = f"LoRA adapters of {what} (load them onto the base model below)"
    if causal is not None:
        # No diffusers pipeline streams a block-causal Wan: show fv_accel's sampler instead.
        schedule = (f"A block-causal (streaming) student: blocks of {causal['num_frames_per_block']} latent frames, "
                    f"attention window `{causal['local_attn_frames']}` frames with {causal['sink_frames']} sink "
                    f"frames (`causal_config.json`). Per block: the few-step chain at timesteps "
                    f"`{causal['denoising_steps']}`, then the block's x0 is written to the KV cache as context.")
        snippet = f'''There is **no diffusers pipeline** for this model: `WanPipeline` would run the transformer
bidirectionally. The transformer itself loads with `WanTransformer3DModel.from_pretrained("{where}",
subfolder="transformer")`; sample it with fv_accel's streaming sampler:

```python
import torch
from fv_accel.causal_pipeline import CausalWanPipeline

pipe = CausalWanPipeline.from_pretrained("{where}", device="cuda", torch_dtype=torch.bfloat16)
out = pipe(["A cat walks on the grass, realistic"], num_frames=21, height=60, width=104,
           generator=torch.Generator("cuda").manual_seed(0))  # latent frames and cells
frames = out.frames  # uint8 [B, F, H, W, 3] when the export has a VAE
```'''
    body = f"""
# {Path(where).name} — {method} ({role})

Exported by fv_accel from a `{method}` run: {what}, training step **{step}**
(checkpoint written by {world_size} rank{'s' if world_size != 1 else ''}), weights stored in `{dtype}`.
Base model: `{base_id or base_init}`.

## Denoising schedule

{schedule}

## Usage

{snippet}

## Training settings

| setting | value |
|---|---|
| `method.name` | `{method}` |
| `step` | `{step}` |
{settings}

The complete resolved run configuration is in the `{checkpoint_dir_name(step)}/{METADATA_FILE}` the export was made from.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
