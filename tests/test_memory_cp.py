"""The peak-memory estimate under context parallel: each rank holds its share N/cp of the video tokens in every
activation term, all L text tokens, and states divided by the shard degree as before. Expected values are the
per-token coefficients of ``fv_accel/memory.py``'s docstring times tokens, by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from test_memory_estimate import init_dirs, recipe, shapes  # noqa: F401 - fixtures

from fv_accel.config import RunConfig, load_yaml, resolve_config
from fv_accel.memory import GPU_MEMORY_GIB, GiB, estimate_run

LATENT_720P = (16, 21, 90, 160)  # 81 frames at 720×1280
TOKENS_720P = 21 * 45 * 80  # patch (1, 2, 2): 75,600


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_divides_the_activations_by_hand(cp: int, recipe: Callable[..., RunConfig]) -> None:  # noqa: F811
    """Wan 14B DMD2 at 720p, full checkpointing, batch 1, bf16 (c = 2), 8 shards either way."""
    d, f, n, text = 5120, 13824, 40, 512
    tokens = TOKENS_720P // cp  # divides: 37,800 and 18,900
    cfg = recipe("14b")
    kw: dict[str, Any] = {"latent_shape": LATENT_720P, "shard_degree": 8, "mixed_precision": "bf16"}
    split = estimate_run(cfg, shapes("14b"), cp_size=cp, **kw)
    whole = estimate_run(cfg, shapes("14b"), **kw)
    terms = {(t.role, t.name): t.bytes for t in split.terms}
    assert split.phase == "backward of critic"
    assert terms[("critic", "activations: graph")] == n * tokens * 2 * d
    assert terms[("critic", "activations: block recompute")] == tokens * (69 * d + 4 * f) + text * 13 * d
    assert terms[("critic", "activations: gradients in flight")] == tokens * (16 * d + 4 * f)
    # the states are what they were: cp changes the tokens per rank, not the shard degree
    states = {k: v for k, v in terms.items() if "activations" not in k[1]}
    assert states == {(t.role, t.name): t.bytes for t in whole.terms if "activations" not in t.name}
    activations = sum(v for k, v in terms.items() if "activations" in k[1])
    assert split.peak_bytes == sum(states.values()) + activations
    # the teacher's no-grad CFG forward (2 samples) in the frozen-forward phase
    frozen_forward = 2 * tokens * (24 * d + 4 * f) * 2 // 2
    assert split.phases["frozen forward"] - whole.phases["frozen forward"] == (
        frozen_forward - 2 * TOKENS_720P * (24 * d + 4 * f) + n * (tokens - TOKENS_720P) * 2 * d)


def test_cp_size_below_one_is_refused(recipe: Callable[..., RunConfig]) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="cp_size must be >= 1, got 0"):
        estimate_run(recipe("14b"), shapes("14b"), latent_shape=LATENT_720P, shard_degree=8,
                     mixed_precision="bf16", cp_size=0)


def test_the_720p_recipe_states_its_estimate(init_dirs: dict[str, Path]) -> None:  # noqa: F811
    """The figures in the comment of ``wan2.1_t2v_14b_720p_dmd2.yaml`` (GiB per GPU) are the estimate's."""
    path = REPO / "recipes" / "configs" / "wan2.1_t2v_14b_720p_dmd2.yaml"
    tree = load_yaml(path)
    for model in tree["models"].values():
        model["init_from"] = str(init_dirs["14b"])
    cases = {(8, 2, "gpu"): 94.14, (16, 2, "gpu"): 65.86, (8, 4, "gpu"): 77.32, (8, 4, "cpu"): 70.67,
             (8, 1, "gpu"): 127.77}
    for (shards, cp, ema), gib in cases.items():
        cfg = resolve_config(tree, [("callbacks.ema.device", ema)])
        est = estimate_run(cfg, shapes("14b"), latent_shape=LATENT_720P, shard_degree=shards,
                           mixed_precision="bf16", cp_size=cp)
        assert round(est.peak_bytes / GiB, 2) == gib, (shards, cp, ema)
        assert f"{gib:.2f} GiB" in path.read_text()
    fits_h200 = estimate_run(resolve_config(tree, []), shapes("14b"), latent_shape=LATENT_720P, shard_degree=8,
                             mixed_precision="bf16", cp_size=2)
    assert fits_h200.fits(GPU_MEMORY_GIB["H200 141GB"])
