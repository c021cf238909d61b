"""The teacher's ODE trajectories for ``method.name: ode_init`` (written by ``recipes/ode_pairs.py``).

For each chosen row of a latent dataset (its text embedding; its latent only fixes the shape), noise is drawn
from the row's own seed ``prompt_seed(seed, row)`` (``fv_accel/prompts.py``), so a row's pair is the same
whichever rank, world size or restart makes it. The teacher integrates the flow ODE from that noise with Euler
steps along its shifted schedule (``flow.sampling_schedule(teacher_steps, shift)``) with classifier-free
guidance ``uncond + w·(cond − uncond)`` against zeros or a negative-prompt embedding, as DMD2's teacher does
(``fv_accel.sampling.euler_integrate``, the loop ``euler_sample`` runs). The student's K timesteps
(``denoising_step_list``; used as given, like ``method.dmd_denoising_steps``: no warping) are inserted into that
grid where they are not already on it, so the states recorded at them are exact ODE states, not the nearest
grid point's; the final state is x0.

**Layout.** ``<output>/shard-NNNNNN.parquet``, shard ``s`` holding chosen rows ``[s·R, (s+1)·R)`` (R =
``rows_per_shard``) in one row group; rank ``r`` of ``W`` writes the shards with ``s % W == r``. A shard is written
under a hidden temporary name and renamed, so a killed run loses at most the shards in progress and a rerun
writes only the missing ones. ``<output>/_ode_pairs.json`` (the manifest, skipped by the data loader) records
what the pairs are made of; a rerun with any different setting is refused (ConfigError, exit 2) instead of
mixing two trajectories in one dataset.

**Schema** (read by ``fv_accel.data.ParquetLatentDataset`` as kind ``ode_pairs``): the source row's ``id``,
``caption`` and ``text_embedding_{bytes,shape,dtype}`` copied verbatim; ``vae_latent_{bytes,shape,dtype}`` = the
teacher's x0; ``ode_latents_{bytes,shape,dtype}`` = its states at the K student timesteps [K, C, T, H, W];
``ode_timesteps`` (K floats); ``source_index`` (the row in the source dataset) and ``noise_seed``. Latents are
in the dataset's stored (unnormalised) space, like every ``vae_latent``: the teacher's own statistics undo its
normalisation, and the student's redo it (all roles share one latent space).

**Cost at scale.** Wan 2.1 1.3B at 480×832, 81 frames: a latent is 16×21×60×104 = 2.10 M values, 8.4 MB in fp32,
4.2 MB in bf16. With K = 4 a row holds K + 1 = 5 latents: 42 MB (fp32) or 21 MB (bf16), plus its text embedding
copied in the source's dtype (at most 512×4096: 4.2 MB in bf16). All 600k rows of a large dataset would take
600k × 42 MB ≈ 25 TB of latents in fp32, ≈ 13 TB in bf16 (≈ 15 TB with bf16 text): so the default stores bf16 (the
student computes in bf16 anyway) and takes ``num_rows`` = 2048 rows spread evenly over the dataset
(``fv_accel.sampling.spread_rows``): 2048 × 25 MB ≈ 52 GB. The teacher runs ``teacher_steps`` (48, CausVid's) × 2 (CFG) forwards per row, plus one
pair per student timestep off its grid.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fv_accel import flow
from fv_accel.data.dataset import TEXT_ONLY_COLUMNS, ParquetLatentDataset
from fv_accel.errors import ConfigError
from fv_accel.models.base import ModelBase
from fv_accel.prompts import prompt_seed
from fv_accel.sampling import euler_integrate, randn_rows, spread_rows

MANIFEST_NAME = "_ode_pairs.json"
"""The manifest beside the shards (an underscore name: the data loader never reads it as data)."""
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
#: two timesteps closer than this are the same grid point (the grid is float32)
_SAME_T = 1e-3


@dataclass(frozen=True)
class OdePairsSpec:
    """Everything the pairs depend on: written to the manifest and compared on every rerun."""

    teacher: str
    """The teacher's ``init_from``."""
    teacher_subfolder: str
    latent_stats: str
    source: str
    """The source dataset directory (resolved)."""
    source_rows: int
    """Rows in the source dataset (the chosen rows depend on it)."""
    num_rows: int
    """Rows taken, spread evenly over the source."""
    rows_per_shard: int
    denoising_steps: tuple[int, ...]
    """The student's K timesteps (``method.denoising_step_list`` of ode_init)."""
    teacher_steps: int
    shift: float
    guidance_scale: float
    uncond: str
    """``zeros`` or the negative-prompt parquet's path."""
    seed: int
    text_len: int
    dtype: str
    """Storage dtype of the latents: ``bf16`` or ``fp32``."""
    compute: str
    """Device type and mixed precision the teacher ran in (noise and numerics depend on both)."""

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.rows_per_shard)

    def manifest(self) -> dict[str, Any]:
        return {**asdict(self), "denoising_steps": list(self.denoising_steps), "num_shards": self.num_shards}


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"shard-{shard:06d}.parquet"


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ODE-pairs manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the ODE-pairs manifest is not a JSON object")
    return data


def check_or_write_manifest(spec: OdePairsSpec, out_dir: Path) -> None:
    """Refuse (ConfigError, exit 2) a directory whose manifest records other settings; else write it.

    Every rank may call it: the content is deterministic and written atomically, so concurrent writers agree."""
    wanted = spec.manifest()
    found = read_manifest(out_dir)
    if found is not None:
        diffs = [f"{k}: {found.get(k)!r} there, {v!r} now" for k, v in wanted.items() if found.get(k) != v]
        if diffs:
            raise ConfigError(f"{out_dir / MANIFEST_NAME}: these ODE pairs were made with other settings "
                              f"({'; '.join(diffs)}); use another --output or the same settings")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MANIFEST_NAME}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    tmp.write_text(json.dumps(wanted, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST_NAME)


def missing_shards(out_dir: Path, num_shards: int) -> list[int]:
    return [s for s in range(num_shards) if not shard_path(out_dir, s).is_file()]


def teacher_schedule(teacher_steps: int, shift: float, denoising_steps: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """The teacher's Euler grid: ``flow.sampling_schedule(teacher_steps, shift)`` with every student timestep not
    already on it (within 1e-3) inserted. Returns the grid (descending, float32) and each student timestep's
    position in it."""
    grid = flow.sampling_schedule(teacher_steps, shift).tolist()
    points = list(grid)
    for t in denoising_steps:
        if all(abs(p - t) > _SAME_T for p in points):
            points.append(float(t))
    points.sort(reverse=True)
    positions = [next(i for i, p in enumerate(points) if abs(p - t) <= _SAME_T) for t in denoising_steps]
    return torch.tensor(points, dtype=torch.float32), positions


def row_noise_seed(seed: int, row: int) -> int:
    """The seed of source row ``row``'s noise: a function of (seed, row) only."""
    return prompt_seed(seed, row)


@torch.no_grad()
def teacher_trajectories(teacher: ModelBase, text_bld: torch.Tensor, uncond_bld: torch.Tensor | None,
                         noise_seeds: Sequence[int], *, latent_shape: Sequence[int], schedule: torch.Tensor,
                         positions: Sequence[int], guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's states at ``positions`` of ``schedule`` [B, K, C, T, H, W] and its final x0 [B, C, T, H, W],
    in the model's normalised space, from noise drawn per row with ``noise_seeds``."""
    device = text_bld.device
    gens = [torch.Generator(device=device).manual_seed(s) for s in noise_seeds]
    x = randn_rows((len(gens), *latent_shape), gens, device)
    guided = guidance_scale != 1.0
    x0, states = euler_integrate(teacher, x, schedule.to(device), text_bld, guidance_scale=guidance_scale,
                                 uncond_embeds_bld=uncond_bld if guided else None, record=positions)
    return torch.stack(states, dim=1), x0


def _to_bytes(x: torch.Tensor, dtype: str) -> bytes:
    x = x.detach().to("cpu", _DTYPES[dtype]).contiguous()
    if x.dtype == torch.bfloat16:  # numpy has no bf16: the same 2-byte words as int16
        return x.view(torch.int16).numpy().tobytes()
    return x.numpy().tobytes()


def write_shard(out_dir: Path, shard: int, rows: dict[str, list[Any]]) -> Path:
    """Write one shard under a hidden temporary name, then rename it into place (a killed writer leaves no
    partial shard under the real name)."""
    path = shard_path(out_dir, shard)
    tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
    try:
        # One row per row group (as preprocessing writes): a shuffled reader decodes the row it needs, not up to
        # rows_per_shard × ~50 MB (a 720p trajectory in bf16) for each row it reads.
        pq.write_table(pa.table(rows), tmp, row_group_size=1, write_batch_size=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def chosen_rows(spec: OdePairsSpec) -> list[int]:
    return spread_rows(spec.source_rows, spec.num_rows)


def write_ode_pairs(spec: OdePairsSpec, teacher: ModelBase, dataset: ParquetLatentDataset, out_dir: Path, *,
                    rank: int, world_size: int, uncond_ld: torch.Tensor | None = None, batch_size: int = 1,
                    autocast_dtype: torch.dtype | None = None) -> list[int]:
    """Write this rank's missing shards (``s % world_size == rank``); returns the shards it wrote.

    ``uncond_ld``: the negative-prompt embedding [text_len, D] (None: zeros). ``autocast_dtype``: run the teacher
    under autocast in this dtype (bf16 mixed precision), None in its own dtype."""
    if len(dataset) != spec.source_rows:
        raise ConfigError(f"{spec.source}: {len(dataset)} rows, the spec says {spec.source_rows}")
    check_or_write_manifest(spec, out_dir)
    schedule, positions = teacher_schedule(spec.teacher_steps, spec.shift, spec.denoising_steps)
    rows_all = chosen_rows(spec)
    device = teacher.device
    shape = tuple(dataset.latent_shape)
    written = []
    for shard in missing_shards(out_dir, spec.num_shards):
        if shard % world_size != rank:
            continue
        rows = rows_all[shard * spec.rows_per_shard:(shard + 1) * spec.rows_per_shard]
        columns: dict[str, list[Any]] = {k: [] for k in (
            "id", "caption", *TEXT_ONLY_COLUMNS, "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype",
            "ode_latents_bytes", "ode_latents_shape", "ode_latents_dtype", "ode_timesteps", "source_index",
            "noise_seed")}
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            text = torch.stack([dataset.load(i).text_embeds_ld for i in batch]).to(device)
            uncond = None
            if spec.guidance_scale != 1.0:
                uncond = torch.zeros_like(text) if uncond_ld is None else uncond_ld.to(device).expand_as(text)
            seeds = [row_noise_seed(spec.seed, i) for i in batch]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                states, x0 = teacher_trajectories(teacher, text, uncond, seeds, latent_shape=shape,
                                                  schedule=schedule, positions=positions,
                                                  guidance_scale=spec.guidance_scale)
            b, k = states.shape[:2]
            # Stored (unnormalised) space, like every vae_latent; the student normalises on reading.
            states = teacher.denormalize_latents(states.float().flatten(0, 1)).reshape(b, k, *shape)
            x0 = teacher.denormalize_latents(x0.float())
            for j, row in enumerate(batch):
                raw = dataset.row_fields(row, ("id", "caption", *TEXT_ONLY_COLUMNS))
                columns["id"].append(str(raw["id"]) if raw["id"] is not None else f"row-{row}")
                columns["caption"].append(raw["caption"] or "")
                for c in TEXT_ONLY_COLUMNS:
                    columns[c].append(raw[c])
                columns["vae_latent_bytes"].append(_to_bytes(x0[j], spec.dtype))
                columns["vae_latent_shape"].append(list(shape))
                columns["vae_latent_dtype"].append(_DTYPE_NAMES[spec.dtype])
                columns["ode_latents_bytes"].append(_to_bytes(states[j], spec.dtype))
                columns["ode_latents_shape"].append([k, *shape])
                columns["ode_latents_dtype"].append(_DTYPE_NAMES[spec.dtype])
                columns["ode_timesteps"].append([float(t) for t in spec.denoising_steps])
                columns["source_index"].append(int(row))
                columns["noise_seed"].append(int(seeds[j]))
        write_shard(out_dir, shard, columns)
        written.append(shard)
    return written


def pairs_errors(data_dir: Path, denoising_steps: Sequence[int]) -> list[str]:
    """What makes ``data_dir`` unusable as ode_init data for ``denoising_steps`` (each a one-line message)."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return [f"{data_dir}: no {MANIFEST_NAME}; make the pairs with recipes/ode_pairs.py"]
    errors = []
    if [int(t) for t in manifest.get("denoising_steps", [])] != list(denoising_steps):
        errors.append(f"{data_dir}: the pairs hold the timesteps {manifest.get('denoising_steps')}, not "
                      f"{list(denoising_steps)}")
    missing = missing_shards(data_dir, int(manifest.get("num_shards", 0)))
    if missing:
        errors.append(f"{data_dir}: {len(missing)} of {manifest.get('num_shards')} shards missing (e.g. "
                      f"{shard_path(data_dir, missing[0]).name}); rerun recipes/ode_pairs.py to finish them")
    return errors


__all__ = ["MANIFEST_NAME", "OdePairsSpec", "check_or_write_manifest", "chosen_rows", "missing_shards",
           "pairs_errors", "read_manifest", "row_noise_seed", "shard_path", "teacher_schedule",
           "teacher_trajectories", "write_ode_pairs", "write_shard"]
