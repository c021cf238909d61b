"""Exponential moving average of the student's weights, kept as fp32 copies of this rank's FSDP2 shards.

``shadow ← decay · shadow + (1 − decay) · weights`` after every optimizer step of the loop
(``callbacks.ema.update: every_step``) or only after those in which the student stepped (``generator_steps``),
from ``callbacks.ema.start_step`` on; the first active step initialises the shadow to the weights. The update
touches only the local shard of each parameter (``DTensor.to_local()``): no all-gather per step, and the memory
cost is one fp32 copy of this rank's shard of the student's trainable parameters (allocated at train start).

Where the shadow lives (``callbacks.ema.device``):

- ``gpu`` (default): beside the parameters; a foreach lerp on the device. Device memory: 4 bytes per local
  trainable parameter (7.1 GB per GPU at 14B over 8 GPUs).
- ``cpu``: in host memory, pinned when CUDA is available. Each update copies the local shards into a pinned
  staging buffer in buckets of :data:`STAGING_BUCKET_BYTES` (two buffers: bucket k+1 is copied with
  ``non_blocking`` while the CPU lerps bucket k), then lerps on the CPU. Cost: host RAM 4 bytes per local
  parameter + 2 buckets; PCIe 4 bytes per local parameter per update (device → host only; the shadow never goes
  back except in :meth:`EMACallback.swapped_in` and export); the CPU lerp reads and writes 8 bytes per parameter.
  The optimizer step that follows waits for the copies (the update blocks on each bucket's event), so nothing
  changes the weights while they are read. On a CPU-only run both settings compute the same bits.

Checkpointing: :meth:`EMACallback.state_dict` hands DCP the shadow as DTensors with the parameters' mesh and
placements, so every rank saves (and gets back) its own shards, and a different world size, including one plain
process, can load them (DCP reshards). :func:`fv_accel.checkpoint.layout.read_ema_state_dict` reads the EMA
weights of a checkpoint in one process as full tensors, for export and sampling.

:meth:`EMACallback.swapped_in` copies the EMA weights into the student for sampling / validation / export and
restores the training weights bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fv_accel.callbacks.base import Callback
from fv_accel.checkpoint.layout import EMA_CALLBACK, EMA_INITIALIZED, EMA_MODULE, EMA_ROLE, EMA_SHADOW
from fv_accel.config import EMAConfig
from fv_accel.runtime import reshard_all

if TYPE_CHECKING:
    from fv_accel.methods import TrainingMethod
    from fv_accel.trainer import Trainer

logger = logging.getLogger(__name__)

# Wrappers that may sit between the transformer and its parameters (torch.compile, activation checkpointing)
# add these segments to parameter names; the transformer's own state dict does not have them.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def clean_fqn(name: str) -> str:
    """A parameter name as it appears in the transformer's (diffusers) state dict."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


#: size of one pinned staging bucket of the ``device: cpu`` update (two are allocated); a parameter shard larger
#: than this gets a bucket of its own size
STAGING_BUCKET_BYTES = 64 * 2**20


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter, as a plain tensor sharing its storage."""
    return t.to_local() if hasattr(t, "to_local") else t


def _host_buffer(numel: int) -> torch.Tensor:
    """fp32 host memory, pinned when CUDA exists (pinned copies are asynchronous and faster)."""
    return torch.empty(numel, dtype=torch.float32, pin_memory=torch.cuda.is_available())


class EMACallback(Callback):
    """EMA of the student's trainable parameters (see the module docstring)."""

    name = EMA_CALLBACK

    def __init__(self, config: EMAConfig, method: TrainingMethod) -> None:
        self.decay = float(config.decay)
        self.start_step = int(config.start_step)
        self.update_on = config.update
        self.device = config.device
        self.method = method
        self.initialized = False
        self.num_updates = 0
        self._modules: list[nn.Module] = []
        self._params: dict[str, nn.Parameter] = {}
        self._shadow: dict[str, torch.Tensor] = {}  # fqn → fp32 local shard
        self._buckets: list[list[str]] = []  # device=cpu: parameter names copied through one staging buffer
        self._staging: list[torch.Tensor] = []  # device=cpu: two pinned fp32 buffers

    # -- setup ------------------------------------------------------------------------------------------------
    def _bind(self) -> None:
        """Find the student's (sharded) trainable parameters and allocate the fp32 shadow shards. A two-expert
        student averages each trained expert; the second expert's names carry its module prefix
        (``transformer_2.blocks...``; :func:`fv_accel.checkpoint.layout.ema_module_of`)."""
        model = self.method.role_models[EMA_ROLE]
        modules = model.modules()
        self._modules = [modules[name] for name in model.trained_modules()]
        self._params = {}
        for name in model.trained_modules():
            reshard_all(modules[name])  # an unsharded unit registers its gathered copies, not the sharded ones
            prefix = "" if name == EMA_MODULE else f"{name}."
            self._params.update({prefix + clean_fqn(n): p for n, p in modules[name].named_parameters()
                                 if p.requires_grad})
        if not self._params:
            raise ValueError("EMA: the student has no trainable parameters")
        # Allocated now (not at start_step) so a checkpoint always has the same keys, whether or not the
        # average has started; it holds the weights until the first active step overwrites it anyway.
        if self.device == "gpu":
            self._shadow = {n: _local(p).detach().float().clone() for n, p in self._params.items()}
            return
        self._shadow = {}
        for n, p in self._params.items():
            local = _local(p).detach()
            self._shadow[n] = _host_buffer(local.numel()).view(local.shape)
            self._shadow[n].copy_(local)
        # Buckets in parameter order, each at most STAGING_BUCKET_BYTES unless one shard alone is larger.
        self._buckets = []
        size = 0
        for n, p in self._params.items():
            nbytes = 4 * _local(p).numel()
            if not self._buckets or size + nbytes > STAGING_BUCKET_BYTES:
                self._buckets.append([])
                size = 0
            self._buckets[-1].append(n)
            size += nbytes
        largest = max(sum(self._shadow[n].numel() for n in bucket) for bucket in self._buckets)
        self._staging = [_host_buffer(largest), _host_buffer(largest)]

    def on_train_start(self, trainer: Trainer) -> None:
        self._bind()

    def _ensure_bound(self) -> None:
        if not self._params:
            self._bind()

    # -- update -----------------------------------------------------------------------------------------------
    def is_active(self, step: int, stepped_roles: list[str]) -> bool:
        """Whether the EMA updates after the optimizer step of ``step`` that stepped ``stepped_roles``."""
        if self.update_on == "generator_steps" and EMA_ROLE not in stepped_roles:
            return False
        return step >= self.start_step

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current weights (the first one copies them)."""
        self._ensure_bound()
        if self.device == "gpu":
            names = list(self._params)
            self._blend([self._shadow[n] for n in names], [_local(self._params[n]).detach().float() for n in names])
        else:
            self._update_from_host_staging()
        self.initialized = True
        self.num_updates += 1

    def _blend(self, shadows: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        if not self.initialized:
            torch._foreach_copy_(shadows, weights)
        else:
            # lerp: shadow + (1 − decay)·(w − shadow) = decay·shadow + (1 − decay)·w
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)

    def _stage(self, bucket: list[str], buffer: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        """Start copying ``bucket``'s local shards into ``buffer``; returns the views and an event to wait on."""
        views, offset = [], 0
        for n in bucket:
            local = _local(self._params[n]).detach()
            view = buffer[offset: offset + local.numel()].view(local.shape)
            view.copy_(local, non_blocking=True)  # casts to fp32 on the way when the weights are not fp32
            views.append(view)
            offset += local.numel()
        event = None
        device = _local(self._params[bucket[0]]).device
        if device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        return views, event

    def _update_from_host_staging(self) -> None:
        """device=cpu: double-buffered device → pinned host copies, lerp on the CPU (see the module docstring)."""
        pending = self._stage(self._buckets[0], self._staging[0])
        for k, bucket in enumerate(self._buckets):
            views, event = pending
            if k + 1 < len(self._buckets):  # the other buffer's lerp (bucket k − 1) has finished: reuse it
                pending = self._stage(self._buckets[k + 1], self._staging[(k + 1) % 2])
            if event is not None:
                event.synchronize()
            self._blend([self._shadow[n] for n in bucket], views)

    def on_after_optimizer_step(self, trainer: Trainer, step: int, stepped_roles: list[str]) -> None:
        if self.is_active(step, stepped_roles):
            self.update()

    # -- use ----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the student; the training weights come back exactly.

        Before the first active step the EMA is the weights themselves, so nothing is swapped. Collective-free:
        each rank swaps its own shards; call it on every rank (the forwards inside are collectives). The swap
        writes the sharded parameters, so every FSDP2 unit is resharded on entry and on exit (see
        :func:`fv_accel.runtime.reshard_all`), whatever ``reshard_after_forward`` says."""
        self._ensure_bound()
        if not self.initialized:
            yield
            return
        backup: dict[str, torch.Tensor] = {}
        for module in self._modules:
            reshard_all(module)
        with torch.no_grad():
            for n, p in self._params.items():
                local = _local(p)
                backup[n] = local.detach().clone()
                local.copy_(self._shadow[n].to(local.dtype))
        try:
            yield
        finally:
            for module in self._modules:  # units the sample left unsharded hold EMA weights
                reshard_all(module)
            with torch.no_grad():
                for n, p in self._params.items():
                    _local(p).copy_(backup[n])

    def shadow_full(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) EMA tensors, fqn → fp32. Collective under FSDP2: every rank must call it."""
        self._ensure_bound()
        out = {}
        for n, p in self._params.items():
            # A host shadow is gathered from the parameters' device (the collective backend may not take CPU).
            shadow = self._as_param_layout(p, self._shadow[n].to(_local(p).device))
            out[n] = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow.clone()
        return out

    # -- state ----------------------------------------------------------------------------------------------
    @staticmethod
    def _as_param_layout(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The shadow shard as a DTensor laid out like ``param`` (plain tensor when ``param`` is plain)."""
        from torch.distributed.tensor import DTensor

        if not isinstance(param, DTensor):
            return local

        if local.device.type != param.device_mesh.device_type:
            # A host shadow (device=cpu) on a CUDA mesh: from_local would copy it to the device. Build the
            # DTensor around the host tensor instead, as FSDP2's own CPU offload does; DCP saves and loads it
            # in place.
            from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

            spec = DTensorSpec(param.device_mesh, tuple(param.placements),
                               tensor_meta=TensorMeta(param.shape, param.stride(), local.dtype))
            return DTensor(local, spec, requires_grad=False)
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    def state_dict(self) -> dict[str, Any]:
        self._ensure_bound()
        return {
            EMA_SHADOW: {n: self._as_param_layout(self._params[n], self._shadow[n]) for n in self._params},
            EMA_INITIALIZED: self.initialized,
            "num_updates": self.num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ensure_bound()
        shadow = state[EMA_SHADOW]
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
        self.initialized = bool(state[EMA_INITIALIZED])
        self.num_updates = int(state["num_updates"])
        if float(state.get("decay", self.decay)) != self.decay:
            logger.warning("EMA decay changed on resume: checkpoint %s, now %s", state["decay"], self.decay)

