"""The causal toy world (``ToyWorldSpec.temporal="trajectory"``) and the quality table's per-block metrics
(precision, coverage, consistency), against hand-computed values and constructed samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch


def test_trajectory_modes_turn_a_quarter_turn_from_u_to_w() -> None:
    """Per mode: unit-RMS centre, constant over space; frame f's channel direction makes the angle
    (π/2)·|f − g|/(T−1) with frame g's, so the first and last frames are orthogonal."""
    from fv_accel.toy import CAUSAL_TOY_SPEC, make_toy_world

    centres = make_toy_world(CAUSAL_TOY_SPEC)["centres"].double()  # [4, 3, C, T, H, W]
    c, t, h, w = CAUSAL_TOY_SPEC.latent_shape
    assert centres.shape == (4, 3, c, t, h, w) and t == 6
    assert torch.allclose(centres.pow(2).mean(dim=(2, 3, 4, 5)), torch.ones(4, 3, dtype=torch.float64))
    assert torch.equal(centres, centres[..., :1, :1].expand_as(centres))  # no spatial structure
    unit = centres[..., 0, 0] / centres[..., 0, 0].norm(dim=2, keepdim=True)  # [4, 3, C, T]
    cos = torch.einsum("nmcf,nmcg->nmfg", unit, unit)
    f = torch.arange(t, dtype=torch.float64)
    expected = torch.cos((math.pi / 2) * (f[:, None] - f[None]).abs() / (t - 1))
    assert torch.allclose(cos, expected.expand_as(cos), atol=1e-6)
    # different modes start in different directions (what lets the first block identify the mode)
    first = unit[..., 0]  # [4, 3, C]
    between = torch.einsum("nac,nbc->nab", first, first) - torch.eye(3, dtype=torch.float64)
    assert between.abs().max() < 0.9


def test_static_world_and_its_stamp_are_those_of_before_the_temporal_field() -> None:
    """The default world: centre = a normal channel vector (drawn in condition, mode order from the seed's
    generator) on every frame and pixel, scaled to RMS 1; the stored spec has no ``temporal`` key (data and
    teachers stamped before the field stay current), a trajectory spec's has it."""
    from fv_accel.toy import CAUSAL_TOY_SPEC, ToyWorldSpec, _spec_metadata, make_toy_world

    spec = ToyWorldSpec()
    rng = np.random.default_rng(spec.seed)
    c, t, h, w = spec.latent_shape
    for ci, centres in enumerate(make_toy_world(spec)["centres"]):
        for mi in range(spec.num_modes):
            channel = rng.normal(size=c)
            ref = np.broadcast_to(channel[:, None, None, None], (c, t, h, w))
            ref = ref / np.sqrt(np.mean(ref**2))
            assert np.array_equal(centres[mi].numpy(), ref.astype(np.float32)), (ci, mi)
    assert "temporal" not in _spec_metadata(spec)
    assert _spec_metadata(CAUSAL_TOY_SPEC)["temporal"] == "trajectory"


def test_causal_teacher_recipe_differs_and_default_settings_are_untouched() -> None:
    from fv_accel.toy import (
        CAUSAL_TOY_SPEC,
        TOY_FINETUNE_SETTINGS,
        TRAJECTORY_TEACHER_STEPS,
        toy_finetune_settings,
        toy_teacher_recipe,
    )

    assert toy_finetune_settings() == TOY_FINETUNE_SETTINGS
    assert toy_teacher_recipe()["finetune"]["loop"]["max_train_steps"] == 300
    causal = toy_teacher_recipe(CAUSAL_TOY_SPEC)
    assert causal["finetune"]["loop"]["max_train_steps"] == TRAJECTORY_TEACHER_STEPS
    assert TOY_FINETUNE_SETTINGS["loop"]["max_train_steps"] == 300  # the copy was changed, not the default


def test_causal_teacher_run_trains_on_the_causal_world_in_its_own_root(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``teacher_finetune_config(CAUSAL_TOY_ROOT-like root, CAUSAL_TOY_SPEC)``: 1500 steps on data whose stored
    spec is the trajectory world; the static world's root beside it is not touched."""
    import fv_accel.toy as toy
    from fv_accel.toy import (
        CAUSAL_TOY_SPEC,
        TRAJECTORY_TEACHER_STEPS,
        _stored_spec,
        ensure_toy_data,
        teacher_finetune_config,
    )

    # the random init is the default teacher's (tested in test_toy_e2e.py); making it takes seconds
    monkeypatch.setattr(toy, "ensure_teacher_init", lambda root: root / "init-toy")

    static = ensure_toy_data(tmp_path)
    before = (static / "part-00000.parquet").read_bytes()
    cfg = teacher_finetune_config(tmp_path / "causal", CAUSAL_TOY_SPEC)
    assert cfg["training"]["loop"]["max_train_steps"] == TRAJECTORY_TEACHER_STEPS
    data = Path(cfg["training"]["data"]["data_path"])
    assert data == tmp_path / "causal" / "data"
    stored = _stored_spec(data)
    assert stored is not None and stored["temporal"] == "trajectory" and stored["latent_shape"] == "(16, 6, 4, 4)"
    assert (static / "part-00000.parquet").read_bytes() == before


def test_frame_blocks_put_the_remainder_first() -> None:
    from fv_accel.quality import frame_blocks

    assert frame_blocks(6, 2) == [(0, 2), (2, 4), (4, 6)]
    assert frame_blocks(3, 2) == [(0, 1), (1, 3)]
    assert frame_blocks(8, 3) == [(0, 2), (2, 5), (5, 8)]


def test_per_block_metrics_hand_computed() -> None:
    """One condition, two modes, [C, T, H, W] = [1, 3, 1, 1], blocks of 2 → frames [0] and [1, 2].
    Centres 0 and 10 on every frame; data rows (0, 0, 0), (1, 1, 1) of mode 0 and (10, 10, 10) of mode 1.

    sample a = (0.5, 0.5, 0.5): block 0 nearest data 0 or 1 → |0.5| / √1 = 0.5, mode 0;
      block 1 → √(0.25 + 0.25) / √2 = 0.5, mode 0.
    sample b = (0, 10, 13): block 0 → 0, mode 0; block 1 nearest (10, 10) → 3 / √2, mode 1.
    Per-block distance: 0.25 and (0.5 + 3/√2) / 2; coverage 1/2 (mode 0 only) and 1; consistency 1/2."""
    from fv_accel.quality import block_distances, block_modes, consistency, frame_blocks, per_block_quality

    centres = torch.tensor([0.0, 10.0]).reshape(1, 2, 1, 1, 1, 1).expand(1, 2, 1, 3, 1, 1)
    data = torch.tensor([[0.0, 0, 0], [1, 1, 1], [10, 10, 10]]).reshape(3, 1, 3, 1, 1)
    data_cond = torch.zeros(3, dtype=torch.int64)
    samples = torch.tensor([[0.5, 0.5, 0.5], [0, 10, 13]]).reshape(2, 1, 3, 1, 1)
    cond = torch.zeros(2, dtype=torch.int64)
    blocks = frame_blocks(3, 2)
    modes = block_modes(samples, cond, centres, blocks)
    assert modes.tolist() == [[0, 0], [0, 1]]
    dist = block_distances(samples, cond, data, data_cond, blocks)
    assert torch.allclose(dist, torch.tensor([[0.5, 0.5], [0.0, 3 / math.sqrt(2)]], dtype=torch.float64))
    assert consistency(modes) == pytest.approx(0.5)
    per_block, consistent = per_block_quality(samples, cond, centres, data, data_cond, 2)
    assert [(b.start, b.end) for b in per_block] == [(0, 1), (1, 3)]
    assert per_block[0].distance == pytest.approx(0.25)
    assert per_block[1].distance == pytest.approx((0.5 + 3 / math.sqrt(2)) / 2)
    assert (per_block[0].mode_coverage, per_block[1].mode_coverage) == (pytest.approx(0.5), pytest.approx(1.0))
    assert consistent == pytest.approx(0.5)


def test_distance_is_to_the_nearest_sample_of_the_samples_own_condition() -> None:
    """Condition 1's only data row is far; condition 0's row equals the sample: the sample of condition 1 is
    measured against condition 1's row (|5 − 0| / √1 = 5 per frame block)."""
    from fv_accel.quality import block_distances

    data = torch.tensor([[5.0, 5.0], [0.0, 0.0]]).reshape(2, 1, 2, 1, 1)
    data_cond = torch.tensor([0, 1])
    sample = torch.tensor([5.0, 5.0]).reshape(1, 1, 2, 1, 1)
    dist = block_distances(sample, torch.tensor([1]), data, data_cond, [(0, 1), (1, 2)])
    assert dist.tolist() == [[5.0, 5.0]]


@pytest.fixture(scope="module")
def causal_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The causal toy world with 8 rows per mode (quick to write and read)."""
    import dataclasses

    from fv_accel.toy import CAUSAL_TOY_SPEC, write_toy_dataset

    out = tmp_path_factory.mktemp("causal") / "data"
    write_toy_dataset(out, dataclasses.replace(CAUSAL_TOY_SPEC, samples_per_mode=8))
    return out


def test_exact_centres_score_the_noise_level_and_are_consistent(causal_world: Path) -> None:
    """A sample at the exact centre of (condition c, mode c mod 3): each block's distance is that of the data
    rows' own noise, std 0.05 per entry, so ≈ 0.05 (the minimum of 8 rows' RMS over a 512-entry block, each
    0.05 ± 0.0016: between 0.045 and 0.0505); every block's mode is the constructed one; consistency 1."""
    from fv_accel.quality import block_modes, data_latents, frame_blocks, per_block_quality
    from fv_accel.toy import CAUSAL_TOY_FRAMES_PER_BLOCK, load_world

    world = load_world(causal_world)
    centres = world["centres"]
    cond = torch.arange(4)
    samples = centres[cond, cond % 3]
    blocks, consistent = per_block_quality(samples, cond, centres, data_latents(causal_world),
                                           world["row_condition"], CAUSAL_TOY_FRAMES_PER_BLOCK)
    assert len(blocks) == 3
    for b in blocks:
        assert 0.045 < b.distance < 0.0505, b
        assert b.mode_coverage == pytest.approx(1 / 3)  # one mode of three per condition
    assert consistent == 1.0
    modes = block_modes(samples, cond, centres, frame_blocks(6, CAUSAL_TOY_FRAMES_PER_BLOCK))
    assert modes.tolist() == [[m] * 3 for m in (cond % 3).tolist()]


def test_a_sample_switching_mode_at_block_2_fails_consistency(causal_world: Path) -> None:
    """Blocks 0 and 1 on mode 0's path, block 2 (frames 4-5) on mode 1's: per block it is as close to the data
    as a centre (≈ 0.05) and assigned as constructed, [0, 0, 1]; consistency 0; the whole clip is far from
    every data sample: a third of its frames are a mode gap (≥ 1.2 per frame in this world) off, so its
    distance is ≥ 1.2 / √3 ≈ 0.69, not ≈ 0.05."""
    from fv_accel.quality import block_modes, data_latents, frame_blocks, per_block_quality
    from fv_accel.toy import distance_to_data, load_world

    world = load_world(causal_world)
    centres = world["centres"]
    per_frame_gap = (centres[:, 0] - centres[:, 1]).pow(2).mean(dim=(1, 3, 4)).sqrt()  # [N_cond, T]
    assert per_frame_gap.min() > 1.2
    cond = torch.arange(4)
    switched = centres[cond, 0].clone()
    switched[:, :, 4:] = centres[cond, 1][:, :, 4:]
    modes = block_modes(switched, cond, centres, frame_blocks(6, 2))
    assert modes.tolist() == [[0, 0, 1]] * 4
    blocks, consistent = per_block_quality(switched, cond, centres, data_latents(causal_world),
                                           world["row_condition"], 2)
    assert consistent == 0.0
    assert all(0.045 < b.distance < 0.0505 for b in blocks), blocks
    rows = torch.tensor([int((world["row_condition"] == c).nonzero()[0]) for c in range(4)])
    whole = distance_to_data(switched, rows, causal_world)
    assert (whole > 1.2 / math.sqrt(3)).all(), whole


def test_quality_json_and_table_show_the_blocks(tmp_path: Path) -> None:
    from fv_accel.quality import (
        BlockQuality,
        ModelQuality,
        ToyQuality,
        format_quality_table,
        write_quality_json,
    )

    blocks = (BlockQuality(0, 2, 0.125, 1.0), BlockQuality(2, 4, 0.25, 0.5))
    models = {"student@4": ModelQuality(0.2, 1.0, 0.9, blocks=blocks, consistency=0.75),
              "teacher@4": ModelQuality(0.3, 1.0, 0.8)}
    result = ToyQuality(models=models, samples={n: torch.zeros(4, 1, 4, 1, 1) for n in models},
                        conditions=torch.tensor([0, 0, 1, 1]), num_modes=3)
    doc = json.loads(write_quality_json(result, tmp_path).read_text())
    assert doc["models"]["student@4"]["consistency"] == 0.75
    assert doc["models"]["student@4"]["blocks"] == [
        {"start": 0, "end": 2, "distance": 0.125, "mode_coverage": 1.0},
        {"start": 2, "end": 4, "distance": 0.25, "mode_coverage": 0.5}]
    assert "blocks" not in doc["models"]["teacher@4"] and "consistency" not in doc["models"]["teacher@4"]
    table = format_quality_table(result).splitlines()
    head = table.index("per block (distance / coverage on the block's frames):")
    assert table[head + 1].split() == ["model", "consistent", "frames", "0-1", "frames", "2-3"]
    assert table[head + 2].split() == ["student@4", "75.0%", "0.1250", "/", "100.0%", "0.2500", "/", "50.0%"]
    assert not any(line.split()[:1] == ["teacher@4"] for line in table[head:])


class _TargetModel:
    """A model whose flow goes straight to a fixed clip per condition (told by the text): velocity
    (x_t − target) / σ, x0 = target. Euler and the DMD sampler then end exactly on the target."""

    device = torch.device("cpu")
    streams = False  # a plain (bidirectional) model: the shared samplers do not stream it
    flow_shift = 3.0

    def __init__(self, texts: torch.Tensor, targets: torch.Tensor) -> None:
        self.texts, self.targets = texts, targets  # [N_cond, L, D], [N_cond, C, T, H, W]

    def _target(self, text_bld: torch.Tensor) -> torch.Tensor:
        match = (text_bld[:, None] == self.texts[None]).flatten(2).all(dim=2)  # [B, N_cond]
        return self.targets[match.float().argmax(dim=1)]

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_bld: torch.Tensor) -> torch.Tensor:
        sigma = (t / 1000).reshape(-1, 1, 1, 1, 1)
        return (x_t - self._target(text_bld)) / sigma

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, text_bld: torch.Tensor) -> torch.Tensor:
        return self._target(text_bld)

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_toy_quality_reports_blocks_of_each_model(causal_world: Path) -> None:
    """Through ``toy_quality`` with models of known output: the student lands on the centre of mode c mod 3 of
    each condition c (consistency 1, per-block distance the noise level, each block covering one mode of
    three), the teacher on a clip that switches from mode 0 to mode 1 at block 2 (consistency 0 at 4 and 50
    steps, per-block distance still the noise level, whole-clip distance ≥ 1.2 / √3)."""
    from fv_accel.quality import quality_json, toy_quality
    from fv_accel.toy import load_world

    world = load_world(causal_world)
    centres, texts = world["centres"], world["text"]
    cond = torch.arange(4)
    switched = centres[cond, 0].clone()
    switched[:, :, 4:] = centres[cond, 1][:, :, 4:]
    student = _TargetModel(texts, centres[cond, cond % 3])
    teacher = _TargetModel(texts, switched)
    result = toy_quality(student, teacher, causal_world, dmd_denoising_steps=[1000, 750, 500, 250],  # type: ignore[arg-type]
                         samples_per_condition=2, frames_per_block=2)
    assert list(result.models) == ["student@4", "teacher@4", "teacher@50"]
    for name, q in result.models.items():
        assert [(b.start, b.end) for b in q.blocks] == [(0, 2), (2, 4), (4, 6)], name
        assert all(0.045 < b.distance < 0.0505 and b.mode_coverage == pytest.approx(1 / 3) for b in q.blocks), q
    assert result.models["student@4"].consistency == 1.0
    assert result.models["student@4"].distance < 0.0505
    for name in ("teacher@4", "teacher@50"):
        assert result.models[name].consistency == 0.0
        assert result.models[name].distance > 1.2 / math.sqrt(3)
    doc = quality_json(result)
    assert [len(doc["models"][n]["blocks"]) for n in result.models] == [3, 3, 3]
