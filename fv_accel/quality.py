"""The toy world's distillation-quality table: distance to the data of student@K, teacher@K and teacher@many.

All three samplers start from the same initial noise (a fresh generator per row, same seed) on the same
conditioning rows, so the numbers differ only by the model and the sampler. The metric is
:func:`fv_accel.toy.distance_to_data` (distance to the nearest same-condition data sample per √dim), averaged.
Every rank runs the forwards (FSDP2 forwards are collectives); every rank gets the same numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from fv_accel.data import ParquetLatentDataset
from fv_accel.models.base import ModelBase
from fv_accel.sampling import DMDSampler, EulerSampler, spread_rows
from fv_accel.toy import distance_to_data


def conditioning(data_dir: str | os.PathLike[str], rows: Sequence[int], text_len: int
                 ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Text embeddings [N, L, D] of ``rows`` and the dataset's latent shape [C, T, H, W]."""
    dataset = ParquetLatentDataset(str(data_dir), text_len=text_len)
    text = torch.stack([dataset.load(i).text_embeds_ld for i in rows])
    return text, dataset.latent_shape


@torch.no_grad()
def sample_stored(model: ModelBase, text_bld: torch.Tensor, latent_shape: Sequence[int],
                  sampler: EulerSampler | DMDSampler, *, seed: int) -> torch.Tensor:
    """Samples in the dataset's stored (denormalised) latent space, float32 on CPU, from one generator seeded
    with ``seed`` (no guidance: the unconditional embeddings are not passed)."""
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = sampler(model, text_bld.to(device), None, latent_shape, gen)
    return model.denormalize_latents(x0.float()).float().cpu()


def toy_quality(student: ModelBase, teacher: ModelBase, data_dir: str | os.PathLike[str], *,
                dmd_denoising_steps: Sequence[int], num_samples: int = 64, seed: int = 0,
                teacher_many_steps: int = 50, text_len: int = 8) -> dict[str, float]:
    """``{"student@K", "teacher@K", "teacher@<many>"}`` → mean distance to the data (lower is better)."""
    num_rows = len(ParquetLatentDataset(str(data_dir), text_len=1))
    rows = spread_rows(num_rows, num_samples)
    text, shape = conditioning(data_dir, rows, text_len)
    index = torch.tensor(rows, dtype=torch.int64)
    k = len(dmd_denoising_steps)
    runs: dict[str, tuple[ModelBase, EulerSampler | DMDSampler]] = {
        f"student@{k}": (student, DMDSampler(tuple(dmd_denoising_steps))),
        f"teacher@{k}": (teacher, EulerSampler(k)),
        f"teacher@{teacher_many_steps}": (teacher, EulerSampler(teacher_many_steps)),
    }
    out: dict[str, float] = {}
    for name, (model, sampler) in runs.items():
        latents = sample_stored(model, text, shape, sampler, seed=seed)
        out[name] = float(distance_to_data(latents, index, Path(data_dir)).mean())
    return out


def format_quality_table(results: dict[str, float]) -> str:
    lines = ["distance to data (nearest same-condition sample, per sqrt(dim); lower is better)"]
    width = max(len(k) for k in results)
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in results.items()]
    return "\n".join(lines)


def write_quality_json(results: dict[str, float], output_dir: str | os.PathLike[str]) -> Path:
    path = Path(output_dir) / "quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["format_quality_table", "sample_stored", "toy_quality", "write_quality_json"]
