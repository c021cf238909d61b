"""Latent datasets in FastVideo's parquet schemas (DESIGN.md §6).

T2V schema: ``id, vae_latent_bytes, vae_latent_shape [C,T,H,W], vae_latent_dtype, text_embedding_bytes,
text_embedding_shape [L,D], text_embedding_dtype, file_name, caption, media_type, width, height, num_frames,
duration_sec, fps``. Text-only schema (data-free DMD2): ``id, text_embedding_{bytes,shape,dtype}, caption``.

Rows are read one row group at a time (the last one is cached per worker), so memory stays bounded for
datasets larger than RAM.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from fv_accel.errors import DataError

T2V_COLUMNS = ("vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype",
               "text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype")
TEXT_ONLY_COLUMNS = ("text_embedding_bytes", "text_embedding_shape", "text_embedding_dtype")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "torch.float32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "torch.float16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
}


@dataclass
class LatentSample:
    index: int
    latents_cthw: torch.Tensor | None
    text_embeds_ld: torch.Tensor
    text_mask_l: torch.Tensor


@dataclass
class LatentBatch:
    """A collated batch on the host: what a model's ``prepare_batch`` consumes."""

    latents_bcthw: torch.Tensor | None
    text_embeds_bld: torch.Tensor
    text_mask_bl: torch.Tensor
    index: torch.Tensor
    latent_shape: tuple[int, int, int, int]
    uncond_embeds_bld: torch.Tensor | None = None


def decode_tensor(raw: bytes, shape: list[int], dtype_name: str, *, where: str) -> torch.Tensor:
    dtype = _DTYPES.get(str(dtype_name))
    if dtype is None:
        raise DataError(f"{where}: unsupported dtype {dtype_name!r}")
    expected = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    if len(raw) != expected:
        raise DataError(f"{where}: {len(raw)} bytes do not hold a {dtype_name} tensor of shape {list(shape)} "
                        f"({expected} bytes)")
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(list(shape)).float()


def list_parquet_files(data_path: str | list[str]) -> list[Path]:
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    if not paths or paths == [""]:
        raise DataError("training.data.data_path is empty")
    files: list[Path] = []
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_file() and p.suffix == ".parquet":
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob("*.parquet"))
            if not found:
                raise DataError(f"{p}: no .parquet files in this directory")
            files.extend(found)
        else:
            raise DataError(f"{p}: not a parquet file or directory")
    return files


class ParquetLatentDataset(Dataset[LatentSample]):
    """Map-style dataset over one or more parquet directories; text-only rows have no latents."""

    def __init__(
        self,
        data_path: str | list[str],
        *,
        text_len: int,
        cfg_rate: float = 0.0,
        seed: int = 0,
        latent_shape: list[int] | None = None,
    ) -> None:
        self.files = list_parquet_files(data_path)
        self.text_len = text_len
        self.cfg_rate = cfg_rate
        self.seed = seed
        self._groups: list[tuple[int, int]] = []  # (file index, row group)
        self._starts: list[int] = []
        total = 0
        schema_kind: str | None = None
        for fi, f in enumerate(self.files):
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as exc:  # pyarrow raises several types for corrupt files
                raise DataError(f"{f}: unreadable parquet file ({exc})") from None
            names = set(pq.read_schema(f).names)
            kind = "t2v" if set(T2V_COLUMNS) <= names else "text_only" if set(TEXT_ONLY_COLUMNS) <= names else None
            if kind is None:
                missing = sorted(set(TEXT_ONLY_COLUMNS) - names) or sorted(set(T2V_COLUMNS) - names)
                raise DataError(f"{f}: missing column(s) {missing}")
            if schema_kind is not None and kind != schema_kind:
                raise DataError(f"{f}: {kind} schema mixed with {schema_kind} files")
            schema_kind = kind
            for g in range(meta.num_row_groups):
                self._starts.append(total)
                self._groups.append((fi, g))
                total += meta.row_group(g).num_rows
        if total == 0:
            raise DataError(f"{self.files[0].parent}: the dataset has no rows")
        self.kind = schema_kind
        self._len = total
        # A few decoded row groups per worker: random access without re-reading, memory stays bounded.
        self._cache: OrderedDict[int, dict[str, list]] = OrderedDict()
        self._cache_groups = 8
        if self.kind == "text_only":
            if latent_shape is None or len(latent_shape) != 4:
                raise DataError("text-only data needs training.data.latent_shape = [C, T, H, W]")
            self.latent_shape = tuple(latent_shape)
        else:
            first = self._row(0)
            self.latent_shape = tuple(int(x) for x in first["vae_latent_shape"])

    def __len__(self) -> int:
        return self._len

    def _row(self, index: int) -> dict:
        g = bisect.bisect_right(self._starts, index) - 1
        cols = self._cache.get(g)
        if cols is None:
            fi, rg = self._groups[g]
            try:
                table = pq.ParquetFile(self.files[fi]).read_row_group(rg)
            except Exception as exc:
                raise DataError(f"{self.files[fi]}: cannot read row group {rg} ({exc})") from None
            cols = self._cache[g] = table.to_pydict()
            while len(self._cache) > self._cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        offset = index - self._starts[g]
        return {k: v[offset] for k, v in cols.items()}

    def where(self, index: int) -> str:
        g = bisect.bisect_right(self._starts, index) - 1
        fi, rg = self._groups[g]
        return f"{self.files[fi]} row {index - self._starts[g]} of row group {rg}"

    def drop_text(self, index: int) -> bool:
        """CFG dropout decision: a pure function of (seed, index), identical across resumes and workers."""
        if self.cfg_rate <= 0:
            return False
        return bool(np.random.default_rng([self.seed, index]).random() < self.cfg_rate)

    def __getitem__(self, index: int) -> LatentSample:
        row = self._row(index)
        where = self.where(index)
        text = decode_tensor(row["text_embedding_bytes"], row["text_embedding_shape"],
                             row["text_embedding_dtype"], where=f"{where}, text_embedding")
        if text.ndim != 2:
            raise DataError(f"{where}: text_embedding_shape must be [L, D], got {list(text.shape)}")
        length = min(text.shape[0], self.text_len)
        padded = torch.zeros(self.text_len, text.shape[1])
        mask = torch.zeros(self.text_len, dtype=torch.bool)
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
    )
