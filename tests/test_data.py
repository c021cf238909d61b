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

import copy  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import REPO, run_python, run_recipe_main  # noqa: E402

from fv_accel.config import DataConfig  # noqa: E402
from fv_accel.data import DataStream, ParquetLatentDataset, build_data_stream  # noqa: E402
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
        s = ds[i]
        assert torch.equal(s.latents_cthw, torch.from_numpy(latents[i]))
        n = texts[i].shape[0]
        keep = min(n, 6)  # 3 tokens are padded to 6, 9 are truncated to 6
        assert torch.equal(s.text_embeds_ld[:keep], torch.from_numpy(texts[i][:keep]))
        assert s.text_embeds_ld[keep:].abs().sum() == 0
        assert s.text_mask_l.tolist() == [True] * keep + [False] * (6 - keep)
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


def test_epoch_reshuffle_from_seed_and_epoch():
    a = EpochShardSampler(100, rank=0, world_size=1, seed=7)
    b = EpochShardSampler(100, rank=0, world_size=1, seed=7)
    c = EpochShardSampler(100, rank=0, world_size=1, seed=8)
    e0, e1 = a.epoch_indices(0), a.epoch_indices(1)
    assert sorted(e0) == sorted(e1) == list(range(100))
    assert e0 != e1  # reshuffled every epoch
    assert b.epoch_indices(1) == e1  # identical for the same seed
    assert c.epoch_indices(0) != e0
    # (seed, epoch) is a pair, not a sum: seed 7 epoch 1 differs from seed 8 epoch 0
    assert c.epoch_indices(0) != e1


@pytest.mark.parametrize(("consumed", "per_rank"), [(0, 12), (4, 10), (7, 9)])
def test_two_ranks_get_equal_disjoint_shares_of_the_trimmed_order(consumed, per_rank):
    """25 rows, 2 ranks: after ``consumed`` rows of the epoch, the rest (25 - consumed) is trimmed to an even
    count and dealt alternately, so both ranks yield the same number of rows (hand counts: 24/2, 20/2, 18/2)."""
    seed, epoch = 3, 2
    order = np.random.default_rng([seed, epoch]).permutation(25).tolist()  # the epoch's order, by the docs
    shares = []
    for rank in (0, 1):
        sampler = EpochShardSampler(25, rank=rank, world_size=2, seed=seed)
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


@pytest.mark.parametrize(("world_after", "batch_after"), [(3, 2), (1, 2), (2, 5)])
def test_resume_on_another_world_size_or_batch_size_continues_the_epoch(tmp_path, world_after, batch_after):
    """2 ranks x batch 2 consume part of epoch 1, then the run resumes with another layout (every new rank
    loads rank 0's position, as the checkpoint manager does): the rest of epoch 1 holds exactly the rows not
    seen yet, each once, and epoch 2 is a full epoch again."""
    latents, texts = make_arrays(37)
    write_rows(tmp_path / "d" / "p.parquet", t2v_rows(latents, texts))
    path = str(tmp_path / "d")
    before = [_stream(path, rank=r, world_size=2, train_batch_size=2, seed=5) for r in range(2)]
    for stream in before:
        _take(stream, 9 + 3)  # epoch 0 has 9 batches per rank (37 rows → 18 per rank); then 3 of epoch 1
    assert before[0].epoch == 1 and before[0].rows_consumed == 3 * 2 * 2
    state = pickle.loads(pickle.dumps(before[0].state_dict()))
    seen = []
    for stream in before:  # what the first run saw of epoch 1: replay it from a fresh stream
        replay = _stream(path, rank=stream.sampler.rank, world_size=2, train_batch_size=2, seed=5)
        seen += [i for b in _take(replay, 12)[9:] for i in b.index.tolist()]
    order = np.random.default_rng([5, 1]).permutation(37).tolist()
    assert sorted(seen) == sorted(order[:12])  # the first 12 rows of epoch 1's order

    after = [_stream(path, rank=r, world_size=world_after, train_batch_size=batch_after, seed=5)
             for r in range(world_after)]
    rest = []
    for stream in after:
        stream.load_state_dict(state)
        while True:
            batch = next(stream)
            if stream.epoch != 1:
                break
            rest += batch.index.tolist()
        assert stream.epoch == 2 and stream.rows_consumed == batch_after * world_after
    remaining = order[12:]
    per_rank = (len(remaining) // world_after) // batch_after * batch_after
    assert len(rest) == len(set(rest)) == per_rank * world_after
    assert set(rest) <= set(remaining) and not set(rest) & set(seen)  # nothing repeated, only unseen rows
    assert len(remaining) - len(rest) < world_after * batch_after  # at most one global batch sits out


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
    proc = run_python([f"recipes/{recipe}", "--config", str(config)], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["critic_loss"]) for r in rows)
    assert "generator_loss" not in rows[0] and np.isfinite(rows[1]["generator_loss"])
