"""``recipes/ode_pairs.py`` / ``fv_accel/ode_pairs.py``: the stored trajectories against a hand Euler loop of the
same tiny teacher, per-row seeds across world sizes, resume, and the manifest guard."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_recipe_main

from fv_accel.config import ModelConfig
from fv_accel.data import ParquetLatentDataset
from fv_accel.models import load_role_model
from fv_accel.models.base import ModelBase
from fv_accel.ode_pairs import MANIFEST_NAME, OdePairsSpec, shard_path, write_ode_pairs

STEPS = (1000, 750, 500, 250)


def _teacher(toy_root: Path, shift: float) -> ModelBase:
    cfg = ModelConfig(init_from=str(toy_root / "init"), trainable=False, flow_shift=shift, latent_stats="identity")
    model = load_role_model("teacher", cfg, mixed_precision="no")
    model.transformer.eval()
    return model


def _spec(toy_root: Path, **over: object) -> OdePairsSpec:
    values: dict[str, object] = dict(
        teacher=str(toy_root / "init"), teacher_subfolder="transformer", latent_stats="identity",
        source=str(toy_root / "data"), source_rows=768, num_rows=3, rows_per_shard=2, denoising_steps=STEPS,
        teacher_steps=6, shift=5.0, guidance_scale=3.0, uncond="zeros", seed=7, text_len=8, dtype="fp32",
        compute="cpu/no")
    values.update(over)
    return OdePairsSpec(**values)  # type: ignore[arg-type]


def _decode(raw: bytes, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)


def _rows(out: Path) -> list[dict]:
    return [row for f in sorted(out.glob("shard-*.parquet")) for row in pq.read_table(f).to_pylist()]


def test_trajectory_equals_a_hand_euler_loop(toy_root: Path, tmp_path: Path) -> None:
    """Shift 5, 6 teacher steps: the grid holds 500 but not 750 or 250, which must be inserted, not snapped."""
    spec = _spec(toy_root)
    teacher = _teacher(toy_root, spec.shift)
    dataset = ParquetLatentDataset(str(toy_root / "data"), text_len=8)
    out = tmp_path / "pairs"
    assert write_ode_pairs(spec, teacher, dataset, out, rank=0, world_size=1) == [0, 1]
    rows = _rows(out)
    assert [r["source_index"] for r in rows] == [0, 256, 512]  # 3 rows spread over 768

    # the oracle: shifted grid u = k/6 → 1000·5u/(1 + 4u), plus 750 and 250, integrated by hand with CFG 3
    grid = [1000 * 5 * (k / 6) / (1 + 4 * (k / 6)) for k in range(6, -1, -1)]
    points = sorted({*(round(t, 4) for t in grid), 750.0, 250.0}, reverse=True)
    assert len(points) == 9 and 500.0 in [round(p, 3) for p in grid]
    for row in rows:
        i = row["source_index"]
        gen = torch.Generator().manual_seed(7 * 2**32 + i)
        x = torch.randn(16, 2, 8, 8, generator=gen)[None]
        text = dataset.load(i).text_embeds_ld[None]
        states = {}
        with torch.no_grad():
            for t, t_next in zip(points[:-1], points[1:], strict=True):
                if any(abs(t - s) < 1e-3 for s in STEPS):
                    states[round(t)] = x.clone()
                tt = torch.tensor([t])
                v_c = teacher.predict_velocity(x, tt, text)
                v_u = teacher.predict_velocity(x, tt, torch.zeros_like(text))
                x = x + (t_next - t) / 1000 * (v_u + 3.0 * (v_c - v_u))
        stored = _decode(row["ode_latents_bytes"], row["ode_latents_shape"])
        assert row["ode_latents_shape"] == [4, 16, 2, 8, 8] and row["ode_timesteps"] == [1000, 750, 500, 250]
        for k, t in enumerate(STEPS):
            torch.testing.assert_close(stored[k], states[t][0], rtol=1e-4, atol=1e-5, msg=f"state at t={t}")
        torch.testing.assert_close(_decode(row["vae_latent_bytes"], row["vae_latent_shape"]), x[0], rtol=1e-4,
                                   atol=1e-5)
        assert row["id"] == dataset.row_fields(i, ["id"])["id"]  # the text columns are the source row's
        assert row["text_embedding_bytes"] == dataset.row_fields(i, ["text_embedding_bytes"])["text_embedding_bytes"]
    # the pairs read back as a dataset whose batches carry the trajectory
    pairs = ParquetLatentDataset(str(out), text_len=8)
    assert pairs.kind == "ode_pairs" and len(pairs) == 3
    sample = pairs[1]
    assert sample.trajectory_kcthw is not None and sample.trajectory_kcthw.shape == (4, 16, 2, 8, 8)
    torch.testing.assert_close(sample.trajectory_timesteps_k, torch.tensor([1000.0, 750.0, 500.0, 250.0]))


def test_two_ranks_write_the_rows_one_rank_writes(toy_root: Path, tmp_path: Path) -> None:
    """Per-row seeds: shards written by ranks 0 and 1 of 2 equal those of one rank, byte for byte; and a rerun
    after losing a shard (a killed run) writes that shard only, identical again."""
    spec = _spec(toy_root, num_rows=5, teacher_steps=2, dtype="bf16")
    teacher = _teacher(toy_root, spec.shift)
    dataset = ParquetLatentDataset(str(toy_root / "data"), text_len=8)
    one, two = tmp_path / "one", tmp_path / "two"
    assert write_ode_pairs(spec, teacher, dataset, one, rank=0, world_size=1) == [0, 1, 2]
    assert write_ode_pairs(spec, teacher, dataset, two, rank=1, world_size=2) == [1]
    assert write_ode_pairs(spec, teacher, dataset, two, rank=0, world_size=2) == [0, 2]
    for s in range(3):
        assert pq.read_table(shard_path(one, s)).equals(pq.read_table(shard_path(two, s))), f"shard {s}"
    assert len({r["noise_seed"] for r in _rows(one)}) == 5

    kept = {s: shard_path(one, s).stat().st_mtime_ns for s in (0, 2)}
    lost = pq.read_table(shard_path(one, 1))
    shard_path(one, 1).unlink()
    (one / ".shard-000001.parquet.999.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    assert write_ode_pairs(spec, teacher, dataset, one, rank=0, world_size=1) == [1]
    assert {s: shard_path(one, s).stat().st_mtime_ns for s in (0, 2)} == kept
    assert pq.read_table(shard_path(one, 1)).equals(lost)
    assert len(ParquetLatentDataset(str(one), text_len=8)) == 5  # the temporary file is not data


def test_a_rerun_with_other_settings_is_refused(toy_root: Path, tmp_path: Path, fresh_world: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pairs"
    argv = ["--teacher", str(toy_root / "init"), "--latent-stats", "identity", "--data", str(toy_root / "data"),
            "--output", str(out), "--num-rows", "2", "--rows-per-shard", "2", "--teacher-steps", "2",
            "--text-len", "8"]
    assert run_recipe_main("ode_pairs", argv) == 0
    assert (out / MANIFEST_NAME).is_file() and shard_path(out, 0).is_file()
    before = shard_path(out, 0).stat().st_mtime_ns
    assert run_recipe_main("ode_pairs", argv) == 0  # the same settings: nothing left to do
    assert shard_path(out, 0).stat().st_mtime_ns == before
    capsys.readouterr()
    assert run_recipe_main("ode_pairs", [*argv, "--guidance-scale", "2.0"]) == 2
    err = capsys.readouterr().err
    assert MANIFEST_NAME in err and "guidance_scale" in err
    assert shard_path(out, 0).stat().st_mtime_ns == before
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary left behind


def test_a_pairs_file_missing_a_trajectory_column_is_refused(toy_root: Path, tmp_path: Path) -> None:
    """A file with some ``ode_*`` columns but not all is a broken pairs file, not plain T2V data."""
    from fv_accel.errors import DataError

    spec = _spec(toy_root, num_rows=2, teacher_steps=1)
    out = tmp_path / "pairs"
    write_ode_pairs(spec, _teacher(toy_root, spec.shift), ParquetLatentDataset(str(toy_root / "data"), text_len=8),
                    out, rank=0, world_size=1)
    broken = tmp_path / "broken"
    broken.mkdir()
    pq.write_table(pq.read_table(shard_path(out, 0)).drop_columns(["ode_timesteps"]), broken / "part.parquet")
    with pytest.raises(DataError, match="ode_timesteps"):
        ParquetLatentDataset(str(broken), text_len=8)
