"""Adding a method is one file: a method defined here, outside ``fv_accel/``, with its own config and role rules,
runs through the real recipe, selected by ``method.name`` after the ``plugins`` key imported this module.

The method ("anchor_test") regresses the student's velocity onto ``anchor_scale`` times that of a frozen
``anchor`` role, which by default is a frozen copy of the student's entry. At step 1 the student and the anchor
hold the same weights, so both predict the same v on the same input, and the loss is (1 − s)²·mean(v²): exactly 0
for s = 1, and four times the s = 0 loss for s = 3. Those ratios are the oracle: they hold only if the typed
config reached the method, the anchor role was built by the method's role defaults, and the loop ran its loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from pydantic import Field

from fv_accel.config import MethodConfigBase, RunConfig
from fv_accel.flops import PassCount
from fv_accel.methods import StepOutput, TrainingMethod, register_method

PLUGIN = "test_method_plugin"  # this module, as the recipe imports it (tests/ is on sys.path under pytest)


class AnchorConfig(MethodConfigBase):
    """Regress the student onto a scaled frozen anchor (a test-only method)."""

    name: Literal["anchor_test"]
    anchor_scale: float = Field(1.0, ge=0)
    """The student's target is this times the anchor's velocity."""


@register_method
class AnchorMethod(TrainingMethod):
    name: ClassVar[str] = "anchor_test"
    Config: ClassVar[type[MethodConfigBase]] = AnchorConfig
    required_roles: ClassVar[tuple[str, ...]] = ("student", "anchor")
    trainable_roles: ClassVar[tuple[str, ...]] = ("student",)
    frozen_roles: ClassVar[tuple[str, ...]] = ("anchor",)

    @classmethod
    def default_roles(cls, models: dict[str, Any]) -> dict[str, Any]:
        if "anchor" not in models and isinstance(models.get("student"), dict):
            return {**models, "anchor": {**models["student"], "trainable": False}}
        return models

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        if cfg.models["anchor"].init_from != cfg.models["student"].init_from:
            raise ValueError("models.anchor.init_from must equal models.student.init_from for method anchor_test")

    def single_train_step(self, batch: Any, step: int) -> StepOutput:
        assert isinstance(self.config, AnchorConfig) and self.cuda_generator is not None
        student, anchor = self.student, self.roles["anchor"].model
        cond = student.prepare_batch(batch, student.device)
        assert cond.latents_bcthw is not None
        x0 = cond.latents_bcthw
        noise = torch.randn(x0.shape, generator=self.cuda_generator, device=x0.device)
        t = torch.full((x0.shape[0],), 500.0, device=x0.device)
        x_t = student.add_noise(x0, noise, t)
        with torch.no_grad():
            target = self.config.anchor_scale * anchor.predict_velocity(x_t, t, cond.text_embeds_bld)
        loss = torch.mean((student.predict_velocity(x_t, t, cond.text_embeds_bld) - target) ** 2)
        b = x0.shape[0]
        return StepOutput(losses={"anchor_loss": loss}, loss_roles={"anchor_loss": "student"},
                          passes={"student": PassCount(forward=b, backward=b), "anchor": PassCount(forward=b)})


def _write_config(tmp_path: Path, toy_root: Path, name: str, **method: Any) -> tuple[Path, Path]:
    out = tmp_path / name
    config = {
        "plugins": [PLUGIN],
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "anchor_test", **method},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2},
                     "loop": {"max_train_steps": 2}, "checkpoint": {"output_dir": str(out)},
                     "tracker": {"backends": []}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, out


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["anchor_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_method_defined_outside_the_package_trains_through_the_recipe(tmp_path: Path, toy_root: Path) -> None:
    from conftest import REPO, run_python, run_recipe_main

    # The real recipe in its own interpreter: only the plugins key tells it about this module.
    path, out = _write_config(tmp_path, toy_root, "s1", anchor_scale=1.0)
    proc = run_python(["recipes/finetune.py", "--config", str(path)], cwd=REPO,
                      PYTHONPATH=str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(out)[0] == 0.0  # student == anchor at step 1, and s = 1
    saved = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert "metadata.json" in saved
    meta = json.loads((out / "checkpoint-2" / "metadata.json").read_text())
    assert meta["config"]["method"] == {"name": "anchor_test", "anchor_scale": 1.0}
    assert meta["config"]["models"]["anchor"]["trainable"] is False  # the method's role default

    # Its own config key reaches it typed: (1 − s)² scaling of the same step-1 loss.
    losses = {}
    for scale in (0.0, 3.0):
        path, out = _write_config(tmp_path, toy_root, f"s{scale:g}", anchor_scale=scale)
        assert run_recipe_main("finetune", ["--config", str(path)]) == 0
        losses[scale] = _losses(out)[0]
    assert losses[0.0] > 0
    assert losses[3.0] == pytest.approx(4.0 * losses[0.0], rel=1e-5)


def test_its_role_rules_and_keys_are_checked_at_config_time(tmp_path: Path, toy_root: Path) -> None:
    from fv_accel.config import load_config
    from fv_accel.errors import ConfigError

    path, _ = _write_config(tmp_path, toy_root, "rules")
    cfg = load_config(str(path), [])
    assert isinstance(cfg.method, AnchorConfig) and cfg.models["anchor"].trainable is False
    anchor = [f"--models.anchor.init_from={toy_root / 'init'}", "--models.anchor.latent_stats=identity"]
    with pytest.raises(ConfigError, match=r"models\.anchor\.trainable must be false for method.name=anchor_test"):
        load_config(str(path), [*anchor, "--models.anchor.trainable=true"])
    with pytest.raises(ConfigError, match=r"method\.generator_update_interval: unknown key"):
        load_config(str(path), ["--method.generator_update_interval=2"])
    with pytest.raises(ConfigError, match=r"models\.anchor\.init_from must equal models\.student\.init_from"):
        load_config(str(path), [f"--models.anchor.init_from={toy_root / 'init' / 'transformer'}",
                                "--models.anchor.subfolder=", "--models.anchor.latent_stats=identity",
                                "--models.anchor.trainable=false"])
    with pytest.raises(ConfigError, match=r"method\.name: no method named 'nope'"):
        load_config(str(path), ["--method.name=nope"])
    with pytest.raises(ConfigError, match=r"plugins\.0: cannot import 'no_such_plugin_module'"):
        load_config(str(path), ["--plugins=[no_such_plugin_module]"])
