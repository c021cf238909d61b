"""How fast does fv_accel's loader deliver samples from FastVideo-layout parquet files?

FastVideo's writer makes one 64-row group per file. This writes a synthetic T2V dataset in that layout
(default: 384 rows in 6 files; latents ``[16, 21, 30, 52]`` float32 = 2.1 MB per row, text embeddings
``[L, 4096]`` float32 with L drawn from 16..80 tokens, ≈ 1.1 GB in all; pyarrow's default snappy compression),
and the same rows again as 4-row groups, under a temporary directory that is deleted at the end. Then, in
alternating rounds in one process:

* **pyarrow**: each file read sequentially, ``read_row_group(...).to_pydict()`` per group, each row's latent and
  text embedding decoded to float32 tensors. No shuffling, no padding, no batching: a floor for any reader.
* **loader, 64-row groups**: fv_accel's ``DataStream`` (``shuffle: row_groups``, window 4, default 1 GB cache,
  ``num_workers: 0``, batch 4, text padded to ``text_len`` 512), one whole epoch.
* **loader, 4-row groups**: the same on the 4-row-group copy.
* **loader, old global row shuffle** (``shuffle: rows``), 64-row groups, a 256 MB cache (≈ one group: a dataset
  much larger than the cache, the real case), the first ``--rows-shuffle-samples`` samples only.

The files are fresh in the OS page cache, so this measures decoding and copying, not the disk. Reported:
samples/s (median over rounds) and the loader's rate relative to pyarrow's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_throughput.py [--rows 384] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fv_accel.config import DataConfig
from fv_accel.data import build_data_stream

TEXT_DIM = 4096


def write_dataset(root: Path, *, num_rows: int, latent_shape: list[int], rows_per_file: int,
                  row_group_size: int, seed: int = 0) -> None:
    """FastVideo's T2V schema (the columns the loader reads plus ``id`` and ``caption``)."""
    rng = np.random.default_rng(seed)
    # A pool of random rows, reused: generating 1 GB of normals would dominate the run; snappy finds no
    # repetition across rows (each value is MBs), so the files cost what distinct rows would.
    pool = [(rng.standard_normal(latent_shape, dtype=np.float32).tobytes(),
             rng.standard_normal((int(rng.integers(16, 81)), TEXT_DIM), dtype=np.float32)) for _ in range(16)]
    root.mkdir(parents=True)
    for first in range(0, num_rows, rows_per_file):
        rows: dict[str, list] = {k: [] for k in ("id", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype",
                                                 "text_embedding_bytes", "text_embedding_shape",
                                                 "text_embedding_dtype", "caption")}
        for i in range(first, min(first + rows_per_file, num_rows)):
            latents, text = pool[i % len(pool)]
            # distinct rows (parquet would dictionary-encode repeated values): the row number in the first float
            rows["id"].append(f"clip-{i}")
            rows["vae_latent_bytes"].append(np.float32(i).tobytes() + latents[4:])
            rows["vae_latent_shape"].append(latent_shape)
            rows["vae_latent_dtype"].append("float32")
            rows["text_embedding_bytes"].append(np.float32(i).tobytes() + text.tobytes()[4:])
            rows["text_embedding_shape"].append(list(text.shape))
            rows["text_embedding_dtype"].append("float32")
            rows["caption"].append(f"caption {i}")
        pq.write_table(pa.table(rows), root / f"shard-{first // rows_per_file:05d}.parquet",
                       row_group_size=row_group_size)


def pyarrow_pass(root: Path) -> float:
    """Sequential read + decode of every row; samples/s."""
    columns = ["vae_latent_bytes", "vae_latent_shape", "text_embedding_bytes", "text_embedding_shape"]
    n = 0
    t0 = time.perf_counter()
    for f in sorted(root.glob("*.parquet")):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            cols = pf.read_row_group(g, columns=columns).to_pydict()
            for lat, lat_shape, txt, txt_shape in zip(*(cols[c] for c in columns), strict=True):
                latents = torch.from_numpy(np.frombuffer(lat, dtype=np.float32).reshape(lat_shape).copy())
                text = torch.from_numpy(np.frombuffer(txt, dtype=np.float32).reshape(txt_shape).copy())
                n += int(latents.shape[0] > 0 and text.shape[1] > 0)
    return n / (time.perf_counter() - t0)


def loader_pass(root: Path, *, num_samples: int | None, **data_kw) -> float:
    """One epoch of fv_accel's DataStream (or its first ``num_samples`` samples); samples/s."""
    cfg = DataConfig(data_path=str(root), text_len=512, train_batch_size=4, seed=0, **data_kw)
    stream = build_data_stream(cfg, rank=0, world_size=1)  # the index is built (or read) here: not the hot path
    batches = stream.batches_per_epoch if num_samples is None else -(-num_samples // 4)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        assert batch.latents_bcthw is not None
    return batches * 4 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--latent-shape", type=int, nargs=4, default=[16, 21, 30, 52])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows-shuffle-samples", type=int, default=32)
    parser.add_argument("--tmp", default="/tmp", help="where the temporary dataset directory is made")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fv_accel_data_bench_", dir=args.tmp))
    try:
        big, small = work / "groups64", work / "groups4"
        t0 = time.perf_counter()
        write_dataset(big, num_rows=args.rows, latent_shape=args.latent_shape, rows_per_file=64, row_group_size=64)
        write_dataset(small, num_rows=args.rows, latent_shape=args.latent_shape, rows_per_file=64, row_group_size=4)
        size = sum(f.stat().st_size for f in big.glob("*.parquet"))
        print(f"wrote {args.rows} rows x 2 layouts in {time.perf_counter() - t0:.1f}s; 64-row layout: "
              f"{len(list(big.glob('*.parquet')))} files, {size / 1e9:.2f} GB")
        sides = {
            "pyarrow sequential (64-row groups)": lambda: pyarrow_pass(big),
            "loader, 64-row groups (row_groups, W=4)": lambda: loader_pass(big, num_samples=None),
            "loader, 4-row groups (row_groups, W=4)": lambda: loader_pass(small, num_samples=None),
            f"loader, 64-row groups, old shuffle: rows, 256 MB cache (first {args.rows_shuffle_samples})":
                lambda: loader_pass(big, num_samples=args.rows_shuffle_samples, shuffle="rows",
                              row_group_cache_mb=256),
        }
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, run in sides.items():
                rates[name].append(run())
            print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.1f}" for v in rates.values()))
        base = statistics.median(rates["pyarrow sequential (64-row groups)"])
        print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, pyarrow {pa.__version__}")
        print("| reader | samples/s (median) | ms/sample | vs pyarrow |\n|---|---|---|---|")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"| {name} | {rate:.1f} | {1000 / rate:.1f} | {rate / base:.2f}x |")
        per64 = 1 / statistics.median(rates["loader, 64-row groups (row_groups, W=4)"])
        per4 = 1 / statistics.median(rates["loader, 4-row groups (row_groups, W=4)"])
        print(f"\nper-sample cost, 64-row / 4-row groups: {per64 / per4:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
