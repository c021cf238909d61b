"""What the causal methods (``self_forcing``, ``diffusion_forcing``) require of their student: the ``wan_causal``
family, checked when the config is validated (exit 2 before any weight is read) and again on the built role."""

from __future__ import annotations

from collections.abc import Mapping

from fv_accel.config import RunConfig
from fv_accel.errors import ConfigError
from fv_accel.models.base import ModelBase
from fv_accel.models.wan_causal import CausalWanModel

CAUSAL_FAMILY = "wan_causal"


def check_causal_student(cfg: RunConfig, method: str, why: str) -> None:
    """ValueError (the config check's way to exit 2) unless ``models.student`` is a causal family; ``why`` says
    what the method needs it for."""
    family = cfg.models["student"].family
    if family != CAUSAL_FAMILY:
        raise ValueError(f"models.student.family must be {CAUSAL_FAMILY!r} for method.name={method} (got "
                         f"{family!r}): {why}")


def causal_student(role_models: Mapping[str, ModelBase], method: str) -> CausalWanModel:
    """The built student as a causal model; ConfigError (exit 2) when it is not one (a method built without the
    config check, e.g. in a test)."""
    student = role_models["student"]
    if not isinstance(student, CausalWanModel):
        raise ConfigError(f"models.student.family must be {CAUSAL_FAMILY!r} for method.name={method}")
    return student
