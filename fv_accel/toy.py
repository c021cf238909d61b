"""The toy world (docs/distillation.md "The toy default"): a small conditional latent distribution with known multi-modal structure.

Each of ``num_conditions`` conditions (a fixed random text embedding) has ``num_modes`` distinct modes; a sample
is a mode centre plus a little noise. Centres are rank-1 (a channel vector times a smooth space-time pattern),
so a tiny Wan transformer can learn them in seconds on a CPU. A few-step sampler of a flow-matching teacher
averages modes (its first steps predict the conditional mean); a good DMD2 student lands on them. The metric
is the distance from a generated sample to the nearest data sample of the same condition, per √dim.

With ``temporal="trajectory"`` (the causal toy world, :data:`CAUSAL_TOY_SPEC`) each mode is instead a path
over the latent frames: its channel vector turns from a first direction to a second one, so the first frames
identify the mode and the later ones follow from it. A clip that starts on one mode's path and continues on
another's is far from every data sample: what a causal (block-by-block) sampler must get right.

Everything here is deterministic from the spec's seed and is written atomically, so several processes may
call ``ensure_*`` at once.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

TOY_ROOT = Path("outputs/toy")
#: where the causal toy world (:data:`CAUSAL_TOY_SPEC`), its init and its teacher live: a root of its own, since a
#: root holds one world (``ensure_toy_data`` rebuilds a root's data written by another spec)
CAUSAL_TOY_ROOT = TOY_ROOT / "causal"

#: How far a trajectory mode's channel vector turns from the first latent frame to the last (radians): a quarter
#: turn, so the last frame is orthogonal to the first and a later block that copies the first block is as far
#: from the data as a switch to another mode.
TRAJECTORY_TURN = math.pi / 2


@dataclass(frozen=True)
class ToyWorldSpec:
    num_conditions: int = 4
    """4, not more: the quality table's 64 samples then give each condition 16, so a sampler that covers all 3
    modes shows it: a perfect sampler misses some (condition, mode) pair 2% of the time, against 63% with 8
    conditions of 8 samples each."""
    num_modes: int = 3
    samples_per_mode: int = 64
    """64: 768 rows, as with the earlier 8 conditions × 32 (tests count on the toy file's row count)."""
    latent_shape: tuple[int, int, int, int] = (16, 2, 8, 8)
    text_len: int = 8
    text_dim: int = 32
    within_mode_std: float = 0.05
    seed: int = 0
    spatial_patterns: bool = False
    """Modulate each mode's channel vector by a smooth space-time pattern. Off by default: a Wan transformer
    sees positions only through relative (RoPE) attention, so absolute patterns take a tiny model far longer
    to learn than the toy's time budget allows."""
    temporal: Literal["static", "trajectory"] = "static"
    """``static``: one channel vector per mode on every frame. ``trajectory``: per mode, the channel vector of
    frame f is cos(φ_f)·u + sin(φ_f)·w with u ⟂ w unit vectors of that mode and φ_f = TRAJECTORY_TURN · f / (T−1)
    (the causal toy world). A field added later: at ``static`` it is left out of the stored spec, so data and
    teachers made before it are kept."""


def _smooth_pattern(rng: np.random.Generator, t: int, h: int, w: int, num_freqs: int = 3) -> np.ndarray:
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    pattern = np.zeros((t, h, w))
    for _ in range(num_freqs):
        ky, kx = rng.integers(0, 3, size=2)
        kt = rng.integers(0, max(t, 1))
        phase = rng.uniform(0, 2 * math.pi, size=3)
        pattern += rng.normal() * (np.cos(math.pi * ky * (yy + 0.5) / h + phase[0])
                                   * np.cos(math.pi * kx * (xx + 0.5) / w + phase[1])
                                   * np.cos(math.pi * kt * (tt + 0.5) / max(t, 1) + phase[2]))
    return pattern


#: the causal toy world: 6 latent frames (3 blocks of 2 for a causal student, :data:`CAUSAL_TOY_FRAMES_PER_BLOCK`)
#: of 4 × 4 (2 × 2 tokens per frame with Wan's 1 × 2 × 2 patches, 24 tokens a clip: fewer than the static
#: world's 32, so training and the block-by-block rollouts of self-forcing stay quick on CPUs). Space carries no
#: information in the toy world (centres are constant over H, W), so its size only sets how many noisy copies
#: of each frame the model can average.
CAUSAL_TOY_SPEC = ToyWorldSpec(latent_shape=(16, 6, 4, 4), temporal="trajectory")
CAUSAL_TOY_FRAMES_PER_BLOCK = 2


def _trajectory_channels(rng: np.random.Generator, c: int, t: int) -> np.ndarray:
    """[C, T]: a unit channel vector per frame turning by TRAJECTORY_TURN from a random u to a random w ⟂ u."""
    u = rng.normal(size=c)
    u /= np.linalg.norm(u)
    w = rng.normal(size=c)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    phi = TRAJECTORY_TURN * np.arange(t) / max(t - 1, 1)
    return np.cos(phi)[None] * u[:, None] + np.sin(phi)[None] * w[:, None]


def make_toy_world(spec: ToyWorldSpec) -> dict[str, torch.Tensor]:
    """Mode centres [N_cond, N_mode, C, T, H, W] (RMS 1 each) and text embeddings [N_cond, L, D]."""
    rng = np.random.default_rng(spec.seed)
    c, t, h, w = spec.latent_shape
    centres = np.zeros((spec.num_conditions, spec.num_modes, c, t, h, w))
    for ci in range(spec.num_conditions):
        for mi in range(spec.num_modes):
            if spec.temporal == "trajectory":
                channel_t = _trajectory_channels(rng, c, t)
            else:
                channel_t = np.repeat(rng.normal(size=c)[:, None], t, axis=1)
            pattern = _smooth_pattern(rng, t, h, w) if spec.spatial_patterns else np.ones((t, h, w))
            centre = channel_t[:, :, None, None] * pattern[None]
            centres[ci, mi] = centre / np.sqrt(np.mean(centre**2))
    text = rng.normal(size=(spec.num_conditions, spec.text_len, spec.text_dim))
    return {"centres": torch.from_numpy(centres).float(), "text": torch.from_numpy(text).float()}


def _atomic_dir(target: Path, build: Any) -> None:
    """Build a directory in a temporary sibling and rename it into place (first writer wins)."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_toy_dataset(out_dir: Path, spec: ToyWorldSpec) -> None:
    """Parquet in FastVideo's T2V schema plus ``world.safetensors`` (centres, text, condition per row)."""
    world = make_toy_world(spec)
    rng = np.random.default_rng(spec.seed + 1)
    rows: dict[str, list] = {k: [] for k in (
        "id", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype", "text_embedding_bytes",
        "text_embedding_shape", "text_embedding_dtype", "file_name", "caption", "media_type", "width", "height",
        "num_frames", "duration_sec", "fps")}
    conditions, modes = [], []
    c, t, h, w = spec.latent_shape
    for ci in range(spec.num_conditions):
        text = world["text"][ci].numpy().astype(np.float32)
        for mi in range(spec.num_modes):
            for si in range(spec.samples_per_mode):
                centre = world["centres"][ci, mi].numpy()
                latent = (centre + spec.within_mode_std * rng.normal(size=centre.shape)).astype(np.float32)
                rows["id"].append(f"toy-c{ci}-m{mi}-s{si}")
                rows["vae_latent_bytes"].append(latent.tobytes())
                rows["vae_latent_shape"].append(list(latent.shape))
                rows["vae_latent_dtype"].append("float32")
                rows["text_embedding_bytes"].append(text.tobytes())
                rows["text_embedding_shape"].append(list(text.shape))
                rows["text_embedding_dtype"].append("float32")
                rows["file_name"].append(f"toy-c{ci}-m{mi}-s{si}.latent")
                rows["caption"].append(f"toy condition {ci}")
                rows["media_type"].append("video")
                rows["width"].append(w * 8)
                rows["height"].append(h * 8)
                rows["num_frames"].append((t - 1) * 4 + 1)
                rows["duration_sec"].append(1.0)
                rows["fps"].append(16.0)
                conditions.append(ci)
                modes.append(mi)

    def build(tmp: Path) -> None:
        pq.write_table(pa.table(rows), tmp / "part-00000.parquet", row_group_size=64)
        save_file({**world, "row_condition": torch.tensor(conditions), "row_mode": torch.tensor(modes)},
                  str(tmp / "world.safetensors"), metadata=_spec_metadata(spec))

    _atomic_dir(out_dir, build)


#: spec fields added after toy data and teachers were first stamped, with the value they had before: left out of
#: the stamp at that value, so outputs of the default world made before the field existed stay current
_LATER_FIELDS: dict[str, Any] = {"temporal": "static"}


def _spec_metadata(spec: ToyWorldSpec) -> dict[str, str]:
    return {k: str(v) for k, v in asdict(spec).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}


def _stored_spec(data_dir: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(data_dir / "world.safetensors"), "pt") as fh:
            return dict(fh.metadata() or {})
    except (OSError, ValueError):
        return None


def ensure_toy_data(root: Path = TOY_ROOT, spec: ToyWorldSpec | None = None) -> Path:
    """The toy dataset under ``<root>/data``; rebuilt when it was written by a different world spec (an older
    fv_accel), and then the toy teacher trained on it is dropped too. A teacher trained by another recipe
    (:func:`toy_teacher_recipe`: world, architecture or training settings) is dropped as well, so the next
    distillation retrains it instead of distilling a stale one."""
    spec = spec or ToyWorldSpec()
    out = root / "data"
    log = logging.getLogger("fv_accel")
    if out.exists() and _stored_spec(out) != _spec_metadata(spec):
        log.info("toy: %s was made by another toy-world spec; rebuilding it", out)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(toy_teacher_dir(root), ignore_errors=True)
    teacher = toy_teacher_dir(root)
    if teacher.exists() and _stored_teacher_recipe(teacher) != toy_teacher_recipe(spec):
        log.info("toy: %s was trained by another toy-teacher recipe; it will be retrained", teacher)
        shutil.rmtree(teacher, ignore_errors=True)
    write_toy_dataset(out, spec)
    return out


#: The toy teacher's architecture: the tiny Wan with 8 heads (attention width 128) and a wider MLP (490,688
#: parameters). Attention width is what limits how close teacher@50 comes to the modes
#: (benchmarks/toy_teacher.py): 4 heads reach a distance of ≈ 0.3 even with 1000 steps, 8 heads ≈ 0.1 in 300.
TOY_TEACHER_WAN_OVERRIDES: dict[str, Any] = {"num_attention_heads": 8, "ffn_dim": 128}

#: The toy fine-tune's settings (the data path and output dir are added per root). A cosine decay of the
#: learning rate lets the last steps settle instead of jittering at 3e-3.
TOY_FINETUNE_SETTINGS: dict[str, Any] = {
    "method": {"name": "finetune", "weighting_scheme": "uniform"},
    # The toy file lists its rows by condition and mode: windows of row groups would fill a batch with a few
    # modes; a plain row permutation (cheap at this size) gives every batch a mix.
    "data": {"seed": 0, "train_batch_size": 32, "text_len": 8, "shuffle": "rows"},
    "optimizer": {"learning_rate": 3e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 20},
    "loop": {"max_train_steps": 300, "max_grad_norm": 1.0},
}


#: Fine-tune steps of the causal (trajectory) world's teacher: 6 frames × 3 modes × 4 conditions give the tiny
#: Wan 72 distinct frame targets (12 in the static world), and it sees time only through relative (RoPE)
#: attention. teacher@50 (one process): 300 steps 0.67 (near the frame-averaged centres), 600 0.27, 1000 0.19,
#: 1500 0.13, the static world's level (docs/causal.md "The toy proof").
TRAJECTORY_TEACHER_STEPS = 1500


def toy_finetune_settings(spec: ToyWorldSpec | None = None) -> dict[str, Any]:
    """The toy fine-tune's settings for the world ``spec``: :data:`TOY_FINETUNE_SETTINGS`, with
    :data:`TRAJECTORY_TEACHER_STEPS` steps for a trajectory world (a copy: callers may change it)."""
    settings = copy.deepcopy(TOY_FINETUNE_SETTINGS)
    if spec is not None and spec.temporal == "trajectory":
        settings["loop"]["max_train_steps"] = TRAJECTORY_TEACHER_STEPS
    return settings


def toy_teacher_recipe(spec: ToyWorldSpec | None = None) -> dict[str, Any]:
    """What the toy teacher is a function of (world spec, architecture, fine-tune settings), as JSON values;
    stored beside the teacher as ``toy_recipe.json`` so a teacher made by an older recipe is retrained."""
    recipe = {"world": _spec_metadata(spec or ToyWorldSpec()), "wan_overrides": TOY_TEACHER_WAN_OVERRIDES,
              "finetune": toy_finetune_settings(spec)}
    return dict(json.loads(json.dumps(recipe)))


def _stored_teacher_recipe(teacher_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((teacher_dir / "toy_recipe.json").read_text()))
    except (OSError, ValueError):
        return None


def ensure_init_transformer(root: Path = TOY_ROOT, seed: int = 0, *, name: str = "init",
                            overrides: dict[str, Any] | None = None) -> Path:
    """A randomly initialised tiny Wan transformer in diffusers format (``<root>/<name>/transformer``)."""
    # The defining module: diffusers' top-level name is typed as its dummy (torch-less) stand-in.
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    from fv_accel.models import TINY_WAN_CONFIG

    out = root / name
    config = {**TINY_WAN_CONFIG, **(overrides or {})}
    if out.exists() and not _config_matches(out / "transformer" / "config.json", config):
        # made by an fv_accel with another toy architecture
        shutil.rmtree(out, ignore_errors=True)

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        WanTransformer3DModel(**config).save_pretrained(tmp / "transformer")

    _atomic_dir(out, build)
    return out


def _config_matches(path: Path, config: dict[str, Any]) -> bool:
    """Whether the saved diffusers ``config.json`` at ``path`` has every key of ``config`` (lists as saved)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in config.items())


def load_world(data_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(data_dir) / "world.safetensors"))


def distance_to_data(latents: torch.Tensor, data_index: torch.Tensor, data_dir: Path) -> torch.Tensor:
    """Per sample: distance to the nearest data sample of the same condition, divided by √dim.

    ``latents`` [N, C, T, H, W] in the dataset's stored space; ``data_index`` [N] the conditioning rows.
    """
    from fv_accel.data import ParquetLatentDataset

    world = load_world(data_dir)
    dataset = ParquetLatentDataset(str(data_dir), text_len=1)
    cond_of_row = world["row_condition"]
    data = torch.stack([dataset[i].latents_cthw for i in range(len(dataset))])  # type: ignore[misc]  # toy data is T2V: every row has latents
    dim = latents[0].numel()
    out = torch.empty(latents.shape[0])
    for n in range(latents.shape[0]):
        same = data[cond_of_row == cond_of_row[data_index[n]]]
        out[n] = (same - latents[n].float()).flatten(1).norm(dim=1).min() / math.sqrt(dim)
    return out


def ensure_teacher_init(root: Path = TOY_ROOT) -> Path:
    """The random initialisation the toy teacher is trained from (``<root>/init-toy``; the teacher's architecture)."""
    return ensure_init_transformer(root, name="init-toy", overrides=TOY_TEACHER_WAN_OVERRIDES)


def finetune_default_config(root: Path = TOY_ROOT, output_dir: str | None = None,
                            spec: ToyWorldSpec | None = None) -> dict[str, Any]:
    """The toy fine-tuning run: a tiny Wan learns the toy world (``spec``, default the default world) from random
    init by flow matching."""
    data = ensure_toy_data(root, spec)
    init = ensure_teacher_init(root)
    settings = toy_finetune_settings(spec)
    return {
        # The toy world has no VAE: its latents are generated with RMS 1 and used as they are.
        "models": {"student": {"family": "wan", "init_from": str(init), "trainable": True, "flow_shift": 3.0,
                               "latent_stats": "identity"}},
        "method": settings["method"],
        "training": {
            "data": {"data_path": str(data), **settings["data"]},
            "optimizer": settings["optimizer"],
            "loop": settings["loop"],
            "checkpoint": {"output_dir": output_dir or str(root / "finetune"), "save_steps": 0, "keep_last": 2},
        },
    }


def toy_teacher_dir(root: Path = TOY_ROOT) -> Path:
    return root / "teacher"


def teacher_finetune_config(root: Path = TOY_ROOT, spec: ToyWorldSpec | None = None) -> dict[str, Any]:
    """The toy teacher's training run: the toy fine-tune, writing its run files to ``<root>/teacher-train``."""
    cfg = finetune_default_config(root, output_dir=str(root / "teacher-train"), spec=spec)
    cfg["training"]["tracker"] = {"backends": []}
    return cfg


def ensure_toy_teacher(accelerator: Any, root: Path = TOY_ROOT, spec: ToyWorldSpec | None = None) -> Path:
    """The tiny teacher (``<root>/teacher``, a diffusers dir with ``transformer/``) of the world ``spec``
    (default: the default world; :data:`CAUSAL_TOY_SPEC` in :data:`CAUSAL_TOY_ROOT` for the causal one, whose
    teacher is the same bidirectional ``wan`` fine-tune), trained on first use.

    Collective: every rank must call it. Trains with ``finetune`` in-process on ``accelerator``, exports the
    student of that run, then renames it into place, so an interrupted run leaves no half-written teacher."""
    import logging

    import torch.distributed as dist

    from fv_accel.checkpoint.gather import save_transformer_pretrained
    from fv_accel.config import resolve_config
    from fv_accel.run import train

    out = toy_teacher_dir(root)
    if (out / "transformer" / "config.json").is_file() and _stored_teacher_recipe(out) == toy_teacher_recipe(spec):
        return out
    logging.getLogger("fv_accel").info("toy: training the teacher into %s (first use only)", out)
    cfg = resolve_config(teacher_finetune_config(root, spec))
    trainer = train(cfg, accelerator)
    tmp = root / ".teacher.tmp"
    if trainer.topology.is_main and tmp.exists():
        shutil.rmtree(tmp)
    save_transformer_pretrained(trainer.method.student.transformer, tmp / "transformer")
    if trainer.topology.is_main:
        (tmp / "toy_recipe.json").write_text(json.dumps(toy_teacher_recipe(spec), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


#: the toy distillation's EMA decay (the quality table samples the EMA student)
TOY_EMA_DECAY = 0.9


def distill_default_config(root: Path = TOY_ROOT, output_dir: str | None = None,
                           teacher_dir: Path | None = None) -> dict[str, Any]:
    """The toy DMD2 run: 4-step student and critic both initialised from the toy teacher.

    Settings (docs/distillation.md "The toy default"): critic lr 2× the student's, 5 critic updates per student
    update, score timesteps shifted by 5, student Adam β1 = 0, EMA of the student. The toy teacher is trained
    without CFG dropout, so its guidance scale is 1."""
    data = ensure_toy_data(root)
    teacher = str(teacher_dir or toy_teacher_dir(root))
    return {
        "models": {
            "student": {"family": "wan", "init_from": teacher, "trainable": True, "flow_shift": 3.0,
                        "latent_stats": "identity"},
            "teacher": {"family": "wan", "init_from": teacher, "trainable": False, "flow_shift": 3.0,
                        "frozen_dtype": "fp32", "latent_stats": "identity"},
        },
        "method": {
            "name": "dmd2",
            "rollout_mode": "simulate",
            "dmd_denoising_steps": [1000, 750, 500, 250],
            # 5 critic steps per student step and score timesteps shifted by 5 (not 3 and 3): the student then
            # keeps every mode on 3 seeds (entropy 0.71–0.74 → ≥ 0.86); docs/distillation.md "Diversity over seeds"
            "generator_update_interval": 5,
            "score_timestep_shift": 5.0,
            "real_score_guidance_scale": 1.0,
            # 2× the student's: with the 8-head teacher 4× leaves student@4 at 0.91× teacher@4, 2× at 0.64–0.74×
            # (3 data seeds; benchmarks/RESULTS.md, "The toy teacher")
            "critic_optimizer": {"learning_rate": 4e-4, "betas": [0.0, 0.999]},
        },
        "training": {
            # The toy file lists its rows by condition and mode: windows of row groups would fill a batch with a
            # few modes; a plain row permutation (cheap at this size) gives every batch a mix.
            "data": {"data_path": str(data), "seed": 0, "train_batch_size": 32, "text_len": 8, "shuffle": "rows"},
            "optimizer": {"learning_rate": 2e-4, "betas": [0.0, 0.999]},
            "loop": {"max_train_steps": 300, "max_grad_norm": 1.0},
            "checkpoint": {"output_dir": output_dir or str(root / "distill"), "save_steps": 0, "keep_last": 2},
        },
        "callbacks": {"ema": {"decay": TOY_EMA_DECAY, "start_step": 0}},
    }


def nearest_mode(latents: torch.Tensor, conditions: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Per sample: index of the nearest mode centre *of its own condition* (another condition's centre never
    counts, however near), the assignment behind the quality table's mode coverage and balance.

    ``latents`` [N, C, T, H, W] in the stored space; ``conditions`` [N]; ``centres`` [N_cond, N_mode, C, T, H, W]
    (``world.safetensors``)."""
    own = centres[conditions.long()].flatten(2).double()  # [N, N_mode, D]
    return (own - latents.flatten(1).double()[:, None]).norm(dim=2).argmin(dim=1)
