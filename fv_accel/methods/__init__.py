"""Training methods. Adding a method = one file here + one registry entry."""

from __future__ import annotations

from fv_accel.methods.base import StepOutput, TrainingMethod
from fv_accel.methods.finetune import FinetuneMethod

METHODS: dict[str, type[TrainingMethod]] = {"finetune": FinetuneMethod}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[TrainingMethod]:
    if name not in METHODS:
        # Methods living in their own modules register on import.
        import importlib

        importlib.import_module(f"fv_accel.methods.{name}")
    return METHODS[name]


__all__ = ["METHODS", "FinetuneMethod", "StepOutput", "TrainingMethod", "method_class", "register_method"]
