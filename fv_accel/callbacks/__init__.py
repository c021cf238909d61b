"""Callbacks: EMA, validation, logging ... each one file, each owning its state."""

from fv_accel.callbacks.base import Callback, CallbackList

__all__ = ["Callback", "CallbackList"]
