"""Distributed, resumable loading: each rank its own shard, reshuffled every epoch from (seed, epoch).

Each epoch has one order of all rows, a permutation drawn from ``(seed, epoch)`` (identical on every rank). The
ranks take it in turns, ``world_size`` rows at a time (rank r the r-th of each group), so after every rank has
consumed k batches of B rows, exactly the first ``k·B·world_size`` rows of the epoch's order have been seen.
The position is therefore one number shared by all ranks, ``rows_consumed`` in ``epoch``; the rest of the epoch
(trimmed to a multiple of ``world_size``) is dealt the same way, and each rank drops its last partial batch, so
fewer than ``world_size × train_batch_size`` rows sit out an epoch (different ones every epoch).

That is what ``state_dict`` holds. It does not depend on the number of loader worker processes (a run may
resume with a different ``num_workers``; batches prefetched by workers but not consumed are produced again),
and it survives a change of world size or batch size: the resumed run continues the same epoch's order after
the rows already seen, so no row of the epoch is repeated or skipped (the exact batches differ, of course).
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import signal
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from fv_accel.config import DataConfig
from fv_accel.data.dataset import LatentBatch, ParquetLatentDataset, collate_latents, load_negative_prompt
from fv_accel.errors import DataError

logger = logging.getLogger(__name__)


class EpochShardSampler(Sampler[int]):
    """This rank's share of the rest of the permutation drawn from ``(seed, epoch)`` after its first
    ``consumed`` rows (all ranks together).

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
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch = epoch
        self.consumed = consumed

    def epoch_indices(self, epoch: int, consumed: int = 0) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        rest = perm[consumed:]
        kept = len(rest) // self.world_size * self.world_size
        return rest[self.rank:kept:self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch, self.consumed))

    def __len__(self) -> int:
        return self.num_samples


def ignore_stop_signals(worker_id: int, *, signums: tuple[int, ...]) -> None:
    """``worker_init_fn``: a loader worker ignores the stop signals.

    Launchers (torchrun's ``killpg``), Slurm and Ctrl-C signal a rank's whole process group, workers included.
    A worker that dies of it makes the rank raise "DataLoader worker ... is killed by signal" mid-step, before
    the loop can reach the step boundary where it saves; the rank shuts its workers down itself. The worker
    starts with these signals blocked (see ``DataStream.__next__``): one sent during its start-up stays pending
    and is discarded here. Seeding is untouched: torch seeds each worker before calling this.
    """
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


_WORKER_ERROR = re.compile(r"DataError: (.*)\s*$", re.S)


class DataStream:
    """An endless iterator of batches whose position (epoch + loader state) can be saved and restored."""

    def __init__(self, dataset: ParquetLatentDataset, cfg: DataConfig, *, rank: int, world_size: int,
                 stop_signals: Sequence[str] = ()) -> None:
        self.dataset = dataset
        self.sampler = EpochShardSampler(len(dataset), rank=rank, world_size=world_size, seed=cfg.seed)
        if len(self.sampler) < cfg.train_batch_size:
            raise DataError(
                f"{dataset.files[0].parent}: {len(dataset)} rows give {len(self.sampler)} per rank, fewer than "
                f"training.data.train_batch_size={cfg.train_batch_size}"
            )
        self.batch_size = cfg.train_batch_size
        self.world_size = world_size
        # what the workers ignore: SIGTERM/SIGINT always, plus training.checkpoint.preempt_signals
        self._stop_signums = tuple(sorted({signal.SIGTERM, signal.SIGINT} |
                                          {signal.Signals[name] for name in stop_signals}))
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
            worker_init_fn=functools.partial(ignore_stop_signals, signums=self._stop_signums),
        )
        self.uncond_ld = load_negative_prompt(cfg.negative_prompt_path, cfg.text_len) if cfg.negative_prompt_path \
            else None
        self.epoch = 0
        self.rows_consumed = 0  # of the current epoch's order, by all ranks together
        self.num_bad_rows_skipped = 0
        self._iter: Iterator[LatentBatch] | None = None
        if cfg.num_workers > 0:
            # The workers ignore SIGTERM, so multiprocessing's exit handler (terminate every worker, then join)
            # would wait for them forever if this stream lived until interpreter exit; atexit runs the
            # handlers registered last first, so this one shuts them down before that.
            atexit.register(_close_at_exit, weakref.ref(self))

    def close(self) -> None:
        """Shut the loader's worker processes down now; the stream cannot be used afterwards.

        Freeing the loader's iterator is what ends torch's workers (it sends each its stop message and joins
        it), and the DataLoader holds the iterator of persistent workers, so both references go.
        """
        self._iter = None
        if hasattr(self, "loader"):
            del self.loader

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> LatentBatch:
        while True:
            if self._iter is None:
                self.sampler.set_epoch(self.epoch, consumed=self.rows_consumed)
                # Forked workers inherit this thread's signal mask: blocked until their worker_init_fn ignores
                # the stop signals. A signal meant for this process stays pending until the unblock below.
                old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._stop_signums)
                try:
                    self._iter = iter(self.loader)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.rows_consumed = 0
                continue
            except DataError as exc:
                # A worker's DataError arrives wrapped in its traceback text; keep the one-line message.
                match = _WORKER_ERROR.search(str(exc))
                raise DataError(match.group(1).strip() if match else str(exc)) from None
            self.rows_consumed += self.batch_size * self.world_size
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

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch consumed per rank (at this world size and batch size)."""
        return self.rows_consumed // (self.batch_size * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rows_consumed": self.rows_consumed,
                "batches_in_epoch": self.batches_in_epoch, "num_bad_rows_skipped": self.num_bad_rows_skipped,
                # what the position means: checked on load
                "num_rows": len(self.dataset), "seed": self.sampler.seed,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.rows_consumed = int(state["rows_consumed"])
        self.num_bad_rows_skipped = int(state.get("num_bad_rows_skipped", 0))
        saved_order, order = (int(state["num_rows"]), int(state["seed"])), (len(self.dataset), self.sampler.seed)
        saved_layout = (int(state["world_size"]), int(state["batch_size"]))
        if saved_order != order:
            logger.warning("data position was saved for (rows, seed) = %s, the run now has %s: the epoch order "
                           "differs; restarting epoch %d from its first batch", saved_order, order, self.epoch)
            self.rows_consumed = 0
        elif saved_layout != (self.world_size, self.batch_size):
            logger.info("data position was saved by %d rank(s) x batch %d, the run now has %d x %d: epoch %d "
                        "continues after the %d rows already seen", *saved_layout, self.world_size,
                        self.batch_size, self.epoch, self.rows_consumed)
        self._iter = None


def _close_at_exit(stream_ref: weakref.ref[DataStream]) -> None:
    stream = stream_ref()
    if stream is not None:
        stream.close()


def build_data_stream(cfg: DataConfig, *, rank: int, world_size: int, stop_signals: Sequence[str] = ()) -> DataStream:
    """``stop_signals``: signal names the loader workers ignore besides SIGTERM and SIGINT."""
    dataset = ParquetLatentDataset(
        cfg.data_path, text_len=cfg.text_len, cfg_rate=cfg.training_cfg_rate, seed=cfg.seed,
        latent_shape=cfg.latent_shape, skip_bad_rows=cfg.skip_bad_rows,
        cache_bytes=cfg.row_group_cache_mb << 20,
    )
    return DataStream(dataset, cfg, rank=rank, world_size=world_size, stop_signals=stop_signals)
