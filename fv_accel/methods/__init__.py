"""Training methods. Adding a method is one file: its ``Config``, role rules and class, registered with
``@register_method``; built-in ones are imported here, others through the config's ``plugins`` key."""

from __future__ import annotations

from fv_accel.methods import dmd2 as _dmd2  # noqa: E402

# Imported for their registration.
from fv_accel.methods import finetune as _finetune  # noqa: E402,I001
from fv_accel.methods import ode_init as _ode_init  # noqa: E402,F401
from fv_accel.methods import self_forcing as _self_forcing  # noqa: E402,F401
from fv_accel.methods.base import Role, StepOutput, TrainingMethod
from fv_accel.methods.registry import METHODS, method_class, register_method

FinetuneMethod = _finetune.FinetuneMethod
DMD2Method = _dmd2.DMD2Method

__all__ = ["METHODS", "DMD2Method", "FinetuneMethod", "Role", "StepOutput", "TrainingMethod", "method_class",
           "register_method"]
