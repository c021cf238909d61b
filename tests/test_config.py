"""Configuration: strict schema errors (exit 2, full key path, before any weight is read), overrides, and the
resolved config round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, run_recipe_captured

from fv_accel.config import (
    RunConfig,
    load_config,
    load_yaml,
    parse_overrides,
    resolve_config,
    write_resolved_config,
)
from fv_accel.errors import EXIT_CONFIG, ConfigError


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory whose weights are garbage: loading them would fail loudly (not with exit 2)."""
    root = tmp_path / "model"
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    return root


def _base(model_dir: Path, **training: Any) -> dict[str, Any]:
    return {
        "models": {"student": {"family": "wan", "init_from": str(model_dir), "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": training,
    }


def _error(base: dict[str, Any], argv: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(base, parse_overrides(argv or []))
    assert info.value.exit_code == EXIT_CONFIG == 2
    return str(info.value)


# -- errors, in process -------------------------------------------------------------------------------------


def test_unknown_key_names_full_path(model_dir: Path) -> None:
    msg = _error(_base(model_dir), ["--training.loop.max_train_step=3"])
    assert "training.loop.max_train_step: unknown key" in msg
    msg = _error(_base(model_dir), ["--method.generator_update_interval=5"])  # a dmd2 key under finetune
    assert "method.generator_update_interval: unknown key" in msg


def test_wrong_type_names_full_path_and_value(model_dir: Path) -> None:
    msg = _error(_base(model_dir), ["--training.loop.max_train_steps=abc"])
    assert "training.loop.max_train_steps" in msg and "'abc'" in msg
    msg = _error(_base(model_dir), ["--models.student.trainable=3"])
    assert "models.student.trainable" in msg


def test_string_is_not_coerced_to_a_number(model_dir: Path) -> None:
    # A quoted YAML string stays a string, from the file and from the command line.
    msg = _error(_base(model_dir, loop={"max_train_steps": "10"}))
    assert "training.loop.max_train_steps" in msg and "'10'" in msg
    msg = _error(_base(model_dir), ["--training.optimizer.learning_rate", '"1e-4"'])
    assert "training.optimizer.learning_rate" in msg


def test_missing_required_values(model_dir: Path) -> None:
    base = _base(model_dir)
    del base["models"]["student"]["init_from"]
    assert "models.student.init_from: required value is missing" in _error(base)
    base = _base(model_dir)
    base["method"] = {}
    assert "method.name: required value is missing" in _error(base)
    base = _base(model_dir)
    del base["method"]
    assert "method: required value is missing" in _error(base)
    # A role added from the command line still needs its init_from.
    msg = _error(_base(model_dir), ["--models.critic.trainable=true"])
    assert "models.critic.init_from: required value is missing" in msg


def test_out_of_range_values(model_dir: Path) -> None:
    msg = _error(_base(model_dir), ["--training.loop.gradient_accumulation_steps=0"])
    assert "training.loop.gradient_accumulation_steps" in msg and "greater than or equal to 1" in msg
    assert "training.optimizer.betas" in _error(_base(model_dir), ["--training.optimizer.betas=[0.9, 1.5]"])
    assert "training.data.training_cfg_rate" in _error(_base(model_dir), ["--training.data.training_cfg_rate=2"])


def test_every_error_is_reported_at_once(model_dir: Path) -> None:
    msg = _error(_base(model_dir), ["--training.loop.gradient_accumulation_steps=0", "--training.bogus=1"])
    assert "training.loop.gradient_accumulation_steps" in msg and "training.bogus: unknown key" in msg


def test_nonexistent_local_init_from(model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    msg = _error(_base(model_dir), [f"--models.student.init_from={missing}"])
    assert msg.startswith("models.student.init_from") and str(missing) in msg
    # An existing directory without <subfolder>/config.json names the subfolder key to check.
    msg = _error(_base(model_dir), ["--models.student.subfolder=unet"])
    assert "models.student.init_from" in msg and "models.student.subfolder" in msg


def test_unparsable_and_missing_yaml_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  student: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="scalar.yaml.*mapping"):
        load_yaml(scalar)


def test_malformed_override_arguments() -> None:
    with pytest.raises(ConfigError, match="unexpected argument 'positional'"):
        parse_overrides(["positional"])
    with pytest.raises(ConfigError, match="--training.loop.max_train_steps has no value"):
        parse_overrides(["--training.loop.max_train_steps"])
    with pytest.raises(ConfigError, match="--a has no value"):
        parse_overrides(["--a", "--b=1"])


def test_override_into_a_scalar_is_an_error(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="training.loop is not a section"):
        resolve_config(_base(model_dir), parse_overrides(["--training.loop=3", "--training.loop.max_train_steps=2"]))


# -- overrides ----------------------------------------------------------------------------------------------


def test_override_forms_lists_bools_strings(model_dir: Path) -> None:
    argv = [
        "--training.loop.max_train_steps=7",  # --a.b=v
        "--training.loop.gradient_accumulation_steps", "3",  # --a.b v
        "--training.optimizer.betas=[0.5, 0.9]",  # list
        "--training.tracker.backends", "[]",
        "--hub.private=false",  # bool
        "--models.student.trainable", "true",
        "--training.optimizer.learning_rate=1e-3",  # float written with an exponent
        "--training.checkpoint.output_dir=out/run-7",  # a string stays a string
        "--hub.repo_id=user/model",
        "--training.data.data_path=[a, b]",
        "--training.checkpoint.resume_from_checkpoint=",  # empty value → ""
    ]
    cfg = resolve_config(_base(model_dir), parse_overrides(argv))
    loop = cfg.training.loop
    assert (loop.max_train_steps, loop.gradient_accumulation_steps) == (7, 3)
    assert cfg.training.optimizer.betas == [0.5, 0.9]
    assert cfg.training.tracker.backends == []
    assert cfg.hub.private is False and cfg.models["student"].trainable is True
    assert cfg.training.optimizer.learning_rate == pytest.approx(1e-3)
    assert isinstance(cfg.training.optimizer.learning_rate, float)
    assert cfg.training.checkpoint.output_dir == "out/run-7"
    assert cfg.hub.repo_id == "user/model"
    assert cfg.training.data.data_path == ["a", "b"]
    assert cfg.training.checkpoint.resume_from_checkpoint == ""
    # The later override wins; untouched keys keep their single-sourced defaults.
    cfg = resolve_config(_base(model_dir), parse_overrides(["--training.loop.max_train_steps=2",
                                                            "--training.loop.max_train_steps=5"]))
    assert cfg.training.loop.max_train_steps == 5
    assert cfg.training.loop.max_grad_norm == RunConfig.model_fields["training"].default_factory().loop.max_grad_norm


def test_off_and_on_are_strings_yes_is_not_a_bool(model_dir: Path, tmp_path: Path) -> None:
    """YAML 1.2 booleans: `compile: off` is the string "off" (PyYAML's YAML 1.1 would read False)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_base(model_dir)) + "")
    text = recipe.read_text().replace("init_from:", "activation_checkpointing: off\n    compile: off\n    init_from:")
    recipe.write_text(text)
    cfg = load_config(str(recipe), ["--models.student.compile=off"])
    assert cfg.models["student"].compile == "off" and cfg.models["student"].activation_checkpointing == "off"
    cfg = load_config(str(recipe), ["--models.student.compile", "regional", "--models.student.trainable=True"])
    assert cfg.models["student"].compile == "regional" and cfg.models["student"].trainable is True
    message = _error(_base(model_dir), ["--models.student.trainable=yes"])
    assert "models.student.trainable" in message and "'yes'" in message


def test_yaml_12_integers_in_overrides(model_dir: Path) -> None:
    """YAML 1.2 core ints: leading zeros are decimal, octal needs 0o, no base 60 (PyYAML: 8, 8, 31, 90)."""
    values = dict(parse_overrides(["--a=010", "--b=0o10", "--c=0x1f", "--d=-07", "--e=1:30", "--f=[010, 0x10]",
                                   "--g=1_000", "--h=2024-01-01"]))
    assert values == {"a": 10, "b": 8, "c": 31, "d": -7, "e": "1:30", "f": [10, 16], "g": "1_000",
                      "h": "2024-01-01"}
    assert all(type(values[k]) is int for k in "abcd")
    cfg = resolve_config(_base(model_dir), parse_overrides(["--training.loop.max_train_steps=010"]))
    assert cfg.training.loop.max_train_steps == 10
    # "1:30" stays a string, which the strict schema rejects where a number is expected.
    message = _error(_base(model_dir), ["--training.loop.max_train_steps=1:30"])
    assert "training.loop.max_train_steps" in message and "'1:30'" in message


def test_yaml_12_integers_in_config_files(model_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_base(model_dir)) + "training:\n  loop:\n    max_train_steps: 010\n"
                      "    gradient_accumulation_steps: 0x1f\n  checkpoint:\n    save_steps: 0o10\n")
    cfg = load_config(str(recipe), [])
    assert (cfg.training.loop.max_train_steps, cfg.training.loop.gradient_accumulation_steps) == (10, 31)
    assert cfg.training.checkpoint.save_steps == 8
    recipe.write_text(recipe.read_text().replace("max_train_steps: 010", "max_train_steps: 1:30"))
    with pytest.raises(ConfigError, match=r"training\.loop\.max_train_steps.*'1:30'"):
        load_config(str(recipe), [])


@pytest.mark.parametrize(("raw", "dropped"), [("run #3", "#3"), ("#ff0000", "#ff0000"), ("5 # steps", "# steps")])
def test_override_comment_is_an_error_naming_the_key(raw: str, dropped: str) -> None:
    # PyYAML would read these as "run", None and 5.
    with pytest.raises(ConfigError) as info:
        parse_overrides([f"--training.checkpoint.output_dir={raw}"])
    message = str(info.value)
    assert message.startswith("override --training.checkpoint.output_dir:")
    assert repr(dropped) in message and "quote" in message
    # The same through the two-argument form; and the quoted form the message suggests keeps the text.
    with pytest.raises(ConfigError, match="training.checkpoint.output_dir"):
        parse_overrides(["--training.checkpoint.output_dir", raw])
    assert parse_overrides([f"--k={json.dumps(raw)}", "--j", f"'{raw}'"]) == [("k", raw), ("j", raw)]


def test_hash_without_a_space_is_plain_text() -> None:
    assert parse_overrides(["--a=run#3", "--b", "[x#1, y]"]) == [("a", "run#3"), ("b", ["x#1", "y"])]


def test_override_switches_method_and_sets_a_list(model_dir: Path) -> None:
    roles = [f"--models.teacher.init_from={model_dir}", "--models.teacher.trainable=false",
             "--models.teacher.latent_stats=identity", f"--models.critic.init_from={model_dir}",
             "--models.critic.latent_stats=identity"]
    argv = [*roles, "--method.name=dmd2", "--method.dmd_denoising_steps=[1000, 500]", "--method.rollout_mode",
            "data_latent"]
    cfg = resolve_config(_base(model_dir), parse_overrides(argv))
    assert cfg.method.name == "dmd2"
    assert cfg.method.dmd_denoising_steps == [1000, 500]  # type: ignore[union-attr]
    assert cfg.method.rollout_mode == "data_latent"  # type: ignore[union-attr]
    msg = _error(_base(model_dir), [*roles, "--method.name=dmd2", "--method.dmd_denoising_steps=[500, 1000]"])
    assert "method.dmd_denoising_steps" in msg


def test_overrides_do_not_mutate_the_base(model_dir: Path) -> None:
    base = _base(model_dir, loop={"max_train_steps": 4})
    resolve_config(base, parse_overrides(["--training.loop.max_train_steps=9"]))
    assert base["training"]["loop"]["max_train_steps"] == 4


# -- resolved config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_match_the_schema(recipe: Path) -> None:
    """The YAML recipes we ship validate (schema only: their Hub ids are not fetched here; a toy pipeline's
    ``toy_pipeline`` section is removed first, as recipes/distill.py does)."""
    from fv_accel.toy_pipeline import parse_section

    _, tree = parse_section(load_yaml(recipe))
    cfg = RunConfig.model_validate(tree)
    assert "student" in cfg.models
    suffixes = {"dmd2": ("_dmd2",), "self_forcing": ("_self_forcing",), "ode_init": ("_ode_init",),
                "finetune": ("_finetune", "_lora")}
    assert recipe.stem.endswith(suffixes[cfg.method.name])
    if cfg.method.name in ("dmd2", "self_forcing"):
        assert "teacher" in cfg.models


def test_resolved_config_roundtrip(model_dir: Path, tmp_path: Path) -> None:
    argv = ["--training.loop.max_train_steps=11", "--training.optimizer.betas=[0.0, 0.99]",
            "--callbacks.ema.decay=0.9", "--method.weighting_scheme=logit_normal"]
    cfg = resolve_config(_base(model_dir), parse_overrides(argv))
    path = write_resolved_config(cfg, tmp_path / "out")
    assert path == tmp_path / "out" / "resolved_config.yaml"
    raw = yaml.safe_load(path.read_text())
    # Every default is spelled out, so the file alone reproduces the run.
    assert raw["training"]["loop"]["nonfinite"] == "stop"
    assert raw["callbacks"]["validation"] is None
    again = load_config(str(path), [])
    assert again == cfg
    # Strings that YAML 1.2 (or 1.1) would read as another type are quoted in the file, so they load back as
    # strings, in fv_accel and in a YAML 1.1 reader alike.
    for text in ("1e-4", "0o10", "010", "1:30", "off"):
        quoted = resolve_config(_base(model_dir), parse_overrides([f"--training.checkpoint.output_dir='{text}'"]))
        quoted_path = write_resolved_config(quoted, tmp_path / "q")
        assert load_config(str(quoted_path), []).training.checkpoint.output_dir == text
        assert yaml.safe_load(quoted_path.read_text())["training"]["checkpoint"]["output_dir"] == text
    # And it is a valid recipe: re-loading with an override changes just that key.
    again = load_config(str(path), ["--training.loop.max_train_steps=12"])
    assert again.training.loop.max_train_steps == 12
    assert again.model_copy(update={"training": cfg.training}) == cfg


# -- through the recipe (its main, in this process): exit code 2, nothing written, no weights read --------------------------


def test_recipe_exits_2_before_reading_weights(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "models": {"student": {"init_from": str(model_dir)}},
        "method": {"name": "finetune"},
        "training": {"loop": {"gradient_accumulation_steps": 0, "max_train_steps": "10"},
                     "checkpoint": {"output_dir": str(out)}, "data": {"data_path": str(tmp_path / "nodata")}},
    }))
    proc = run_recipe_captured("finetune", ["--config", str(recipe), "--training.optimizer.lr_sheduler", "linear"],
                               capsys, caplog)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "training.loop.gradient_accumulation_steps" in err
    assert "training.loop.max_train_steps" in err and "'10'" in err
    assert "training.optimizer.lr_sheduler: unknown key" in err
    # The weights under init_from are garbage: reading them would have failed differently (exit 1).
    assert "safetensors" not in err.lower() and "Traceback" not in err
    assert not out.exists(), "nothing may be written before the configuration is valid"


def test_recipe_exits_2_on_unparsable_yaml_and_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("training: {loop: [\n")
    proc = run_recipe_captured("finetune", ["--config", str(bad)], capsys, caplog)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "broken.yaml" in proc.stderr and "not valid YAML" in proc.stderr

    good = tmp_path / "recipe.yaml"
    good.write_text(yaml.safe_dump({"models": {"student": {"init_from": str(tmp_path / "gone")}},
                                    "method": {"name": "finetune"}}))
    proc = run_recipe_captured("finetune", ["--config", str(good)], capsys, caplog)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "models.student.init_from" in proc.stderr and str(tmp_path / "gone") in proc.stderr
