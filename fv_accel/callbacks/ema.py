"""Exponential moving average of the student's weights, kept as fp32 copies of this rank's FSDP2 shards.

``shadow ← decay · shadow + (1 − decay) · weights`` after every optimizer step in which the student stepped, from
``callbacks.ema.start_step`` on; the first active step initialises the shadow to the weights. The update touches
only the local shard of each parameter (``DTensor.to_local()``): no all-gather per step, and the memory cost is
one fp32 copy of this rank's shard of the student's trainable parameters (allocated at train start).

Checkpointing: :meth:`EMACallback.state_dict` hands DCP the shadow as DTensors with the parameters' mesh and
placements, so every rank saves (and gets back) its own shards, and a different world size, including one plain
process, can load them (DCP reshards). :func:`load_ema_state_dict` reads the EMA weights of a checkpoint in one
process as full tensors, for export and sampling.

:meth:`EMACallback.swapped_in` copies the EMA weights into the student for sampling / validation / export and
restores the training weights bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fv_accel.callbacks.base import Callback
from fv_accel.config import EMAConfig

if TYPE_CHECKING:
    from fv_accel.methods import TrainingMethod
    from fv_accel.trainer import Trainer

logger = logging.getLogger(__name__)

#: the role whose weights are averaged
EMA_ROLE = "student"
#: DCP key prefix of the shadow in a checkpoint (``callbacks.<name>`` + the state dict's ``shadow`` entry)
EMA_SHADOW_PREFIX = "callbacks.ema.shadow."
#: DCP key of the flag telling whether the EMA has had its first update
EMA_INITIALIZED_KEY = "callbacks.ema.initialized"

# Wrappers that may sit between the transformer and its parameters (torch.compile, activation checkpointing)
# add these segments to parameter names; the transformer's own state dict does not have them.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    """A parameter name as it appears in the transformer's (diffusers) state dict."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter, as a plain tensor sharing its storage."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMACallback(Callback):
    """EMA of the student's trainable parameters (see the module docstring)."""

    name = "ema"

    def __init__(self, config: EMAConfig, method: TrainingMethod) -> None:
        self.decay = float(config.decay)
        self.start_step = int(config.start_step)
        self.method = method
        self.initialized = False
        self.num_updates = 0
        self._params: dict[str, nn.Parameter] = {}
        self._shadow: dict[str, torch.Tensor] = {}  # fqn → fp32 local shard

    # -- setup ------------------------------------------------------------------------------------------------
    def _bind(self) -> None:
        """Find the student's (sharded) trainable parameters and allocate the fp32 shadow shards."""
        transformer = self.method.role_models[EMA_ROLE].transformer
        self._params = {clean_fqn(n): p for n, p in transformer.named_parameters() if p.requires_grad}
        if not self._params:
            raise ValueError("EMA: the student has no trainable parameters")
        # Allocated now (not at start_step) so a checkpoint always has the same keys, whether or not the
        # average has started; it holds the weights until the first active step overwrites it anyway.
        self._shadow = {n: _local(p).detach().float().clone() for n, p in self._params.items()}

    def on_train_start(self, trainer: Trainer) -> None:
        self._bind()

    def _ensure_bound(self) -> None:
        if not self._params:
            self._bind()

    # -- update -----------------------------------------------------------------------------------------------
    def is_active(self, step: int, stepped_roles: list[str]) -> bool:
        return EMA_ROLE in stepped_roles and step >= self.start_step

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current weights (the first one copies them)."""
        self._ensure_bound()
        names = list(self._params)
        shadows = [self._shadow[n] for n in names]
        weights = [_local(self._params[n]).detach().float() for n in names]
        if not self.initialized:
            torch._foreach_copy_(shadows, weights)
            self.initialized = True
        else:
            # lerp: shadow + (1 − decay)·(w − shadow) = decay·shadow + (1 − decay)·w
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)
        self.num_updates += 1

    def on_after_optimizer_step(self, trainer: Trainer, step: int, stepped_roles: list[str]) -> None:
        if self.is_active(step, stepped_roles):
            self.update()

    # -- use ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the student; the training weights come back exactly.

        Before the first active step the EMA is the weights themselves, so nothing is swapped. Collective-free:
        each rank swaps its own shards; call it on every rank (the forwards inside are collectives)."""
        self._ensure_bound()
        if not self.initialized:
            yield
            return
        backup: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n, p in self._params.items():
                local = _local(p)
                backup[n] = local.detach().clone()
                local.copy_(self._shadow[n].to(local.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params.items():
                    _local(p).copy_(backup[n])

    def shadow_full(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA tensors, fqn → fp32. Collective under FSDP2: every rank must call it."""
        self._ensure_bound()
        out = {}
        for n, p in self._params.items():
            shadow = self._as_param_layout(p, self._shadow[n])
            out[n] = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow.clone()
        return out

    # -- state ----------------------------------------------------------------------------------------------
    @staticmethod
    def _as_param_layout(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The shadow shard as a DTensor laid out like ``param`` (plain tensor when ``param`` is plain)."""
        if not hasattr(param, "device_mesh"):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def state_dict(self) -> dict[str, Any]:
        self._ensure_bound()
        return {
            "shadow": {n: self._as_param_layout(self._params[n], self._shadow[n]) for n in self._params},
            "initialized": self.initialized,
            "num_updates": self.num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure_bound()
        shadow = state["shadow"]
        missing = sorted(set(self._params) - set(shadow))
        unexpected = sorted(set(shadow) - set(self._params))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the student: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for n, value in shadow.items():
                local = _local(value)
                if local.data_ptr() != self._shadow[n].data_ptr():  # DCP usually loads in place
                    self._shadow[n].copy_(local)
        self.initialized = bool(state["initialized"])
        self.num_updates = int(state["num_updates"])
        if float(state.get("decay", self.decay)) != self.decay:
            logger.warning("EMA decay changed on resume: checkpoint %s, now %s", state["decay"], self.decay)


# -- reading a checkpoint in one process ------------------------------------------------------------------------
def load_ema_state_dict(checkpoint_dir: str | os.PathLike[str], *, with_student_rest: bool = True
                        ) -> dict[str, torch.Tensor]:
    """The EMA weights of a checkpoint as full tensors keyed like the transformer's state dict, in one process.

    The shards of every rank are reassembled by DCP (any world size wrote them). With ``with_student_rest``,
    entries the EMA does not track (frozen parameters, buffers) come from the student's weights in the same
    checkpoint, so the result is a complete transformer state dict. Raises ``CheckpointError`` when the
    checkpoint has no EMA (the run had ``callbacks.ema`` unset) or its EMA never started.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from fv_accel.errors import CheckpointError

    path = Path(checkpoint_dir)
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable DCP checkpoint ({type(exc).__name__}: {exc})") from None
    entries = metadata.state_dict_metadata
    ema_keys = [k for k, v in entries.items() if k.startswith(EMA_SHADOW_PREFIX)
                and isinstance(v, TensorStorageMetadata)]
    if not ema_keys:
        raise CheckpointError(f"{path}: no EMA weights in this checkpoint (was callbacks.ema set?)")
    student_prefix = f"roles.{EMA_ROLE}.transformer."
    rest_keys = [k for k, v in entries.items() if k.startswith(student_prefix)
                 and isinstance(v, TensorStorageMetadata)] if with_student_rest else []

    def empty(key: str) -> torch.Tensor:
        meta = entries[key]
        assert isinstance(meta, TensorStorageMetadata)
        return torch.empty(meta.size, dtype=meta.properties.dtype)

    flat: dict[str, Any] = {k: empty(k) for k in ema_keys + rest_keys}
    flat["callbacks.ema.initialized"] = False
    # No process group: DCP reads every rank's shard into these full-size tensors (resharding to world size 1).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    if not flat["callbacks.ema.initialized"]:
        raise CheckpointError(f"{path}: the EMA had not started yet (step < callbacks.ema.start_step)")
    out = {k[len(student_prefix):]: flat[k] for k in rest_keys}
    out.update({k[len(EMA_SHADOW_PREFIX):]: flat[k] for k in ema_keys})
    return out
