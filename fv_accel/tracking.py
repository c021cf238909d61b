"""Experiment trackers (Accelerate's tensorboard / wandb / trackio): checked before the run is built, started
with the resolved config as flat ``a.b.c`` keys."""

from __future__ import annotations

import importlib.util
from typing import Any

from fv_accel.config import RunConfig
from fv_accel.errors import ConfigError

#: tracker backend → (package it imports, how to install it)
_TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'fv_accel[wandb]'"),
    "trackio": ("trackio", "pip install 'fv_accel[trackio]'"),
}


def check_tracker_backends(cfg: RunConfig) -> None:
    """Fail with a ConfigError (exit 2) before anything is built when a tracker's package is missing."""
    for backend in cfg.training.tracker.backends:
        package, hint = _TRACKER_PACKAGES[backend]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"training.tracker.backends: {backend!r} needs the {package!r} package, which is not "
                              f"installed ({hint}, or remove {backend!r} from the list)")


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dump as ``{"a.b.c": value}``: trackers take scalars only (anything else as its str)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def init_trackers(accelerator: Any, cfg: RunConfig) -> None:
    accelerator.init_trackers(cfg.training.tracker.project_name, config=flat_config(cfg.model_dump(mode="json")))
