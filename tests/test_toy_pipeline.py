"""The causal toy pipeline (``fv_accel/toy_pipeline.py``, ``recipes/configs/toy_self_forcing.yaml``): its section
is validated strictly, the run's paths must be the stages', and each stage is reused on a second call and
rebuilt (with what follows it) when its settings or its input change. Tiny step counts; the teacher stage is a
stamped random init (training the real one takes minutes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "configs" / "toy_self_forcing.yaml"


def _shipped() -> tuple[Any, dict[str, Any]]:
    from fv_accel.config import load_yaml
    from fv_accel.toy_pipeline import parse_section

    return parse_section(load_yaml(CONFIG))


def test_shipped_config_names_the_stage_outputs_and_validates_without_its_section() -> None:
    from fv_accel.config import RunConfig
    from fv_accel.toy_pipeline import check_paths, stage_paths

    section, rest = _shipped()
    assert section is not None and section.root == "outputs/toy/causal"
    check_paths(section, rest)
    paths = stage_paths(section.root)
    assert Path(rest["models"]["student"]["init_from"]) == paths["ode_init"]
    cfg = RunConfig.model_validate(rest)  # the rest is a plain run config
    assert cfg.models["student"].family == "wan_causal"
    assert cfg.models["student"].causal_or_default.num_frames_per_block == 2


def test_section_errors_name_the_key() -> None:
    from fv_accel.errors import ConfigError
    from fv_accel.toy_pipeline import check_paths, parse_section

    section, rest = _shipped()
    with pytest.raises(ConfigError, match=r"toy_pipeline\.ode_init\.max_train_step: unknown key"):
        parse_section({**rest, "toy_pipeline": {"ode_init": {"max_train_step": 3}}})
    with pytest.raises(ConfigError, match=r"toy_pipeline\.world"):
        parse_section({**rest, "toy_pipeline": {"world": "static"}})
    assert section is not None
    moved = json.loads(json.dumps(rest))
    moved["models"]["teacher"]["init_from"] = "elsewhere/teacher"
    with pytest.raises(ConfigError, match=r"^models\.teacher\.init_from: 'elsewhere/teacher'"):
        check_paths(section, moved)


def test_a_tree_without_the_section_passes_unchanged() -> None:
    from fv_accel.toy_pipeline import prepare_toy_pipeline

    tree = {"models": {}, "training": {"loop": {"max_train_steps": 3}}}
    assert prepare_toy_pipeline(tree, dry_run=False) is tree


def _fake_teacher(root: Path) -> Path:
    """The causal world's data and, as its teacher, the random toy-teacher init stamped with the teacher recipe
    (so ``ensure_toy_teacher`` takes it as current)."""
    from fv_accel.toy import (
        CAUSAL_TOY_SPEC,
        ensure_teacher_init,
        ensure_toy_data,
        toy_teacher_dir,
        toy_teacher_recipe,
    )

    ensure_toy_data(root, CAUSAL_TOY_SPEC)
    teacher = toy_teacher_dir(root)
    shutil.copytree(ensure_teacher_init(root), teacher)
    (teacher / "toy_recipe.json").write_text(json.dumps(toy_teacher_recipe(CAUSAL_TOY_SPEC)))
    return teacher


def _section(**stages: dict[str, Any]) -> Any:
    from fv_accel.toy_pipeline import ToyPipelineConfig

    tiny = {"ode_pairs": {"teacher_steps": 2, "num_rows": 4, "rows_per_shard": 2, "batch_size": 2},
            "ode_init": {"max_train_steps": 1, "train_batch_size": 2}}
    for name, values in stages.items():
        tiny[name] = {**tiny[name], **values}
    return ToyPipelineConfig.model_validate(tiny)


def test_stages_are_reused_and_rebuilt_when_their_settings_or_inputs_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_process_dist: Any) -> None:
    import fv_accel.ode_pairs as ode_pairs
    import fv_accel.run as run
    import fv_accel.toy_pipeline as toy_pipeline
    from fv_accel.toy_pipeline import build_stages, read_stamp, stage_paths

    monkeypatch.chdir(tmp_path)
    # the ODE-init student's quality table samples 64 clips with the teacher at 50 steps: not needed here
    monkeypatch.setattr(toy_pipeline, "_write_ode_init_quality", lambda section, tree, student_dir, name: None)
    calls: dict[str, int] = {"pairs": 0, "train": 0}
    real_write, real_train = ode_pairs.write_ode_pairs, run.train

    def count_write(*args: Any, **kwargs: Any) -> Any:
        calls["pairs"] += 1
        return real_write(*args, **kwargs)

    def count_train(*args: Any, **kwargs: Any) -> Any:
        calls["train"] += 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ode_pairs, "write_ode_pairs", count_write)
    monkeypatch.setattr(run, "train", count_train)
    _, tree = _shipped()
    paths = stage_paths("outputs/toy/causal")
    teacher = _fake_teacher(paths["data"].parent)
    acc = single_process_dist

    build_stages(acc, _section(), tree)
    assert calls == {"pairs": 1, "train": 1}
    student = paths["ode_init"] / "transformer" / "diffusion_pytorch_model.safetensors"
    assert student.is_file() and len(list(paths["ode_pairs"].glob("shard-*.parquet"))) == 2
    first = student.stat().st_mtime_ns

    build_stages(acc, _section(), tree)  # everything current: nothing made again
    assert calls == {"pairs": 1, "train": 1}
    assert student.stat().st_mtime_ns == first

    build_stages(acc, _section(ode_init={"max_train_steps": 2}), tree)  # the ODE-init run changed
    assert calls == {"pairs": 1, "train": 2}
    assert read_stamp(paths["ode_init"])["run"]["training"]["loop"]["max_train_steps"] == 2  # type: ignore[index]

    build_stages(acc, _section(ode_init={"max_train_steps": 2}, ode_pairs={"teacher_steps": 3}), tree)
    assert calls == {"pairs": 2, "train": 3}  # new pairs, so a new ODE-init student too

    # another teacher (same recipe stamp, other weights): its pairs are stale, and the student made from them
    weights = teacher / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, str(weights), metadata={"format": "pt"})
    build_stages(acc, _section(ode_init={"max_train_steps": 2}, ode_pairs={"teacher_steps": 3}), tree)
    assert calls == {"pairs": 3, "train": 4}


def test_recipe_hook_sees_the_overrides_and_strips_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    """``recipes/distill.py --config toy_self_forcing.yaml --toy_pipeline.ode_init.max_train_steps=7``: the hook
    gets the override in its section, and the run is validated without the section."""
    import fv_accel.run as run
    import fv_accel.toy_pipeline as toy_pipeline
    from tests.conftest import run_recipe_main

    seen: dict[str, Any] = {}

    def fake_build(accelerator: Any, section: Any, tree: dict[str, Any]) -> None:
        seen["section"] = section

    def fake_run(cfg: Any, **kwargs: Any) -> None:
        seen["cfg"] = cfg

    monkeypatch.setattr(toy_pipeline, "build_stages", fake_build)
    monkeypatch.setattr(toy_pipeline, "check_paths", lambda section, tree: None)
    monkeypatch.setattr("fv_accel.runtime.build_accelerator", lambda **kwargs: None)
    monkeypatch.setattr(run, "run_training", fake_run)
    # the model sources do not exist in a fresh checkout: the stages would build them
    monkeypatch.setattr("fv_accel.config.check_model_source", lambda key, model_cfg: None)
    rc = run_recipe_main("distill", ["--config", str(CONFIG), "--toy_pipeline.ode_init.max_train_steps=7",
                                     "--training.loop.max_train_steps=3"])
    assert rc == 0
    assert seen["section"].ode_init.max_train_steps == 7
    assert seen["cfg"].training.loop.max_train_steps == 3
