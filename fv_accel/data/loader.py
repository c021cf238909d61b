"""Distributed, resumable loading: each rank its own shard, reshuffled every epoch from (seed, epoch).

**The epoch's order** is one sequence of all row indices drawn from ``(seed, epoch)``, identical on every rank.
With ``shuffle: row_groups`` (default) it is a permutation of the parquet row groups, cut into windows of
``W = shuffle_window_groups`` consecutive groups, with the rows of each window shuffled among themselves. With
``shuffle: rows`` it is a permutation of all rows. Row-group order matters because a row costs a whole group
read unless the group is still cached: FastVideo's writer makes one 64-row group per file (≈ 0.5 GB at
81×480×832), and a global row shuffle reads and decodes a group for nearly every sample. Within a window the
order touches only W groups, and the dataset's cache keeps at least W groups, so each loader process reads each
group once per pass. The price: rows of a batch come from W groups rather than the whole dataset (less mixing;
consecutive batches share groups), and each loader process holds W groups in memory (4 × 0.5 GB above).

**Dealing.** The ranks take the order in turns, ``world_size`` rows at a time (rank r the r-th of each turn),
so after every rank has consumed k batches of B rows, exactly the first ``k·B·world_size`` rows of the epoch's
order have been seen. The position is therefore one number shared by all ranks, ``rows_consumed`` in
``epoch``; the rest of the epoch (trimmed to a multiple of ``world_size``) is dealt the same way, and each rank
drops its last partial batch, so fewer than ``world_size × train_batch_size`` rows sit out an epoch (different
ones every epoch). All ranks walk through the same window at the same time; each reads the window's groups
once, so one pass costs every rank about one read of each group it has rows in (nearly all groups when a
window holds more rows than there are ranks): per sample and rank, ``world_size`` rows' worth of bytes.

**Loader workers.** torch hands whole batches to workers in turn, so each of a rank's ``num_workers`` worker
processes reads the window's groups it meets: at most ``num_workers`` reads per group per pass and rank, and
W groups cached per worker. Assigning groups to workers would change the batches with ``num_workers`` and
break the resume guarantee below, so it is not done.

That is what ``state_dict`` holds. It does not depend on the number of loader worker processes (a run may
resume with a different ``num_workers``; batches prefetched by workers but not consumed are produced again),
and it survives a change of world size or batch size: the resumed run continues the same epoch's order after
the rows already seen, so no row of the epoch is repeated or skipped (the exact batches differ, of course).

**The dataset index** is built by rank 0 (through the index cache file beside the data, see
``fv_accel.data.dataset``) and broadcast with ``torch.distributed.broadcast_object_list`` when a process group
exists: the other ranks neither list the data path nor read a footer.
"""

from __future__ import annotations

import atexit
import functools
import gc
import hashlib
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
from fv_accel.data.dataset import (
    DatasetIndex,
    LatentBatch,
    ParquetLatentDataset,
    build_index,
    collate_latents,
    load_negative_prompt,
)
from fv_accel.errors import DataError
from fv_accel.runtime import rank0_result

logger = logging.getLogger(__name__)


class EpochShardSampler(Sampler[int]):
    """This rank's share of the rest of the epoch's order drawn from ``(seed, epoch)`` after its first
    ``consumed`` rows (all ranks together).

    ``group_sizes`` (row counts of consecutive row groups, summing to ``num_rows``) selects the row-group order
    with windows of ``window_groups`` groups; None the permutation of all rows. torch's ``DistributedSampler``
    seeds with ``seed + epoch`` (seed 0 epoch 1 equals seed 1 epoch 0); a numpy generator seeded with the pair
    keeps runs with different seeds apart in every epoch.
    """

    def __init__(self, num_rows: int, *, rank: int, world_size: int, seed: int,
                 group_sizes: Sequence[int] | None = None, window_groups: int = 4) -> None:
        self.num_rows = num_rows
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.group_sizes = None if group_sizes is None else np.asarray(group_sizes, dtype=np.int64)
        if self.group_sizes is not None and int(self.group_sizes.sum()) != num_rows:
            raise ValueError(f"group sizes sum to {int(self.group_sizes.sum())}, not num_rows={num_rows}")
        if window_groups < 1:
            raise ValueError(f"window_groups must be >= 1, got {window_groups}")
        self.window_groups = window_groups
        self.num_samples = num_rows // world_size
        self.epoch = 0
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch = epoch
        self.consumed = consumed

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The whole epoch's order (all rows, before dealing)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.group_sizes is None:
            return rng.permutation(self.num_rows)
        sizes = self.group_sizes
        starts = np.cumsum(sizes) - sizes
        perm = rng.permutation(len(sizes))
        sizes_p = sizes[perm]
        ends = np.cumsum(sizes_p)
        ends_minus = ends - sizes_p
        # Rows of the groups in permuted order: each group's first row plus the offset within the group.
        order = np.repeat(starts[perm] - ends_minus, sizes_p) + np.arange(self.num_rows)
        bounds = [0, *ends[self.window_groups - 1::self.window_groups].tolist()]
        if bounds[-1] != self.num_rows:
            bounds.append(self.num_rows)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            rng.shuffle(order[lo:hi])  # in place, on a view
        return order

    def epoch_indices(self, epoch: int, consumed: int = 0) -> list[int]:
        rest = self.epoch_order(epoch)[consumed:]
        kept = len(rest) // self.world_size * self.world_size
        return rest[self.rank:kept:self.world_size].tolist()

    def order_key(self) -> dict[str, Any]:
        """What identifies the epoch orders (besides the dataset size and seed), saved with the position."""
        if self.group_sizes is None:
            return {"shuffle": "rows"}
        digest = hashlib.sha256(self.group_sizes.tobytes()).hexdigest()[:16]
        return {"shuffle": "row_groups", "shuffle_window_groups": self.window_groups, "row_groups_sha256": digest}

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch, self.consumed))

    def __len__(self) -> int:
        # What __iter__ yields: the rest of the epoch after ``consumed``, trimmed, dealt over the ranks.
        return max(self.num_rows - self.consumed, 0) // self.world_size


#: Loader worker processes started by this process. They ignore SIGTERM, so multiprocessing's exit handler
#: (terminate, then join) would wait for them forever if no stream shut them down first (a stream kept alive by
#: a traceback, or collected while a reference cycle still holds its iterator).
_WORKERS: dict[int, Any] = {}


def _kill_leftover_workers() -> None:
    """At exit, after the streams' own ``close`` (registered later, so run earlier): SIGKILL what is left. The
    workers only read data, so nothing is lost."""
    for worker in _WORKERS.values():
        if worker.is_alive():
            worker.kill()
    for worker in _WORKERS.values():
        worker.join(timeout=5)


atexit.register(_kill_leftover_workers)  # torch imported multiprocessing first: this runs before its handler


def ignore_stop_signals(worker_id: int, *, signums: tuple[int, ...]) -> None:
    """``worker_init_fn``: a loader worker ignores the stop signals.

    Launchers (torchrun's ``killpg``), Slurm and Ctrl-C signal a rank's whole process group, workers included.
    A worker that dies of it makes the rank raise "DataLoader worker ... is killed by signal" mid-step, before
    the loop can reach the step boundary where it saves; the rank shuts its workers down itself. The worker
    starts with these signals blocked (see ``DataStream.__next__``): one sent during its start-up stays pending
    and is discarded here. Seeding is untouched: torch seeds each worker before calling this.
    """
    # Objects inherited from the parent are never collected here: a forked copy of, e.g., a leaked process group
    # would run a destructor that joins threads this process does not have (a hang), and collecting them only
    # dirties copy-on-write pages. The parent collects its garbage right before forking (``__next__``).
    gc.freeze()
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


_WORKER_ERROR = re.compile(r"DataError: (.*)\s*$", re.S)


class DataStream:
    """An endless iterator of batches whose position (epoch + loader state) can be saved and restored."""

    def __init__(self, dataset: ParquetLatentDataset, cfg: DataConfig, *, rank: int, world_size: int,
                 stop_signals: Sequence[str] = ()) -> None:
        self.dataset = dataset
        self.sampler = EpochShardSampler(
            len(dataset), rank=rank, world_size=world_size, seed=cfg.seed,
            group_sizes=dataset.group_sizes if cfg.shuffle == "row_groups" else None,
            window_groups=cfg.shuffle_window_groups)
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
        # Explicitly, not only by dropping references: a traceback (a failed step, a test) can keep the iterator
        # alive, and workers that ignore SIGTERM would then outlive the process's exit handlers.
        # ``_shutdown_workers`` is what the iterator's own ``__del__`` runs (stop message, join); idempotent.
        loader_iter = getattr(getattr(self, "loader", None), "_iterator", None)
        for it in (self._iter, loader_iter):
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
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
                if self.loader.num_workers > 0:  # workers may be forked now (once per epoch at most: ~ms)
                    gc.collect()  # so garbage is destroyed here, where the threads its destructors join exist
                old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._stop_signums)
                try:
                    self._iter = iter(self.loader)
                    for worker in getattr(self._iter, "_workers", []):  # torch's worker Process objects
                        _WORKERS[worker.pid] = worker
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
        """Of a whole epoch (``len(self.loader)`` counts only what is left of the current one)."""
        return self.sampler.num_samples // self.batch_size

    @property
    def batches_in_epoch(self) -> int:
        """Batches of the current epoch consumed per rank (at this world size and batch size)."""
        return self.rows_consumed // (self.batch_size * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "rows_consumed": self.rows_consumed,
                "batches_in_epoch": self.batches_in_epoch, "num_bad_rows_skipped": self.num_bad_rows_skipped,
                # what the position means: checked on load
                "num_rows": len(self.dataset), "seed": self.sampler.seed, **self.sampler.order_key(),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.rows_consumed = int(state["rows_consumed"])
        self.num_bad_rows_skipped = int(state.get("num_bad_rows_skipped", 0))
        # A state saved before the row-group order existed has no "shuffle" key: it was a row permutation.
        key = self.sampler.order_key()
        saved_key = {k: state.get(k, "rows" if k == "shuffle" else None) for k in key}
        saved_order = (int(state["num_rows"]), int(state["seed"]), *saved_key.values())
        order = (len(self.dataset), self.sampler.seed, *key.values())
        saved_layout = (int(state["world_size"]), int(state["batch_size"]))
        if saved_order != order:
            logger.warning("data position was saved for (rows, seed, shuffle...) = %s, the run now has %s: the "
                           "epoch order differs; restarting epoch %d from its first batch", saved_order, order,
                           self.epoch)
            self.rows_consumed = 0
        elif saved_layout != (self.world_size, self.batch_size):
            logger.info("data position was saved by %d rank(s) x batch %d, the run now has %d x %d: epoch %d "
                        "continues after the %d rows already seen", *saved_layout, self.world_size,
                        self.batch_size, self.epoch, self.rows_consumed)
        self._iter = None


def shared_index(cfg: DataConfig) -> DatasetIndex:
    """The dataset index, built by rank 0 of the whole world alone and broadcast (see the module docstring;
    ``fv_accel.runtime.rank0_result``); a DataError on rank 0 is raised on every rank, so none waits in the
    collective."""
    return rank0_result(lambda: build_index(cfg.data_path), wrap=lambda exc: DataError(
        f"{cfg.data_path}: cannot index the data ({type(exc).__name__}: {exc})"))


def _close_at_exit(stream_ref: weakref.ref[DataStream]) -> None:
    stream = stream_ref()
    if stream is not None:
        stream.close()


def build_data_stream(cfg: DataConfig, *, rank: int, world_size: int, stop_signals: Sequence[str] = ()) -> DataStream:
    """``rank``/``world_size``: this process's data rank and the number of data ranks (``Topology.data_rank``,
    ``Topology.data_world_size``). ``stop_signals``: signal names the loader workers ignore besides SIGTERM and
    SIGINT."""
    window = cfg.shuffle_window_groups if cfg.shuffle == "row_groups" else 1
    dataset = ParquetLatentDataset(
        cfg.data_path, text_len=cfg.text_len, cfg_rate=cfg.training_cfg_rate, seed=cfg.seed,
        latent_shape=cfg.latent_shape, skip_bad_rows=cfg.skip_bad_rows,
        cache_bytes=cfg.row_group_cache_mb << 20, min_cached_groups=window,
        index=shared_index(cfg),
    )
    return DataStream(dataset, cfg, rank=rank, world_size=world_size, stop_signals=stop_signals)
