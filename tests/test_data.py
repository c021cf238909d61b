"""Test helpers: parquet files in FastVideo's T2V and text-only schemas, written row by row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

T2V_FIELDS = ("id", "vae_latent_bytes", "vae_latent_shape", "vae_latent_dtype", "text_embedding_bytes",
              "text_embedding_shape", "text_embedding_dtype", "file_name", "caption", "media_type", "width",
              "height", "num_frames", "duration_sec", "fps")


def make_arrays(num_rows: int, *, latent_shape=(16, 2, 8, 8), text_dim: int = 32, seed: int = 0,
                text_lens: list[int] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    latents = [rng.normal(size=latent_shape).astype(np.float32) for _ in range(num_rows)]
    lens = text_lens or [3 + i % 5 for i in range(num_rows)]
    texts = [rng.normal(size=(n, text_dim)).astype(np.float32) for n in lens]
    return latents, texts


def t2v_rows(latents: list[np.ndarray], texts: list[np.ndarray], *, dtype: str = "float32",
             prefix: str = "clip") -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {k: [] for k in T2V_FIELDS}
    for i, (lat, txt) in enumerate(zip(latents, texts, strict=True)):
        lat = lat.astype(dtype)
        txt = txt.astype(dtype)
        rows["id"].append(f"{prefix}-{i}")
        rows["vae_latent_bytes"].append(lat.tobytes())
        rows["vae_latent_shape"].append(list(lat.shape))
        rows["vae_latent_dtype"].append(dtype)
        rows["text_embedding_bytes"].append(txt.tobytes())
        rows["text_embedding_shape"].append(list(txt.shape))
        rows["text_embedding_dtype"].append(dtype)
        rows["file_name"].append(f"{prefix}-{i}.mp4")
        rows["caption"].append(f"caption {i}")
        rows["media_type"].append("video")
        rows["width"].append(lat.shape[3] * 8)
        rows["height"].append(lat.shape[2] * 8)
        rows["num_frames"].append((lat.shape[1] - 1) * 4 + 1)
        rows["duration_sec"].append(1.0)
        rows["fps"].append(16.0)
    return rows


def text_only_rows(texts: list[np.ndarray], *, dtype: str = "float32") -> dict[str, list[Any]]:
    return {
        "id": [f"prompt-{i}" for i in range(len(texts))],
        "text_embedding_bytes": [t.astype(dtype).tobytes() for t in texts],
        "text_embedding_shape": [list(t.shape) for t in texts],
        "text_embedding_dtype": [dtype] * len(texts),
        "caption": [f"prompt {i}" for i in range(len(texts))],
    }


def write_rows(path: Path, rows: dict[str, list[Any]], *, row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=row_group_size)
    return path


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------

import collections  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import REPO, run_python, run_recipe_main  # noqa: E402

from fv_accel.config import DataConfig  # noqa: E402
from fv_accel.data import DataStream, ParquetLatentDataset, build_data_stream, collate_latents  # noqa: E402
from fv_accel.data.loader import EpochShardSampler  # noqa: E402
from fv_accel.errors import DataError  # noqa: E402


def _stream(data_path, **kw) -> DataStream:
    rank = kw.pop("rank", 0)
    world_size = kw.pop("world_size", 1)
    cfg = DataConfig(data_path=data_path, text_len=kw.pop("text_len", 6), **kw)
    return build_data_stream(cfg, rank=rank, world_size=world_size)


def _take(stream: DataStream, n: int) -> list:
    return [next(stream) for _ in range(n)]


def _same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.index, y.index)
        assert torch.equal(x.latents_bcthw, y.latents_bcthw)
        assert torch.equal(x.text_embeds_bld, y.text_embeds_bld)
        assert torch.equal(x.text_mask_bl, y.text_mask_bl)


@pytest.fixture
def fp32_fp16_dirs(tmp_path):
    latents, texts = make_arrays(12, text_lens=[3, 9] * 6)
    write_rows(tmp_path / "f32" / "part-0.parquet", t2v_rows(latents, texts, dtype="float32"))
    lat16, txt16 = make_arrays(8, seed=1)
    write_rows(tmp_path / "f16" / "part-0.parquet", t2v_rows(lat16, txt16, dtype="float16", prefix="h"))
    return tmp_path / "f32", tmp_path / "f16", (latents, texts), (lat16, txt16)


def test_rows_honour_dtype_shape_and_text_padding(fp32_fp16_dirs):
    f32, f16, (latents, texts), (lat16, txt16) = fp32_fp16_dirs
    ds = ParquetLatentDataset(str(f32), text_len=6)
    assert len(ds) == 12 and ds.kind == "t2v" and ds.latent_shape == (16, 2, 8, 8)
    for i in (0, 1, 11):
        s = ds.load(i)
        assert torch.equal(s.latents_cthw, torch.from_numpy(latents[i]))
        n = texts[i].shape[0]
        keep = min(n, 6)  # 3 tokens are padded to 6, 9 are truncated to 6
        assert s.text_embeds_ld.shape == (6, 32)
        assert torch.equal(s.text_embeds_ld[:keep], torch.from_numpy(texts[i][:keep]))
        assert s.text_embeds_ld[keep:].abs().sum() == 0
        assert s.text_mask_l.tolist() == [True] * keep + [False] * (6 - keep)
        # dataset[i] (what the DataLoader calls) leaves the padding to the collate function
        u = ds[i]
        assert torch.equal(u.text_embeds_ld, torch.from_numpy(texts[i][:keep])) and torch.equal(u.text_mask_l,
                                                                                                s.text_mask_l)
    batch = collate_latents([ds[0], ds[1]], ds.latent_shape)
    assert torch.equal(batch.text_embeds_bld, torch.stack([ds.load(0).text_embeds_ld, ds.load(1).text_embeds_ld]))
    h = ParquetLatentDataset(str(f16), text_len=16)
    s = h[5]
    # float16 bytes are read as float16 (not reinterpreted as float32), then widened exactly.
    assert s.latents_cthw.dtype == torch.float32
    assert torch.equal(s.latents_cthw, torch.from_numpy(lat16[5].astype(np.float16).astype(np.float32)))
    assert torch.equal(s.text_embeds_ld[: txt16[5].shape[0]],
                       torch.from_numpy(txt16[5].astype(np.float16).astype(np.float32)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_preprocess_bytes_round_trip_through_the_reader(dtype):
    from fv_accel.data.dataset import decode_tensor
    from fv_accel.data.preprocess import tensor_columns

    x = torch.randn(3, 5)
    cols = tensor_columns("t", x, dtype)
    assert cols["t_dtype"] == dtype and cols["t_shape"] == [3, 5]
    back = decode_tensor(cols["t_bytes"], cols["t_shape"], cols["t_dtype"], where="x")
    assert torch.equal(back, x.to(getattr(torch, dtype)).float())


def test_list_and_repeat_counts(fp32_fp16_dirs):
    f32, f16, (latents, _), (lat16, _) = fp32_fp16_dirs
    ds = ParquetLatentDataset({str(f32): 2, str(f16): 1}, text_len=4)
    assert len(ds) == 2 * 12 + 8
    assert torch.equal(ds[12 + 3].latents_cthw, torch.from_numpy(latents[3]))  # second copy of f32
    assert torch.equal(ds[24 + 2].latents_cthw,
                       torch.from_numpy(lat16[2].astype(np.float16).astype(np.float32)))
    assert len(ParquetLatentDataset([str(f16), str(f32)], text_len=4)) == 20
    # row names in messages are per file, also in the repeated copy
    assert ds.where(12 + 5) == f"{f32 / 'part-0.parquet'} row 5"


def test_large_row_group_is_streamed_with_bounded_memory(tmp_path):
    """A 16 MiB row group with a 1 MiB cache budget: read row by row, peak Arrow memory stays ~1 page."""
    latents, texts = make_arrays(64, latent_shape=(16, 4, 32, 32))  # 256 KiB per latent
    rows = t2v_rows(latents, texts)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(rows), tmp_path / "big.parquet", row_group_size=64, use_dictionary=False,
                   write_batch_size=1)
    script = f"""
import pyarrow as pa, numpy as np, json
pool = pa.proxy_memory_pool(pa.default_memory_pool())
pa.set_memory_pool(pool)
from fv_accel.data import ParquetLatentDataset
ds = ParquetLatentDataset({str(tmp_path)!r}, text_len=8, cache_bytes=1 << 20)
row = ds[40].latents_cthw.numpy()
print(json.dumps({{"peak": pool.max_memory(), "sum": float(row.sum())}}))
"""
    proc = run_python(["-c", script], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sum"] == pytest.approx(float(latents[40].sum()), rel=1e-5)
    assert out["peak"] < 4 << 20, out  # the whole group is 16 MiB
    # The cached path returns the same rows.
    ds = ParquetLatentDataset(str(tmp_path), text_len=8, cache_bytes=1 << 30)
    assert torch.equal(ds[40].latents_cthw, torch.from_numpy(latents[40]))


@pytest.mark.parametrize("group_sizes", [None, [7, 13, 20, 60]])
def test_epoch_reshuffle_from_seed_and_epoch(group_sizes):
    a = EpochShardSampler(100, rank=0, world_size=1, seed=7, group_sizes=group_sizes, window_groups=2)
    b = EpochShardSampler(100, rank=0, world_size=1, seed=7, group_sizes=group_sizes, window_groups=2)
    c = EpochShardSampler(100, rank=0, world_size=1, seed=8, group_sizes=group_sizes, window_groups=2)
    e0, e1 = a.epoch_indices(0), a.epoch_indices(1)
    assert sorted(e0) == sorted(e1) == list(range(100))
    assert e0 != e1  # reshuffled every epoch
    assert b.epoch_indices(1) == e1  # identical for the same seed
    assert c.epoch_indices(0) != e0
    # (seed, epoch) is a pair, not a sum: seed 7 epoch 1 differs from seed 8 epoch 0
    assert c.epoch_indices(0) != e1


def _group_of_row(group_sizes: list[int]) -> list[int]:
    return [g for g, n in enumerate(group_sizes) for _ in range(n)]


@pytest.mark.parametrize("window", [1, 3, 7])
def test_row_group_order_is_shuffled_windows_of_whole_groups(window):
    """The documented row-group order: the rows of W whole groups, then of the next W groups, ...; inside a
    window the groups' rows are mixed; the group order changes with the epoch."""
    sizes = [5, 3, 8, 4, 6, 2, 7]  # 35 rows in 7 groups
    group = _group_of_row(sizes)
    sampler = EpochShardSampler(35, rank=0, world_size=1, seed=4, group_sizes=sizes, window_groups=window)
    group_orders = []
    for epoch in range(3):
        order = sampler.epoch_order(epoch).tolist()
        assert sorted(order) == list(range(35))
        windows, pos, seen_groups = [], 0, []
        while pos < 35:
            # the next window: its rows must be exactly those of min(W, groups left) whole groups
            num_groups = min(window, len(sizes) - len(seen_groups))
            length = 1
            while True:  # grow the span until it holds all rows of the groups it touches, and W of them
                groups = {group[i] for i in order[pos:pos + length]}
                assert len(groups) <= num_groups, (epoch, pos)
                full = sum(sizes[x] for x in groups)
                if len(groups) == num_groups and full == length:
                    break
                length = full if full > length else length + 1
            rows = order[pos:pos + length]
            assert sorted(rows) == sorted(i for i in range(35) if group[i] in groups), (epoch, pos)
            windows.append(rows)
            seen_groups += sorted(groups)
            pos += length
        assert len(windows) == -(-7 // window)
        group_orders.append([group[i] for i in order])
        if window > 1:  # rows of different groups interleave in some window (not group after group)
            runs = sum(1 for a, b in zip(group_orders[-1], group_orders[-1][1:], strict=False) if a != b) + 1
            assert runs > 7, (epoch, group_orders[-1])
    assert group_orders[0] != group_orders[1] != group_orders[2]


@pytest.mark.parametrize("group_sizes", [None, [4, 4, 4, 4, 4, 4, 1]])
@pytest.mark.parametrize(("consumed", "per_rank"), [(0, 12), (4, 10), (7, 9)])
def test_two_ranks_get_equal_disjoint_shares_of_the_trimmed_order(consumed, per_rank, group_sizes):
    """25 rows, 2 ranks: after ``consumed`` rows of the epoch, the rest (25 - consumed) is trimmed to an even
    count and dealt alternately, so both ranks yield the same number of rows (hand counts: 24/2, 20/2, 18/2)."""
    seed, epoch = 3, 2
    if group_sizes is None:
        order = np.random.default_rng([seed, epoch]).permutation(25).tolist()  # the epoch's order, by the docs
    else:  # the row-group order (its structure is tested above); here the dealing of it
        order = EpochShardSampler(25, rank=0, world_size=1, seed=seed, group_sizes=group_sizes,
                                  window_groups=2).epoch_order(epoch).tolist()
    shares = []
    for rank in (0, 1):
        sampler = EpochShardSampler(25, rank=rank, world_size=2, seed=seed, group_sizes=group_sizes,
                                    window_groups=2)
        sampler.set_epoch(epoch, consumed=consumed)
        share = list(sampler)
        assert len(share) == per_rank, rank
        assert len(sampler) == per_rank, rank  # what iteration yields, as the Sampler contract asks
        shares.append(share)
    assert not set(shares[0]) & set(shares[1])
    # rank r takes the r-th row of each pair of the remaining order; the odd row left over sits out
    assert shares[0] == order[consumed::2][:per_rank] and shares[1] == order[consumed + 1::2][:per_rank]
    assert sorted(shares[0] + shares[1]) == sorted(order[consumed:consumed + 2 * per_rank])


@pytest.mark.parametrize("num_rows", [24, 25])
def test_two_rank_sharding_covers_every_row_once_per_epoch(tmp_path, num_rows):
    latents, texts = make_arrays(num_rows)
    write_rows(tmp_path / "d" / "p.parquet", t2v_rows(latents, texts))
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        stream = _stream(str(tmp_path / "d"), rank=rank, world_size=2, train_batch_size=3, seed=3)
        assert stream.batches_per_epoch == 4
        for epoch in (0, 1):
            for batch in _take(stream, 4):
                assert stream.epoch == epoch
                per_epoch[epoch] += batch.index.tolist()
    for epoch, seen in per_epoch.items():
        assert len(seen) == len(set(seen)) == 24, epoch  # disjoint shards, nothing twice
        if num_rows == 24:
            assert sorted(seen) == list(range(24))
    assert per_epoch[0] != per_epoch[1]


@pytest.mark.parametrize("shuffle", ["rows", "row_groups"])
@pytest.mark.parametrize(("world_after", "batch_after"), [(3, 2), (1, 2), (2, 5)])
def test_resume_on_another_world_size_or_batch_size_continues_the_epoch(tmp_path, world_after, batch_after,
                                                                        shuffle):
    """2 ranks x batch 2 consume part of epoch 1, then the run resumes with another layout (every new rank
    loads rank 0's position, as the checkpoint manager does): the rest of epoch 1 is exactly the uninterrupted
    epoch order after the rows seen (read off one process with batch 1), and epoch 2 is a full epoch again."""
    latents, texts = make_arrays(37)
    write_rows(tmp_path / "d" / "p.parquet", t2v_rows(latents, texts))  # 10 row groups of <= 4 rows
    path = str(tmp_path / "d")
    kw = dict(seed=5, shuffle=shuffle, shuffle_window_groups=3)
    # The uninterrupted order of epoch 1: one process, batch 1, every row of the epoch in turn.
    single = _stream(path, train_batch_size=1, **kw)
    order = [int(b.index) for b in _take(single, 2 * 37)[37:]]
    assert sorted(order) == list(range(37))
    if shuffle == "rows":  # the documented permutation
        assert order == np.random.default_rng([5, 1]).permutation(37).tolist()

    before = [_stream(path, rank=r, world_size=2, train_batch_size=2, **kw) for r in range(2)]
    for stream in before:
        _take(stream, 9 + 3)  # epoch 0 has 9 batches per rank (37 rows → 18 per rank); then 3 of epoch 1
    assert before[0].epoch == 1 and before[0].rows_consumed == 3 * 2 * 2
    state = pickle.loads(pickle.dumps(before[0].state_dict()))
    seen = []
    for stream in before:  # what the first run saw of epoch 1: replay it from a fresh stream
        replay = _stream(path, rank=stream.sampler.rank, world_size=2, train_batch_size=2, **kw)
        seen += [i for b in _take(replay, 12)[9:] for i in b.index.tolist()]
    assert sorted(seen) == sorted(order[:12])  # the first 12 rows of epoch 1's order

    after = [_stream(path, rank=r, world_size=world_after, train_batch_size=batch_after, **kw)
             for r in range(world_after)]
    batches: list[list[list[int]]] = []
    for stream in after:
        stream.load_state_dict(state)
        batches.append([])
        while True:
            batch = next(stream)
            if stream.epoch != 1:
                break
            batches[-1].append(batch.index.tolist())
        assert stream.epoch == 2 and stream.rows_consumed == batch_after * world_after
    # In lockstep, step k's j-th row of rank r is row 12 + k·B·W + j·W + r of the epoch's order.
    rest = [batches[r][k][j] for k in range(len(batches[0])) for j in range(batch_after) for r in range(world_after)]
    per_rank = (len(order[12:]) // world_after) // batch_after * batch_after
    assert len(rest) == per_rank * world_after
    assert rest == order[12:12 + len(rest)]  # continues the uninterrupted order: nothing repeated or skipped
    assert len(order) - 12 - len(rest) < world_after * batch_after  # at most one global batch sits out


def test_position_of_another_epoch_order_restarts_the_epoch(tmp_path):
    """A position is only meaningful in the order it was taken from: a state saved under another shuffle mode or
    window restarts its epoch; a state saved before ``shuffle`` existed (no key) was a global row shuffle."""
    latents, texts = make_arrays(24)
    write_rows(tmp_path / "d" / "p.parquet", t2v_rows(latents, texts))  # 6 groups of 4 rows
    path = str(tmp_path / "d")
    rows = _stream(path, train_batch_size=2, shuffle="rows")
    _take(rows, 3)
    old_state = {k: v for k, v in rows.state_dict().items() if k != "shuffle"}  # as written before this release
    assert (old_state["epoch"], old_state["rows_consumed"]) == (0, 6)
    for kw, consumed in ((dict(shuffle="rows"), 6), (dict(shuffle="row_groups"), 0),
                         (dict(shuffle="row_groups", shuffle_window_groups=2), 0)):
        resumed = _stream(path, train_batch_size=2, **kw)
        resumed.load_state_dict(old_state)
        assert (resumed.epoch, resumed.rows_consumed) == (0, consumed), kw
    groups = _stream(path, train_batch_size=2, shuffle_window_groups=2)
    _take(groups, 3)
    for window, consumed in ((2, 6), (3, 0)):
        resumed = _stream(path, train_batch_size=2, shuffle_window_groups=window)
        resumed.load_state_dict(groups.state_dict())
        assert resumed.rows_consumed == consumed, window


def _fastvideo_layout(root, num_files: int, *, rows_per_file: int = 64, latent_shape=(16, 2, 8, 8)):
    """FastVideo's writer layout: one row group per file (64 rows of 8 KiB latents: 0.5 MiB per group)."""
    for f in range(num_files):
        latents, texts = make_arrays(rows_per_file, latent_shape=latent_shape, seed=f)
        write_rows(root / f"shard-{f:02d}.parquet", t2v_rows(latents, texts, prefix=f"f{f}"),
                   row_group_size=rows_per_file)
    return root


@pytest.mark.parametrize(("shuffle", "world_size"), [("row_groups", 1), ("row_groups", 2), ("rows", 1)])
def test_one_epoch_reads_each_row_group_once_per_rank(tmp_path, monkeypatch, shuffle, world_size):
    """6 files × one 64-row group, a 1 MiB cache budget (2 groups): with the row-group order each rank reads each
    group once per epoch (the cache keeps the 4-group window above the budget); a global row shuffle re-reads."""
    data = _fastvideo_layout(tmp_path / "d", 6)
    reads: collections.Counter = collections.Counter()
    read_group = ParquetLatentDataset._read_group

    def counting(self, group):
        reads[(id(self), group.file.name, group.row_group)] += 1
        return read_group(self, group)

    monkeypatch.setattr(ParquetLatentDataset, "_read_group", counting)
    rows, datasets = [], []
    for rank in range(world_size):
        stream = _stream(str(data), rank=rank, world_size=world_size, train_batch_size=4, seed=2, shuffle=shuffle,
                         shuffle_window_groups=4, row_group_cache_mb=1)
        datasets.append(id(stream.dataset))
        for _ in range(stream.batches_per_epoch):
            rows += next(stream).index.tolist()
        assert stream.epoch == 0
    assert sorted(rows) == list(range(384))  # 384 rows divide evenly: the whole epoch was read
    groups_per_rank = [sum(1 for key in reads if key[0] == d) for d in datasets]
    if shuffle == "row_groups":
        assert max(reads.values()) == 1, reads
        assert groups_per_rank == [6] * world_size  # each rank has rows in every group
    else:  # the counter sees re-reads when there are any: random rows miss a 2-group cache most of the time
        assert sum(reads.values()) > 3 * 6, reads


def test_index_cache_skips_footers_and_follows_file_changes(tmp_path, monkeypatch):
    data = _fastvideo_layout(tmp_path / "d", 3, rows_per_file=8)
    opened: list[str] = []

    class CountingParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            opened.append(Path(source).name)
            super().__init__(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", CountingParquetFile)
    first = ParquetLatentDataset(str(data), text_len=4)
    assert sorted(set(opened)) == ["shard-00.parquet", "shard-01.parquet", "shard-02.parquet"]
    assert (data / ".fv_accel_index.json").is_file()
    opened.clear()
    second = ParquetLatentDataset(str(data), text_len=4)
    assert opened == []  # no footer, no latent-shape read: all from the cache
    assert len(second) == len(first) == 24 and second.group_sizes == [8, 8, 8]
    assert second.latent_shape == (16, 2, 8, 8) and second.kind == "t2v"

    # Rewrite one file with 5 rows in groups of 2: its footer (only) is read again.
    latents, texts = make_arrays(5, seed=9)
    write_rows(data / "shard-02.parquet", t2v_rows(latents, texts), row_group_size=2)
    third = ParquetLatentDataset(str(data), text_len=4)
    assert opened == ["shard-02.parquet"]
    assert len(third) == 8 + 8 + 5 and third.group_sizes == [8, 8, 2, 2, 1]
    assert torch.equal(third[16 + 4].latents_cthw, torch.from_numpy(latents[4]))
    # Same size, new mtime (rewritten in place): read again too. A new file appears in the index.
    opened.clear()
    os.utime(data / "shard-00.parquet", ns=(1, 1))
    _fastvideo_layout(tmp_path / "extra", 1, rows_per_file=3)
    (tmp_path / "extra" / "shard-00.parquet").rename(data / "shard-03.parquet")
    fourth = ParquetLatentDataset(str(data), text_len=4)
    # shard-00 twice: its footer, and the dataset's first latent shape (kept with the file's entry)
    assert sorted(opened) == ["shard-00.parquet", "shard-00.parquet", "shard-03.parquet"]
    assert len(fourth) == 8 + 8 + 5 + 3


def test_index_cache_falls_back_when_the_data_dir_is_not_writable(tmp_path, monkeypatch):
    data = _fastvideo_layout(tmp_path / "d", 2, rows_per_file=4)
    (data / ".fv_accel_index.json").mkdir()  # neither readable nor replaceable as a file (we may be root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ParquetLatentDataset(str(data), text_len=4)
    cached = list((tmp_path / "cache" / "fv_accel" / "index").glob("*.json"))
    assert len(cached) == 1
    assert sorted(json.loads(cached[0].read_text())["files"]) == ["shard-00.parquet", "shard-01.parquet"]
    monkeypatch.setattr(pq, "ParquetFile", None)  # any footer read now fails
    assert len(ParquetLatentDataset(str(data), text_len=4)) == 8


def test_other_ranks_take_rank_0s_index_without_touching_the_files(tmp_path, monkeypatch):
    import fv_accel.data.dataset as dataset_module
    from fv_accel.data.dataset import build_index

    data = _fastvideo_layout(tmp_path / "d", 2, rows_per_file=8)
    rank0_index = pickle.dumps(build_index(str(data)))
    (data / ".fv_accel_index.json").unlink()  # rank 1 could not use the cache file either
    broadcasts = []

    def broadcast_object_list(payload, src):  # what rank 1 receives from rank 0: [result, error]
        assert payload == [None, None] and src == 0
        broadcasts.append(1)
        payload[0] = pickle.loads(rank0_index)

    def rank_1_of_2(monkeypatch):  # the process group as rank 1 of a world of 2 sees it
        import torch.distributed as dist

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def no_file_access(*args, **kwargs):
        raise AssertionError("rank 1 touched the data files")

    rank_1_of_2(monkeypatch)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(pq, "ParquetFile", no_file_access)  # footers and rows
    monkeypatch.setattr(dataset_module, "_list_entry", no_file_access)  # listing (and stat-ing) data_path
    stream = _stream(str(data), rank=1, world_size=2, train_batch_size=2, shuffle_window_groups=1)
    assert broadcasts == [1] and len(stream.dataset) == 16
    monkeypatch.undo()
    batch = next(stream)
    latents = {f * 8 + i: lat for f in range(2) for i, lat in enumerate(make_arrays(8, seed=f)[0])}
    for row, index in enumerate(batch.index.tolist()):
        assert torch.equal(batch.latents_bcthw[row], torch.from_numpy(latents[index]))

    # An error on rank 0 reaches every rank as the same one-line DataError (none waits in the collective).
    rank_1_of_2(monkeypatch)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda payload, src: payload.__setitem__(
        1, DataError("d/x.parquet: missing column(s) ['id']")))
    with pytest.raises(DataError, match=r"^d/x.parquet: missing column\(s\) \['id'\]$"):
        _stream(str(data), rank=1, world_size=2)


def test_resume_and_worker_count_give_identical_batches_and_cfg_dropout(fp32_fp16_dirs):
    f32, f16, _, _ = fp32_fp16_dirs
    path = {str(f32): 1, str(f16): 1}
    kw = dict(train_batch_size=3, training_cfg_rate=0.5, seed=11, text_len=6)
    reference = _take(_stream(path, **kw), 9)  # 20 rows → 6 batches/epoch: crosses an epoch boundary
    dropped = [bool(b.text_embeds_bld[j].abs().sum() == 0) for b in reference for j in range(3)]
    assert 0 < sum(dropped) < len(dropped)  # dropout happened, and not everywhere
    for b in reference:  # dropout zeroes the embedding and keeps the mask
        assert b.text_mask_bl.sum(dim=1).min() >= 3

    workers = _take(_stream(path, num_workers=2, **kw), 9)
    _same_batches(reference, workers)

    # split 6 = exactly at the end of epoch 0 (its StopIteration not yet seen)
    for num_workers_before, num_workers_after, split in ((0, 2, 4), (2, 0, 4), (2, 2, 4), (0, 0, 6), (2, 0, 7)):
        first = _stream(path, num_workers=num_workers_before, **kw)
        _take(first, split)
        # the state travels through pickle, as DCP stores non-tensor values
        state = pickle.loads(pickle.dumps(copy.deepcopy(first.state_dict())))
        resumed = _stream(path, num_workers=num_workers_after, **kw)
        resumed.load_state_dict(state)
        _same_batches(reference[split:], _take(resumed, 9 - split))
        assert resumed.epoch == 1


def test_text_only_dataset(tmp_path):
    _, texts = make_arrays(6)
    write_rows(tmp_path / "t" / "p.parquet", text_only_rows(texts, dtype="float16"))
    with pytest.raises(DataError, match="latent_shape"):
        ParquetLatentDataset(str(tmp_path / "t"), text_len=8)
    stream = _stream(str(tmp_path / "t"), train_batch_size=2, latent_shape=[16, 2, 4, 4], text_len=8)
    assert stream.dataset.kind == "text_only"
    batch = next(stream)
    assert batch.latents_bcthw is None and batch.latent_shape == (16, 2, 4, 4)
    i = int(batch.index[0])
    n = texts[i].shape[0]
    assert torch.equal(batch.text_embeds_bld[0, :n], torch.from_numpy(texts[i].astype(np.float16)).float())


# ----------------------------------------------------------------------------------------------------------
# Bad data: message and exit code
# ----------------------------------------------------------------------------------------------------------

def _finetune_main(argv: list[str]) -> int:
    return run_recipe_main("finetune", argv)


def _bad_dataset(tmp_path, case: str):
    """A directory whose problem is ``case``; returns (data_path, expected message fragment)."""
    latents, texts = make_arrays(8)
    rows = t2v_rows(latents, texts)
    d = tmp_path / case
    f = d / "part-0.parquet"
    if case == "missing_column":
        del rows["vae_latent_dtype"]
        write_rows(f, rows)
        return d, f"{f}: missing column(s) ['vae_latent_dtype']"
    if case == "wrong_shape":
        rows["vae_latent_shape"][5] = [16, 2, 8, 4]
        write_rows(f, rows)
        return d, f"{f} row 5, vae_latent: 8192 bytes do not hold a float32 tensor of shape [16, 2, 8, 4]"
    if case == "truncated_bytes":
        rows["text_embedding_bytes"][6] = rows["text_embedding_bytes"][6][:-10]
        write_rows(f, rows)
        return d, f"{f} row 6, text_embedding: truncated:"
    if case == "unreadable_file":
        d.mkdir()
        f.write_bytes(b"PAR1 this is not parquet")
        return d, f"{f}: unreadable parquet file"
    if case == "empty_directory":
        d.mkdir()
        return d, f"{d}: no .parquet files in this directory"
    raise AssertionError(case)


BAD_CASES = ["missing_column", "wrong_shape", "truncated_bytes", "unreadable_file", "empty_directory"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_names_file_and_row(tmp_path, case):
    data, message = _bad_dataset(tmp_path, case)
    with pytest.raises(DataError) as info:
        stream = _stream(str(data), train_batch_size=8)
        next(stream)
    assert message in str(info.value)


@pytest.mark.parametrize("case", ["missing_column", "truncated_bytes"])
def test_bad_data_exits_1_from_the_recipe(toy_root, tmp_path, capsys, case):
    data, message = _bad_dataset(tmp_path, case)
    code = _finetune_main([f"--models.student.init_from={toy_root / 'init'}", f"--training.data.data_path={data}",
                           "--training.data.train_batch_size=8", "--training.data.text_len=8",
                           "--training.data.num_workers=1",  # a worker's error comes back as one line
                           f"--training.checkpoint.output_dir={tmp_path / 'out'}",
                           "--training.loop.max_train_steps=1", "--training.tracker.backends=[]"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"fv_accel: error: {message}" in err
    assert "Traceback" not in err


def test_skip_bad_rows_keeps_batch_size_and_counts(tmp_path):
    data, _ = _bad_dataset(tmp_path, "truncated_bytes")  # row 6 is bad
    stream = _stream(str(data), train_batch_size=4, skip_bad_rows=True, seed=1)
    seen, sizes = [], []
    for batch in _take(stream, 6):  # 3 epochs of 2 batches
        sizes.append(len(batch.index))
        seen += batch.index.tolist()
    assert sizes == [4] * 6
    assert 6 not in seen
    assert seen.count(7) == 3 + 3  # row 7 stands in for row 6 once per epoch, on top of its own turn
    assert stream.num_bad_rows_skipped == 3
    assert stream.state_dict()["num_bad_rows_skipped"] == 3


# ----------------------------------------------------------------------------------------------------------
# End to end through recipes/finetune.py
# ----------------------------------------------------------------------------------------------------------


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_finetune_on_fp32_and_fp16_files_resumes_exactly_with_workers(toy_root, fp32_fp16_dirs, tmp_path):
    """FastVideo-schema files written here (float32 + float16, repeat counts) train; a run resumed from its
    step-2 checkpoint with 2 loader workers reproduces steps 3-4 (data order, CFG dropout, losses) exactly."""
    f32, f16, _, _ = fp32_fp16_dirs
    common = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
              f"--training.data.data_path={{{f32}: 1, {f16}: 2}}",  # 12 + 2×8 = 28 rows
              "--training.data.train_batch_size=8", "--training.data.text_len=8",
              "--training.data.training_cfg_rate=0.3", "--training.loop.max_train_steps=4",
              "--training.tracker.backends=[]"]
    a, b = tmp_path / "a", tmp_path / "b"
    proc = run_python([*common, f"--training.checkpoint.output_dir={a}", "--training.checkpoint.save_steps=2"],
                      cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_python([*common, f"--training.checkpoint.output_dir={b}", "--training.data.num_workers=2",
                       f"--training.checkpoint.resume_from_checkpoint={a / 'checkpoint-2'}"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows_a, rows_b = _metrics(a / "metrics.jsonl"), _metrics(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [1, 2, 3, 4] and [r["step"] for r in rows_b] == [3, 4]
    assert all(0 < r["loss"] < 10 for r in rows_a)
    # 28 rows / batch 8 = 3 batches per epoch: step 4 is the first batch of epoch 1 (reshuffled).
    # Bitwise equal on CPU; the tolerance only absorbs GPU kernel nondeterminism (a different batch or dropout
    # pattern changes the loss by far more).
    assert [r["loss"] for r in rows_b] == pytest.approx([r["loss"] for r in rows_a[2:]], rel=1e-5, abs=0)


# ----------------------------------------------------------------------------------------------------------
# Text-only data drives data-free DMD2 (rollout_mode: simulate)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (REPO / "fv_accel" / "methods" / "dmd2.py").is_file(), reason="DMD2 method not present")
def test_text_only_data_drives_dmd2_simulate(toy_root, tmp_path):
    import yaml

    _, texts = make_arrays(6, text_lens=[4, 8, 12] * 2)
    data = tmp_path / "prompts"
    write_rows(data / "rank000-00000.parquet", text_only_rows(texts, dtype="float16"))
    neg = np.random.default_rng(5).normal(size=(3, 32)).astype(np.float32)
    write_rows(data / "_negative_prompt.parquet", text_only_rows([neg]))
    init = str(toy_root / "init")
    out = tmp_path / "dmd2"
    cfg = {
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"},
                   "critic": {"init_from": init, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": [1000, 500],
                   "generator_update_interval": 2, "uncond": "negative_prompt"},
        "training": {
            "data": {"data_path": str(data), "latent_shape": [16, 2, 8, 8], "text_len": 8, "train_batch_size": 2,
                     "negative_prompt_path": str(data / "_negative_prompt.parquet")},
            "loop": {"max_train_steps": 2},
            "checkpoint": {"output_dir": str(out)},
            "tracker": {"backends": []},
        },
    }
    config = tmp_path / "dmd2.yaml"
    config.write_text(yaml.safe_dump(cfg))
    recipe = "distill.py" if (REPO / "recipes" / "distill.py").is_file() else "finetune.py"
    assert run_recipe_main(recipe.removesuffix(".py"), ["--config", str(config)]) == 0  # in this process
    rows = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["critic_loss"]) for r in rows)
    assert "generator_loss" not in rows[0] and np.isfinite(rows[1]["generator_loss"])
