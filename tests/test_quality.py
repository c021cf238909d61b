"""The toy quality table's recall columns (mode coverage, mode-balance entropy) on constructed samples with
hand-computed answers, the quality.json layout, quality.png, and its tracker logging."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

# Two conditions × three modes in a 1-D "latent" [C, T, H, W] = [1, 1, 1, 1], centres far apart.
CENTRES = torch.tensor([[0.0, 10.0, 20.0], [100.0, 110.0, 120.0]]).reshape(2, 3, 1, 1, 1, 1)


def _samples(counts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples near the centres: ``counts[c][m]`` samples of condition c at mode m (+ a small offset)."""
    latents, conditions = [], []
    for c, per_mode in enumerate(counts):
        for m, n in enumerate(per_mode):
            for i in range(n):
                latents.append(CENTRES[c, m] + 0.1 * (i + 1))
                conditions.append(c)
    return torch.stack(latents), torch.tensor(conditions)


def _scores(counts: list[list[int]]) -> tuple[float, float]:
    from fv_accel.quality import mode_coverage, mode_entropy
    from fv_accel.toy import nearest_mode

    latents, conditions = _samples(counts)
    modes = nearest_mode(latents, conditions, CENTRES)
    return mode_coverage(conditions, modes, 3), mode_entropy(conditions, modes, 3)


def test_all_samples_on_one_mode() -> None:
    coverage, entropy = _scores([[4, 0, 0], [0, 0, 4]])
    assert coverage == pytest.approx(1 / 3)
    assert entropy == pytest.approx(0.0, abs=1e-12)


def test_uniform_over_modes() -> None:
    coverage, entropy = _scores([[2, 2, 2], [3, 3, 3]])
    assert coverage == pytest.approx(1.0)
    assert entropy == pytest.approx(1.0)


def test_uneven_histogram_hand_values() -> None:
    # condition 0: (2, 1, 0) → 2 of 3 modes, H = ln 3 − (2/3) ln 2 = 0.636514 nats, / ln 3 = 0.579380;
    # condition 1: uniform → 3 of 3, 1.0. Means: coverage 5/6, entropy 0.789690.
    coverage, entropy = _scores([[2, 1, 0], [1, 1, 1]])
    assert coverage == pytest.approx(5 / 6)
    assert entropy == pytest.approx(0.789690, abs=1e-6)


def test_assignment_uses_the_samples_own_condition() -> None:
    """A sample of condition 0 at 104 is nearest (of all centres) to condition 1's mode 0 (100), but of its own
    condition's centres to mode 2 (20); a sample of condition 1 at 18 is nearest to condition 0's mode 2 (20)
    but of its own to mode 0 (100)."""
    from fv_accel.quality import mode_coverage
    from fv_accel.toy import nearest_mode

    latents = torch.tensor([104.0, 18.0]).reshape(2, 1, 1, 1, 1)
    conditions = torch.tensor([0, 1])
    modes = nearest_mode(latents, conditions, CENTRES)
    assert modes.tolist() == [2, 0]
    # one hit per condition: 2 of the 6 (condition, mode) pairs
    assert mode_coverage(conditions, modes, 3) == pytest.approx(1 / 3)


def test_balanced_rows_gives_every_condition_the_same_count() -> None:
    from fv_accel.quality import balanced_rows

    row_condition = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert balanced_rows(row_condition, 2) == [0, 1, 3, 4, 6, 7]
    # more samples than rows: rows repeat (same prompt), the count per condition still holds
    assert balanced_rows(row_condition, 4) == [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]


def _result(**models: tuple[float, float, float]) -> Any:
    from fv_accel.quality import ModelQuality, ToyQuality

    conditions = torch.tensor([0, 0, 1, 1])
    return ToyQuality(models={n: ModelQuality(*v) for n, v in models.items()},
                      samples={n: torch.zeros(4, 1, 1, 1, 1) for n in models}, conditions=conditions, num_modes=3)


def test_quality_json_keeps_the_distance_keys_and_adds_the_metrics(tmp_path: Path) -> None:
    from fv_accel.quality import format_quality_table, write_quality_json

    result = _result(**{"student@4": (0.25, 2 / 3, 0.5), "teacher@4": (0.5, 1.0, 0.75)})
    doc = json.loads(write_quality_json(result, tmp_path).read_text())
    assert doc["student@4"] == 0.25 and doc["teacher@4"] == 0.5  # the file's original name → distance entries
    assert doc["models"]["student@4"] == {"distance": 0.25, "mode_coverage": 2 / 3, "mode_entropy": 0.5}
    assert doc["models"]["teacher@4"] == {"distance": 0.5, "mode_coverage": 1.0, "mode_entropy": 0.75}
    assert (doc["samples_per_condition"], doc["num_conditions"], doc["num_modes"]) == (2, 2, 3)
    table = format_quality_table(result)
    assert "4 samples per model (2 per condition, 2 conditions x 3 modes)" in table
    row = next(line for line in table.splitlines() if line.strip().startswith("student@4"))
    assert row.split() == ["student@4", "0.2500", "66.7%", "0.50"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-condition toy world with 8 rows per mode (small: quick to write and to read)."""
    from fv_accel.toy import ToyWorldSpec, write_toy_dataset

    out = tmp_path_factory.mktemp("world") / "data"
    write_toy_dataset(out, ToyWorldSpec(num_conditions=4, num_modes=3, samples_per_mode=8))
    return out


def test_quality_png_is_written_with_every_models_points(small_world: Path, tmp_path: Path) -> None:
    """teacher@50 spread over the modes, teacher@K at the conditional mean, student@K on one mode: each model's
    colour appears in the panels (below the legend strip), the file decodes, 4 panels in a 2 × 2 grid."""
    from PIL import Image

    from fv_accel.quality import (
        DATA_COLOUR,
        LEGEND_HEIGHT,
        MODEL_COLOURS,
        PANEL_SIZE,
        ModelQuality,
        ToyQuality,
        write_quality_png,
    )
    from fv_accel.toy import load_world

    centres = load_world(small_world)["centres"]  # [4, 3, C, T, H, W]
    conditions = torch.arange(4).repeat_interleave(6)
    gen = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(24, *centres.shape[2:], generator=gen)
    samples = {
        "student@4": centres[conditions, 0] + noise,
        "teacher@4": centres[conditions].mean(dim=1) + noise,
        "teacher@50": centres[conditions, torch.arange(24) % 3] + noise,
    }
    q = ModelQuality(0.0, 0.0, 0.0)
    result = ToyQuality(models={n: q for n in samples}, samples=samples, conditions=conditions, num_modes=3)
    path, image = write_quality_png(result, small_world, tmp_path)
    assert path == tmp_path / "quality.png" and not list(tmp_path.glob("*.tmp"))
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (2 * PANEL_SIZE, LEGEND_HEIGHT + 2 * PANEL_SIZE)
        pixels = png.convert("RGB").crop((0, LEGEND_HEIGHT, png.size[0], png.size[1]))
    counts = {colour: n for n, colour in pixels.getcolors(maxcolors=1 << 16)}  # type: ignore[union-attr]
    # drawn many-step teacher first: teacher@50 → MODEL_COLOURS[0], teacher@4 → [1], student@4 → [2]
    for colour in (DATA_COLOUR, *MODEL_COLOURS):
        assert counts.get(colour, 0) >= 20, (colour, counts.get(colour))


def test_quality_image_logs_to_trackers_that_take_images(tmp_path: Path, fresh_world: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """TensorBoard gets one image of the picture's size at the given step; a tracker without ``log_images``
    (trackio) is skipped with a debug line, not an error."""
    import logging

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fv_accel.quality import log_quality_image
    from fv_accel.runtime import build_accelerator

    accelerator = build_accelerator(log_with=["tensorboard"], project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    no_images = SimpleNamespace(name="trackio")
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    with caplog.at_level(logging.DEBUG, logger="fv_accel"):
        log_quality_image(SimpleNamespace(trackers=[no_images, *accelerator.trackers]), image, step=7)
    accelerator.end_training()
    assert any("trackio" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records), caplog.text
    (run_dir,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    (logged,) = events.Images("quality/toy")
    assert (logged.step, logged.width, logged.height) == (7, 40, 30)

def test_entropy_normalisation_matches_log_num_modes() -> None:
    """Two modes used evenly out of four: ln 2 / ln 4 = 0.5 exactly, coverage 2/4."""
    from fv_accel.quality import mode_coverage, mode_entropy

    conditions = torch.zeros(6, dtype=torch.int64)
    modes = torch.tensor([1, 3, 1, 3, 1, 3])
    assert mode_coverage(conditions, modes, 4) == pytest.approx(0.5)
    assert mode_entropy(conditions, modes, 4) == pytest.approx(math.log(2) / math.log(4))
