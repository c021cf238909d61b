"""DCP ``Stateful`` adapters: how a role's module, optimizer and LR scheduler, a callback, and a data stream
are handed to ``torch.distributed.checkpoint`` (keys: ``fv_accel/checkpoint/layout.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Accelerate wraps optimizers; DCP helpers need the torch optimizer underneath."""
    return getattr(optimizer, "optimizer", optimizer)


class RoleModuleContainer(nn.Module):
    """Ephemeral root holding every module an optimizer owns, so DCP sees all of its parameters."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)


class ModelState(Stateful):
    """A module's weights. ``trainable_only`` (a LoRA role): only the parameters that train (the adapters) are
    saved and loaded; the frozen base comes from ``init_from`` again on resume and is never written."""

    def __init__(self, module: nn.Module, *, trainable_only: bool = False) -> None:
        self.module = module
        self.options = StateDictOptions(ignore_frozen_params=trainable_only)

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.options.ignore_frozen_params:
            set_model_state_dict(self.module, state_dict, options=StateDictOptions(strict=True))
            return
        # Non-strict because the frozen base is absent by design; every saved entry must still land.
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            raise RuntimeError(f"trainable-only weights: got {sorted(set(state_dict) ^ expected)[:4]} that do not "
                               "match the module's trainable parameters")
        result = set_model_state_dict(self.module, state_dict,
                                      options=StateDictOptions(strict=False, ignore_frozen_params=True))
        if result.unexpected_keys:
            raise RuntimeError(f"trainable-only weights: unexpected keys {result.unexpected_keys[:4]}")


class OptimizerState(Stateful):
    def __init__(self, container: nn.Module, optimizer: Any) -> None:
        self.container = container
        self.optimizer = unwrap_optimizer(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.container, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.container, self.optimizer, state_dict)


class SchedulerState(Stateful):
    def __init__(self, scheduler: Any) -> None:
        self.scheduler = getattr(scheduler, "scheduler", scheduler)

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])


class CallbackState(Stateful):
    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def state_dict(self) -> dict[str, Any]:
        return self.callback.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.callback.load_state_dict(state_dict)


class SavedKeysOnly(Stateful):
    """A stateful whose load asks DCP only for the entries the checkpoint has: a data position saved before a
    key existed (e.g. ``shuffle``) then loads, and the stream's ``load_state_dict`` fills in the old meaning."""

    def __init__(self, inner: Any, saved: set[str]) -> None:
        self.inner = inner
        self.saved = saved

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.inner.state_dict().items() if k in self.saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
