"""Role-keyed DCP checkpoints: ``<output_dir>/checkpoint-<step>/``.

A checkpoint is written into ``checkpoint-<step>.partial/`` and renamed into place by rank 0 once every
rank has finished, so ``checkpoint-<step>/.metadata`` (DCP's own completion marker) only ever exists in a
checkpoint whose every file is there. Per-rank random state is captured after the collective save (collectives
may advance device RNG) and restored last.

Async saves (``training.checkpoint.async_save``) stage the state into CPU memory at the save step and write it
from a background thread; the rename into place happens later, on the main thread, at a point every rank
reaches together (a step boundary where every rank's write has finished, the next save, the end of the run).
Every key and file name comes from ``fv_accel/checkpoint/layout.py``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.storage import StorageWriter

from fv_accel.checkpoint import layout
from fv_accel.checkpoint.states import CallbackState, SavedKeysOnly, unwrap_optimizer
from fv_accel.errors import CheckpointError
from fv_accel.runtime import Topology, rank0_result

if TYPE_CHECKING:
    from fv_accel.callbacks import CallbackList
    from fv_accel.data import DataStream
    from fv_accel.methods import TrainingMethod

logger = logging.getLogger(__name__)

#: IO threads per rank writing its shards (one file each): parallel streams to NVMe / parallel filesystems
WRITER_THREADS = 4


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable across a machine crash (not needed for a killed process; cheap)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return (path / layout.DCP_METADATA_FILE).is_file() and (path / layout.METADATA_FILE).is_file()


def list_checkpoints(output_dir: Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        step = layout.checkpoint_step(child.name)
        if step is not None and child.is_dir() and (not complete_only or is_complete(child)):
            found.append((step, child))
    return sorted(found)


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike[str]) -> Path | None:
    """``""`` → None; ``latest`` → newest complete checkpoint in output_dir (None if there is none);
    a ``checkpoint-<step>`` directory → itself (must be complete); an output directory → its newest one."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(Path(output_dir))
        return found[-1][1] if found else None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {spec!r} does not exist")
    if layout.checkpoint_step(path.name) is not None:
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {spec!r} is incomplete (no .metadata / metadata.json)")
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{spec!r} holds no complete checkpoint-<step> directory")
    return found[-1][1]


def set_aside_newer(output_dir: str | os.PathLike[str], resume: Path, *, on_newer: str) -> list[Path]:
    """Rank 0, before a resumed run trains: move complete checkpoints newer than ``resume`` in ``output_dir``
    out of the way (``on_newer="abandon"``) or refuse to start (``"refuse"``, ``ConfigError``).

    They belong to the timeline being rolled back: left in place, retention (which keeps the newest step
    numbers) would delete the resumed run's checkpoints and keep them, ``latest`` would return to them and the
    Hub push would wait for a step beyond them. Returns the new paths; nothing is ever deleted."""
    import time

    from fv_accel.errors import ConfigError

    step = int(read_metadata(resume)["step"])
    newer = [path for s, path in list_checkpoints(Path(output_dir)) if s > step]
    if not newer:
        return []
    names = ", ".join(p.name for p in newer)
    if on_newer == "refuse":
        raise ConfigError(f"training.checkpoint.on_newer=refuse: resuming from {resume} (step {step}), but "
                          f"{output_dir} holds newer checkpoints: {names}; move them away or set "
                          f"training.checkpoint.on_newer=abandon")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = []
    for path in newer:
        target = path.with_name(f"{path.name}{layout.ABANDONED_INFIX}{stamp}")
        n = 1
        while target.exists():  # the same step abandoned twice within a second
            target = path.with_name(f"{path.name}{layout.ABANDONED_INFIX}{stamp}-{n}")
            n += 1
        os.replace(path, target)
        moved.append(target)
        logger.warning("moved %s aside to %s: resuming from %s (step %d) abandons the timeline it belongs to",
                       path, target.name, resume, step)
    _fsync_dir(Path(output_dir))
    return moved


def resume_command(argv: list[str] | None = None) -> str:
    """The command that resumes this run: this process's arguments with the resume option set to ``latest``
    (the launcher's own flags, e.g. ``accelerate launch --config_file ...``, are not visible from here)."""
    import shlex
    import sys

    args = list(sys.argv if argv is None else argv)
    kept: list[str] = []
    skip_next = False
    for arg in args[1:]:
        if skip_next:
            skip_next = False
        elif arg == "--training.checkpoint.resume_from_checkpoint":
            skip_next = True
        elif not arg.startswith("--training.checkpoint.resume_from_checkpoint="):
            kept.append(arg)
    script = args[0] if args else "recipes/<recipe>.py"
    return ("accelerate launch [same launcher flags] "
            + shlex.join([script, *kept, "--training.checkpoint.resume_from_checkpoint=latest"]))


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / layout.METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata.json ({exc})") from None


#: Opt-in for reading random-state files written before RNG_FORMAT (plain pickles, which can run code).
ALLOW_PICKLE_RNG_ENV = "FV_ACCEL_ALLOW_PICKLE_RNG"
#: Version of the random-state file: tensors and plain data written by torch.save, read with weights_only.
RNG_FORMAT = 1
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (zip) container; the old files were bare pickles


def capture_rng_state(method: TrainingMethod) -> dict[str, Any]:
    """This rank's RNG states as tensors and plain data only, so the file loads with ``weights_only=True``."""
    py_version, py_words, py_gauss = random.getstate()
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple), "numpy's global RandomState is MT19937: its legacy state is a tuple"
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np_state
    state: dict[str, Any] = {
        "format": RNG_FORMAT,
        # Mersenne Twister words are < 2**32: int64 holds them exactly.
        "python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "method": method.random_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(method: TrainingMethod, state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``; also takes the pre-format dict of an opted-in old pickle file."""
    if "format" in state:
        py, nps = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss_next"]))
        np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                             nps["cached_gaussian"]))
    else:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    method.load_random_state(state["method"])


def _saved_data_rank(state: dict[str, Any], rank: int) -> int:
    """The data rank a random-state file was saved for; files from before it was recorded: their rank."""
    return int(state.get("data_rank", rank))


def _file_rank(path: Path) -> int:
    return int(path.name.removeprefix(layout.RANDOM_STATE_PREFIX).removeprefix("rank").split(".")[0])


def save_rng_file(state: dict[str, Any], path: Path) -> None:
    """Write ``capture_rng_state``'s dict atomically (tmp, fsync, rename)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_rng_file(path: Path) -> dict[str, Any]:
    """Read a random-state file without running code from it.

    Current files go through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    data. Files from before RNG_FORMAT are bare pickles: a checkpoint from elsewhere could run arbitrary code
    when unpickled, so they are read only when ``FV_ACCEL_ALLOW_PICKLE_RNG=1`` says this checkpoint is trusted.
    """
    with open(path, "rb") as fh:
        is_zip = fh.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    if not is_zip:
        if os.environ.get(ALLOW_PICKLE_RNG_ENV) != "1":
            raise CheckpointError(
                f"{path}: random state in the old pickle format, which can run arbitrary code when read; "
                f"if you trust this checkpoint, rerun with {ALLOW_PICKLE_RNG_ENV}=1 to read it")
        logger.warning("%s: reading an old pickled random-state file (%s=1)", path, ALLOW_PICKLE_RNG_ENV)
        with open(path, "rb") as fh:
            return pickle.load(fh)  # noqa: S301 - the user opted in for this checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals are UnpicklingError; a damaged zip is RuntimeError
        raise CheckpointError(f"{path}: not a readable random-state file (only tensors and plain data are "
                              f"loaded): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != RNG_FORMAT:
        raise CheckpointError(f"{path}: not a random-state file of format {RNG_FORMAT}")
    return state


def resolve_async_save(setting: bool | Literal["auto"]) -> bool:
    """``training.checkpoint.async_save``: "auto" = on when CUDA is available (GPUs idle during a synchronous
    save; on CPU the background writer competes with training for the same cores)."""
    return torch.cuda.is_available() if setting == "auto" else bool(setting)


class _CheckedFileSystemWriter(dcp.FileSystemWriter):
    """DCP's FileSystemWriter, failing when a write thread failed. With ``thread_count > 1`` DCP (torch 2.13,
    ``_FileSystemWriter._write_data``) only prints the exception of a helper thread and goes on to write
    ``.metadata``: a checkpoint that looks complete but cannot be loaded."""

    def write_data(self, plan: Any, planner: Any) -> torch.futures.Future[Any]:
        future = super().write_data(plan, planner)
        written = len(future.wait())  # one WriteResult per item; already done (the writes are synchronous)
        if written != len(plan.items):
            raise OSError(f"{self.path}: a write thread failed ({written} of {len(plan.items)} items written)")
        return future


def default_writer(path: Path) -> StorageWriter:
    # sync_files=True (the default) makes DCP fsync every file it writes; see CheckpointManager._finalize.
    return _CheckedFileSystemWriter(str(path), thread_count=WRITER_THREADS, sync_files=True)


@dataclass
class _PendingSave:
    step: int
    partial: Path
    stateless: list[str]
    future: Future[Any]


class CheckpointManager:
    def __init__(
        self,
        *,
        output_dir: str | os.PathLike[str],
        method: TrainingMethod,
        data: DataStream | None,
        callbacks: CallbackList,
        config_dump: dict[str, Any],
        keep_last: int = 0,
        async_save: bool = False,
        make_writer: Callable[[Path], StorageWriter] = default_writer,
        topology: Topology | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = method
        self.data = data
        self.callbacks = callbacks
        self.config_dump = config_dump
        self.keep_last = keep_last
        self.async_save = async_save
        #: builds the DCP storage writer of one save from its ``.partial`` directory
        self.make_writer = make_writer
        #: this process's rank and the world size (per-rank files, rank 0's metadata); read from the process
        #: group when not given
        self.topology = topology or Topology.from_process_group()
        self._last_saved_step: int | None = None
        self._pending: _PendingSave | None = None
        self._groups: tuple[dist.ProcessGroup | None, dist.ProcessGroup | None] | None = None

    # -- state --------------------------------------------------------------------------------------------
    def _states(self) -> dict[str, Any]:
        states: dict[str, Any] = dict(self.method.checkpoint_state())
        for cb in self.callbacks:
            states[layout.callback_key(cb.name)] = CallbackState(cb)
        if self.data is not None:
            # The loader position is per rank (each rank has its own shard).
            states[layout.dataloader_key(self.topology.rank)] = self.data
        return states

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {role: unwrap_optimizer(opt) for role, opt in self.method.optimizers().items()}

    def _stateless_optimizer_roles(self) -> list[str]:
        return [role for role, opt in self._optimizers().items() if not opt.state]

    def path_for(self, step: int) -> Path:
        return self.output_dir / layout.checkpoint_dir_name(step)

    # -- save -----------------------------------------------------------------------------------------------
    def save(self, step: int, *, blocking: bool = False) -> Path:
        """Collective: write ``checkpoint-<step>/`` atomically, then apply retention. Returns its path.

        Crash safety: everything goes into ``checkpoint-<step>.partial/``; only when every rank has written its
        shards and random state does rank 0 add ``metadata.json`` and rename the directory into place (one
        atomic rename), so a kill at any moment leaves either no ``checkpoint-<step>`` or a complete one, and
        never touches older checkpoints. An incomplete or stale ``checkpoint-<step>`` (e.g. from an abandoned
        run resumed from an earlier step) is replaced only after the new one is fully written.

        With ``async_save`` and not ``blocking``, the state is staged (copied to CPU memory) here and written
        by a background thread while training continues; the path is complete only after a later
        :meth:`maybe_finalize` or :meth:`wait_pending` finalised it. A save still in flight is finalised first.
        """
        self.wait_pending()  # at most one save in flight
        final = self.path_for(step)
        # e.g. the end-of-run save right after a periodic save of the same step (rank 0's view decides for all)
        if self._last_saved_step == step and rank0_result(lambda: is_complete(final), topology=self.topology):
            return final
        partial = final.with_name(final.name + layout.PARTIAL_SUFFIX)
        if self.topology.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed midway
            partial.mkdir(parents=True)
        _barrier()
        states = self._states()
        # An optimizer that has not stepped yet (a DMD2 student before its first generator step) has no state.
        # Saving it through DCP would *create* state (a zero-gradient AdamW step: step count 1), so saving
        # would change the run; leave it out and record that it was empty.
        stateless = self._stateless_optimizer_roles()
        for role in stateless:
            states.pop(layout.optimizer_key(role), None)
        writer = self.make_writer(partial)
        if self.async_save and not blocking:
            group = self._async_groups()[0]
            # Stages synchronously (through the writer, a BlockingAsyncStager like DCP's FileSystemWriter, else
            # DCP's DefaultStager: every tensor, DTensor shards included, is copied to new CPU tensors, and
            # Stateful objects such as the data position are read now), then writes from a background thread.
            # DCP's own collectives run on a gloo group of their own, never on the group that the training
            # step uses from this thread.
            start = time.perf_counter()
            future = dcp.async_save(states, storage_writer=writer, process_group=group,
                                    async_checkpointer_type=AsyncCheckpointerType.THREAD)
            # An AsyncSaveResponse only comes back with asynchronous staging, which DCP's default stager skips.
            assert isinstance(future, Future), f"dcp.async_save returned {type(future).__name__}"
            if self.topology.rank == 0:
                logger.info("checkpoint-%d: state staged in %.2f s; writing in the background", step,
                            time.perf_counter() - start)
            # DCP's background save draws no random numbers (its ids come from uuid4, i.e. os.urandom): this is
            # the RNG state the run continues with, as in the synchronous order below.
            self._write_random_state(partial)
            self._pending = _PendingSave(step=step, partial=partial, stateless=stateless, future=future)
            return final
        dcp.save(states, storage_writer=writer)
        # After the collective save: collectives (and DCP's planning) may advance RNG on some backends.
        self._write_random_state(partial)
        self._finalize(step, partial, stateless)
        return final

    def _write_random_state(self, partial: Path) -> None:
        # The data rank says whose random stream this is (context-parallel peers share one): a resume on
        # another layout restores each rank from a file of its own data rank (restore_random_state).
        state = {**capture_rng_state(self.method), "data_rank": self.topology.data_rank}
        save_rng_file(state, partial / layout.random_state_file(self.topology.rank))

    def _finalize(self, step: int, partial: Path, stateless: list[str]) -> None:
        """Collective, once every rank's files are written: metadata.json, the rename, retention."""
        _barrier()
        if self.topology.rank == 0:
            meta = {"step": step, "world_size": self.topology.world_size,
                    "optimizers_without_state": stateless, "config": self.config_dump}
            _write_atomic(partial / layout.METADATA_FILE, json.dumps(meta, indent=2))
            # No fsync of the shard files here: DCP's FileSystemWriter (sync_files=True, its default) fsyncs
            # each file it writes, .metadata included (torch/distributed/checkpoint/filesystem.py,
            # _write_files_from_queue and _FileSystemWriter.finish), and each rank does so for its own files.
            # What remains is the directory entries, made durable before the rename publishes them.
            _fsync_dir(partial)
            final = self.path_for(step)
            if final.exists():  # incomplete, or stale from an abandoned timeline: the new one is complete now
                stale = final.with_name(final.name + layout.STALE_SUFFIX)
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(partial, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(partial, final)
            _fsync_dir(self.output_dir)
            self._apply_retention()
        self._last_saved_step = step
        _barrier()

    # -- async saves: finalised on the main thread, at points every rank reaches together ---------------------
    @property
    def pending_step(self) -> int | None:
        """The step of the async save still in flight (written or not, not yet finalised), else None."""
        return self._pending.step if self._pending is not None else None

    def maybe_finalize(self) -> bool:
        """Collective while an async save is pending (call at every step boundary, on every rank): finalise it
        when every rank's write has finished, else return at once. Returns whether it was finalised."""
        if self._pending is None:
            return False
        if self._count_ranks(not self._pending.future.done()) > 0:
            return False
        self.wait_pending()
        return True

    def wait_pending(self) -> None:
        """Collective: wait for this rank's in-flight async write, agree that every rank's succeeded, finalise.
        Raises ``CheckpointError`` (on every rank) when a rank's write failed; the ``.partial`` stays."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error: BaseException | None = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            error = exc
        if self._count_ranks(error is not None) > 0:
            # DCP wraps a rank's error with its traceback: name only its last line (the original exception)
            why = "" if error is None else (str(error).strip().splitlines() or [type(error).__name__])[-1]
            if error is not None and not isinstance(error, CheckpointException):
                why = f"{type(error).__name__}: {why}"
            raise CheckpointError(f"async save of {pending.partial} failed"
                                  + (f" on this rank ({why})" if error else " on another rank")
                                  + "; it stays incomplete") from error
        self._finalize(pending.step, pending.partial, pending.stateless)
        if self.topology.rank == 0:
            logger.info("checkpoint-%d complete (async save)", pending.step)

    def abandon_pending(self) -> None:
        """After a failure, on this rank alone (no collective: other ranks may be gone or elsewhere): let the
        in-flight write end, before the process group is torn down, and leave it a ``.partial``, which
        ``latest`` skips and the next save or retention removes."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:
            logger.warning("async save of %s failed during the run's failure: %s", pending.partial,
                           (str(exc).strip().splitlines() or [type(exc).__name__])[-1])

    def _async_groups(self) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
        """(group for DCP's collectives in the background thread, group for agreements on this thread).

        gloo, as async_save requires a CPU backend, created on the first async save (a point every rank
        reaches together). Two groups: collectives of two threads on one group would interleave differently
        on different ranks."""
        if not dist.is_initialized():
            return None, None
        if self._groups is None:
            self._groups = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
        return self._groups

    def _count_ranks(self, flag: bool) -> int:
        """How many ranks pass ``flag`` (a collective on the agreement group)."""
        count = torch.tensor([int(flag)], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(count, group=self._async_groups()[1])
        return int(count.item())

    def _apply_retention(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints (all with 0); remove leftovers of killed saves
        older than the newest complete checkpoint. Runs right after a checkpoint became complete, so the
        newest complete checkpoint is never among the deleted ones."""
        complete = list_checkpoints(self.output_dir)
        if not complete:
            return
        newest = complete[-1][0]
        doomed: list[Path] = []
        if self.keep_last > 0:
            doomed += [path for _, path in complete[: max(len(complete) - self.keep_last, 0)]]
        for child in self.output_dir.iterdir():
            found = layout.leftover_of(child.name)
            if found is None or not child.is_dir():
                continue
            child_step, suffix = found
            leftover = suffix is not None or not is_complete(child)
            if suffix == layout.DELETING_SUFFIX or (child_step < newest and leftover):
                doomed.append(child)
        for path in doomed:
            if path == complete[-1][1]:
                continue
            # Rename first: a kill during rmtree then leaves a name that is never taken for a checkpoint.
            trash = path.with_name(path.name.split(".")[0] + layout.DELETING_SUFFIX)
            try:
                if path != trash:
                    shutil.rmtree(trash, ignore_errors=True)
                    os.replace(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError as exc:
                logger.warning("retention: could not delete %s: %s", path, exc)

    # -- load -----------------------------------------------------------------------------------------------
    def load(self, path: Path) -> int:
        """Load everything but the random state into the freshly built run; returns the checkpoint's step.

        Order matters: the optimizers' state is materialised first (DCP loads nothing into an empty AdamW
        state), then everything is loaded in one collective ``dcp.load``, then every optimizer that had state
        in the checkpoint is checked to really have received it.
        """
        meta = read_metadata(path)
        saved_keys = set(layout.dcp_entries(path))
        self.method.seed_optimizer_state_for_resume()
        states = self._states()
        loaded_roles = self._prepare_optimizers_for_load(path, meta, saved_keys, states)
        key = layout.dataloader_key(self.topology.rank)
        if key in states and meta.get("world_size") != self.topology.world_size:
            # The ranks consume in lockstep, so every rank saved the same position (rows consumed of the
            # epoch's order); a rank of the new world may have no key of its own: each reads rank 0's.
            states[layout.dataloader_key(0)] = states.pop(key)
        for name in [n for n in states if layout.is_dataloader_key(n)]:
            states[name] = SavedKeysOnly(states[name], layout.entries_under(saved_keys, name))
        for name in [n for n in states if layout.is_callback_key(n)]:
            # A stateless callback saves nothing (nothing to say); EMA switched on for the resumed run starts
            # from the current weights.
            if not layout.entries_under(saved_keys, name) and states.pop(name).state_dict():
                logger.warning("%s has no state for %s; it starts fresh", path, name)
        missing_roles = sorted({n for n in states if layout.is_role_key(n)
                                and not layout.entries_under(saved_keys, n)})
        if missing_roles:
            raise CheckpointError(f"{path}: no weights for {', '.join(missing_roles)} (saved by another method?)")
        try:
            dcp.load(states, checkpoint_id=str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from exc
        # Stronger than the method's non-empty check: every state entry was overwritten by the checkpoint.
        self._check_optimizers_loaded(path, loaded_roles)
        return int(meta["step"])

    def _prepare_optimizers_for_load(self, path: Path, meta: dict[str, Any], saved_keys: set[str],
                                     states: dict[str, Any]) -> list[str]:
        """An optimizer saved without state (it had not stepped yet) gets its empty state back, as in the
        uninterrupted run: its seeded state would count one extra AdamW step. The others keep the seeded
        state, marked (step = -1) so that :meth:`_check_optimizers_loaded` can prove DCP overwrote it.
        Returns the roles whose optimizer state is loaded."""
        stateless = set(meta.get("optimizers_without_state", []))
        loaded_roles = []
        for role, opt in self._optimizers().items():
            if role in stateless:
                logger.info("%s: the optimizer of role %r had not stepped yet; it starts empty", path, role)
                states.pop(layout.optimizer_key(role), None)
                opt.state.clear()
                continue
            if not any(k.startswith(layout.optimizer_state_prefix(role)) for k in saved_keys):
                raise CheckpointError(f"{path}: no optimizer state for role {role!r}")
            for param_state in opt.state.values():
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"].fill_(-1)
                elif "step" in param_state:
                    param_state["step"] = -1
            loaded_roles.append(role)
        return loaded_roles

    def _check_optimizers_loaded(self, path: Path, roles: list[str]) -> None:
        for role in roles:
            opt = self._optimizers()[role]
            steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
            if not opt.state or any(v < 0 for v in steps):
                raise CheckpointError(f"{path}: the optimizer state of role {role!r} was not loaded "
                                      f"({sum(v < 0 for v in steps)} of {len(opt.state)} parameters missed)")

    def restore_random_state(self, path: Path) -> None:
        """Restore per-rank RNG; call last, after the data iterator and everything else are set up.

        Each rank takes the random stream of its data rank (noise, timesteps and rollout choices are drawn per
        data rank, identical within a context-parallel group): its own file on the same layout; on another
        one (cp changed) the first saved rank of the same data rank, so CP peers restore one stream and data
        ranks never share one. A data rank no saved rank had keeps the fresh RNG it was seeded with."""
        data_rank = self.topology.data_rank
        own = path / layout.random_state_file(self.topology.rank)
        state = load_rng_file(own) if own.is_file() else None
        if state is None or _saved_data_rank(state, self.topology.rank) != data_rank:
            state = None
            files = sorted((f for f in path.iterdir() if layout.is_random_state_file(f.name)
                            and f.suffix == ".pt"), key=_file_rank)
            for rng_file in files:
                candidate = load_rng_file(rng_file)
                if _saved_data_rank(candidate, _file_rank(rng_file)) == data_rank:
                    state = candidate
                    break
        if state is None:
            logger.warning("%s has no random state for data rank %d (rank %d); continuing with fresh RNG", path,
                           data_rank, self.topology.rank)
            return
        restore_rng_state(self.method, state)
