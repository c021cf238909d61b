"""Explicit callback hooks. Each callback owns its state; a misspelt hook is an AttributeError, not silence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fv_accel.trainer import Trainer


class Callback:
    """Base class: one concrete no-op per moment of the loop. ``name`` keys its checkpoint state."""

    name: str = "callback"

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        pass

    def on_after_optimizer_step(self, trainer: Trainer, step: int, stepped_roles: list[str]) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_validation(self, trainer: Trainer, step: int) -> None:
        pass

    def on_train_end(self, trainer: Trainer, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CallbackList:
    """Calls each hook on every callback, in order."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks: list[Callback] = list(callbacks or [])
        names = [cb.name for cb in self.callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique: {names}")

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def get(self, name: str) -> Callback | None:
        return next((cb for cb in self.callbacks if cb.name == name), None)

    def on_train_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(trainer, step)

    def on_after_optimizer_step(self, trainer: Trainer, step: int, stepped_roles: list[str]) -> None:
        for cb in self.callbacks:
            cb.on_after_optimizer_step(trainer, step, stepped_roles)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, metrics)

    def on_validation(self, trainer: Trainer, step: int) -> None:
        for cb in self.callbacks:
            cb.on_validation(trainer, step)

    def on_train_end(self, trainer: Trainer, step: int) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer, step)
