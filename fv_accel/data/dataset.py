"""Latent datasets in FastVideo's parquet schemas (docs/data.md "Dataset format").

T2V schema: ``id, vae_latent_bytes, vae_latent_shape [C,T,H,W], vae_latent_dtype, text_embedding_bytes,
text_embedding_shape [L,D], text_embedding_dtype, file_name, caption, media_type, width, height, num_frames,
duration_sec, fps``. Text-only schema (data-free DMD2): ``id, text_embedding_{bytes,shape,dtype}, caption``.
ODE-pairs schema (``recipes/ode_pairs.py``, read by ``method.name: ode_init``): the T2V latent and text columns
(``vae_latent`` = the teacher's x0) plus ``ode_latents_{bytes,shape,dtype}`` (the teacher's states [K, C, T, H, W]
at the student's K timesteps) and ``ode_timesteps`` (those K timesteps); batches then carry the trajectory.

Memory stays bounded for datasets larger than RAM: only file footers are read up front; rows are read one
parquet row group at a time into a small LRU cache whose size is counted in bytes (``cache_bytes``, but never
fewer than ``min_cached_groups`` groups: the loader's shuffle window), and a row group larger than that budget
is streamed with a bounded read buffer, keeping only the requested row. Whole files are never loaded.

**The index** (files, row groups with row counts and byte sizes, schema kind, latent shape) is built by
:func:`build_index` and cached per directory entry of ``data_path`` in ``<dir>/.fv_accel_index.json`` (where
the directory is read-only, under ``$XDG_CACHE_HOME/fv_accel/index``; single-file entries are not cached).
An entry is reused while the file's size and mtime are unchanged; new or changed files have their footers read
(concurrently) and the cache is rewritten atomically. Listing and stat-ing the files is still needed to
validate the cache, so in a distributed run only rank 0 builds the index and broadcasts it
(``fv_accel.data.loader``): the two mechanisms cover different costs. At 64 ranks × 75k files, building on
every rank cost 64 listings + 4.8 M footer reads (each an open and two reads, often on a network file system);
now it is one listing + 75k stats on rank 0, 75k footer reads only on the first run (or for changed files),
and one ``broadcast_object_list`` of a few MB (≈ 100 bytes per file). The other ranks touch no file.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from fv_accel.errors import DataError

logger = logging.getLogger(__name__)

LATENT_COLUMNS = ("vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype")
TEXT_ONLY_COLUMNS = ("text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype")
T2V_COLUMNS = LATENT_COLUMNS + TEXT_ONLY_COLUMNS
TRAJECTORY_COLUMNS = ("ode_latents_bytes", "ode_latents_shape", "ode_latents_dtype", "ode_timesteps")
#: the schema kinds whose rows hold latents
LATENT_KINDS = ("t2v", "ode_pairs")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "torch.float32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "torch.float16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
    "float64": torch.float64, "torch.float64": torch.float64,
}

#: A row group up to this size (uncompressed, as the footer reports it) is cached whole; larger ones stream.
DEFAULT_CACHE_BYTES = 1 << 30
#: Read buffer when streaming a row group that exceeds the cache budget.
_STREAM_BUFFER_BYTES = 8 << 20
#: With skip_bad_rows: give up after this many bad rows in a row (the data is broken, not a few rows).
MAX_CONSECUTIVE_BAD_ROWS = 1000


@dataclass
class LatentSample:
    index: int
    latents_cthw: torch.Tensor | None
    text_embeds_ld: torch.Tensor
    """``[text_len, D]`` from ``load``; ``[n, D]`` with n = the mask's count from ``dataset[i]``, which leaves
    the zero padding to :func:`collate_latents` (padding each sample, then stacking, copied UMT5's 512 × 4096
    floats twice per sample: more than the latents)."""
    text_mask_l: torch.Tensor
    """``[text_len]``, True for real tokens."""
    num_bad_rows_skipped: int = 0
    """With ``skip_bad_rows``: bad rows passed over to reach this one (0 otherwise)."""
    trajectory_kcthw: torch.Tensor | None = None
    """ODE-pairs data only: the teacher's states at the K student timesteps (stored latent space)."""
    trajectory_timesteps_k: torch.Tensor | None = None
    """ODE-pairs data only: those K timesteps, float32, descending."""


@dataclass
class LatentBatch:
    """A collated batch on the host: what a model's ``prepare_batch`` consumes."""

    latents_bcthw: torch.Tensor | None
    text_embeds_bld: torch.Tensor
    text_mask_bl: torch.Tensor
    index: torch.Tensor
    latent_shape: tuple[int, int, int, int]
    uncond_embeds_bld: torch.Tensor | None = None
    num_bad_rows_skipped: int = 0
    trajectory_bkcthw: torch.Tensor | None = None
    """ODE-pairs data only: [B, K, C, T, H, W], the teacher's states at the student's K timesteps (stored space,
    as ``latents_bcthw`` before ``prepare_batch``); ``latents_bcthw`` holds the teacher's x0."""
    trajectory_timesteps_bk: torch.Tensor | None = None
    """ODE-pairs data only: [B, K] float32, the timesteps of those states."""

    def pin_memory(self) -> LatentBatch:
        """Called by the DataLoader (``pin_memory=True`` on CUDA machines) so host→device copies can overlap."""
        pinned = {f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **pinned)


def decode_tensor(raw: bytes | None, shape: Any, dtype_name: Any, *, where: str) -> torch.Tensor:
    """Bytes + shape + dtype columns → a float32 tensor; a mismatch names ``where`` (file, row, column)."""
    dtype = _DTYPES.get(str(dtype_name))
    if dtype is None:
        raise DataError(f"{where}: unsupported dtype {dtype_name!r} (expected one of float32, float16, bfloat16)")
    if raw is None or shape is None:
        raise DataError(f"{where}: value is null")
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise DataError(f"{where}: negative size in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated: " if len(raw) < expected else ""
        raise DataError(f"{where}: {what}{len(raw)} bytes do not hold a {dtype_name} tensor of shape {shape} "
                        f"({expected} bytes)")
    if expected == 0:
        return torch.zeros(shape)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).float()


def parse_data_path(data_path: str | list[str] | dict[str, int]) -> list[tuple[Path, int]]:
    """``data_path`` as configured → [(directory or file, repeat count)]."""
    if isinstance(data_path, dict):
        entries = [(str(k), int(v)) for k, v in data_path.items()]
    elif isinstance(data_path, str):
        entries = [(data_path, 1)]
    else:
        entries = [(str(p), 1) for p in data_path]
    entries = [(p, r) for p, r in entries if p != ""]
    if not entries:
        raise DataError("training.data.data_path is empty")
    for p, r in entries:
        if r < 1:
            raise DataError(f"training.data.data_path: repeat count for {p} must be >= 1, got {r}")
    return [(Path(p).expanduser(), r) for p, r in entries]


def _list_entry(p: Path) -> list[Path]:
    """The parquet files of one ``data_path`` entry (a file, or a directory searched recursively), sorted."""
    if p.is_file():
        if p.suffix != ".parquet":
            raise DataError(f"{p}: not a .parquet file")
        return [p]
    if p.is_dir():
        # Hidden/underscore paths are writers' temporaries and manifests (preprocessing), never data.
        found = sorted(f for f in p.rglob("*.parquet")
                       if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
        if not found:
            raise DataError(f"{p}: no .parquet files in this directory")
        return found
    raise DataError(f"{p}: no such file or directory")


def list_parquet_files(data_path: str | list[str] | dict[str, int]) -> list[Path]:
    """Every parquet file of ``data_path`` in a fixed order, each repeated by its entry's repeat count."""
    files: list[Path] = []
    for p, repeat in parse_data_path(data_path):
        files.extend(_list_entry(p) * repeat)
    return files


@dataclass
class FileIndex:
    """What the dataset needs from one parquet file: its footer's row groups and schema kind."""

    size: int
    mtime_ns: int
    kind: str  # "t2v" | "text_only" | "ode_pairs"
    row_groups: list[tuple[int, int]]  # (num_rows, uncompressed bytes as the footer reports it)
    latent_shape: list[int] | None = None  # first row's vae_latent_shape; read only for the dataset's first file


@dataclass
class DatasetIndex:
    """Everything a dataset is built from without touching the files; small and picklable (broadcast)."""

    files: list[Path]  # data_path's files in order, repeated by their repeat counts
    entries: dict[Path, FileIndex]  # one per distinct file

    @property
    def latent_shape(self) -> tuple[int, int, int, int] | None:
        """Latent shape of the dataset's first row (T2V); None for text-only data."""
        for f in self.files:
            entry = self.entries[f]
            if entry.latent_shape is not None:
                c, t, h, w = entry.latent_shape
                return c, t, h, w
            if any(n for n, _ in entry.row_groups):
                return None
        return None


def _inspect(f: Path) -> tuple[pq.FileMetaData, str]:
    """Footer and schema kind of one file; only the footer is read."""
    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for corrupt or foreign files
        raise DataError(f"{f}: unreadable parquet file ({exc})") from None
    names = set(pf.schema_arrow.names)
    missing_text = [c for c in TEXT_ONLY_COLUMNS if c not in names]
    missing_latent = [c for c in LATENT_COLUMNS if c not in names]
    if missing_text:
        raise DataError(f"{f}: missing column(s) {missing_text}")
    if missing_latent and len(missing_latent) < len(LATENT_COLUMNS):
        # Some latent columns but not all: a broken T2V file, not text-only data.
        raise DataError(f"{f}: missing column(s) {missing_latent}")
    missing_trajectory = [c for c in TRAJECTORY_COLUMNS if c not in names]
    if len(missing_trajectory) < len(TRAJECTORY_COLUMNS):
        if missing_trajectory or missing_latent:  # a broken ODE-pairs file
            raise DataError(f"{f}: missing column(s) {missing_trajectory or missing_latent}")
        return pf.metadata, "ode_pairs"
    return pf.metadata, "text_only" if missing_latent else "t2v"


def _index_file(f: Path, stat: os.stat_result) -> FileIndex:
    meta, kind = _inspect(f)
    groups = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    return FileIndex(stat.st_size, stat.st_mtime_ns, kind, groups)


def _first_latent_shape(f: Path, entry: FileIndex) -> list[int]:
    group = next(g for g, (n, _) in enumerate(entry.row_groups) if n)
    try:
        column = pq.ParquetFile(f).read_row_group(group, columns=["vae_latent_shape"])
    except Exception as exc:
        raise DataError(f"{f}: cannot read row group {group} ({exc})") from None
    shape = column.column(0)[0].as_py()
    if shape is None or len(shape) != 4:
        raise DataError(f"{f} row 0: vae_latent_shape must be [C, T, H, W], got {shape}")
    return [int(s) for s in shape]


INDEX_FILE_NAME = ".fv_accel_index.json"
_INDEX_VERSION = 1


class _IndexCache:
    """The cached footers of one ``data_path`` entry, keyed by path relative to the entry, size and mtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
        # Beside the data first; a read-only data directory falls back to the user's cache directory. A single
        # file is one footer read (by rank 0): not worth a file in a directory that may hold other things.
        self.locations = [root / INDEX_FILE_NAME, cache_home / "fv_accel" / "index" / f"{digest}.json"] \
            if root.is_dir() else []
        self.cached: dict[str, FileIndex] = {}
        self.dirty = False
        for location in self.locations:
            try:
                raw = json.loads(location.read_text())
                if raw.get("version") != _INDEX_VERSION:
                    continue
                self.cached = {rel: FileIndex(e["size"], e["mtime_ns"], e["kind"],
                                              [(int(n), int(b)) for n, b in e["row_groups"]], e["latent_shape"])
                               for rel, e in raw["files"].items()}
                break
            except (OSError, ValueError, KeyError, TypeError):
                continue  # absent, unreadable or from another version: rebuilt from the footers

    def _rel(self, f: Path) -> str:
        return f.name if f == self.root else f.relative_to(self.root).as_posix()

    def update(self, files: list[Path]) -> dict[Path, FileIndex]:
        """Index entries for ``files``: cached where size and mtime match, else read from the footer."""
        # Stats and footers concurrently: both are metadata latency (75k files × ~1 ms on a parallel filesystem
        # is over a minute serially, while every other rank waits in the index broadcast).
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
            stats = dict(zip(files, pool.map(Path.stat, files), strict=True))
            entries: dict[Path, FileIndex] = {}
            stale: list[Path] = []
            for f, st in stats.items():
                hit = self.cached.get(self._rel(f))
                if hit is not None and (hit.size, hit.mtime_ns) == (st.st_size, st.st_mtime_ns):
                    entries[f] = hit
                else:
                    stale.append(f)
            entries.update(zip(stale, pool.map(lambda f: _index_file(f, stats[f]), stale), strict=True))
        if stale or len(self.cached) != len(entries):
            self.dirty = True
        self.cached = {self._rel(f): entries[f] for f in files}
        return entries

    def save(self) -> None:
        """Write the cache atomically (a unique temporary file, then rename); a failure costs only speed."""
        if not self.locations:
            return
        text = json.dumps({"version": _INDEX_VERSION,
                           "files": {rel: dataclasses.asdict(e) for rel, e in self.cached.items()}},
                          separators=(",", ":"))
        for location in self.locations:
            tmp = location.with_name(f".{location.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            try:
                location.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(text)
                os.replace(tmp, location)
                self.dirty = False
                return
            except OSError:
                tmp.unlink(missing_ok=True)
        logger.info("dataset index of %s could not be cached (read-only locations); footers are read at "
                    "every start", self.root)


def build_index(data_path: str | list[str] | dict[str, int]) -> DatasetIndex:
    """List ``data_path`` and index every file's footer, through the per-entry index cache."""
    files: list[Path] = []
    entries: dict[Path, FileIndex] = {}
    caches: list[_IndexCache] = []
    for root, repeat in parse_data_path(data_path):
        found = _list_entry(root)
        cache = _IndexCache(root)
        entries.update(cache.update(found))
        caches.append(cache)
        files.extend(found * repeat)
    index = DatasetIndex(files, entries)
    # The latent shape of the first row is part of the index, so the other ranks need not read it either.
    first = next((f for f in files if any(n for n, _ in entries[f].row_groups)), None)
    if first is not None and entries[first].kind in LATENT_KINDS and entries[first].latent_shape is None:
        entries[first].latent_shape = _first_latent_shape(first, entries[first])
        for cache in caches:
            cache.dirty |= any(entry is entries[first] for entry in cache.cached.values())
    for cache in caches:
        if cache.dirty:
            cache.save()
    return index


@dataclass(frozen=True)
class _Group:
    file: Path
    row_group: int
    start: int  # first dataset index of this group
    file_row: int  # first row of this group within its file
    num_rows: int
    nbytes: int  # uncompressed size from the footer


class ParquetLatentDataset(Dataset[LatentSample]):
    """Map-style dataset over parquet files (T2V or text-only schema); text-only rows have no latents.

    Index ``i`` is a position in the concatenation of all files (repeated files appear repeatedly). CFG dropout
    is a pure function of (seed, index), so it is the same whatever the worker count or resume point.
    """

    def __init__(
        self,
        data_path: str | list[str] | dict[str, int],
        *,
        text_len: int,
        cfg_rate: float = 0.0,
        seed: int = 0,
        latent_shape: list[int] | None = None,
        skip_bad_rows: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        min_cached_groups: int = 1,
        index: DatasetIndex | None = None,
    ) -> None:
        """``index``: a prebuilt (e.g. broadcast) index; None builds it here through the index cache.
        ``min_cached_groups``: the cache keeps this many row groups even above ``cache_bytes`` (the loader's
        shuffle window, so that each group is read once per pass)."""
        if index is None:
            index = build_index(data_path)
        self.files = index.files
        self.text_len = text_len
        self.cfg_rate = cfg_rate
        self.seed = seed
        self.skip_bad_rows = skip_bad_rows
        self.cache_bytes = cache_bytes
        self.min_cached_groups = max(1, min_cached_groups)
        self._groups: list[_Group] = []
        self._starts: list[int] = []
        total = 0
        schema_kind: str | None = None
        for f in self.files:
            entry = index.entries[f]
            if schema_kind is not None and entry.kind != schema_kind:
                raise DataError(f"{f}: {entry.kind} schema mixed with {schema_kind} files in one dataset")
            schema_kind = entry.kind
            file_row = 0
            for g, (num_rows, nbytes) in enumerate(entry.row_groups):
                if num_rows == 0:
                    continue
                self._starts.append(total)
                self._groups.append(_Group(f, g, total, file_row, num_rows, nbytes))
                total += num_rows
                file_row += num_rows
        if total == 0:
            raise DataError(f"{', '.join(sorted({str(f) for f in self.files}))}: the dataset has no rows")
        assert schema_kind is not None
        self.kind = schema_kind
        self._len = total
        self._columns = list({"t2v": T2V_COLUMNS, "text_only": TEXT_ONLY_COLUMNS,
                              "ode_pairs": T2V_COLUMNS + TRAJECTORY_COLUMNS}[self.kind])
        self._reset_caches()
        self._warned: set[int] = set()
        if self.kind == "text_only":
            if latent_shape is None or len(latent_shape) != 4:
                raise DataError(f"{self.files[0]}: text-only data needs training.data.latent_shape = [C, T, H, W] "
                                "(the shape of the latents the student generates)")
            c, t, h, w = (int(x) for x in latent_shape)
            self.latent_shape: tuple[int, int, int, int] = (c, t, h, w)
        else:
            first = index.latent_shape
            assert first is not None, "build_index reads the first row's latent shape of T2V data"
            self.latent_shape = first
            if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
                raise DataError(f"{self.files[0]}: latents have shape {list(self.latent_shape)} but "
                                f"training.data.latent_shape is {list(latent_shape)}")

    @property
    def group_sizes(self) -> list[int]:
        """Row counts of the dataset's row groups in index order (empty groups left out): the sampler's unit."""
        return [g.num_rows for g in self._groups]

    # -- setup --------------------------------------------------------------------------------------------
    def _reset_caches(self) -> None:
        # Per process: file handles and cached row groups are never shared with forked loader workers.
        self._pid = os.getpid()
        self._handles: OrderedDict[Path, pq.ParquetFile] = OrderedDict()
        # Cached row groups as column lists: picking one row out of Python lists costs ~0.5 µs, slicing an
        # arrow table and converting the slice ~18 µs (per row of every batch).
        self._cache: OrderedDict[tuple[Path, int], tuple[dict[str, list[Any]], int]] = OrderedDict()
        self._cached_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_handles", "_cache"):
            state[key] = OrderedDict()
        state["_cached_bytes"] = 0
        return state

    def __len__(self) -> int:
        return self._len

    # -- reading --------------------------------------------------------------------------------------------
    def _file(self, path: Path) -> pq.ParquetFile:
        if os.getpid() != self._pid:
            self._reset_caches()
        handle = self._handles.get(path)
        if handle is None:
            # buffer_size > 0 makes pyarrow read column chunks in bounded pieces instead of whole.
            handle = self._handles[path] = pq.ParquetFile(path, buffer_size=_STREAM_BUFFER_BYTES, pre_buffer=False)
            while len(self._handles) > 16:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(path)
        return handle

    def _read_group(self, group: _Group) -> tuple[dict[str, list[Any]], int]:
        """One whole row group as column lists, and its in-memory size."""
        table = self._file(group.file).read_row_group(group.row_group, columns=self._columns)
        return table.to_pydict(), table.nbytes

    def _group_of(self, index: int) -> _Group:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for a dataset of {self._len} rows")
        return self._groups[bisect.bisect_right(self._starts, index) - 1]

    def _read_row(self, index: int) -> dict[str, Any]:
        group = self._group_of(index)
        offset = index - group.start
        key = (group.file, group.row_group)
        try:
            cached = self._cache.get(key)
            if cached is None and group.nbytes <= self.cache_bytes:
                cached = self._cache[key] = self._read_group(group)
                self._cached_bytes += cached[1]
                # Keep the shuffle window even above the byte budget: evicting one of its groups would
                # re-read it for the window's next row from that group.
                while self._cached_bytes > self.cache_bytes and len(self._cache) > self.min_cached_groups:
                    _, (_, old_bytes) = self._cache.popitem(last=False)
                    self._cached_bytes -= old_bytes
            if cached is not None:
                self._cache.move_to_end(key)
                columns = cached[0]
                return {name: values[offset] for name, values in columns.items()}
            pf = self._file(group.file)
            # Too large to cache: stream the group a few rows at a time and keep only the wanted row.
            step = max(1, int(group.num_rows * (self.cache_bytes / 4) / max(group.nbytes, 1)))
            seen = 0
            for batch in pf.iter_batches(batch_size=step, row_groups=[group.row_group], columns=self._columns):
                if offset < seen + batch.num_rows:
                    return batch.slice(offset - seen, 1).to_pylist()[0]
                seen += batch.num_rows
            raise DataError(f"{group.file}: row group {group.row_group} has {seen} rows, footer says "
                            f"{group.num_rows}")
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{group.file}: cannot read row group {group.row_group} "
                            f"({type(exc).__name__}: {exc})") from None

    def where(self, index: int) -> str:
        """``<file> row <r>`` (0-based row within the file) for messages."""
        group = self._group_of(index)
        return f"{group.file} row {group.file_row + index - group.start}"

    def drop_text(self, index: int) -> bool:
        """CFG dropout decision: a pure function of (seed, index), identical across resumes and workers."""
        if self.cfg_rate <= 0:
            return False
        return bool(np.random.default_rng([self.seed, index]).random() < self.cfg_rate)

    def load(self, index: int, *, pad_text: bool = True) -> LatentSample:
        """Row ``index`` decoded (text padded to ``text_len`` unless ``pad_text`` is False); raises DataError
        naming the file and row when it is malformed."""
        row = self._read_row(index)
        where = self.where(index)
        text = decode_tensor(row["text_embedding_bytes"], row["text_embedding_shape"],
                             row["text_embedding_dtype"], where=f"{where}, text_embedding")
        if text.ndim != 2:
            raise DataError(f"{where}: text_embedding_shape must be [L, D], got {list(text.shape)}")
        length = min(text.shape[0], self.text_len)
        mask = torch.zeros(self.text_len, dtype=torch.bool)
        mask[:length] = True
        # CFG dropout zeroes the embedding and keeps the mask (FastVideo's convention).
        embeds = torch.zeros(self.text_len if pad_text else length, text.shape[1])
        if not self.drop_text(index):
            embeds[:length] = text[:length]
        latents = None
        if self.kind in LATENT_KINDS:
            latents = decode_tensor(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"],
                                    where=f"{where}, vae_latent")
            if tuple(latents.shape) != self.latent_shape:
                raise DataError(f"{where}: latent shape {list(latents.shape)} differs from the dataset's "
                                f"{list(self.latent_shape)} (batches need equal shapes)")
        sample = LatentSample(index=index, latents_cthw=latents, text_embeds_ld=embeds, text_mask_l=mask)
        if self.kind == "ode_pairs":
            sample.trajectory_kcthw, sample.trajectory_timesteps_k = self._trajectory(row, where)
        return sample

    def _trajectory(self, row: dict[str, Any], where: str) -> tuple[torch.Tensor, torch.Tensor]:
        states = decode_tensor(row["ode_latents_bytes"], row["ode_latents_shape"], row["ode_latents_dtype"],
                               where=f"{where}, ode_latents")
        timesteps = torch.tensor(row["ode_timesteps"] or [], dtype=torch.float32)
        if states.ndim != 5 or tuple(states.shape[1:]) != self.latent_shape or states.shape[0] != len(timesteps):
            raise DataError(f"{where}: ode_latents shape {list(states.shape)} is not [K, *latent shape "
                            f"{list(self.latent_shape)}] with K = {len(timesteps)} ode_timesteps")
        return states, timesteps

    def row_fields(self, index: int, columns: Sequence[str]) -> dict[str, Any]:
        """The raw values of ``columns`` in row ``index`` (None for a column the file lacks), read with one row
        group read of just those columns: what a writer copies verbatim (``recipes/ode_pairs.py``)."""
        group = self._group_of(index)
        names = set(self._file(group.file).schema_arrow.names)
        present = [c for c in columns if c in names]
        table = self._file(group.file).read_row_group(group.row_group, columns=present)
        row = table.slice(index - group.start, 1).to_pylist()[0] if present else {}
        return {c: row.get(c) for c in columns}

    def __getitem__(self, index: int) -> LatentSample:
        if not self.skip_bad_rows:
            return self.load(index, pad_text=False)
        # A bad row is replaced by the next good row in dataset order, so every batch keeps its size (and every
        # rank its number of forwards); the substitution is deterministic, hence identical after a resume.
        for skipped in range(min(self._len, MAX_CONSECUTIVE_BAD_ROWS)):
            current = (index + skipped) % self._len
            try:
                sample = self.load(current, pad_text=False)
            except DataError as exc:
                if current not in self._warned:
                    self._warned.add(current)
                    logger.warning("skipping bad row (training.data.skip_bad_rows): %s", exc)
                continue
            sample.num_bad_rows_skipped = skipped
            return sample
        raise DataError(f"{self.where(index)}: {min(self._len, MAX_CONSECUTIVE_BAD_ROWS)} consecutive bad rows "
                        "from here on; the data is broken beyond skip_bad_rows")


def load_negative_prompt(path: str | os.PathLike[str], text_len: int) -> torch.Tensor:
    """First row's text embedding of a parquet file, zero-padded/truncated to ``[text_len, D]``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: negative-prompt file does not exist (training.data.negative_prompt_path)")
    try:
        row = pq.ParquetFile(p).read_row_group(0, columns=list(TEXT_ONLY_COLUMNS)).slice(0, 1).to_pylist()[0]
    except Exception as exc:
        raise DataError(f"{p}: unreadable negative-prompt file ({type(exc).__name__}: {exc})") from None
    text = decode_tensor(row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"],
                         where=f"{p} row 0, text_embedding")
    if text.ndim != 2:
        raise DataError(f"{p} row 0: text_embedding_shape must be [L, D], got {list(text.shape)}")
    out = torch.zeros(text_len, text.shape[1])
    out[: min(text_len, text.shape[0])] = text[:text_len]
    return out


def collate_latents(samples: list[LatentSample], latent_shape: tuple[int, int, int, int]) -> LatentBatch:
    """Stack samples into a batch, zero-padding each text embedding to the mask's length (``text_len``)."""
    latents = None
    if samples[0].latents_cthw is not None:
        latents = torch.stack([s.latents_cthw for s in samples])  # type: ignore[misc]  # a dataset's rows all have latents (T2V) or none
    trajectory = timesteps = None
    if samples[0].trajectory_kcthw is not None:  # ODE-pairs data: every row has one
        trajectory = torch.stack([s.trajectory_kcthw for s in samples])  # type: ignore[misc]
        timesteps = torch.stack([s.trajectory_timesteps_k for s in samples])  # type: ignore[misc]
    # numpy's zeros is calloc: fresh pages come zeroed from the kernel and the padding is never written here
    # (torch.zeros memsets: at 4 × 512 × 4096 floats that memset was most of the loader's time).
    shape = (len(samples), samples[0].text_mask_l.shape[0], samples[0].text_embeds_ld.shape[1])
    text = torch.from_numpy(np.zeros(shape, dtype=np.float32))
    for i, s in enumerate(samples):
        text[i, : s.text_embeds_ld.shape[0]] = s.text_embeds_ld
    return LatentBatch(
        latents_bcthw=latents,
        text_embeds_bld=text,
        text_mask_bl=torch.stack([s.text_mask_l for s in samples]),
        index=torch.tensor([s.index for s in samples], dtype=torch.int64),
        latent_shape=latent_shape,
        num_bad_rows_skipped=sum(s.num_bad_rows_skipped for s in samples),
        trajectory_bkcthw=trajectory,
        trajectory_timesteps_bk=timesteps,
    )
