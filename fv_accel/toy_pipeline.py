"""The causal toy world's staged pipeline (``recipes/configs/toy_self_forcing.yaml``, docs/causal.md "The
causal toy world").

A config with a top-level ``toy_pipeline`` section is a toy run whose inputs are built first, each stage once:

1. data: the causal toy world (:data:`fv_accel.toy.CAUSAL_TOY_SPEC`) in ``<root>/data``;
2. teacher: the bidirectional toy teacher (:func:`fv_accel.toy.ensure_toy_teacher`) in ``<root>/teacher``;
3. ODE pairs: the teacher's trajectories at the student's K timesteps (``fv_accel/ode_pairs.py``, every rank
   writes its shards) in ``<root>/data_ode_pairs``;
4. ODE-init: a normal ``method.name: ode_init`` run of the causal student (the config's ``models.student``
   section, initialised from the teacher's weights), trained in-process and exported to ``<root>/ode_init``.

The run itself (self-forcing from the ODE-init student) is the rest of the config. Each stage's output carries
a stamp (``toy_stage.json``: its settings and the stamp of what it was made from); a stage whose stamp matches
is reused, any other is rebuilt, and so is everything after it. Stages are written under a temporary name and
renamed (the ODE pairs resume shard by shard and get their stamp last), so an interrupted build leaves nothing
that looks finished. Collective: every rank calls :func:`prepare_toy_pipeline`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fv_accel.errors import ConfigError

logger = logging.getLogger("fv_accel")

#: the config section that marks a toy pipeline (removed before the rest is validated as a RunConfig)
SECTION = "toy_pipeline"
STAMP_NAME = "toy_stage.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OdePairsStage(_Strict):
    """How the teacher's trajectories are made (``fv_accel.ode_pairs.OdePairsSpec``)."""

    teacher_steps: int = Field(48, ge=1)
    """Euler steps of the teacher (CausVid's 48), on the teacher's own ``flow_shift``."""
    num_rows: int = Field(0, ge=0)
    """Rows taken, spread over the data; 0: every row (768: one trajectory per row, each from its own noise)."""
    rows_per_shard: int = Field(96, ge=1)
    batch_size: int = Field(48, ge=1)
    """Rows per teacher forward."""
    seed: int = 0
    """Seed of the rows' noise."""


class OdeInitStage(_Strict):
    """The ODE-init run's own settings; the student, its timesteps and text length are the main config's."""

    max_train_steps: int = Field(300, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    train_batch_size: int = Field(32, ge=1)
    """Per process."""
    seed: int = 0
    """``training.data.seed`` of the ODE-init run."""


class ToyPipelineConfig(_Strict):
    """The ``toy_pipeline`` section."""

    world: Literal["causal"] = "causal"
    """The toy world (only the causal one has a staged pipeline)."""
    root: str = "outputs/toy/causal"
    """Where the stages live; the config's data, teacher and student paths must be this root's."""
    ode_pairs: OdePairsStage = Field(default_factory=OdePairsStage)
    ode_init: OdeInitStage = Field(default_factory=OdeInitStage)


def stage_paths(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Each stage's output directory under ``root``."""
    base = Path(root)
    return {"data": base / "data", "teacher": base / "teacher", "ode_pairs": base / "data_ode_pairs",
            "ode_init": base / "ode_init"}


def read_stamp(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((stage_dir / STAMP_NAME).read_text()))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _file_sha256(directory: Path) -> str:
    """SHA-256 over a diffusers model directory's weight files (what later stages were made from)."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        digest.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as f:  # in 16 MiB pieces: host RAM stays flat whatever the weights' size
            while chunk := f.read(16 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def parse_section(tree: dict[str, Any]) -> tuple[ToyPipelineConfig | None, dict[str, Any]]:
    """Split a raw config tree into its ``toy_pipeline`` section (None without one) and the rest."""
    if SECTION not in tree:
        return None, tree
    rest = {k: v for k, v in tree.items() if k != SECTION}
    try:
        section = ToyPipelineConfig.model_validate(tree[SECTION] or {})
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            path = ".".join([SECTION, *(str(p) for p in err["loc"])])
            errors.append(f"{path}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors)) from None
    return section, rest


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_paths(section: ToyPipelineConfig, tree: dict[str, Any]) -> None:
    """The run's data, teacher and student must be the stages' outputs (one culprit key per error, exit 2)."""
    paths = stage_paths(section.root)
    wanted = {"training.data.data_path": paths["data"], "models.teacher.init_from": paths["teacher"],
              "models.student.init_from": paths["ode_init"]}
    for key, path in wanted.items():
        value = _get(tree, key)
        if not isinstance(value, str) or Path(value) != path:
            raise ConfigError(f"{key}: {value!r}, but toy_pipeline.root {section.root!r} builds {str(path)!r} "
                              "there; set it to that path (or change toy_pipeline.root)")


def ode_pairs_stamp(section: ToyPipelineConfig, tree: dict[str, Any], teacher_dir: Path, *, num_source_rows: int,
                    compute: str) -> dict[str, Any]:
    return {"spec": _ode_pairs_spec(section, tree, teacher_dir, num_source_rows=num_source_rows,
                                    compute=compute).manifest(),
            "teacher_sha256": _file_sha256(teacher_dir)}


def _ode_pairs_spec(section: ToyPipelineConfig, tree: dict[str, Any], teacher_dir: Path, *, num_source_rows: int,
                    compute: str) -> Any:
    from fv_accel.ode_pairs import OdePairsSpec

    settings, teacher = section.ode_pairs, tree["models"]["teacher"]
    paths = stage_paths(section.root)
    return OdePairsSpec(
        teacher=str(teacher_dir), teacher_subfolder="transformer", latent_stats=teacher.get("latent_stats", "auto"),
        source=str(paths["data"].resolve()), source_rows=num_source_rows,
        num_rows=min(settings.num_rows or num_source_rows, num_source_rows), rows_per_shard=settings.rows_per_shard,
        denoising_steps=tuple(_student_steps(tree)), teacher_steps=settings.teacher_steps,
        shift=float(teacher.get("flow_shift", 3.0)), guidance_scale=1.0, uncond="zeros", seed=settings.seed,
        text_len=int(_get(tree, "training.data.text_len")), dtype="fp32", compute=compute)


def _student_steps(tree: dict[str, Any]) -> list[int]:
    if _get(tree, "method.denoising_step_shift") is not None:
        raise ConfigError("method.denoising_step_shift: the toy pipeline records its ODE pairs at "
                          "method.dmd_denoising_steps as written; leave the shift null and write the steps out")
    steps = _get(tree, "method.dmd_denoising_steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError("method.dmd_denoising_steps: the toy pipeline needs the student's timesteps written out "
                          "(its ODE pairs are recorded at them)")
    return [int(s) for s in steps]


def ode_init_config(section: ToyPipelineConfig, tree: dict[str, Any]) -> dict[str, Any]:
    """The ODE-init run: the main config's student (from the teacher's weights), timesteps and text length with
    the ``toy_pipeline.ode_init`` settings, on the ODE pairs."""
    paths = stage_paths(section.root)
    settings = section.ode_init
    student = {**copy.deepcopy(tree["models"]["student"]), "init_from": str(paths["teacher"]), "trainable": True}
    return {
        "models": {"student": student},
        "method": {"name": "ode_init", "denoising_step_list": _student_steps(tree)},
        "training": {
            "data": {"data_path": str(paths["ode_pairs"]), "seed": settings.seed,
                     "train_batch_size": settings.train_batch_size, "text_len": _get(tree, "training.data.text_len"),
                     "shuffle": "rows"},
            "optimizer": {"learning_rate": settings.learning_rate, "lr_scheduler": "cosine", "lr_warmup_steps": 20},
            "loop": {"max_train_steps": settings.max_train_steps, "max_grad_norm": 1.0},
            "checkpoint": {"output_dir": str(Path(section.root) / "ode_init-train"), "save_steps": 0,
                           "keep_last": 1},
            "tracker": {"backends": []},
        },
    }


def ode_init_stamp(section: ToyPipelineConfig, tree: dict[str, Any], pairs_stamp: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps({"run": ode_init_config(section, tree), "ode_pairs": pairs_stamp})))


def ensure_ode_pairs(accelerator: Any, section: ToyPipelineConfig, tree: dict[str, Any]) -> dict[str, Any]:
    """Stage 3 (collective): the ODE pairs, reused when their stamp matches; returns the stamp."""
    import torch

    from fv_accel.config import ModelConfig
    from fv_accel.data.dataset import ParquetLatentDataset, build_index
    from fv_accel.models import load_role_model
    from fv_accel.ode_pairs import write_ode_pairs
    from fv_accel.runtime import Topology, rank0_result

    paths = stage_paths(section.root)
    out = paths["ode_pairs"]
    text_len = int(_get(tree, "training.data.text_len"))
    topology = Topology.from_accelerator(accelerator)
    index = rank0_result(lambda: build_index(str(paths["data"])), topology=topology)  # one rank lists the data
    dataset = ParquetLatentDataset(str(paths["data"]), text_len=text_len, index=index)
    compute = f"{accelerator.device.type}/{accelerator.mixed_precision}"
    # Rank 0 hashes the teacher's weights for all (every rank reading them would cost W× the bytes).
    stamp = rank0_result(lambda: ode_pairs_stamp(section, tree, paths["teacher"], num_source_rows=len(dataset),
                                                 compute=compute), topology=topology)
    if read_stamp(out) == stamp:
        return stamp
    spec = _ode_pairs_spec(section, tree, paths["teacher"], num_source_rows=len(dataset), compute=compute)
    found = read_stamp(out)
    # Unstamped shards of the same spec and teacher are a killed build's: kept, the rest is written. Anything
    # else (another spec, another teacher) goes.
    partial = out / ".building.json"
    if topology.is_main and out.exists() and (found is not None or _read_json(partial) != stamp):
        logger.info("toy: %s was made with other settings or another teacher; rebuilding it", out)
        shutil.rmtree(out)
    _barrier()
    if topology.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(partial, stamp)
    _barrier()
    logger.info("toy: the teacher's ODE pairs into %s (%d rows, %d teacher steps)", out, spec.num_rows,
                spec.teacher_steps)
    teacher_cfg = ModelConfig.model_validate({**tree["models"]["teacher"], "init_from": str(paths["teacher"]),
                                              "trainable": False})
    teacher = load_role_model("teacher", teacher_cfg, mixed_precision="no")
    for module in teacher.modules().values():
        module.to(accelerator.device).eval()
    write_ode_pairs(spec, teacher, dataset, out, rank=topology.rank, world_size=topology.world_size,
                    batch_size=section.ode_pairs.batch_size,
                    autocast_dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else None)
    _barrier()
    if topology.is_main:
        _write_json(out / STAMP_NAME, stamp)
        partial.unlink(missing_ok=True)
    _barrier()
    return stamp


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def ensure_ode_init(accelerator: Any, section: ToyPipelineConfig, tree: dict[str, Any],
                    pairs_stamp: dict[str, Any]) -> Path:
    """Stage 4 (collective): the ODE-init student (``<root>/ode_init``, a diffusers dir with ``transformer/``),
    trained in-process with ``method.name: ode_init`` unless its stamp matches."""
    from fv_accel.checkpoint.gather import save_transformer_pretrained
    from fv_accel.config import resolve_config
    from fv_accel.run import train

    out = stage_paths(section.root)["ode_init"]
    stamp = ode_init_stamp(section, tree, pairs_stamp)
    if (out / "transformer" / "config.json").is_file() and read_stamp(out) == stamp:
        return out
    logger.info("toy: training the ODE-init student into %s (%d steps)", out, section.ode_init.max_train_steps)
    trainer = train(resolve_config(ode_init_config(section, tree)), accelerator)
    tmp = out.with_name(f".{out.name}.tmp")
    if trainer.topology.is_main and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    save_transformer_pretrained(trainer.method.student.transformer, tmp / "transformer")
    if trainer.topology.is_main:
        _write_ode_init_quality(section, tree, tmp, name=str(out))
        _write_json(tmp / STAMP_NAME, stamp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    _barrier()
    return out


def stage_quality(section: ToyPipelineConfig, tree: dict[str, Any], student_dir: Path) -> Any:
    """The quality table (:func:`fv_accel.quality.toy_quality`, per block) of the student exported in
    ``student_dir`` against the teacher stage, both loaded in this process only (no collective)."""
    from fv_accel.config import ModelConfig
    from fv_accel.models import load_role_model
    from fv_accel.quality import toy_quality

    paths = stage_paths(section.root)
    models = tree["models"]
    student_cfg = ModelConfig.model_validate({**models["student"], "init_from": str(student_dir),
                                              "trainable": False})
    student = load_role_model("student", student_cfg, mixed_precision="no")
    teacher = load_role_model("teacher", ModelConfig.model_validate(
        {**models["teacher"], "init_from": str(paths["teacher"]), "trainable": False}), mixed_precision="no")
    for model in (student, teacher):
        for module in model.modules().values():
            module.eval()
    frames_per_block = (student_cfg.causal_or_default.num_frames_per_block if student_cfg.family == "wan_causal"
                        else None)
    return toy_quality(student, teacher, paths["data"], dmd_denoising_steps=_student_steps(tree),
                       text_len=int(_get(tree, "training.data.text_len")), frames_per_block=frames_per_block)


def _write_ode_init_quality(section: ToyPipelineConfig, tree: dict[str, Any], student_dir: Path, *,
                            name: str) -> None:
    """The ODE-init student's table (streamed student@K), printed and kept beside it (``quality.json``): where
    self-forcing starts. ``name``: the stage's final directory (``student_dir`` is its temporary one)."""
    from fv_accel.quality import format_quality_table, write_quality_json

    result = stage_quality(section, tree, student_dir)
    write_quality_json(result, student_dir)
    print(f"toy quality of the ODE-init student ({name}):\n{format_quality_table(result)}", flush=True)


def build_stages(accelerator: Any, section: ToyPipelineConfig, tree: dict[str, Any]) -> None:
    """Every stage in order (collective), each reused when current."""
    from fv_accel.toy import CAUSAL_TOY_SPEC, ensure_toy_data, ensure_toy_teacher

    root = Path(section.root)
    ensure_toy_data(root, CAUSAL_TOY_SPEC)
    _barrier()
    ensure_toy_teacher(accelerator, root, CAUSAL_TOY_SPEC)
    pairs_stamp = ensure_ode_pairs(accelerator, section, tree)
    ensure_ode_init(accelerator, section, tree, pairs_stamp)


def prepare_toy_pipeline(tree: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """The recipe hook: for a tree with a ``toy_pipeline`` section, build the stages and return the tree without
    the section; any other tree is returned as it is.

    A dry run trains nothing: missing teacher and student are stood in for by the teacher's untrained
    initialisation (the same architecture, so the same summary)."""
    section, rest = parse_section(tree)
    if section is None:
        return tree
    rest = copy.deepcopy(rest)
    check_paths(section, rest)
    if dry_run:
        from fv_accel.toy import CAUSAL_TOY_SPEC, ensure_teacher_init, ensure_toy_data

        root = Path(section.root)
        ensure_toy_data(root, CAUSAL_TOY_SPEC)
        for role in ("teacher", "student"):
            model = rest["models"][role]
            if not (Path(model["init_from"]) / "transformer" / "config.json").is_file():
                model["init_from"] = str(ensure_teacher_init(root))
                logger.info("dry run: models.%s is not built yet (the first real run builds it); the summary uses "
                            "the untrained teacher init %s", role, model["init_from"])
        return rest
    from fv_accel.runtime import build_accelerator

    # The same process group and Accelerate state that the run then uses.
    build_stages(build_accelerator(), section, rest)
    return rest


__all__ = ["OdeInitStage", "OdePairsStage", "SECTION", "STAMP_NAME", "ToyPipelineConfig", "build_stages",
           "check_paths", "ensure_ode_init", "ensure_ode_pairs", "ode_init_config", "parse_section",
           "prepare_toy_pipeline", "read_stamp", "stage_paths"]
