"""The one Accelerator: FSDP2 everywhere (world size 1 included), on GPUs and on CPU over gloo.

``accelerate launch`` passes its choices through the environment (process layout, mixed precision,
FSDP settings); :func:`build_accelerator` turns them into an Accelerator whose every model is FSDP2-sharded.
A plain ``python recipes/x.py`` gets a world-size-1 process group so the same code path runs.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import MixedPrecisionPolicy

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_process_env() -> None:
    """Without a launcher, describe a world of one process so Accelerate creates a process group."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()),
    )


def mixed_precision_from_env() -> str:
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if value not in ("no", "bf16"):
        raise ValueError(f"mixed precision {value!r} is not supported: use 'no' (fp32) or 'bf16'")
    return value


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype transformer blocks compute in: bf16 under bf16 mixed precision, else fp32."""
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float32


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy of every unit except those a family keeps in fp32 (:data:`FP32_POLICY`).

    bf16: parameters all-gathered and computed in bf16, gradients reduced in fp32 (Accelerate's default policy
    would reduce in bf16). ``cast_forward_inputs=False``: FSDP2 would otherwise cast every floating input of
    every unit to bf16, the timestep included (750 → 752, which the exported pipeline never sees) and the
    RoPE tables passed to each block. The family wrapper (``predict_velocity``) casts hidden states and
    text embeddings itself.
    """
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


#: Units a family keeps in fp32 (``ModelBase.fp32_modules``): parameters gathered and computed in fp32. Their
#: inputs are cast to fp32 (diffusers casts the timestep embedding to the time embedder's *stored* dtype, which
#: is bf16 for a role stored in bf16 without diffusers' fp32 exceptions).
FP32_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)


def build_accelerator(
    *,
    block_class_names: tuple[str, ...] | None = None,
    log_with: Sequence[str] | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """Build the Accelerator from what ``accelerate launch`` passed (or a single local process).

    ``block_class_names``: the classes FSDP2 wraps one by one. :func:`fv_accel.build.shard_roles` sets them per
    role from its family (``ModelBase.block_class_names``); None leaves Accelerate's default for a model
    sharded directly (the launcher's ``fsdp_transformer_layer_cls_to_wrap``, else the model's own
    ``_no_split_modules``).

    ``log_with`` names Accelerate trackers (tensorboard, wandb, trackio); their files go under
    ``<project_dir>/logs``.
    """
    from accelerate.utils import ProjectConfiguration

    _ensure_process_env()
    mixed_precision = mixed_precision_from_env()
    policy = mixed_precision_policy(mixed_precision)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=None if block_class_names is None else list(block_class_names),
        # None: the launcher's fsdp_reshard_after_forward (FSDP_RESHARD_AFTER_FORWARD), true when it says nothing.
        reshard_after_forward=None,
        state_dict_type="SHARDED_STATE_DICT",
        mixed_precision_policy=policy,
        activation_checkpointing=False,  # per role, see ModelConfig.activation_checkpointing
    )
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        fsdp_plugin=plugin,
        step_scheduler_with_optimizer=False,  # a prepared scheduler would step num_processes times per call
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs")
        if project_dir
        else None,
    )
    if accelerator.distributed_type != DistributedType.FSDP:
        # On CPU Accelerate picks MULTI_CPU and would silently wrap models in DDP. Both state singletons
        # carry the type (AcceleratorState re-copies PartialState's), so set it on both.
        PartialState().distributed_type = DistributedType.FSDP
        state = AcceleratorState()
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise RuntimeError(f"Accelerate did not enable FSDP2 (distributed type {accelerator.distributed_type})")
    return accelerator


def assert_fsdp2_sharded(name: str, module: torch.nn.Module) -> None:
    """Fail loudly if a model escaped FSDP2 (e.g. a silent DDP fallback)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(module, FSDPModule):
        raise RuntimeError(f"role {name!r} is a {type(module).__name__}, not an FSDP2 module")
    plain = [n for n, p in module.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"role {name!r} has parameters that are not FSDP2 DTensors: {plain[:3]}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reset_accelerate_state() -> None:
    """Forget Accelerate's singletons (tests that build several Accelerators in one process)."""
    from accelerate.state import GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def reshard_all(module: torch.nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back into its sharded state.

    A no-grad forward may leave units unsharded (FSDP2 keeps the root unsharded for the backward it expects;
    every unit with ``reshard_after_forward=False``), and their next forward then runs on those unsharded
    copies without gathering again: an in-place edit of the sharded parameters only takes effect after this.
    Collective-free (it frees the gathered copies). No-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
