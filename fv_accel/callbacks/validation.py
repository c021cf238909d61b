"""Validation videos: sample the student (and its EMA weights) from fixed prompts with a fixed seed.

Every ``callbacks.validation.every_steps`` steps (and at step 0 with ``at_start``) the callback runs the
method's own sampler (:meth:`TrainingMethod.validation_sampler`: Euler for finetune, the few-step DMD sampler
for DMD2) on ``num_samples`` prompts: rows spread evenly over the validation data (``data_path``, else the
training data), whose precomputed text embeddings are read once. Prompt ``i``'s noise comes from its own
generator seeded with :func:`fv_accel.prompts.prompt_seed` (``seed``, ``i``) at every validation, for both
variants: the videos of different steps differ only by the weights, and a prompt's video does not depend on the
number of ranks or the batch it is sampled in. The training RNG is never touched, so validation does not change the run.

The prompts are split over the ranks: rank r samples prompts r, r + W, ... (W ranks). The weights are
FSDP-sharded, so each forward is a collective: every rank runs the same number of forwards on batches of the
same size, ranks with fewer prompts repeating one and discarding the result. The main process gathers the
latents (``[C, T, H, W]`` float32 per prompt and variant: 8.4 MB at 81×480×832), turns them into frames (the
VAE of the student's pipeline when ``init_from`` is one, else :func:`fv_accel.video.render_latents`), writes
``<output_dir>/validation/step-<step>/{student,ema}-<i>.mp4`` plus ``index.json``, and logs the videos to the
trackers. Nothing outlives the call but the prompt embeddings (a few KiB): no model copy is made; EMA weights
are swapped in place by the EMA callback and swapped back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fv_accel.callbacks.base import Callback
from fv_accel.config import RunConfig, ValidationConfig
from fv_accel.prompts import encode_prompts, prompt_seed
from fv_accel.sampling import spread_rows
from fv_accel.video import decode_with_vae, frame_grid, render_latents, write_mp4

if TYPE_CHECKING:
    from fv_accel.data import LatentBatch
    from fv_accel.runtime import Topology
    from fv_accel.trainer import Trainer

logger = logging.getLogger(__name__)


PROMPTS_FILE = "prompts.parquet"


def _file_metadata(path: Path) -> dict[str, str] | None:
    """The ``fv_accel.*`` schema metadata of a parquet file, or None when it does not exist or is unreadable."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # missing, partial or foreign: encode again
        return None
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"fv_accel.")}


def rank_prompts(num_prompts: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Prompt indices rank ``rank`` samples, padded to the same count on every rank, and how many are real.

    Rank r takes r, r + W, ...; the padding repeats one of its prompts (prompt 0 for a rank with none), so every
    rank runs the same forwards (collectives) and the padded results are discarded."""
    mine = list(range(rank, num_prompts, world_size))
    per_rank = -(-num_prompts // world_size)
    return mine + [mine[0] if mine else 0] * (per_rank - len(mine)), len(mine)


def merge_rank_latents(per_rank: list[dict[str, torch.Tensor]], num_prompts: int) -> dict[str, torch.Tensor]:
    """Per-rank latents (rank r holds prompts r, r + W, ..., unpadded) → ``[num_prompts, ...]`` per variant."""
    world_size = len(per_rank)
    out: dict[str, torch.Tensor] = {}
    for name, first in per_rank[0].items():
        full = torch.empty((num_prompts, *first.shape[1:]), dtype=first.dtype)
        for r, part in enumerate(per_rank):
            full[r::world_size] = part[name]
        out[name] = full
    return out


class ValidationCallback(Callback):
    name = "validation"

    def __init__(self, config: ValidationConfig, run_config: RunConfig) -> None:
        self.config = config
        self.run_config = run_config
        self.rows: list[int] = []
        self.where: list[str] = []
        self.prompts: LatentBatch | None = None
        """The validation prompts' batch, loaded at train start (every step samples the same ones)."""
        self._vae: torch.nn.Module | None = None
        self._vae_loaded = False

    # -- prompts --------------------------------------------------------------------------------------------
    def load_prompts(self, trainer: Trainer | None = None) -> LatentBatch:
        """Read the validation rows' text embeddings once (host memory; a few KiB for toy-sized runs), with the
        unconditional embedding training batches carry (the negative prompt when configured, else zeros)."""
        from fv_accel.data.dataset import ParquetLatentDataset, collate_latents, load_negative_prompt

        data_cfg = self.run_config.training.data
        if self.config.prompts:
            prompts_file = self.encode_captions(trainer)
            latent_shape = data_cfg.latent_shape
            if latent_shape is None and trainer is not None and trainer.data is not None:
                latent_shape = list(trainer.data.dataset.latent_shape)
            dataset = ParquetLatentDataset(str(prompts_file), text_len=data_cfg.text_len, latent_shape=latent_shape)
            self.rows = list(range(len(dataset)))
            self.where = [f"prompt {i}: {p}" for i, p in enumerate(self.config.prompts)]
        else:
            path = self.config.data_path or data_cfg.data_path
            dataset = ParquetLatentDataset(path, text_len=data_cfg.text_len, latent_shape=data_cfg.latent_shape)
            self.rows = spread_rows(len(dataset), self.config.num_samples)
            self.where = [dataset.where(i) for i in self.rows]
        samples = [dataset[i] for i in self.rows]
        batch = collate_latents(samples, dataset.latent_shape)
        if data_cfg.negative_prompt_path:
            # As fv_accel.data.DataStream does for training batches: CFG at validation pushes away from the same
            # unconditional embedding the model was trained against.
            uncond_ld = load_negative_prompt(data_cfg.negative_prompt_path, data_cfg.text_len)
            batch.uncond_embeds_bld = uncond_ld.expand(len(batch.index), -1, -1)
        return batch

    def encode_captions(self, trainer: Trainer | None) -> Path:
        """``callbacks.validation.prompts`` → ``<output_dir>/validation/prompts.parquet`` (text-only schema).

        The main process encodes them with the student pipeline's text encoder, as the student's family loads
        it (``ModelBase.load_encoders``; loaded for this and freed right after), writes the file, and every rank
        then reads it, so all ranks sample from identical embeddings. A later run into the same output dir (a
        resume) reuses the file when it was made from the same captions, text encoder and ``text_len``.
        Collective when ``trainer`` is given."""
        from fv_accel.data.preprocess import write_text_rows
        from fv_accel.models import FAMILIES

        out = Path(self.run_config.training.checkpoint.output_dir) / "validation" / PROMPTS_FILE
        student = self.run_config.models["student"]
        source = student.init_from
        text_len = self.run_config.training.data.text_len
        stamp = {"fv_accel.prompts": json.dumps(self.config.prompts), "fv_accel.text_encoder": source,
                 "fv_accel.text_len": str(text_len)}
        if (trainer is None or trainer.is_main) and _file_metadata(out) != stamp:
            device = trainer.accelerator.device if trainer is not None else torch.device("cpu")
            t0 = time.perf_counter()
            embeddings = encode_prompts(FAMILIES[student.family], source, list(self.config.prompts),
                                        key="models.student.init_from", what="callbacks.validation.prompts",
                                        device=device, text_len=text_len)
            write_text_rows(out, [f"prompt-{i}" for i in range(len(embeddings))], list(self.config.prompts),
                            embeddings, metadata=stamp)
            logger.info("validation: encoded %d prompt(s) with the text encoder of %s into %s (%.1f s)",
                        len(embeddings), source, out, time.perf_counter() - t0)
        if trainer is not None:
            trainer.accelerator.wait_for_everyone()
        return out

    def on_train_start(self, trainer: Trainer) -> None:
        self.prompts = self.load_prompts(trainer)

    def should_run(self, step: int) -> bool:
        if step == 0:
            return self.config.at_start
        return self.config.every_steps > 0 and step % self.config.every_steps == 0

    def on_validation(self, trainer: Trainer, step: int) -> None:
        if self.should_run(step):
            self.run(trainer, step)

    # -- sampling -------------------------------------------------------------------------------------------
    def _variants(self, trainer: Trainer) -> list[tuple[str, Any]]:
        """(name, context manager factory): the student's weights, then the EMA weights when EMA is on."""
        variants: list[tuple[str, Any]] = [("student", contextlib.nullcontext)]
        ema = trainer.callbacks.get("ema")
        if ema is not None:
            variants.append(("ema", ema.swapped_in))  # type: ignore[attr-defined]  # found by name: any callback named "ema" swaps in EMA weights
        return variants

    @torch.no_grad()
    def sample(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """Latents in the dataset's stored (unnormalised) space, ``[N, C, T, H, W]`` float32 per variant, on the
        main process ({} on the others). Collective: every rank must call it."""
        if self.prompts is None:
            self.prompts = self.load_prompts(trainer)
        method = trainer.method
        student = method.student
        sampler = method.validation_sampler()
        cond = student.prepare_batch(self.prompts, student.device)
        num_prompts = cond.batch_size
        # Per data rank: the ranks of a context-parallel group sample the same prompts, each a share of the tokens.
        topology = trainer.topology
        indices, num_real = rank_prompts(num_prompts, topology.data_rank, topology.data_world_size)
        chunk = max(1, self.run_config.training.data.train_batch_size)
        modules = list(student.modules().values())  # both experts of a two-expert student
        was_training = [m.training for m in modules]
        for module in modules:
            module.eval()
        local: dict[str, torch.Tensor] = {}
        try:
            for name, context in self._variants(trainer):
                # Fresh generators per variant and per validation: the same noise at every step, for both variants.
                gens = [torch.Generator(device=student.device).manual_seed(prompt_seed(self.config.seed, i))
                        for i in indices]
                parts = []
                with context():
                    for start in range(0, len(indices), chunk):
                        rows = torch.tensor(indices[start:start + chunk], device=cond.text_embeds_bld.device)
                        x0 = sampler(student, cond.text_embeds_bld[rows], cond.uncond_embeds_bld[rows],
                                     cond.latent_shape, gens[start:start + chunk])
                        parts.append(student.denormalize_latents(x0.float()).cpu())
                local[name] = torch.cat(parts)[:num_real]
        finally:
            for module, mode in zip(modules, was_training, strict=True):
                module.train(mode)
        return self._gather(local, num_prompts, topology)

    @staticmethod
    def _gather(local: dict[str, torch.Tensor], num_prompts: int, topology: Topology) -> dict[str, torch.Tensor]:
        """Every data rank's latents onto the main process, in prompt order; {} on the other ranks."""
        if topology.world_size == 1:
            return local
        import torch.distributed as dist

        # Object gather on the host: only the main process receives (N × 8.4 MB per variant at 81×480×832).
        # One copy per data rank: the other ranks of a context-parallel group hold the same latents.
        sent = (topology.data_rank, local if topology.cp_rank == 0 else None)
        received: list[Any] | None = [None] * topology.world_size if topology.is_main else None
        dist.gather_object(sent, received, dst=0)
        if received is None:
            return {}
        per_data_rank = dict(part for part in received if part[1] is not None)
        return merge_rank_latents([per_data_rank[r] for r in range(topology.data_world_size)], num_prompts)

    def to_frames(self, trainer: Trainer, latents_bcthw: torch.Tensor) -> np.ndarray:
        if not self._vae_loaded:  # main process only, at its first validation; kept for the later ones
            self._vae = trainer.method.student.load_vae()
            self._vae_loaded = True
        vae = self._vae
        if vae is not None:
            return decode_with_vae(vae, latents_bcthw)
        return render_latents(latents_bcthw)

    def run(self, trainer: Trainer, step: int) -> list[Path]:
        t0 = time.perf_counter()
        latents = self.sample(trainer)
        written: list[Path] = []
        if trainer.is_main:
            out_dir = Path(trainer.output_dir) / "validation" / f"step-{step}"
            videos: dict[str, np.ndarray] = {}
            for name, lat in latents.items():
                videos[name] = self.to_frames(trainer, lat)
                for i, frames in enumerate(videos[name]):
                    written.append(write_mp4(frames, out_dir / f"{name}-{i:02d}.mp4", fps=self.config.fps))
            index = {
                "step": step, "seed": self.config.seed, "method": self.run_config.method.name,
                "rows": self.rows, "sources": self.where,
                "files": {name: [f"{name}-{i:02d}.mp4" for i in range(len(v))] for name, v in videos.items()},
                "frames": {name: list(v.shape[1:4]) for name, v in videos.items()},
            }
            tmp = out_dir / ".index.json.tmp"
            tmp.write_text(json.dumps(index, indent=1))
            os.replace(tmp, out_dir / "index.json")
            log_videos(trainer.accelerator, videos, written, step=step, fps=self.config.fps)
            logger.info("validation at step %d: %d video(s) in %s (%.1f s)", step, len(written), out_dir,
                        time.perf_counter() - t0)
        del latents
        return written


# -- trackers -----------------------------------------------------------------------------------------------
def log_videos(accelerator: Any, videos: dict[str, np.ndarray], paths: list[Path], *, step: int, fps: int) -> None:
    """Log validation videos to every active tracker.

    TensorBoard: ``add_video`` when moviepy is installed (it encodes GIFs with it), else one frame-grid image
    per variant (a row per sample). wandb / trackio: the mp4 files (``Video``), else the frame grid (``Image``).
    """
    by_name: dict[str, list[Path]] = {}
    for p in paths:
        by_name.setdefault(p.name.split("-")[0], []).append(p)
    for tracker in getattr(accelerator, "trackers", []):
        kind = getattr(tracker, "name", "")
        try:
            if kind == "tensorboard":
                writer = tracker.writer
                for name, vid in videos.items():
                    if importlib.util.find_spec("moviepy") is not None:
                        tensor = torch.from_numpy(vid).permute(0, 1, 4, 2, 3)  # [B, F, 3, H, W]
                        writer.add_video(f"validation/{name}", tensor, global_step=step, fps=fps)
                    else:
                        writer.add_image(f"validation/{name}", frame_grid(vid), global_step=step,
                                         dataformats="HWC")
                writer.flush()
            elif kind in ("wandb", "trackio"):
                module = importlib.import_module(kind)
                payload: dict[str, Any] = {}
                for name, vid in videos.items():
                    if hasattr(module, "Video"):
                        kwargs = {"format": "mp4"} if kind == "wandb" else {}
                        payload[f"validation/{name}"] = [module.Video(str(p), **kwargs)
                                                         for p in by_name.get(name, [])]
                    elif hasattr(module, "Image"):
                        payload[f"validation/{name}"] = module.Image(frame_grid(vid))
                if payload:
                    tracker.log(payload, step=step)
        except Exception as exc:  # a tracker hiccup must not kill a multi-day run; the mp4 files are on disk
            logger.warning("could not log validation videos to %s: %s", kind, exc)
