"""The shipped causal Wan recipes resolve as configs and quote the dry run's memory estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fv_accel.config import RunConfig, load_yaml, resolve_config
from fv_accel.memory import GiB, RoleShape, estimate_run
from tests.test_memory_estimate import ARCH, LATENT, config_dict, wan_counts

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"ode_init": "wan2.1_t2v_1.3b_causal_ode_init.yaml", "self_forcing": "wan2.1_t2v_1.3b_causal_self_forcing.yaml"}
SIZES = {"student": "1.3b", "teacher": "14b", "critic": "1.3b"}
#: The peaks (GiB per GPU on 8 GPUs) the recipes' hardware comments state.
STATED = {"ode_init": 11.37, "self_forcing": 23.47}


@pytest.fixture(scope="module")
def init_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for size in ARCH:
        root = tmp_path_factory.mktemp(f"wan-{size}")
        (root / "transformer").mkdir()
        (root / "transformer" / "config.json").write_text(json.dumps(config_dict(size)))
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text(json.dumps({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}))
        dirs[size] = root
    return dirs


def load_recipe(name: str, init_dirs: dict[str, Path], tmp_path: Path) -> RunConfig:
    tree = load_yaml(REPO / "recipes" / "configs" / RECIPES[name])
    for role, model in tree["models"].items():
        model["init_from"] = str(init_dirs[SIZES[role]])
        model["latent_stats"] = "auto"
    data = tree["training"]["data"]
    data["data_path"] = str(tmp_path)
    if "negative_prompt_path" in data:
        negative = tmp_path / "_negative_prompt.parquet"
        negative.write_bytes(b"")
        data["negative_prompt_path"] = str(negative)
    return resolve_config(tree)


def shapes(cfg: RunConfig) -> dict[str, RoleShape]:
    found = {}
    for role, model in cfg.models.items():
        a = ARCH[SIZES[role]]
        params, block = wan_counts(128 * a["num_attention_heads"], a["ffn_dim"], a["num_layers"])
        found[role] = RoleShape(config_dict(SIZES[role]), params, block, family=model.family)
    return found


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_causal_recipe_states_its_estimate(name: str, init_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_recipe(name, init_dirs, tmp_path)
    assert cfg.models["student"].family == "wan_causal"
    assert cfg.models["student"].causal_or_default.num_frames_per_block == 3
    estimate = estimate_run(cfg, shapes(cfg), latent_shape=LATENT, shard_degree=8, mixed_precision="bf16")
    gib = round(estimate.peak_bytes / GiB, 2)
    assert gib == STATED[name], (name, gib, estimate.phase)
    assert f"{gib:.2f} GiB per GPU on 8 GPUs" in (REPO / "recipes" / "configs" / RECIPES[name]).read_text()


def test_ode_init_and_self_forcing_share_the_student_steps(init_dirs: dict[str, Path], tmp_path: Path) -> None:
    ode = load_recipe("ode_init", init_dirs, tmp_path)
    sf = load_recipe("self_forcing", init_dirs, tmp_path)
    assert ode.method.denoising_step_list == sf.method.dmd_denoising_steps  # type: ignore[union-attr]
    assert ode.models["student"].causal == sf.models["student"].causal
