"""Distributed, resumable loading: each rank its own shard, reshuffled every epoch from (seed, epoch).

Each epoch one permutation of all rows is drawn from ``(seed, epoch)`` (identical on every rank), trimmed to a
multiple of ``world_size`` and dealt round-robin, so the ranks' shards are disjoint and together cover every
kept row exactly once. Each rank then drops its last partial batch, so fewer than ``world_size ×
train_batch_size`` rows sit out an epoch (different ones every epoch).

Because the order is a pure function of (seed, epoch, rank, world size), the position is just (epoch, batches
consumed in it). That is what ``state_dict`` holds: it does not depend on the number of loader worker
processes (a run may resume with a different ``num_workers``) and batches prefetched by workers but not yet
consumed are simply produced again after a resume.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from fv_accel.config import DataConfig
from fv_accel.data.dataset import LatentBatch, ParquetLatentDataset, collate_latents, load_negative_prompt
from fv_accel.errors import DataError

logger = logging.getLogger(__name__)


class EpochShardSampler(Sampler[int]):
    """This rank's share of a permutation drawn from ``(seed, epoch)``, starting at position ``start``.

    torch's ``DistributedSampler`` seeds with ``seed + epoch`` (seed 0 epoch 1 equals seed 1 epoch 0); a numpy
    generator seeded with the pair keeps runs with different seeds apart in every epoch.
    """

    def __init__(self, num_rows: int, *, rank: int, world_size: int, seed: int) -> None:
        self.num_rows = num_rows
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_samples = num_rows // world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def epoch_indices(self, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        kept = self.num_samples * self.world_size
        return perm[self.rank:kept:self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start:])

    def __len__(self) -> int:
        return self.num_samples


_WORKER_ERROR = re.compile(r"DataError: (.*)\s*$", re.S)


class DataStream:
    """An endless iterator of batches whose position (epoch + loader state) can be saved and restored."""

    def __init__(self, dataset: ParquetLatentDataset, cfg: DataConfig, *, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.sampler = EpochShardSampler(len(dataset), rank=rank, world_size=world_size, seed=cfg.seed)
        if len(self.sampler) < cfg.train_batch_size:
            raise DataError(
                f"{dataset.files[0].parent}: {len(dataset)} rows give {len(self.sampler)} per rank, fewer than "
                f"training.data.train_batch_size={cfg.train_batch_size}"
            )
        self.batch_size = cfg.train_batch_size
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.train_batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            collate_fn=functools.partial(collate_latents, latent_shape=dataset.latent_shape),
            # Workers live across epochs (no re-fork and no cold row-group cache at each epoch start).
            persistent_workers=cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: each new iterator draws a worker base seed, and drawing it from the global
            # torch RNG would make that RNG depend on where a run was resumed (the rows are a pure function
            # of (seed, epoch, index) either way).
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.uncond_ld = load_negative_prompt(cfg.negative_prompt_path, cfg.text_len) if cfg.negative_prompt_path \
            else None
        self.epoch = 0
        self.batches_in_epoch = 0  # consumed from the current epoch
        self.num_bad_rows_skipped = 0
        self._iter: Iterator[LatentBatch] | None = None

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> LatentBatch:
        while True:
            if self._iter is None:
                self.sampler.set_epoch(self.epoch, start=self.batches_in_epoch * self.batch_size)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.batches_in_epoch = 0
                continue
            except DataError as exc:
                # A worker's DataError arrives wrapped in its traceback text; keep the one-line message.
                match = _WORKER_ERROR.search(str(exc))
                raise DataError(match.group(1).strip() if match else str(exc)) from None
            self.batches_in_epoch += 1
            if self.uncond_ld is not None:
                batch.uncond_embeds_bld = self.uncond_ld.expand(len(batch.index), -1, -1)
            if batch.num_bad_rows_skipped:
                self.num_bad_rows_skipped += batch.num_bad_rows_skipped
                logger.warning("skip_bad_rows: %d bad row(s) replaced in this batch, %d in total on this rank",
                               batch.num_bad_rows_skipped, self.num_bad_rows_skipped)
            return batch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "num_bad_rows_skipped": self.num_bad_rows_skipped,
                # what the position means: checked on load
                "num_rows": len(self.dataset), "batch_size": self.batch_size, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.num_bad_rows_skipped = int(state.get("num_bad_rows_skipped", 0))
        saved = (int(state["num_rows"]), int(state["batch_size"]), int(state["seed"]))
        now = (len(self.dataset), self.batch_size, self.sampler.seed)
        if saved != now:
            logger.warning("data position was saved for (rows, batch size, seed) = %s, the run now has %s; "
                           "restarting epoch %d from its first batch", saved, now, self.epoch)
            self.batches_in_epoch = 0
        self._iter = None


def build_data_stream(cfg: DataConfig, *, rank: int, world_size: int) -> DataStream:
    dataset = ParquetLatentDataset(
        cfg.data_path, text_len=cfg.text_len, cfg_rate=cfg.training_cfg_rate, seed=cfg.seed,
        latent_shape=cfg.latent_shape, skip_bad_rows=cfg.skip_bad_rows,
        cache_bytes=cfg.row_group_cache_mb << 20,
    )
    return DataStream(dataset, cfg, rank=rank, world_size=world_size)
