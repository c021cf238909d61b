"""Build functions: load roles, construct the method, create optimizers, shard with Accelerate, build data.

Constructors stay cheap (they take built collaborators); everything that reads weights or allocates lives here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NoReturn

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from diffusers.optimization import get_scheduler

from fv_accel.config import OptimizerConfig, RunConfig
from fv_accel.data import DataStream, build_data_stream
from fv_accel.errors import ConfigError, DataError, FvAccelError
from fv_accel.methods import TrainingMethod, method_class
from fv_accel.models import ModelBase, is_on_meta, load_role_model, materialize_roles, resolve_latent_stats
from fv_accel.runtime import FP32_POLICY, Topology, assert_fsdp2_sharded, compute_dtype

logger = logging.getLogger(__name__)


@dataclass
class BuiltRun:
    method: TrainingMethod
    data: DataStream | None


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    if cfg.fused and torch.cuda.is_available():
        kwargs["fused"] = True
    else:
        # FSDP2 parameters are DTensors: the per-tensor loop (PyTorch's CPU default) pays DTensor dispatch for
        # every op of every parameter; the foreach kernels dispatch once per op for the whole list.
        kwargs["foreach"] = True
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.betas[0], cfg.betas[1]),
                             weight_decay=cfg.weight_decay, eps=cfg.eps, **kwargs)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, num_steps: int) -> Any:
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=max(num_steps, 1))


def load_roles(cfg: RunConfig, mixed_precision: str) -> dict[str, ModelBase]:
    """Every role's transformer on the ``meta`` device: no weight is read here. :func:`shard_roles` shards the
    empty roles and then fills each rank's shards from the safetensors files (``fv_accel.models.sharded_load``).

    Why: loading each role in full on every rank before sharding costs, for 14B DMD2, student 57 GB + critic
    57 GB (fp32) + teacher 29 GB (bf16) = 143 GB of host RAM per rank, 1.14 TB per 8-GPU node. Now a rank holds
    its shards and one tensor slice at a time; on GPUs the shards live on the device, so host RAM per rank is
    one slice (≤ 0.6 GB at 14B).

    Why not Accelerate's ``cpu_ram_efficient_loading`` (rank 0 loads the full model, the others build it on
    ``meta``, ``fsdp2_load_full_state_dict`` broadcasts it after ``fully_shard``): (1) rank 0 still holds a full
    role beside the shards already built (on CPU with 2 ranks: 2.0× a role while the critic loads, above the
    1.5× budget of ``tests/test_role_loading.py``); (2) every parameter is broadcast in full to every rank;
    (3) each role reads its files again (no sharing between roles with the same ``init_from``); (4) with meta
    parameters the optimizer's parameters are remapped by ``data_ptr()``, which is 0 for every meta tensor (see
    :func:`shard_roles`). Reading slices with ``safetensors.safe_open(...).get_slice`` has none of these.

    Measured (``tests/dist_scripts/role_loading.py``, 2 CPU ranks, bf16, DMD2 with 3 roles of a 147 M-parameter
    Wan, 0.59 GB per fp32 role; peak RSS above the same script on a tiny Wan, in fp32 roles, rank 0 / rank 1):
    full loads first 3.50× / 3.34×; this path 1.29× / 1.29×, of which 1.25× are the rank's own shards (on CPU
    the shards are host memory). 14B arithmetic (57 GB per fp32 role): before 143 GB per rank, 1.14 TB per
    8-GPU node; now the shards go straight to the GPU and the host holds one slice of one tensor at a time
    (the largest, a 13824 × 5120 fp32 FFN weight, is 283 MB whole, 35 MB per rank at 8 ranks). See
    ``benchmarks/RESULTS.md``.

    Tested on FSDP (1-D meshes, 1 and 2 ranks); :func:`fv_accel.models.sharded_load.local_index` also handles
    HSDP's ``(Replicate, Shard)`` placements, untested.
    """
    # Statistics of every role first (Hub ones included): a missing or mismatched latent space stops the run
    # (exit 2) before any weights are read.
    stats = resolve_latent_stats(cfg.models)
    return {role: load_role_model(role, mcfg, mixed_precision=mixed_precision, latent_stats=stats[role],
                                  on_meta=True)
            for role, mcfg in cfg.models.items()}


def shard_roles(accelerator: Accelerator, method: TrainingMethod, cfg: RunConfig) -> None:
    """FSDP2-shard every role: each trainable role in its own ``prepare()`` call with its optimizer and
    scheduler; frozen roles with the same plugin but no optimizer, kept out of Accelerate's saved models.
    Under context parallel every role's sequence is split first (``ModelBase.enable_context_parallel``).
    Roles still on ``meta`` (:func:`load_roles`) are sharded empty, then filled from their files."""
    opt_cfgs = method.optimizer_configs()
    plugin = accelerator.state.fsdp_plugin
    cp_mesh = method.topology.cp_mesh if method.topology is not None else None
    optimizer_names: dict[str, tuple[Any, list[list[str]]]] = {}
    for role, record in method.roles.items():
        model = record.model
        if cp_mesh is not None:  # before fully_shard (and on meta: a refusal costs no weight read)
            model.enable_context_parallel(cp_mesh)
        plugin.transformer_cls_names_to_wrap = list(model.block_class_names)
        modules = model.modules()
        stored_dtypes = {name: shard_fp32_modules(accelerator, model, name) for name in modules}
        # Every module but the first is sharded alone (Accelerate prepares one model per call); a trained one
        # keeps requires_grad. The first goes through prepare() with the role's optimizer and scheduler, which
        # hold the trained parameters of all modules (one optimizer per role; a two-expert role's checkpoint
        # keys its experts' weights apart, roles.<role>.transformer and roles.<role>.transformer_2).
        prepared: dict[str, torch.nn.Module] = {}
        for name in list(modules)[1:]:
            prepared[name] = fsdp2_prepare_model(accelerator, modules[name])
            if name not in model.trained_modules():
                prepared[name].requires_grad_(False)
                prepared[name].eval()
        first = next(iter(modules))
        if record.trainable:
            if role not in opt_cfgs:
                raise ValueError(f"method {method.name!r} gives no optimizer settings for trainable role {role!r}")
            named = {f"{m}.{n}": p for m, module in {**modules, **prepared}.items()
                     for n, p in module.named_parameters()}
            params = [p for p in named.values() if p.requires_grad]
            optimizer = build_optimizer(params, opt_cfgs[role])
            num_steps = method.num_optimizer_steps(role, cfg.training.loop.max_train_steps)
            scheduler = build_lr_scheduler(optimizer, opt_cfgs[role], num_steps)
            names = {id(p): n for n, p in named.items()}
            group_names = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
            prepared[first], optimizer, scheduler = accelerator.prepare(modules[first], optimizer, scheduler)
            if first not in model.trained_modules():
                prepared[first].requires_grad_(False)
                prepared[first].eval()
            optimizer_names[role] = (optimizer, group_names)
            method.attach_prepared(role, prepared, optimizer, scheduler)
        else:
            prepared[first] = fsdp2_prepare_model(accelerator, modules[first])
            prepared[first].requires_grad_(False)
            prepared[first].eval()
            method.attach_prepared(role, prepared)
        for name, module in model.modules().items():
            finish_prepare(accelerator, role, module, stored_dtypes[name])
            assert_fsdp2_sharded(role, module)
    if any(is_on_meta(m) for model in method.role_models.values() for m in model.modules().values()):
        from torch.distributed.fsdp import CPUOffloadPolicy

        offloaded = isinstance(plugin.cpu_offload, CPUOffloadPolicy)
        materialize_roles(method.role_models, torch.device("cpu") if offloaded else accelerator.device)
    # Accelerate maps an optimizer's parameters to the sharded ones by data_ptr(), which is 0 for every meta
    # tensor (all would map to one parameter), and materialising replaces the parameter objects: point each
    # optimizer at its role's final parameters by name (names survive sharding).
    for role, (optimizer, group_names) in optimizer_names.items():
        sharded = {f"{m}.{n}": p for m, module in method.role_models[role].modules().items()
                   for n, p in module.named_parameters()}
        for group, group_params in zip(optimizer.param_groups, group_names, strict=True):
            group["params"] = [sharded[n] for n in group_params]


def shard_fp32_modules(accelerator: Accelerator, model: ModelBase, module_name: str = "transformer"
                       ) -> dict[str, torch.dtype]:
    """Before ``prepare``: under bf16, give each module the family keeps in fp32 (``model.fp32_modules()``) its
    own FSDP2 unit with :data:`FP32_POLICY`, so it is gathered and computed in fp32 as in diffusers' inference
    (in the block's bf16 unit the time embedder's gradients near t = 1000 are tens of % off). Accelerate then
    wraps the blocks and the root around these units. Returns every parameter's stored dtype (master
    weights: fp32), which ``prepare`` must keep (:func:`finish_prepare`)."""
    from torch.distributed.fsdp import fully_shard

    model.compute_dtype = compute_dtype(accelerator.mixed_precision)
    transformer = model.modules()[module_name]
    stored = {name: p.dtype for name, p in transformer.named_parameters()}
    if accelerator.mixed_precision == "no":
        return stored
    stored.update({name: torch.float32 for name, p in transformer.named_parameters() if p.requires_grad})
    plugin = accelerator.state.fsdp_plugin
    mesh = accelerator.torch_device_mesh  # the mesh Accelerate shards the rest of the model over
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    for module in model.fp32_modules(transformer):
        fully_shard(module, mesh=mesh,
                    reshard_after_forward=plugin.reshard_after_forward, mp_policy=FP32_POLICY,
                    offload_policy=plugin.cpu_offload)
    return stored


def finish_prepare(accelerator: Accelerator, role: str, transformer: torch.nn.Module,
                   stored: dict[str, torch.dtype]) -> None:
    """After ``prepare``, hold Accelerate to what fv_accel relies on (accelerate 1.15; see pyproject.toml):
    parameters keep their stored dtypes (1.10–1.12 upcast a frozen bf16 role to fp32: twice its memory), and
    the root unit reshards after forward like every other unit (≥ 1.14 leaves it unsharded, which keeps a
    frozen role's embeddings gathered for the whole run)."""
    from torch.distributed.fsdp import FSDPModule

    changed = [f"{name}: {stored[name]} → {p.dtype}" for name, p in transformer.named_parameters()
               if stored.get(name, p.dtype) != p.dtype]
    if changed:
        raise RuntimeError(f"accelerate {accelerate.__version__} changed parameter dtypes of role {role!r} "
                           f"({changed[0]}; {len(changed)} in all): install an accelerate version that "
                           "pyproject.toml allows")
    if isinstance(transformer, FSDPModule):
        reshard = accelerator.state.fsdp_plugin.reshard_after_forward
        transformer.set_reshard_after_forward(bool(reshard), recurse=False)


def build_run(cfg: RunConfig, accelerator: Accelerator, *, with_data: bool = True,
              topology: Topology | None = None) -> BuiltRun:
    topology = topology or Topology.from_accelerator(accelerator)
    models = load_roles(cfg, accelerator.mixed_precision)
    method = method_class(cfg.method.name)(cfg=cfg, role_models=models)
    method.topology = topology
    shard_roles(accelerator, method, cfg)
    data = None
    if with_data:
        data = build_data_stream(cfg.training.data, rank=topology.data_rank, world_size=topology.data_world_size,
                                 stop_signals=cfg.training.checkpoint.preempt_signals)
        check_latent_channels(method.role_models, data)
        check_latent_patching(method.role_models, data)
        check_context_parallel_tokens(method.role_models, data, topology.cp_size)
    return BuiltRun(method=method, data=data)


def check_context_parallel_tokens(role_models: dict[str, ModelBase], data: DataStream, cp_size: int) -> None:
    """Ulysses splits each sample's tokens evenly over the context-parallel group: fail before step 1 (exit 2)
    when the data's token count does not divide, instead of inside the first forward."""
    if cp_size == 1:
        return
    c, *thw = data.dataset.latent_shape
    for role, model in role_models.items():
        tokens = math.prod(size // p for size, p in zip(thw, model.latent_patch_size, strict=True))
        if tokens % cp_size:
            raise ConfigError(f"training.data: latents [C, T, H, W] = {[c, *thw]} make {tokens} tokens per sample "
                              f"for models.{role}, not divisible by parallelism_config_cp_size {cp_size}")


def _refuse_latents(dataset: Any, problem: str, *, fix: str, where: str, error: type[FvAccelError]) -> NoReturn:
    """The data's latents do not fit a role: text-only data names its configured ``latent_shape`` (exit 2), a
    dataset its first file (``where``, with ``{file}``), raised as ``error`` with the ``fix``."""
    if dataset.kind == "text_only":
        raise ConfigError(f"training.data.latent_shape: {problem}")
    raise error(f"{where.format(file=dataset.files[0])} {problem}; {fix}")


def check_latent_channels(role_models: dict[str, ModelBase], data: DataStream) -> None:
    """Exit 2 before step 1 when the data's latents come from another VAE than a role's (16-channel Wan 2.1
    latents for a 48-channel TI2V-5B transformer): the first normalisation or forward would fail on a shape."""
    dataset = data.dataset
    c, *thw = dataset.latent_shape
    for role, model in role_models.items():
        wanted = model.latent_channels
        if wanted is None or wanted == c:
            continue
        _refuse_latents(dataset, f"{c}-channel latents [C, T, H, W] = {[c, *thw]}, but models.{role} "
                        f"({model.config.init_from!r}) takes {wanted} channels",
                        fix="preprocess the videos with that model's pipeline (recipes/preprocess.py --model)",
                        where="training.data.data_path: {file} holds", error=ConfigError)


def check_latent_patching(role_models: dict[str, ModelBase], data: DataStream) -> None:
    """Fail before step 1 when the data's latents do not split into whole transformer patches: the patch
    embedding would silently drop the last latent row/column and the loss would die on a shape mismatch."""
    dataset = data.dataset
    c, *thw = dataset.latent_shape
    for role, model in role_models.items():
        patch = model.latent_patch_size
        if all(size % p == 0 for size, p in zip(thw, patch, strict=True)):
            continue
        _refuse_latents(dataset, f"latents [C, T, H, W] = {[c, *thw]} do not divide into models.{role}'s patches "
                        f"(T, H, W) = {list(patch)}",
                        fix="preprocess with --height/--width (and --num-frames) that give whole patches",
                        where="{file}:", error=DataError)
