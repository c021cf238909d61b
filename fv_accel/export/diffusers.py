"""The diffusers side of an export: the family's transformer class, the model built on the meta device around
the checkpoint's tensors, the few-step scheduler config, and the pipeline directory around the transformer.

The transformer class is the family's :meth:`fv_accel.models.ModelBase.diffusers_model_class`. A base pipeline
may list more than one component of that class (Wan 2.2 A14B: ``transformer`` and ``transformer_2``, one expert
per noise range). A role trained with both experts (its ``init_from`` is such a pipeline with ``subfolder``
``transformer``: :func:`expert_components`) is written with both: each trained expert from the checkpoint, a
frozen one (``models.<role>.experts: high|low``) linked from the base, ``boundary_ratio`` kept. Otherwise the
export writes one module, the role's ``transformer``, as the pipeline's ``transformer/`` (whatever ``subfolder``
it was trained from); every other component of the transformer class is set to ``[null, null]`` in
``model_index.json`` (and ``boundary_ratio`` to null), because the student is a single transformer for all steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fv_accel.checkpoint.layout import DtypeOf
from fv_accel.errors import CheckpointError
from fv_accel.models import FAMILIES, ModelBase
from fv_accel.sampling import distilled_scheduler_config

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}


# -- the transformer -------------------------------------------------------------------------------------------
def family_of(model_cfg: dict[str, Any]) -> type[ModelBase]:
    """The model family of a role's config (as stored in ``metadata.json``)."""
    family = model_cfg.get("family", "wan")
    if family not in FAMILIES:
        raise CheckpointError(f"cannot export model family {family!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[family]


def transformer_class(family: type[ModelBase]) -> Any:
    """The diffusers class an export of ``family`` is written as."""
    import diffusers

    return getattr(diffusers, family.diffusers_model_class())


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

    cls = transformer_class(family_of(model_cfg))
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


# -- LoRA ------------------------------------------------------------------------------------------------------
#: the file diffusers' ``load_lora_weights`` / ``load_lora_adapter`` read from a directory
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


def lora_weight_name(module: str) -> str:
    """Where a LoRA export holds the adapters of ``module``, relative to the export: ``transformer``'s in
    :data:`LORA_WEIGHTS_FILE` (what ``pipe.load_lora_weights(dir)`` reads by default), a second expert's in
    ``<module>/`` (``pipe.load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)``), so that a
    default load never puts a low-noise expert's adapters into ``transformer``."""
    return LORA_WEIGHTS_FILE if module == "transformer" else f"{module}/{LORA_WEIGHTS_FILE}"


def lora_config_of(role: str, model_cfg: dict[str, Any]) -> tuple[Any, list[str]] | None:
    """``(models.<role>.lora, its target modules)`` of a run's role (targets: the family's default when the
    config has none); None for a role trained without LoRA."""
    from fv_accel.config import LoraConfig

    raw = model_cfg.get("lora")
    if raw is None:
        return None
    try:
        lora = LoraConfig.model_validate(raw)
    except ValueError as exc:
        raise CheckpointError(f"models.{role}.lora in the checkpoint's metadata.json is unreadable: {exc}") from None
    targets = list(lora.target_modules or family_of(model_cfg).lora_target_modules)
    return lora, targets


def write_lora(out: Path, family: type[ModelBase], adapters: dict[str, torch.Tensor], lora: Any,
               targets: list[str], dtype: torch.dtype, *, module: str = "transformer") -> None:
    """Write ``adapters`` of ``module`` (training names, ``<linear>.lora_A.default.weight``) as a diffusers
    LoRA at :func:`lora_weight_name`: the pipeline class's own ``save_lora_weights`` (keys
    ``transformer.<linear>.lora_A.weight``, the peft config with rank and alpha in the file's metadata), which
    ``load_lora_weights`` / ``load_lora_adapter`` read. A second expert's file has the same keys: diffusers'
    ``load_into_transformer_2=True`` loads such a file into ``transformer_2``."""
    import diffusers

    from fv_accel.models.lora import diffusers_lora_state_dict, peft_config

    pipeline_cls = getattr(diffusers, family.diffusers_pipeline_class())
    layers = {k: v.to(dtype).contiguous() for k, v in diffusers_lora_state_dict(adapters).items()}
    folder, _, name = lora_weight_name(module).rpartition("/")
    pipeline_cls.save_lora_weights(str(out / folder), transformer_lora_layers=layers, weight_name=name,
                                   transformer_lora_adapter_metadata=peft_config(lora, targets).to_dict())


def merged_state_dict(role: str, model_cfg: dict[str, Any], adapters: dict[str, torch.Tensor], lora: Any,
                      ) -> dict[str, torch.Tensor]:
    """The base transformer's weights (read from ``init_from``) with the adapters merged in,
    ``W + (alpha / rank)·B A`` (``fv_accel/models/lora.py``)."""
    from safetensors.torch import load_file

    from fv_accel.config import ModelConfig
    from fv_accel.models.lora import merge_into

    try:
        files = family_of(model_cfg).weight_files(role, ModelConfig.model_validate(model_cfg))
        base: dict[str, torch.Tensor] = {}
        for file in files:
            base.update(load_file(str(file)))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"--merge-lora: cannot read the base weights of models.{role}.init_from "
                              f"{model_cfg['init_from']!r} ({type(exc).__name__}: {exc})") from None
    try:
        return merge_into(base, adapters, rank=lora.rank, alpha=lora.alpha)
    except KeyError as exc:
        raise CheckpointError(f"--merge-lora: the adapters do not fit the base of models.{role} (no {exc})") from None


# -- the scheduler ---------------------------------------------------------------------------------------------
def denoising_steps_of(config: dict[str, Any]) -> list[int] | None:
    steps = config.get("method", {}).get("dmd_denoising_steps")
    return [int(s) for s in steps] if steps else None


def scheduler_of(config: dict[str, Any], role: str) -> tuple[list[int] | None, dict[str, Any] | None]:
    """``(denoising steps, scheduler config)`` an export of ``role`` samples with; (None, None) for a run not
    distilled to a step count. The schedule describes how the student samples; a critic export has none."""
    steps = denoising_steps_of(config) if role in ("student", "ema") else None
    return steps, (distilled_scheduler_config(steps) if steps else None)


# -- the pipeline ----------------------------------------------------------------------------------------------
def _transformer_components(model_index: dict[str, Any], family: type[ModelBase]) -> list[str]:
    """The pipeline components of the family's transformer class (``transformer``, ``transformer_2``)."""
    cls = family.diffusers_model_class()
    return [name for name, value in model_index.items()
            if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] == cls]


def expert_components(base: Path | None, family: type[ModelBase], subfolder: str) -> list[str]:
    """The pipeline components a role trained from ``base``/``subfolder`` holds: both experts when the base is a
    two-expert pipeline (``transformer_2`` and ``boundary_ratio`` set) loaded from ``transformer`` (as
    ``fv_accel/models/wan.py`` loads it), else its one transformer."""
    if base is None or subfolder != "transformer":
        return ["transformer"]
    model_index = json.loads((base / "model_index.json").read_text())
    components = [n for n in _transformer_components(model_index, family) if model_index[n][0] is not None]
    if "transformer_2" in components and model_index.get("boundary_ratio") is not None:
        return ["transformer", "transformer_2"]
    return ["transformer"]


def pipeline_source(init_from: str, family: type[ModelBase]) -> Path | None:
    """The local directory of a full diffusers pipeline behind ``init_from`` (downloading the non-transformer
    components of a Hub pipeline), or None when ``init_from`` is a bare model."""
    local = Path(init_from).expanduser()
    if local.exists():
        return local if (local / "model_index.json").is_file() else None
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        index_file = hf_hub_download(init_from, "model_index.json")
    except RemoteEntryNotFoundError:  # a bare model repo
        return None
    except LocalEntryNotFoundError:  # offline and not cached
        logger.warning("cannot reach %s (offline?); exporting the transformer only, not a full pipeline",
                       init_from)
        return None
    except Exception as exc:
        raise CheckpointError(f"cannot reach base model {init_from!r} on the Hub ({type(exc).__name__})") from None
    # The transformer comes from the checkpoint and the others are dropped: download none of them. (A frozen
    # expert of a two-expert role is fetched by write_pipeline's keep list below.)
    skip = _transformer_components(json.loads(Path(index_file).read_text()), family)
    try:
        return Path(snapshot_download(init_from, ignore_patterns=[f"{name}/*" for name in skip]))
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


def write_pipeline(src: Path, out: Path, *, family: type[ModelBase], subfolder: str,
                   scheduler_cfg: dict[str, Any] | None, experts: list[str] | None = None,
                   written: list[str] | None = None) -> None:
    """Link every component of the base pipeline except its transformers into ``out`` (which already holds
    the exported ``transformer/``, or each of ``written``); swap the scheduler for ``scheduler_cfg``. With
    ``experts`` (:func:`expert_components`) those transformers are kept: the ones not ``written`` (frozen)
    are linked from the base. See the module docstring."""
    model_index = json.loads((src / "model_index.json").read_text())
    kept = experts or [subfolder]
    dropped = [name for name in _transformer_components(model_index, family) if name not in kept]
    for name, value in model_index.items():
        if name.startswith("_") or name in (written or [subfolder]) or not isinstance(value, list) \
                or value[0] is None:
            continue
        if name in dropped:
            logger.warning("base pipeline has a second transformer (%s); the export writes one and drops it", name)
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
    if "boundary_ratio" in model_index and dropped:  # no second expert to switch to
        model_index["boundary_ratio"] = None
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
