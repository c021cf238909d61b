"""The one Accelerator: FSDP2 everywhere (world size 1 included), on GPUs and on CPU over gloo.

``accelerate launch`` passes its choices through the environment (process layout, mixed precision,
FSDP settings, the ``parallelism_config_*`` layout); :func:`build_accelerator` turns them into an Accelerator
whose every model is FSDP2-sharded over one device mesh.
A plain ``python recipes/x.py`` gets a world-size-1 process group so the same code path runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import MixedPrecisionPolicy

from fv_accel.errors import ConfigError, FvAccelError

T = TypeVar("T")

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


#: The accelerate config keys of the layout, in the order of the mesh (context parallel innermost).
LAYOUT_KEYS = ("parallelism_config_dp_replicate_size", "parallelism_config_dp_shard_size",
               "parallelism_config_cp_size")


def parallelism_from_env(world_size: int) -> Any:
    """The launcher's layout (the accelerate config's ``parallelism_config_*`` keys, which ``accelerate launch``
    passes as ``PARALLELISM_CONFIG_*``) as Accelerate's ``ParallelismConfig``, checked against ``world_size``;
    None when the launcher gives none or a trivial one: plain FSDP over all processes.

    Checked here, before anything loads, because Accelerate would fail later or obscurely (a product that is not
    the process count raises inside ``Accelerator()``; replicate-only layouts have no dimension to shard over)."""
    from accelerate.parallelism_config import ParallelismConfig

    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() != "true":
        return None
    try:
        config = ParallelismConfig()
    except ValueError as exc:
        raise ConfigError(f"accelerate config parallelism_config: {exc}") from None
    if config.tp_size > 1 or config.sp_size > 1:
        raise ConfigError("accelerate config: parallelism_config_tp_size / parallelism_config_sp_size are not "
                          "supported by fv_accel (context parallel is parallelism_config_cp_size)")
    sizes = (config.dp_replicate_size, config.dp_shard_size, config.cp_size)
    if math.prod(sizes) != world_size:
        product = " × ".join(f"{key} ({size})" for key, size in zip(LAYOUT_KEYS, sizes, strict=True))
        raise ConfigError(f"accelerate config: {product} = {math.prod(sizes)}, but {world_size} processes were "
                          "launched (num_processes); make the product equal the number of processes")
    if config.dp_replicate_size > 1 and config.dp_shard_size == 1:
        raise ConfigError("accelerate config: parallelism_config_dp_replicate_size > 1 needs "
                          "parallelism_config_dp_shard_size > 1 (replicas of FSDP shards, HSDP)")
    if world_size == 1:
        return None
    return config


@contextlib.contextmanager
def _parallelism_env_hidden() -> Iterator[None]:
    """Keep ``Accelerator()`` from building the layout itself: on CPU it checks the layout while its distributed
    type is still MULTI_CPU and refuses it. :func:`build_accelerator` attaches the layout once FSDP is forced."""
    key = "ACCELERATE_USE_PARALLELISM_CONFIG"
    saved = os.environ.pop(key, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[key] = saved


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
    parallelism = parallelism_from_env(int(os.environ["WORLD_SIZE"]))
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
        # Roles are sharded on meta and filled from their files (fv_accel.build.load_roles); a launch config
        # with distributed_type FSDP would otherwise turn on Accelerate's rank-0 loading, which copies from meta.
        cpu_ram_efficient_loading=False,
    )
    with _parallelism_env_hidden():
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
    if parallelism is not None:
        # What Accelerator() does with a layout, once the distributed type is FSDP: one mesh with dimensions
        # (dp_replicate, dp_shard, cp) and the flattened dp, dp_shard_cp (FSDP2 shards over it), dp_cp.
        state = AcceleratorState()
        state.parallelism_config = parallelism
        state.device_mesh = parallelism.get_device_mesh(accelerator.device.type)
        parallelism._validate_accelerator(accelerator)
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


@dataclass(frozen=True)
class Topology:
    """Where this process sits in the run, read once: the loop, the data stream, the checkpointer and the run
    assembly (``fv_accel/run.py``) ask it instead of reading ``torch.distributed`` or the environment.

    ``rank``/``world_size`` count every process (collectives, per-rank files). ``data_rank``/``data_world_size``
    say which share of the data this process reads and which random stream it draws from: the data-parallel
    coordinates (dp_replicate × dp_shard). The ``cp_size`` ranks of one context-parallel group share a data rank:
    they hold the same samples and split their token sequence."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    data_rank: int = 0
    data_world_size: int = 1
    device_mesh: Any = None
    """Accelerate's ``torch_device_mesh`` (None when the launcher gave no layout: plain FSDP over all ranks)."""
    cp_size: int = 1
    """Context-parallel degree (``parallelism_config_cp_size``): ranks that split one sample's sequence."""

    @property
    def cp_mesh(self) -> Any:
        """The 1-D ``cp`` sub-mesh of this rank's context-parallel group; None without context parallel."""
        return self.device_mesh["cp"] if self.cp_size > 1 else None

    @property
    def cp_rank(self) -> int:
        """This rank's place in its context-parallel group (0 without context parallel)."""
        return int(self.cp_mesh.get_local_rank()) if self.cp_size > 1 else 0

    @property
    def is_main(self) -> bool:
        """The process that writes run files (config, metrics, checkpoint metadata)."""
        return self.rank == 0

    @classmethod
    def from_accelerator(cls, accelerator: Accelerator) -> Topology:
        mesh = accelerator.torch_device_mesh
        rank, world_size = accelerator.process_index, accelerator.num_processes
        data_rank, data_world_size, cp_size = rank, world_size, 1
        if mesh is not None:
            # The data rank is this rank's coordinate on the dp dimensions of the mesh (row-major), so it holds
            # however Accelerate orders the dimensions; cp peers differ only in their cp coordinate.
            names = list(mesh.mesh_dim_names)
            coordinate = mesh.get_coordinate()
            data_rank, data_world_size = 0, 1
            for name in ("dp_replicate", "dp_shard"):
                if name in names:
                    dim = names.index(name)
                    data_rank = data_rank * mesh.size(dim) + coordinate[dim]
                    data_world_size *= mesh.size(dim)
            cp_size = mesh.size(names.index("cp")) if "cp" in names else 1
        return cls(rank=rank, world_size=world_size, local_rank=accelerator.local_process_index,
                   data_rank=data_rank, data_world_size=data_world_size, device_mesh=mesh, cp_size=cp_size)

    @classmethod
    def from_process_group(cls) -> Topology:
        """From the default process group alone (a world of one without one): for code built without an
        Accelerator (tests, offline tools). It knows no layout: every rank is its own data rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   data_rank=rank, data_world_size=world_size)


def rank0_result(compute: Callable[[], T], *, topology: Topology | None = None,
                 wrap: Callable[[Exception], FvAccelError] | None = None) -> T:
    """Collective: rank 0 runs ``compute`` and every rank returns its result, or raises the error it raised.

    For every branch that leads into a collective and would otherwise depend on each rank's own view (of a
    filesystem: node-local disks, NFS caches; or of a costly listing that one rank should do for all): if ranks
    decided alone, some would enter the collective and others never. An ``FvAccelError`` on rank 0 is raised on
    every rank; another exception is turned into one by ``wrap`` (default: exit 1 naming it). The result must be
    picklable (it is sent with ``broadcast_object_list``). ``topology``: the whole world by default."""
    import torch.distributed as dist

    topology = topology or Topology.from_process_group()
    if topology.world_size == 1:
        return compute()
    outcome: list[Any] = [None, None]  # result, error
    if topology.rank == 0:
        try:
            outcome[0] = compute()
        except FvAccelError as exc:
            outcome[1] = exc
        except Exception as exc:
            outcome[1] = wrap(exc) if wrap is not None else FvAccelError(f"rank 0: {type(exc).__name__}: {exc}")
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


#: Seeds derived from one configured seed are this far apart per unit of it, so that the streams of nearby
#: seeds (seed, seed + 1) never share a generator seed for small offsets (ranks, fixed stream offsets).
SEED_STRIDE = 1_000_003
#: Offset of the streams every rank draws alike (a method's ``choice_generator``; the global RNGs add the rank).
SHARED_STREAM_OFFSET = 7_919
#: Offset (plus the rank) of a method's per-rank host-side choices (``rank_choice_generator``).
RANK_CHOICE_STREAM_OFFSET = 2 * SHARED_STREAM_OFFSET


def derived_seed(seed: int, offset: int) -> int:
    """The seed of one random stream of a run seeded with ``seed`` (``training.data.seed``): the method's
    per-data-rank generator uses ``offset = data_rank``, its rank-independent choices ``SHARED_STREAM_OFFSET``,
    its per-data-rank host-side choices ``data_rank + RANK_CHOICE_STREAM_OFFSET``, the global RNGs
    ``data_rank + SHARED_STREAM_OFFSET`` (context-parallel peers draw alike)."""
    return seed * SEED_STRIDE + offset


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
