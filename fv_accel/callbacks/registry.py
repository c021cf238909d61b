"""Build the callbacks a run config asks for."""

from __future__ import annotations

from fv_accel.callbacks.base import Callback, CallbackList
from fv_accel.config import RunConfig
from fv_accel.methods import TrainingMethod


def build_callbacks(cfg: RunConfig, method: TrainingMethod) -> CallbackList:
    callbacks: list[Callback] = []
    if cfg.callbacks.ema is not None:  # first: later callbacks of the same step see the updated average
        from fv_accel.callbacks.ema import EMACallback

        callbacks.append(EMACallback(cfg.callbacks.ema, method))
    validation = cfg.callbacks.validation
    if validation is not None and (validation.every_steps > 0 or validation.at_start):
        from fv_accel.callbacks.validation import ValidationCallback

        callbacks.append(ValidationCallback(validation, cfg))
    if cfg.hub.repo_id:  # pushes every checkpoint (hub.push_every_checkpoint) and always the final model
        from fv_accel.callbacks.hub_push import HubPushCallback

        callbacks.append(HubPushCallback.from_config(cfg))
    return CallbackList(callbacks)
