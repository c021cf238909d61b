"""Every key and file name of a checkpoint, and the one-process readers of its tensors.

A run's ``<output_dir>`` holds::

    checkpoint-<step>/                    a complete checkpoint (both markers below exist)
        .metadata                         DCP's index of every key; written last by DCP (completion marker)
        __<rank>_<n>.distcp               DCP shards, one or more per rank that saved
        metadata.json                     step, world_size, optimizers_without_state, the resolved run config
        random_state.rank<r>.pt           rank r's RNG state (torch.save of tensors and plain data)
    checkpoint-<step>.partial/            a save in progress (or killed midway); renamed into place when complete
    checkpoint-<step>.stale/              an older checkpoint of the same step, replaced by a new complete one
    checkpoint-<step>.deleting/           being deleted by retention (renamed first so a kill leaves no look-alike)
    checkpoint-<step>.abandoned-<stamp>/  a newer checkpoint moved aside when a run resumed from an older one

DCP keys inside a checkpoint (one flat namespace; a state dict's nested entries are joined with ``.``)::

    roles.<role>.<module>.<parameter>     weights of each trainable role's modules (``transformer``, ...)
    optimizers.<role>.state|param_groups  that role's optimizer (absent while it had no state yet)
    schedulers.<role>.scheduler           that role's LR scheduler
    callbacks.<name>.<entry>              each stateful callback; the EMA: callbacks.ema.shadow.<parameter>,
                                          callbacks.ema.initialized, callbacks.ema.num_updates, callbacks.ema.decay
    dataloader.rank<r>.<entry>            rank r's data position

The readers below run in one process with no process group: DCP reassembles full tensors from the shards of
whatever number of ranks wrote them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fv_accel.errors import CheckpointError

# -- directory and file names --------------------------------------------------------------------------------
#: rank 0 writes it last, into the ``.partial`` directory, just before the rename into place
METADATA_FILE = "metadata.json"
#: DCP's own index, written when every rank's shards are
DCP_METADATA_FILE = ".metadata"
PARTIAL_SUFFIX = ".partial"
STALE_SUFFIX = ".stale"
DELETING_SUFFIX = ".deleting"
#: ``checkpoint-<N>.abandoned-<timestamp>``: matched by neither pattern below, so never listed, resumed or deleted
ABANDONED_INFIX = ".abandoned-"
RANDOM_STATE_PREFIX = "random_state."

CHECKPOINT_PREFIX = "checkpoint-"

_CHECKPOINT_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# checkpoint dirs and what killed saves / deletions leave behind
_LEFTOVER_DIR = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)("
                           + "|".join(re.escape(s) for s in (PARTIAL_SUFFIX, STALE_SUFFIX, DELETING_SUFFIX)) + ")?$")


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``checkpoint-<step>`` directory name; None for any other name (leftovers included)."""
    match = _CHECKPOINT_DIR.match(name)
    return int(match.group(1)) if match else None


def leftover_of(name: str) -> tuple[int, str | None] | None:
    """``(step, suffix)`` of a checkpoint directory or a leftover of one (``.partial``, ``.stale``,
    ``.deleting``; suffix None for the directory itself); None for anything else, abandoned ones included."""
    match = _LEFTOVER_DIR.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def random_state_file(rank: int) -> str:
    return f"{RANDOM_STATE_PREFIX}rank{rank}.pt"


def is_random_state_file(name: str) -> bool:
    return name.startswith(RANDOM_STATE_PREFIX)


# -- DCP keys --------------------------------------------------------------------------------------------------
ROLES = "roles"
OPTIMIZERS = "optimizers"
SCHEDULERS = "schedulers"
CALLBACKS = "callbacks"
DATALOADER = "dataloader"


def role_module_key(role: str, module: str) -> str:
    return f"{ROLES}.{role}.{module}"


def optimizer_key(role: str) -> str:
    return f"{OPTIMIZERS}.{role}"


def optimizer_state_prefix(role: str) -> str:
    """Prefix of the per-parameter entries of a role's optimizer (absent when it had no state yet)."""
    return f"{optimizer_key(role)}.state."


def scheduler_key(role: str) -> str:
    return f"{SCHEDULERS}.{role}"


def callback_key(name: str) -> str:
    return f"{CALLBACKS}.{name}"


def dataloader_key(rank: int) -> str:
    return f"{DATALOADER}.rank{rank}"


def is_role_key(key: str) -> bool:
    return key.startswith(f"{ROLES}.")


def is_callback_key(key: str) -> bool:
    return key.startswith(f"{CALLBACKS}.")


def is_dataloader_key(key: str) -> bool:
    return key.startswith(f"{DATALOADER}.")


def entries_under(saved_keys: Iterable[str], key: str) -> set[str]:
    """The saved entries of the state registered as ``key``, relative to it (``a.b`` for ``<key>.a.b``)."""
    prefix = key + "."
    return {k[len(prefix):] for k in saved_keys if k.startswith(prefix)}


def saved_roles(saved_keys: Iterable[str]) -> list[str]:
    """The roles that have weights in a checkpoint (its trainable roles)."""
    return sorted({k.split(".")[1] for k in saved_keys if is_role_key(k)})


#: the role whose weights the EMA averages; entries it does not track come from this role's weights
EMA_ROLE = "student"
#: the module of :data:`EMA_ROLE` the EMA averages; the shadow of another trained module (a second expert)
#: carries that module's name as a prefix: ``transformer_2.blocks.0...``
EMA_MODULE = "transformer"


def ema_module_names(shadow_names: Iterable[str], module: str) -> dict[str, str]:
    """``{name in module: shadow name}`` of the EMA entries of ``module`` (see :data:`EMA_MODULE`)."""
    if module != EMA_MODULE:
        prefix = f"{module}."
        return {n[len(prefix):]: n for n in shadow_names if n.startswith(prefix)}
    return {n: n for n in shadow_names if not re.match(r"transformer_\d+\.", n)}


def saved_modules(checkpoint: Path, role: str) -> list[str]:
    """The modules of ``role`` with weights in the checkpoint (a two-expert role's trained experts)."""
    prefix = f"{ROLES}.{role}."
    return sorted({k[len(prefix):].split(".")[0] for k in dcp_entries(checkpoint) if k.startswith(prefix)})
#: the EMA callback's name (its state lives under ``callbacks.ema``) and the entries of its state dict
EMA_CALLBACK = "ema"
EMA_SHADOW = "shadow"
EMA_INITIALIZED = "initialized"
#: DCP key prefix of the shadow (``callbacks.ema`` + the state dict's ``shadow`` entry)
EMA_SHADOW_PREFIX = f"{callback_key(EMA_CALLBACK)}.{EMA_SHADOW}."
#: DCP key of the flag telling whether the EMA has had its first update
EMA_INITIALIZED_KEY = f"{callback_key(EMA_CALLBACK)}.{EMA_INITIALIZED}"


# -- one-process readers ---------------------------------------------------------------------------------------
#: ``dtype_of(name, saved dtype)`` → the dtype a tensor is read into (DCP casts each chunk as it copies it in).
DtypeOf = Callable[[str, torch.dtype], torch.dtype]


def dcp_entries(checkpoint: Path) -> dict[str, Any]:
    """``{DCP key: storage metadata}`` of a checkpoint (reads only ``.metadata``)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return dict(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    except Exception as exc:  # missing, truncated or foreign .metadata
        raise CheckpointError(f"{checkpoint}: not a readable DCP checkpoint (unreadable DCP metadata: "
                              f"{type(exc).__name__}: {exc})") from None


def _load_in_place(state: dict[str, Any], checkpoint: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)


def tensor_keys(entries: dict[str, Any], prefix: str) -> dict[str, str]:
    """``{name: DCP key}`` of the tensors under ``prefix`` (model state dicts hold only tensors)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k[len(prefix):]: k for k, v in entries.items() if k.startswith(prefix)
            and isinstance(v, TensorStorageMetadata)}


def read_tensors(checkpoint: Path, sources: dict[str, str], entries: dict[str, Any], dtype_of: DtypeOf | None,
                 extra: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` read from the DCP keys ``sources[name]``, in one process.

    Each tensor is allocated once in its final dtype and DCP copies the saved chunks into it one at a time, so
    the peak is the result plus one saved chunk (at most one tensor in its saved dtype), never a second full
    copy. ``extra`` entries (non-tensor state such as flags) are loaded in the same pass, in place."""
    state: dict[str, Any] = {}
    for name, key in sources.items():
        item = entries[key]
        saved = item.properties.dtype
        state[key] = torch.empty(item.size, dtype=dtype_of(name, saved) if dtype_of is not None else saved)
    if extra:
        state.update(extra)
    _load_in_place(state, checkpoint)
    if extra:
        extra.update({k: state[k] for k in extra})
    return {name: state[key] for name, key in sources.items()}


def read_role_state_dict(checkpoint: Path, role: str, dtype_of: DtypeOf | None = None, *,
                         module: str = "transformer") -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``role``'s ``module``: in the saved dtypes, or each tensor directly
    in ``dtype_of(name, saved dtype)`` (no full copy in the saved dtype)."""
    entries = dcp_entries(checkpoint)
    sources = tensor_keys(entries, role_module_key(role, module) + ".")
    if not sources:
        saved = saved_roles(entries)
        raise CheckpointError(f"{checkpoint}: holds no weights for role {role!r} "
                              f"(trainable roles saved: {', '.join(saved) or 'none'})")
    try:
        return read_tensors(checkpoint, sources, entries, dtype_of)
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: cannot read role {role!r} ({type(exc).__name__}: {exc})") from None


def read_ema_state_dict(checkpoint: Path, dtype_of: DtypeOf | None = None, *,
                        with_student_rest: bool = True, module: str = EMA_MODULE) -> dict[str, torch.Tensor]:
    """The EMA weights as full tensors keyed like the averaged module's state dict.

    With ``with_student_rest``, the tensors the EMA does not track (frozen parameters, buffers) come from
    :data:`EMA_ROLE`'s weights, giving a complete state dict; only those are read, not that role's copies of the
    averaged weights (at 14B, 57 GB of fp32 not read). Raises ``CheckpointError`` when the checkpoint has no
    EMA (the run had no ``callbacks.ema``) or its EMA never started. ``module``: which of the student's modules
    (a second expert's averaged weights are stored under its prefix, :func:`ema_module_names`)."""
    entries = dcp_entries(checkpoint)
    all_shadow = tensor_keys(entries, EMA_SHADOW_PREFIX)
    shadow = {n: all_shadow[full] for n, full in ema_module_names(all_shadow, module).items()}
    if not all_shadow:
        raise CheckpointError(f"{checkpoint}: holds no EMA weights (the run had no callbacks.ema section)")
    rest: dict[str, str] = {}
    if with_student_rest:
        rest = {n: k for n, k in tensor_keys(entries, role_module_key(EMA_ROLE, module) + ".").items()
                if n not in shadow}
    flag: dict[str, Any] = {EMA_INITIALIZED_KEY: False}
    try:
        state = read_tensors(checkpoint, {**rest, **shadow}, entries, dtype_of, extra=flag)
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: cannot read the EMA weights ({type(exc).__name__}: {exc})") from None
    if not flag[EMA_INITIALIZED_KEY]:
        raise CheckpointError(f"{checkpoint}: the EMA had not started yet (step < callbacks.ema.start_step)")
    return state


def read_ema_initialized(checkpoint: Path) -> bool:
    """Whether the checkpoint's EMA has had its first update (reads that one flag; no collectives)."""
    flag: dict[str, Any] = {EMA_INITIALIZED_KEY: False}
    _load_in_place(flag, checkpoint)
    return bool(flag[EMA_INITIALIZED_KEY])
