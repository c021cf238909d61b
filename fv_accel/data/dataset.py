"""Latent datasets in FastVideo's parquet schemas (DESIGN.md §6).

T2V schema: ``id, vae_latent_bytes, vae_latent_shape [C,T,H,W], vae_latent_dtype, text_embedding_bytes,
text_embedding_shape [L,D], text_embedding_dtype, file_name, caption, media_type, width, height, num_frames,
duration_sec, fps``. Text-only schema (data-free DMD2): ``id, text_embedding_{bytes,shape,dtype}, caption``.

Memory stays bounded for datasets larger than RAM: only file footers are read up front; rows are read one
parquet row group at a time into a small LRU cache whose size is counted in bytes (``cache_bytes``), and a row
group larger than that budget is streamed with a bounded read buffer, keeping only the requested row. Whole
files are never loaded.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import os
from collections import OrderedDict
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
    text_mask_l: torch.Tensor
    num_bad_rows_skipped: int = 0
    """With ``skip_bad_rows``: bad rows passed over to reach this one (0 otherwise)."""


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


def list_parquet_files(data_path: str | list[str] | dict[str, int]) -> list[Path]:
    """Every parquet file of ``data_path`` in a fixed order, each repeated by its entry's repeat count."""
    files: list[Path] = []
    for p, repeat in parse_data_path(data_path):
        if p.is_file():
            if p.suffix != ".parquet":
                raise DataError(f"{p}: not a .parquet file")
            found = [p]
        elif p.is_dir():
            # Hidden/underscore paths are writers' temporaries and manifests (preprocessing), never data.
            found = sorted(f for f in p.rglob("*.parquet")
                           if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"{p}: no .parquet files in this directory")
        else:
            raise DataError(f"{p}: no such file or directory")
        files.extend(found * repeat)
    return files


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
    ) -> None:
        self.files = list_parquet_files(data_path)
        self.text_len = text_len
        self.cfg_rate = cfg_rate
        self.seed = seed
        self.skip_bad_rows = skip_bad_rows
        self.cache_bytes = cache_bytes
        self._groups: list[_Group] = []
        self._starts: list[int] = []
        # Footers only, read concurrently: a large dataset has thousands of files and this is I/O latency.
        unique = list(dict.fromkeys(self.files))
        with ThreadPoolExecutor(max_workers=min(16, len(unique))) as pool:
            footers = dict(zip(unique, pool.map(self._inspect, unique), strict=True))
        total = 0
        schema_kind: str | None = None
        for f in self.files:
            meta, kind = footers[f]
            if schema_kind is not None and kind != schema_kind:
                raise DataError(f"{f}: {kind} schema mixed with {schema_kind} files in one dataset")
            schema_kind = kind
            file_row = 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                if rg.num_rows == 0:
                    continue
                self._starts.append(total)
                self._groups.append(_Group(f, g, total, file_row, rg.num_rows, rg.total_byte_size))
                total += rg.num_rows
                file_row += rg.num_rows
        if total == 0:
            raise DataError(f"{', '.join(sorted({str(f) for f in self.files}))}: the dataset has no rows")
        assert schema_kind is not None
        self.kind = schema_kind
        self._len = total
        self._columns = list(T2V_COLUMNS if self.kind == "t2v" else TEXT_ONLY_COLUMNS)
        self._reset_caches()
        self._warned: set[int] = set()
        if self.kind == "text_only":
            if latent_shape is None or len(latent_shape) != 4:
                raise DataError(f"{self.files[0]}: text-only data needs training.data.latent_shape = [C, T, H, W] "
                                "(the shape of the latents the student generates)")
            self.latent_shape = tuple(int(x) for x in latent_shape)
        else:
            self.latent_shape = self._first_latent_shape()
            if latent_shape is not None and tuple(latent_shape) != self.latent_shape:
                raise DataError(f"{self.files[0]}: latents have shape {list(self.latent_shape)} but "
                                f"training.data.latent_shape is {list(latent_shape)}")

    # -- setup --------------------------------------------------------------------------------------------
    @staticmethod
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
        return pf.metadata, "text_only" if missing_latent else "t2v"

    def _first_latent_shape(self) -> tuple[int, int, int, int]:
        group = self._groups[0]
        try:
            column = self._file(group.file).read_row_group(group.row_group, columns=["vae_latent_shape"])
        except Exception as exc:
            raise DataError(f"{group.file}: cannot read row group {group.row_group} ({exc})") from None
        shape = column.column(0)[0].as_py()
        if shape is None or len(shape) != 4:
            raise DataError(f"{group.file} row 0: vae_latent_shape must be [C, T, H, W], got {shape}")
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

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
                table = self._file(group.file).read_row_group(group.row_group, columns=self._columns)
                cached = self._cache[key] = (table.to_pydict(), table.nbytes)
                self._cached_bytes += table.nbytes
                while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
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

    def load(self, index: int) -> LatentSample:
        """Row ``index`` decoded and padded; raises DataError naming the file and row when it is malformed."""
        row = self._read_row(index)
        where = self.where(index)
        text = decode_tensor(row["text_embedding_bytes"], row["text_embedding_shape"],
                             row["text_embedding_dtype"], where=f"{where}, text_embedding")
        if text.ndim != 2:
            raise DataError(f"{where}: text_embedding_shape must be [L, D], got {list(text.shape)}")
        length = min(text.shape[0], self.text_len)
        padded = torch.zeros(self.text_len, text.shape[1])
        mask = torch.zeros(self.text_len, dtype=torch.bool)
        # CFG dropout zeroes the embedding and keeps the mask (FastVideo's convention).
        if not self.drop_text(index):
            padded[:length] = text[:length]
        mask[:length] = True
        latents = None
        if self.kind == "t2v":
            latents = decode_tensor(row["vae_latent_bytes"], row["vae_latent_shape"], row["vae_latent_dtype"],
                                    where=f"{where}, vae_latent")
            if tuple(latents.shape) != self.latent_shape:
                raise DataError(f"{where}: latent shape {list(latents.shape)} differs from the dataset's "
                                f"{list(self.latent_shape)} (batches need equal shapes)")
        return LatentSample(index=index, latents_cthw=latents, text_embeds_ld=padded, text_mask_l=mask)

    def __getitem__(self, index: int) -> LatentSample:
        if not self.skip_bad_rows:
            return self.load(index)
        # A bad row is replaced by the next good row in dataset order, so every batch keeps its size (and every
        # rank its number of forwards); the substitution is deterministic, hence identical after a resume.
        for skipped in range(min(self._len, MAX_CONSECUTIVE_BAD_ROWS)):
            current = (index + skipped) % self._len
            try:
                sample = self.load(current)
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
    latents = None
    if samples[0].latents_cthw is not None:
        latents = torch.stack([s.latents_cthw for s in samples])  # type: ignore[misc]
    return LatentBatch(
        latents_bcthw=latents,
        text_embeds_bld=torch.stack([s.text_embeds_ld for s in samples]),
        text_mask_bl=torch.stack([s.text_mask_l for s in samples]),
        index=torch.tensor([s.index for s in samples], dtype=torch.int64),
        latent_shape=latent_shape,
        num_bad_rows_skipped=sum(s.num_bad_rows_skipped for s in samples),
    )
