"""Distributed, resumable loading: each rank its own shard, reshuffled every epoch from (seed, epoch)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from fv_accel.config import DataConfig
from fv_accel.data.dataset import LatentBatch, ParquetLatentDataset, collate_latents
from fv_accel.errors import DataError


class DataStream:
    """An endless iterator of batches whose position (epoch + loader state) can be saved and restored."""

    def __init__(self, dataset: ParquetLatentDataset, cfg: DataConfig, *, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.sampler = StatefulDistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        if len(self.sampler) < cfg.train_batch_size:
            raise DataError(
                f"{dataset.files[0].parent}: {len(dataset)} rows give {len(self.sampler)} per rank, fewer than "
                f"training.data.train_batch_size={cfg.train_batch_size}"
            )
        self.loader = StatefulDataLoader(
            dataset,
            batch_size=cfg.train_batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg.num_workers,
            collate_fn=functools.partial(collate_latents, latent_shape=dataset.latent_shape),
            persistent_workers=False,
        )
        self.epoch = 0
        self._iter: Iterator[LatentBatch] | None = None

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> LatentBatch:
        while True:
            if self._iter is None:
                self.sampler.set_epoch(self.epoch)
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.sampler.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._iter = None


def build_data_stream(cfg: DataConfig, *, rank: int, world_size: int) -> DataStream:
    dataset = ParquetLatentDataset(
        cfg.data_path, text_len=cfg.text_len, cfg_rate=cfg.training_cfg_rate, seed=cfg.seed,
        latent_shape=cfg.latent_shape,
    )
    return DataStream(dataset, cfg, rank=rank, world_size=world_size)
