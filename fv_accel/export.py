"""Export one role of a DCP training checkpoint as a diffusers model (or a complete diffusers pipeline).

Runs in one plain process with no process group and no GPU: DCP reshards whatever number of ranks wrote the
checkpoint into full tensors here. Only the role's weights are read (not optimizer state). The model is built
on the meta device from the role's ``init_from`` config, so peak memory is one copy of the weights.

Output (CONTRACT.md "Export output"):
    <output>/transformer/      diffusers config.json + safetensors (sharded with an index past max_shard_size)
    <output>/README.md         model card
    <output>/model_index.json, vae/, text_encoder/, tokenizer/, scheduler/ ...
                               when the role's init_from is a full diffusers pipeline

Everything is written into a temporary sibling directory and renamed into place, so a failed export never
leaves a half-written ``<output>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fv_accel.checkpoint import read_metadata, resolve_checkpoint
from fv_accel.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, CheckpointError, ConfigError, FvAccelError
from fv_accel.sampling import distilled_scheduler_config, scheduler_timesteps

logger = logging.getLogger(__name__)

EXPORT_ROLES = ("student", "critic", "ema")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Model family → the diffusers transformer class an export is written as.
TRANSFORMER_CLASSES: dict[str, str] = {"wan": "WanTransformer3DModel"}
CARD_TAGS = ["fv-accel", "diffusers", "text-to-video", "distillation"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


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


# -- reading the checkpoint ------------------------------------------------------------------------------------
#: ``dtype_of(name, saved dtype)`` → the dtype a tensor is read into (DCP casts each chunk as it copies it in).
DtypeOf = Callable[[str, torch.dtype], torch.dtype]


def _dcp_keys(checkpoint: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return dict(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    except Exception as exc:  # a truncated or foreign .metadata
        raise CheckpointError(f"{checkpoint}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from None


def _read_tensors(checkpoint: Path, sources: dict[str, str], meta: dict[str, Any], dtype_of: DtypeOf | None,
                  extra: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` read from the checkpoint keys ``sources[name]``, in one process.

    Each tensor is allocated once in its final dtype and DCP copies the saved chunks into it one at a time, so
    the peak is the result plus one saved chunk (at most one tensor in its saved dtype), never a second full
    copy. Whatever the writing world size was, DCP assembles full tensors from the shards (no process group).
    ``extra`` entries (non-tensor state such as flags) are loaded in the same pass, in place."""
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {}
    for name, key in sources.items():
        item = meta[key]
        saved = item.properties.dtype
        state[key] = torch.empty(item.size, dtype=dtype_of(name, saved) if dtype_of is not None else saved)
    if extra:
        state.update(extra)
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    if extra:
        extra.update({k: state[k] for k in extra})
    return {name: state[key] for name, key in sources.items()}


def _tensor_keys(meta: dict[str, Any], prefix: str) -> dict[str, str]:
    """``{name: checkpoint key}`` of the tensors under ``prefix`` (model state dicts hold only tensors)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k[len(prefix):]: k for k, v in meta.items() if k.startswith(prefix)
            and isinstance(v, TensorStorageMetadata)}


def load_role_state_dict(checkpoint: Path, role: str, dtype_of: DtypeOf | None = None) -> dict[str, torch.Tensor]:
    """The full (unsharded) transformer state dict of ``role``, read in this one process: in the saved dtypes,
    or each tensor directly in ``dtype_of(name, saved dtype)`` (no full copy in the saved dtype).

    DCP keys are ``roles.<role>.transformer.<parameter name>``.
    """
    prefix = f"roles.{role}.transformer."
    meta = _dcp_keys(checkpoint)
    if not any(k.startswith(prefix) for k in meta):
        saved = sorted({k.split(".")[1] for k in meta if k.startswith("roles.")})
        raise CheckpointError(f"{checkpoint}: holds no weights for role {role!r} "
                              f"(trainable roles saved: {', '.join(saved) or 'none'})")
    try:
        return _read_tensors(checkpoint, _tensor_keys(meta, prefix), meta, dtype_of)
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: cannot read role {role!r} ({type(exc).__name__}: {exc})") from None


def load_ema_role_state_dict(checkpoint: Path, dtype_of: DtypeOf | None = None) -> dict[str, torch.Tensor]:
    """EMA shadow weights under the student's parameter names, plus the student's tensors the EMA does not
    track (frozen parameters, buffers): a complete transformer state dict. Only those keys are read; the
    student's copies of the averaged weights are not (at 14B that is 57 GB of fp32 not read)."""
    try:
        from fv_accel.callbacks.ema import EMA_INITIALIZED_KEY, EMA_ROLE, EMA_SHADOW_PREFIX
    except ImportError:
        raise CheckpointError("this fv_accel has no EMA callback; --role ema is unavailable") from None
    meta = _dcp_keys(checkpoint)
    shadow = _tensor_keys(meta, EMA_SHADOW_PREFIX)
    if not shadow:
        raise CheckpointError(f"{checkpoint}: holds no EMA weights (the run had no callbacks.ema section)")
    rest = {n: k for n, k in _tensor_keys(meta, f"roles.{EMA_ROLE}.transformer.").items() if n not in shadow}
    flag: dict[str, Any] = {EMA_INITIALIZED_KEY: False}
    try:
        state = _read_tensors(checkpoint, {**rest, **shadow}, meta, dtype_of, extra=flag)
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: cannot read the EMA weights ({type(exc).__name__}: {exc})") from None
    if not flag[EMA_INITIALIZED_KEY]:
        raise CheckpointError(f"{checkpoint}: the EMA had not started yet (step < callbacks.ema.start_step)")
    return state


# -- building the model ----------------------------------------------------------------------------------------
def _transformer_class(family: str) -> Any:
    import diffusers

    if family not in TRANSFORMER_CLASSES:
        raise CheckpointError(f"cannot export model family {family!r} (known: {', '.join(TRANSFORMER_CLASSES)})")
    return getattr(diffusers, TRANSFORMER_CLASSES[family])


def export_dtype_of(cls: Any, dtype: torch.dtype) -> DtypeOf:
    """The dtype each tensor is exported in: ``dtype``, except the modules diffusers keeps in fp32 even in a
    bf16 model (norms, time embedding, modulation tables) and non-float buffers (kept as saved)."""
    keep_fp32 = set(getattr(cls, "_keep_in_fp32_modules", None) or [])

    def dtype_of(name: str, saved: torch.dtype) -> torch.dtype:
        if not saved.is_floating_point:
            return saved
        return torch.float32 if keep_fp32.intersection(name.split(".")) else dtype

    return dtype_of


def build_transformer(model_cfg: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """The role's diffusers transformer (architecture from ``init_from``) holding ``state`` in ``dtype``.
    Tensors already in their export dtype (see :func:`export_dtype_of`) are used as they are, not copied; the
    others are cast one by one, each replacing its entry in ``state`` (so the source can be freed at once)."""
    from accelerate import init_empty_weights

    cls = _transformer_class(model_cfg.get("family", "wan"))
    source, subfolder = model_cfg["init_from"], model_cfg.get("subfolder") or None
    try:
        config = cls.load_config(source, subfolder=subfolder)
    except Exception as exc:
        where = f"{source}/{subfolder}" if subfolder else source
        raise CheckpointError(f"cannot read the transformer config from init_from {where!r} "
                              f"({type(exc).__name__}); export needs the run's base model") from None
    with init_empty_weights():  # parameters on meta: no random init, no second copy of the weights
        model = cls.from_config(config)
    dtype_of = export_dtype_of(cls, dtype)
    try:
        for k, v in state.items():
            state[k] = v.to(dtype_of(k, v.dtype))
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match the {cls.__name__} of {source!r}: {exc}") from None
    return model.eval()


# -- pipelines -------------------------------------------------------------------------------------------------
def hub_id_of(source: str) -> str | None:
    """A Hub repo id for ``source``: itself if it looks like one, or the repo of an HF-cache snapshot path."""
    if not Path(source).expanduser().exists():
        return source if _HUB_ID.match(source) else None
    match = _HF_CACHE_SNAPSHOT.search(str(Path(source).expanduser().resolve()))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def pipeline_source(init_from: str) -> Path | None:
    """The local directory of a full diffusers pipeline behind ``init_from`` (downloading the non-transformer
    components of a Hub pipeline), or None when ``init_from`` is a bare model."""
    local = Path(init_from).expanduser()
    if local.exists():
        return local if (local / "model_index.json").is_file() else None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        hf_hub_download(init_from, "model_index.json")
    except RemoteEntryNotFoundError:  # a bare model repo
        return None
    except LocalEntryNotFoundError:  # offline and not cached
        logger.warning("cannot reach %s (offline?); exporting the transformer only, not a full pipeline",
                       init_from)
        return None
    except Exception as exc:
        raise CheckpointError(f"cannot reach base model {init_from!r} on the Hub ({type(exc).__name__})") from None
    try:
        # The transformer itself comes from the checkpoint: do not download the base one.
        return Path(snapshot_download(init_from, ignore_patterns=["transformer/*", "transformer_2/*"]))
    except Exception as exc:
        raise CheckpointError(f"cannot download the components of base pipeline {init_from!r} "
                              f"({type(exc).__name__})") from None


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of ``src`` into ``dst`` (copy where linking is impossible, e.g. across devices)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()  # HF cache snapshots are symlinks into blobs/
        try:
            os.link(real, target)
        except OSError:
            shutil.copy2(real, target)


def _write_pipeline(src: Path, out: Path, *, subfolder: str, scheduler_cfg: dict[str, Any] | None) -> None:
    """Link every component of the base pipeline except the exported transformer; swap the scheduler."""
    model_index = json.loads((src / "model_index.json").read_text())
    for name, value in model_index.items():
        if name.startswith("_") or name == subfolder or not isinstance(value, list) or value[0] is None:
            continue
        if name == "transformer_2":
            # A two-expert (Wan 2.2 A14B) base: the distilled student is a single transformer for all steps.
            logger.warning("base pipeline has a second expert (transformer_2); the export drops it")
            model_index[name] = [None, None]
            continue
        if name == "scheduler" and scheduler_cfg is not None:
            (out / name).mkdir(parents=True)
            (out / name / "scheduler_config.json").write_text(json.dumps(scheduler_cfg, indent=2) + "\n")
            model_index[name] = ["diffusers", scheduler_cfg["_class_name"]]
            continue
        if not (src / name).is_dir():
            raise CheckpointError(f"base pipeline {src} lists component {name!r} but has no {name}/ folder")
        _link_tree(src / name, out / name)
    if subfolder != "transformer":  # the export is always written under transformer/
        model_index["transformer"] = model_index.pop(subfolder)
    if "boundary_ratio" in model_index and model_index.get("transformer_2") == [None, None]:
        model_index["boundary_ratio"] = None
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


# -- the model card --------------------------------------------------------------------------------------------
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
) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    models = config["models"]
    model_role = "student" if role == "ema" else role
    base_init = models.get("teacher", models[model_role])["init_from"]
    base_id = hub_id_of(base_init) or hub_id_of(models[model_role]["init_from"])
    method = config.get("method", {}).get("name", "unknown")
    card_data = ModelCardData(
        base_model=base_id,
        license=_base_license(base_source) or "other",
        library_name="diffusers",
        pipeline_tag="text-to-video",
        tags=list(CARD_TAGS) + [method],
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
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.utils import export_to_video

transformer = WanTransformer3DModel.from_pretrained("{where}", subfolder="transformer", torch_dtype=torch.bfloat16)
pipe = WanPipeline.from_pretrained("{base_ref}", transformer=transformer, torch_dtype=torch.bfloat16).to("cuda")
{sched}video = pipe(prompt="A cat walks on the grass, realistic", {steps_arg}).frames[0]
export_to_video(video, "sample.mp4", fps=16)
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

The complete resolved run configuration is in the `checkpoint-{step}/metadata.json` the export was made from.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


# -- the export ------------------------------------------------------------------------------------------------
def is_previous_export(path: Path) -> bool:
    return (path / "transformer" / "config.json").is_file() and (path / "README.md").is_file()


def denoising_steps_of(config: dict[str, Any]) -> list[int] | None:
    steps = config.get("method", {}).get("dmd_denoising_steps")
    return [int(s) for s in steps] if steps else None


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
    meta = read_metadata(ckpt)
    config, step = meta.get("config"), int(meta.get("step", -1))
    if not isinstance(config, dict) or "models" not in config:
        raise CheckpointError(f"{ckpt}: metadata.json has no run config; cannot tell which model was trained")
    model_role = "student" if role == "ema" else role
    if model_role not in config["models"]:
        raise CheckpointError(f"{ckpt}: the run has no {model_role!r} role (roles: {', '.join(config['models'])})")
    model_cfg = config["models"][model_role]

    # Each tensor is read straight into its export dtype: peak ≈ one copy of the model in that dtype.
    dtype_of = export_dtype_of(_transformer_class(model_cfg.get("family", "wan")), DTYPES[dtype])
    if role == "ema":
        state = load_ema_role_state_dict(ckpt, dtype_of)
    else:
        state = load_role_state_dict(ckpt, role, dtype_of)
    model = build_transformer(model_cfg, state, DTYPES[dtype])
    del state
    num_parameters = sum(p.numel() for p in model.parameters())

    # The denoising schedule describes how the student samples; a critic/EMA export shares the student's.
    denoising_steps = denoising_steps_of(config) if role in ("student", "ema") else None
    scheduler_cfg = distilled_scheduler_config(denoising_steps) if denoising_steps else None
    base = pipeline_source(model_cfg["init_from"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
        del model
        if base is not None:
            _write_pipeline(base, tmp, subfolder=model_cfg.get("subfolder") or "transformer",
                            scheduler_cfg=scheduler_cfg)
        card = build_model_card(
            config=config, role=role, step=step, world_size=int(meta.get("world_size", 1)), dtype=dtype,
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


# -- command line (recipes/export.py; ``python -m fv_accel.export`` for the training-time push) ---------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recipes/export.py",
        description="Export a trained role to diffusers format (and optionally push it to the Hugging Face Hub).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint-<step> dir or a run's output dir")
    parser.add_argument("--role", required=True, choices=EXPORT_ROLES)
    parser.add_argument("--output", required=True, help="directory to write (new, empty, or an earlier export)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the export to this repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", default=None, help="Hub branch to push to (default main)")
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision need --push-to-hub")
    return args


def retry_command(args: argparse.Namespace, checkpoint: Path) -> str:
    """The exact command that redoes this export and push (what a failed push tells the user to run)."""
    cmd = ["python", "recipes/export.py", "--checkpoint", str(checkpoint), "--role", args.role,
           "--output", str(args.output), "--dtype", args.dtype, "--push-to-hub", args.push_to_hub]
    if args.max_shard_size != "5GB":
        cmd += ["--max-shard-size", args.max_shard_size]
    if args.private:
        cmd.append("--private")
    if args.revision:
        cmd += ["--revision", args.revision]
    return shlex.join(cmd)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: bad arguments
        return EXIT_CONFIG if exc.code not in (0, None) else EXIT_OK
    from fv_accel.hub import push_folder, redact

    try:
        result = export_checkpoint(args.checkpoint, role=args.role, output=args.output, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, repo_id=args.push_to_hub)
        print(f"exported {result.role} (step {result.step}, {result.dtype}) to {result.output}"
              f"{' as a complete diffusers pipeline' if result.is_pipeline else ''}", flush=True)
        if args.push_to_hub:
            checkpoint = resolve_checkpoint(args.checkpoint, "") or Path(args.checkpoint)
            pushed = push_folder(result.output, args.push_to_hub, private=args.private, revision=args.revision,
                                 commit_message=f"fv_accel export: {result.role} at step {result.step}",
                                 retry_command=retry_command(args, checkpoint))
            print(f"pushed to {pushed.repo_id}@{pushed.revision}: {pushed.commit_url}", flush=True)
        return EXIT_OK
    except FvAccelError as exc:
        print(f"fv_accel: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        print(redact(traceback.format_exc()), file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
