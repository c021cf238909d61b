"""The toy world's distillation-quality table: precision and mode recall of student@K, teacher@K and teacher@many.

All three samplers start from the same initial noise (one generator, same seed) on the same conditioning rows
(the same number per condition), so the numbers differ only by the model and the sampler. Per model:

- ``distance``: :func:`fv_accel.toy.distance_to_data` (to the nearest same-condition data sample, per √dim),
  averaged — precision, which a model that collapses onto one mode per condition still scores well on;
- ``mode_coverage``: each sample is assigned to the nearest mode centre of its own condition
  (:func:`fv_accel.toy.nearest_mode`); the share of the sampled (condition, mode) pairs that got a sample;
- ``mode_entropy``: per condition, the entropy of that assignment's histogram over log(num_modes) (1 = even,
  0 = one mode), averaged over the conditions.

With ``frames_per_block`` (a causal student's block size; the causal toy world, ``fv_accel.toy.CAUSAL_TOY_SPEC``)
each model also gets, per block of latent frames (:func:`fv_accel.causal_blocks.block_sizes`, remainder first),
the same precision and coverage on that block's frames alone, and ``consistency``: the share of samples whose
blocks are all assigned to the same mode. A sample that starts on one mode's path and continues on another's
scores well per block but fails consistency (and the whole-clip distance).

``quality.png`` shows the same samples: one panel per condition, a 2-D PCA fitted on that condition's data.
Every rank runs the forwards (FSDP2 forwards are collectives); every rank gets the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fv_accel.causal_blocks import block_sizes, block_starts
from fv_accel.data import ParquetLatentDataset
from fv_accel.models.base import ModelBase
from fv_accel.sampling import DMDSampler, EulerSampler
from fv_accel.toy import distance_to_data, load_world, nearest_mode

logger = logging.getLogger("fv_accel")

#: at least this many samples per model (spread evenly over the conditions)
MIN_NUM_SAMPLES = 64
#: samples per condition unless asked otherwise: enough for a 3-mode histogram to mean something
DEFAULT_SAMPLES_PER_CONDITION = 16


def conditioning(data_dir: str | os.PathLike[str], rows: Sequence[int], text_len: int
                 ) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Text embeddings [N, L, D] of ``rows`` and the dataset's latent shape [C, T, H, W]."""
    dataset = ParquetLatentDataset(str(data_dir), text_len=text_len)
    text = torch.stack([dataset.load(i).text_embeds_ld for i in rows])
    return text, dataset.latent_shape


#: ``(model, text [B, L, D], uncond or None, latent_shape, generator)`` → x0 [B, C, T, H, W] in the normalised space:
#: :class:`fv_accel.sampling.EulerSampler`, :class:`fv_accel.sampling.DMDSampler`, or a causal student's streaming
#: sampler
SampleFn = Callable[[ModelBase, torch.Tensor, torch.Tensor | None, Sequence[int], torch.Generator], torch.Tensor]


@torch.no_grad()
def sample_stored(model: ModelBase, text_bld: torch.Tensor, latent_shape: Sequence[int],
                  sampler: EulerSampler | DMDSampler | SampleFn, *, seed: int) -> torch.Tensor:
    """Samples in the dataset's stored (denormalised) latent space, float32 on CPU, from one generator seeded
    with ``seed`` (no guidance: the unconditional embeddings are not passed)."""
    device = model.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x0 = sampler(model, text_bld.to(device), None, latent_shape, gen)
    return model.denormalize_latents(x0.float()).float().cpu()


@dataclass(frozen=True)
class BlockQuality:
    """One block of latent frames ``[start, end)``: the whole-clip metrics restricted to its frames."""

    start: int
    end: int
    distance: float
    """Mean over samples of the distance from the block's frames to the same frames of the nearest
    same-condition data sample (nearest for this block alone), per √(block dim)."""
    mode_coverage: float
    """Share of the sampled (condition, mode) pairs hit when a sample's block counts for the mode whose centre
    is nearest on the block's frames."""


@dataclass(frozen=True)
class ModelQuality:
    distance: float
    """Mean distance to the nearest same-condition data sample, per √dim (lower is better)."""
    mode_coverage: float
    """Share of the sampled (condition, mode) pairs with at least one sample assigned (1 = no mode dropped)."""
    mode_entropy: float
    """Mean over conditions of the assignment histogram's entropy / log(num_modes) (1 = even, 0 = one mode)."""
    blocks: tuple[BlockQuality, ...] = ()
    """Per block of latent frames, in order; empty when the table was made without a block size."""
    consistency: float | None = None
    """Share of samples whose blocks all got the same mode (None without blocks)."""


@dataclass(frozen=True)
class ToyQuality:
    """The quality table's numbers and the samples behind them (for the picture)."""

    models: dict[str, ModelQuality]
    samples: dict[str, torch.Tensor]
    """model name → its samples [N, C, T, H, W] in the stored latent space."""
    conditions: torch.Tensor
    """[N]: the condition of each sample (the same rows for every model)."""
    num_modes: int

    @property
    def samples_per_condition(self) -> int:
        return int(torch.bincount(self.conditions).max())

    @property
    def num_conditions(self) -> int:
        return int(self.conditions.unique().numel())


def mode_histograms(conditions: torch.Tensor, modes: torch.Tensor, num_modes: int) -> torch.Tensor:
    """[N_sampled_cond, num_modes] counts of samples per mode, one row per condition that has samples."""
    present = conditions.unique()
    return torch.stack([torch.bincount(modes[conditions == c], minlength=num_modes) for c in present])


def mode_coverage(conditions: torch.Tensor, modes: torch.Tensor, num_modes: int) -> float:
    """Share of (condition, mode) pairs, over the conditions that have samples, hit by at least one sample."""
    return float((mode_histograms(conditions, modes, num_modes) > 0).double().mean())


def mode_entropy(conditions: torch.Tensor, modes: torch.Tensor, num_modes: int) -> float:
    """Mean over the sampled conditions of the mode histogram's entropy / log(num_modes)."""
    if num_modes < 2:
        return 1.0  # one mode: every histogram is as even as it can be
    counts = mode_histograms(conditions, modes, num_modes).double()
    p = counts / counts.sum(dim=1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=1)  # 0·log 0 = 0
    return float((entropy / math.log(num_modes)).mean())


def frame_blocks(num_frames: int, frames_per_block: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every block (:func:`fv_accel.causal_blocks.block_sizes`: the first takes the
    remainder)."""
    starts = block_starts(num_frames, frames_per_block)
    return [(start, start + size) for start, size in zip(starts, block_sizes(num_frames, frames_per_block),
                                                          strict=True)]


def block_modes(latents: torch.Tensor, conditions: torch.Tensor, centres: torch.Tensor,
                blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[N, num_blocks]: per sample and block, the nearest mode centre of its own condition on that block's
    frames (``latents`` [N, C, T, H, W], ``centres`` [N_cond, N_mode, C, T, H, W])."""
    return torch.stack([nearest_mode(latents[:, :, s:e], conditions, centres[:, :, :, s:e]) for s, e in blocks],
                       dim=1)


def block_distances(latents: torch.Tensor, conditions: torch.Tensor, data: torch.Tensor,
                    data_conditions: torch.Tensor, blocks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[N, num_blocks]: per sample and block, the distance from the block's frames to the same frames of the
    nearest data sample of the same condition (each block its own nearest), divided by √(block dim)."""
    out = torch.empty(latents.shape[0], len(blocks), dtype=torch.float64)
    for c in conditions.unique().tolist():
        mine, theirs = conditions == c, data[data_conditions == c].double()
        for b, (s, e) in enumerate(blocks):
            x = latents[mine, :, s:e].flatten(1).double()
            d = torch.cdist(x, theirs[:, :, s:e].flatten(1)).min(dim=1).values
            out[mine, b] = d / math.sqrt(x.shape[1])
    return out


def consistency(modes_nb: torch.Tensor) -> float:
    """Share of samples (rows of ``modes_nb`` [N, num_blocks]) whose blocks are all assigned to one mode."""
    return float((modes_nb == modes_nb[:, :1]).all(dim=1).double().mean())


def per_block_quality(latents: torch.Tensor, conditions: torch.Tensor, centres: torch.Tensor, data: torch.Tensor,
                      data_conditions: torch.Tensor, frames_per_block: int
                      ) -> tuple[tuple[BlockQuality, ...], float]:
    """The per-block entries of :class:`ModelQuality` and its ``consistency`` for ``latents`` [N, C, T, H, W]."""
    num_modes = centres.shape[1]
    blocks = frame_blocks(latents.shape[2], frames_per_block)
    modes = block_modes(latents, conditions, centres, blocks)
    dist = block_distances(latents, conditions, data, data_conditions, blocks)
    per_block = tuple(BlockQuality(start=s, end=e, distance=float(dist[:, b].mean()),
                                   mode_coverage=mode_coverage(conditions, modes[:, b], num_modes))
                      for b, (s, e) in enumerate(blocks))
    return per_block, consistency(modes)


def balanced_rows(row_condition: torch.Tensor, samples_per_condition: int) -> list[int]:
    """``samples_per_condition`` dataset rows of every condition, spread over that condition's rows (repeated
    when it has fewer; a toy row's conditioning is its condition's text, so a repeat is the same prompt)."""
    rows: list[int] = []
    for c in row_condition.unique().tolist():
        of_c = (row_condition == c).nonzero().flatten().tolist()
        rows += [of_c[i * len(of_c) // samples_per_condition] for i in range(samples_per_condition)]
    return rows


def toy_quality(student: ModelBase, teacher: ModelBase, data_dir: str | os.PathLike[str], *,
                dmd_denoising_steps: Sequence[int], samples_per_condition: int | None = None, seed: int = 0,
                teacher_many_steps: int = 50, text_len: int = 8, frames_per_block: int | None = None,
                student_sampler: SampleFn | None = None) -> ToyQuality:
    """``student@K``, ``teacher@K`` and ``teacher@<many>``: precision and mode recall on the toy world.

    ``samples_per_condition`` None: 16, or more when needed for :data:`MIN_NUM_SAMPLES` samples per model.
    ``frames_per_block``: also the per-block metrics and consistency (blocks of that many latent frames).
    ``student_sampler``: how student@K samples (default the DMD sampler over ``dmd_denoising_steps``; a causal
    student passes its block-by-block streaming sampler)."""
    world = load_world(Path(data_dir))
    num_conditions, num_modes = world["centres"].shape[:2]
    if samples_per_condition is None:
        samples_per_condition = max(DEFAULT_SAMPLES_PER_CONDITION, math.ceil(MIN_NUM_SAMPLES / num_conditions))
    rows = balanced_rows(world["row_condition"], samples_per_condition)
    text, shape = conditioning(data_dir, rows, text_len)
    index = torch.tensor(rows, dtype=torch.int64)
    conditions = world["row_condition"][index].long()
    k = len(dmd_denoising_steps)
    runs: dict[str, tuple[ModelBase, EulerSampler | DMDSampler | SampleFn]] = {
        f"student@{k}": (student, student_sampler or DMDSampler(tuple(dmd_denoising_steps))),
        f"teacher@{k}": (teacher, EulerSampler(k)),
        f"teacher@{teacher_many_steps}": (teacher, EulerSampler(teacher_many_steps)),
    }
    data = data_latents(data_dir) if frames_per_block is not None else None
    models: dict[str, ModelQuality] = {}
    samples: dict[str, torch.Tensor] = {}
    for name, (model, sampler) in runs.items():
        latents = sample_stored(model, text, shape, sampler, seed=seed)
        modes = nearest_mode(latents, conditions, world["centres"])
        blocks: tuple[BlockQuality, ...] = ()
        consistent = None
        if data is not None and frames_per_block is not None:
            blocks, consistent = per_block_quality(latents, conditions, world["centres"], data,
                                                   world["row_condition"], frames_per_block)
        models[name] = ModelQuality(distance=float(distance_to_data(latents, index, Path(data_dir)).mean()),
                                    mode_coverage=mode_coverage(conditions, modes, num_modes),
                                    mode_entropy=mode_entropy(conditions, modes, num_modes),
                                    blocks=blocks, consistency=consistent)
        samples[name] = latents
    return ToyQuality(models=models, samples=samples, conditions=conditions, num_modes=int(num_modes))


def format_quality_table(result: ToyQuality) -> str:
    n = result.samples_per_condition
    lines = [f"{n * result.num_conditions} samples per model ({n} per condition, {result.num_conditions} "
             f"conditions x {result.num_modes} modes)"]
    width = max(len(k) for k in [*result.models, "model"])
    lines.append(f"  {'model':<{width}}  distance  coverage  entropy")
    lines += [f"  {name:<{width}}  {q.distance:8.4f}  {q.mode_coverage:8.1%}  {q.mode_entropy:7.2f}"
              for name, q in result.models.items()]
    lines += ["distance: to the nearest same-condition data sample, per sqrt(dim), lower is better",
              "coverage: share of (condition, mode) pairs hit (a sample counts for its condition's nearest mode)",
              "entropy: mode balance per condition / log(num_modes), mean over conditions (1 = even, 0 = one mode)"]
    with_blocks = {name: q for name, q in result.models.items() if q.blocks}
    if with_blocks:
        spans = next(iter(with_blocks.values())).blocks
        heads = [f"frames {b.start}-{b.end - 1}" for b in spans]
        cell = max(16, *(len(h) for h in heads))
        lines.append("per block (distance / coverage on the block's frames):")
        lines.append(f"  {'model':<{width}}  consistent  " + "  ".join(f"{h:>{cell}}" for h in heads))
        for name, q in with_blocks.items():
            cells = [f"{b.distance:.4f} / {b.mode_coverage:6.1%}" for b in q.blocks]
            lines.append(f"  {name:<{width}}  {q.consistency or 0.0:10.1%}  "
                         + "  ".join(f"{c:>{cell}}" for c in cells))
        lines.append("consistent: share of samples whose blocks all have one nearest mode (switching mode fails)")
    return "\n".join(lines)


def quality_json(result: ToyQuality) -> dict[str, Any]:
    """What ``quality.json`` holds. The top-level ``"<model>": distance`` entries are what the file held before
    coverage and entropy were added (kept for older readers); ``"models"`` has every metric, with ``blocks``
    (``[{start, end, distance, mode_coverage}, ...]``) and ``consistency`` only when the table has blocks."""
    def entry(q: ModelQuality) -> dict[str, Any]:
        out = asdict(q)
        if not q.blocks:
            del out["blocks"], out["consistency"]
        return out

    return {
        **{name: q.distance for name, q in result.models.items()},
        "models": {name: entry(q) for name, q in result.models.items()},
        "samples_per_condition": result.samples_per_condition,
        "num_conditions": result.num_conditions,
        "num_modes": result.num_modes,
    }


def write_quality_json(result: ToyQuality, output_dir: str | os.PathLike[str]) -> Path:
    path = Path(output_dir) / "quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(quality_json(result), indent=2) + "\n")
    os.replace(tmp, path)
    return path


# -- the picture ----------------------------------------------------------------------------------------------
#: RGB of the data points and of the models, in the order they are drawn (later on top)
DATA_COLOUR = (200, 200, 200)
MODEL_COLOURS = ((31, 119, 180), (255, 127, 14), (214, 39, 40))
#: pixel size of one panel and height of the legend strip above the panels
PANEL_SIZE = 300
LEGEND_HEIGHT = 30
_MARGIN = 12
_TITLE_HEIGHT = 18


def data_latents(data_dir: str | os.PathLike[str]) -> torch.Tensor:
    """Every data row's latents [N_rows, C, T, H, W] (stored space)."""
    dataset = ParquetLatentDataset(str(data_dir), text_len=1)
    return torch.stack([dataset[i].latents_cthw for i in range(len(dataset))])  # type: ignore[misc]  # toy data is T2V: every row has latents


def pca_2d(points_nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and the two leading principal directions [2, D] of ``points_nd`` (a zero second one when the
    points span a line)."""
    x = points_nd.double()
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    axes = torch.zeros(2, x.shape[1], dtype=torch.float64)
    axes[: min(2, vh.shape[0])] = vh[:2]
    return mean, axes


#: marker of the data, then of each model in turn (told apart without colour too)
_MARKERS = ("dot", "ring", "square", "triangle")


def _marker(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, colour: tuple[int, int, int]) -> None:
    r = 6.0 if kind == "dot" else 4.0  # data: a wide light disc, so a sample on a mode leaves a halo
    if kind in ("dot", "ring"):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour if kind == "dot" else None,
                     outline=colour, width=2)
    elif kind == "square":
        draw.rectangle((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r, y + r - 1)], fill=colour)


def _to_pixels(points_n2: torch.Tensor, lo: torch.Tensor, span: float, x0: int, y0: int, size: int
               ) -> list[tuple[float, float]]:
    """Plot coordinates → pixels of the square ``size`` at (x0, y0); PC2 points up."""
    u = (points_n2 - lo) / span
    return [(x0 + float(a) * size, y0 + (1 - float(b)) * size) for a, b in u.tolist()]


def quality_image(data: torch.Tensor, data_conditions: torch.Tensor, samples: dict[str, torch.Tensor],
                  sample_conditions: torch.Tensor, *, num_panels: int = 4) -> Image.Image:
    """One panel per condition (the first ``num_panels`` sampled ones, 2 per row): that condition's data and
    every model's samples, projected on the 2-D PCA of its data, so a dropped mode shows as a data cluster
    with no sample near it. Same scale on both axes; the legend is the strip of ``LEGEND_HEIGHT`` at the top.

    ``samples`` (at most ``len(MODEL_COLOURS)`` models, drawn in that order) hold [N, ...] latents whose
    conditions are ``sample_conditions`` [N]; ``data`` [M, ...] with ``data_conditions`` [M]."""
    if len(samples) > len(MODEL_COLOURS):
        raise ValueError(f"quality_image: at most {len(MODEL_COLOURS)} models, got {list(samples)}")
    shown = sample_conditions.unique().tolist()[:num_panels]
    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    image = Image.new("RGB", (cols * PANEL_SIZE, LEGEND_HEIGHT + rows * PANEL_SIZE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    # legend
    x = _MARGIN
    colours = [DATA_COLOUR, *MODEL_COLOURS]
    for i, name in enumerate(["data", *samples]):
        _marker(draw, _MARKERS[i], x + 5, LEGEND_HEIGHT / 2, colours[i])
        draw.text((x + 14, LEGEND_HEIGHT / 2), name, fill="black", font=font, anchor="lm")
        x += 24 + int(draw.textlength(name, font=font))
    plot = PANEL_SIZE - 2 * _MARGIN - _TITLE_HEIGHT
    for p, cond in enumerate(shown):
        left, top = (p % cols) * PANEL_SIZE, LEGEND_HEIGHT + (p // cols) * PANEL_SIZE
        own_data = data[data_conditions == cond].flatten(1)
        mean, axes = pca_2d(own_data)
        projected = [(own_data.double() - mean) @ axes.T]
        projected += [(s[sample_conditions == cond].flatten(1).double() - mean) @ axes.T for s in samples.values()]
        every = torch.cat(projected)
        hi, lo = every.max(dim=0).values, every.min(dim=0).values
        span = float((hi - lo).max()) * 1.08 + 1e-9  # one scale for both axes: distances look like distances
        lo = (hi + lo) / 2 - span / 2
        x0, y0 = left + _MARGIN, top + _MARGIN + _TITLE_HEIGHT
        draw.rectangle((x0, y0, x0 + plot, y0 + plot), outline=(200, 200, 200))
        draw.text((x0, top + _MARGIN), f"condition {cond} (PCA of its data)", fill="black", font=font)
        for i, points in enumerate(projected):
            for px, py in _to_pixels(points, lo, span, x0, y0, plot):
                _marker(draw, _MARKERS[i], px, py, colours[i])
    return image


def write_quality_png(result: ToyQuality, data_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str]
                      ) -> tuple[Path, Image.Image]:
    """``<output_dir>/quality.png`` (written atomically): :func:`quality_image` of ``result``'s samples, the
    many-step teacher first so the few-step models are drawn on top."""
    world = load_world(Path(data_dir))
    ordered = dict(reversed(list(result.samples.items())))  # teacher@many, teacher@K, student@K
    image = quality_image(data_latents(data_dir), world["row_condition"], ordered, result.conditions)
    path = Path(output_dir) / "quality.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".quality.png.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path, image


def log_quality_image(accelerator: Any, image: Image.Image, *, step: int, name: str = "quality/toy") -> None:
    """Log the picture to every tracker of ``accelerator`` that takes images (Accelerate's ``log_images``);
    the others are skipped (debug log). Main process only: trackers live there."""
    for tracker in getattr(accelerator, "trackers", []):
        kind = getattr(tracker, "name", type(tracker).__name__)
        if not hasattr(tracker, "log_images"):
            logger.debug("quality.png: tracker %s takes no images; not logged there", kind)
            continue
        try:
            if kind == "tensorboard":  # SummaryWriter.add_images wants a batch array and its layout
                tracker.log_images({name: np.asarray(image)[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: [image]}, step=step)
        except Exception as exc:  # the file is on disk; a tracker hiccup after training must not fail the run
            logger.warning("could not log quality.png to %s: %s", kind, exc)


__all__ = ["BlockQuality", "ModelQuality", "SampleFn", "ToyQuality", "block_distances", "block_modes",
           "consistency", "frame_blocks", "per_block_quality", "format_quality_table", "log_quality_image", "mode_coverage",
           "mode_entropy", "quality_image", "quality_json", "sample_stored", "toy_quality", "write_quality_json",
           "write_quality_png"]
