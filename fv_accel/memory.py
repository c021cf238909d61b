"""Peak device memory of a training run, per device, from the roles' shapes and the run configuration.

``--dry-run`` prints this estimate (``fv_accel/summary.py``) and warns when it exceeds the device's memory or
``training.target_device_memory_gib``. It is an estimate of what PyTorch's caching allocator holds at the peak
(``torch.cuda.max_memory_allocated``), not of the CUDA context, cuBLAS/NCCL workspaces or fragmentation: a run
is said to fit when the peak is at most the device memory minus :data:`DEVICE_RESERVE_GIB`.

Notation: P parameters of a role, S = the FSDP2 shard degree (world size), n blocks of B_blk parameters each,
root unit P_root = P − n·B_blk (embeddings, time/text projections, output head), D hidden size, F feed-forward
size, b micro-batch size per rank, N video tokens per sample = (T/p_t)(H/p_h)(W/p_w), L text tokens,
c = 2 bytes per compute element under bf16 mixed precision (4 in fp32 runs).

**States** (sharded: divided by S)

=====================================  ===================================================================
trainable role, weights                4·P/S   (fp32 master weights, also under bf16 mixed precision)
trainable role, AdamW m and v          8·P/S
trainable role, gradients              4·P/S   (fp32; alive from the role's backward until the optimizer
                                               step, so in DMD2 the student's are alive during the critic's
                                               backward)
frozen role, weights                   2·P/S with ``frozen_dtype: bf16`` under bf16, else 4·P/S
LoRA role (``models.<role>.lora``)     base as a frozen role, 2·(P − A)/S, plus 16·A/S for the A adapter
                                       parameters (fp32 weights, AdamW m and v; gradients 4·A/S as above);
                                       Wan 14B at rank 16: A = 77 M, 29.2 GB for the role instead of 224 GB
EMA shadow (``callbacks.ema``)         4·P_student/S on the device (4·A/S with LoRA); 0 with
                                       ``callbacks.ema.device: cpu``
=====================================  ===================================================================

**FSDP2 working set** (unsharded, not divided by S): the block being computed plus the one prefetched,
all-gathered in the compute dtype, 2·c·B_blk (largest block over the roles; one role computes at a time); one
block's unsharded gradient before its reduce-scatter, 4·B_blk (fp32 reduce dtype, during backward); and each
role's root unit, c·P_root, gathered from its forward through its backward.

**Activations** of one graded forward (per rank: not divided by S). Under context parallel (cp ranks split
each sample's token sequence, ``parallelism_config_cp_size``) a rank holds N/cp video tokens of every
activation below (rounded up) and all L text tokens (Ulysses leaves the text unsplit); its states are still
divided by S, which then counts the cp ranks too (FSDP2 shards over dp_shard × cp). Bytes per token saved by one Wan block for
its backward, counted with ``torch.autograd.graph.saved_tensors_hooks`` on ``WanTransformerBlock`` (diffusers
0.42) with an attention kernel that keeps only its output and log-sum-exp (flash, cuDNN, efficient; the CPU
flash kernel in the count) at two (D, F) pairs, (1536, 8960) and (1024, 4096), and fitted as x·D + y·F
(rounded; within 1% of both counts). The bf16 column is FSDP2's bf16 compute with diffusers' own fp32 upcasts:

==================  ==========================  ==========================
per block           bf16 (per video token)      fp32 (per video token)
==================  ==========================  ==========================
all saved (``off``) a_off = 69·D + 4·F          86·D + 8·F
``selective`` keeps a_sel = 18·D + 2·F          36·D + 4·F
block input         c·D                         c·D
==================  ==========================  ==========================

Text tokens add t_off = 13·D (fp32 17·D) bytes each per block (cross-attention keys and values and their
inputs) without checkpointing, t_sel = 4·D (fp32 8·D) under selective. The ``_native_math`` attention backend also keeps the
softmax: b·heads·N²·c per block (86 GB per block at 14B and 81×480×832: it does not fit, and the
estimate says so).

A role's graph holds, with k = ``activation_checkpointing_every`` and m = ⌈n/k⌉ checkpointed blocks:

- ``off``: n·b·(N·a_off + L·t_off)
- ``full``: m·b·N·c·D (inputs only) + (n − m)·b·(N·a_off + L·t_off)
- ``selective``: m·b·(N·(a_sel + c·D) + L·t_sel) + (n − m)·b·(N·a_off + L·t_off)

Backward of a checkpointed block first recomputes its saved tensors (b·(N·a_off + L·t_off)) and then holds
activation gradients, estimated at b·N·(16·D + 4·F) bytes (fp32 gradients of the residual stream and of the
normalised copies, and the feed-forward hidden's). A frozen role's no-grad forward (the DMD2 teacher, cond and
uncond batched: 2·b samples) holds about 2b·N·(24·D + 4·F)·c/2 bytes at once (fp32 normalised copies, q, k, v,
attention output, feed-forward hidden before and after the activation).

**Phases.** Trainable roles run their backward one after another in ``method.trainable_roles`` order
(generator-first DMD2: the student's right after its forward, then the critic's; one graph alive at a time).
With one combined backward (``eager_backward = False``) autograd runs the most recently built graph first
(the critic's) while the others wait alive. The peak is the largest of:

- frozen forwards with the first role's graph alive: states without gradients + graph + no-grad working set;
- role i's backward: states + gradients of the roles already done + graphs still waiting + max(graph_i +
  recompute + activation gradients, 4·P_i/S): the graph shrinks while the gradients grow, block by block, so
  the sum peaks at one end;
- after the last backward: states + every gradient.

**Worked numbers** (bf16, full checkpointing, b = 1, 81×480×832 → latent 21×60×104 → N = 32,760, L = 512,
DMD2 with three roles, a generator step; GiB = 2³⁰ bytes):

Wan 1.3B (P = 1,418,996,800; n = 30, B_blk = 46,440,704, P_root = 25,775,680; D = 1536, F = 8960), one GPU,
no EMA. Student and critic weights 5.29 + AdamW 10.57 each, teacher 2.64: 34.36; FSDP2 0.17 + 0.17 + 3 × 0.05
= 0.49; the student's gradients 5.29; the critic's graph 30·N·2·1536 = 2.81, recompute
N·(69·1536 + 4·8960) + 512·13·1536 = 4.34, activation gradients N·(16·1536 + 4·8960) = 1.84. Peak in the
critic's backward: 34.36 + 0.49 + 5.29 + 8.99 = 49.13 GiB (the combined backward peaks at the same 49.13 in
the student's backward, after the critic's).
Calibration: ``gpu-figures.md`` measured 44.7 GiB for a bare PyTorch loop with the same passes on one H100
(combined backward, no FSDP2): the estimate is 4.4 GiB (+9.9%) above it; 0.49 GiB of that is FSDP2's
buffers, which the bare loop lacks, the rest the upper-bound working sets (recompute and activation gradients
counted alive together at their largest).
With the EMA on the device (the recipe): 54.41 GiB on one GPU; on 8 GPUs 15.10 GiB.

Wan 14B (P = 14,288,491,584; n = 40, B_blk = 351,394,304, P_root = 232,719,424; D = 5120, F = 13824),
8 GPUs (S = 8), EMA on the device. Student and critic 6.65 + 13.31 each, teacher 3.33, EMA 6.65: 49.89; FSDP2
1.31 + 1.31 + 3 × 0.43 = 3.92; the student's gradients 6.65; the critic's graph 40·N·2·5120 = 12.50,
recompute 12.50, activation gradients 4.19. Peak in the critic's backward: 89.65 GiB per GPU. It does not fit
8 × 80 GB (79.6 GiB reported; 77.6 usable after :data:`DEVICE_RESERVE_GIB`), not even with
``callbacks.ema.device: cpu`` (83.00 GiB); it fits 8 × H200 141 GB (140.4 GiB) and 16 × 80 GB (S = 16:
61.38 GiB). The combined backward would add the student's graph less its gradients: 95.50 GiB.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

GiB = 2**30

#: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers and allocator fragmentation: device memory the
#: estimate does not count but a run cannot use
DEVICE_RESERVE_GIB = 2.0

#: total memory of common GPUs as ``torch.cuda.get_device_properties().total_memory`` reports it, in GiB
GPU_MEMORY_GIB: dict[str, float] = {"A100/H100 80GB": 79.6, "H200 141GB": 140.4, "B200 180GB": 178.4}

#: Wan block: saved bytes per video token, (coefficient of D, coefficient of F), by compute dtype bytes
_WAN_SAVED_OFF = {2: (69, 4), 4: (86, 8)}
_WAN_SAVED_SELECTIVE = {2: (18, 2), 4: (36, 4)}
#: Wan block: saved bytes per text token, coefficient of D (off / selective), by compute dtype bytes
_WAN_TEXT_OFF = {2: 13, 4: 17}
_WAN_TEXT_SELECTIVE = {2: 4, 4: 8}
#: activation gradients held during one block's backward, per video token (coefficients of D and F)
_WAN_BACKWARD_GRADS = (16, 4)
#: a no-grad block forward's live tensors per video token in bf16 (coefficients of D and F)
_WAN_NOGRAD = (24, 4)

Checkpointing = Literal["off", "full", "selective"]

#: the ``role`` of FSDP2's shared buffers in :class:`MemoryTerm`
FSDP_ROLE = "FSDP2"


@dataclass(frozen=True)
class RoleSpec:
    """What the estimate needs to know of one role (global numbers, before sharding)."""

    trainable: bool
    num_params: int
    num_blocks: int
    block_params: int
    hidden_dim: int
    ffn_dim: int
    num_heads: int
    patch_size: tuple[int, int, int]
    weight_bytes: int = 4
    """Bytes per stored weight: 4 for trainable roles (fp32 masters); 2 for a bf16 frozen role."""
    trained_params: int | None = None
    """A trainable role that trains only some parameters (LoRA adapters): how many. They are fp32 with
    gradients, AdamW states and the EMA shadow; the other ``num_params − trained_params`` are stored at
    ``weight_bytes`` like a frozen role's. None: every parameter trains."""
    activation_checkpointing: Checkpointing = "off"
    checkpoint_every: int = 1
    attention_backend: str | None = None
    num_experts: int = 1
    """Transformers of the role (2: Wan 2.2 A14B), each ``num_blocks`` blocks; ``num_params`` counts all. A
    batch mixing both noise ranges runs both, so both root units may be gathered at once."""

    @property
    def root_params(self) -> int:
        return self.num_params - self.num_experts * self.num_blocks * self.block_params


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    role: str
    bytes: int


@dataclass
class MemoryEstimate:
    """The peak phase's terms (bytes per device) and every phase's total."""

    phase: str
    terms: list[MemoryTerm]
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def largest(self, k: int = 3) -> list[MemoryTerm]:
        return sorted(self.terms, key=lambda t: t.bytes, reverse=True)[:k]

    def per_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            out[t.role] = out.get(t.role, 0) + t.bytes
        return out

    def fits(self, device_gib: float) -> bool:
        return self.peak_bytes <= (device_gib - DEVICE_RESERVE_GIB) * GiB


def num_video_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    _, t, h, w = (int(x) for x in latent_shape)
    pt, ph, pw = (int(x) for x in patch_size)
    return (t // pt) * (h // ph) * (w // pw)


def wan_role_spec(config: Mapping[str, Any], *, num_params: int, block_params: int, trainable: bool,
                  weight_bytes: int, activation_checkpointing: Checkpointing = "off", checkpoint_every: int = 1,
                  attention_backend: str | None = None) -> RoleSpec:
    """A Wan role from its diffusers ``config`` and its parameter counts."""
    heads = int(config["num_attention_heads"])
    patch_t, patch_h, patch_w = (int(x) for x in config["patch_size"])
    return RoleSpec(trainable=trainable, num_params=num_params, num_blocks=int(config["num_layers"]),
                    block_params=block_params, hidden_dim=heads * int(config["attention_head_dim"]),
                    ffn_dim=int(config["ffn_dim"]), num_heads=heads,
                    patch_size=(patch_t, patch_h, patch_w),
                    weight_bytes=weight_bytes, activation_checkpointing=activation_checkpointing,
                    checkpoint_every=checkpoint_every, attention_backend=attention_backend)


# -- activations --------------------------------------------------------------------------------------------
def block_saved_bytes(spec: RoleSpec, *, tokens: int, text_len: int, batch: int, compute_bytes: int,
                      mode: Literal["off", "selective"] = "off") -> int:
    """Bytes one block saves for its backward without checkpointing (``off``) or under selective."""
    d, f = spec.hidden_dim, spec.ffn_dim
    if mode == "off":
        a_d, a_f = _WAN_SAVED_OFF[compute_bytes]
        per_text = _WAN_TEXT_OFF[compute_bytes] * d
    else:
        a_d, a_f = _WAN_SAVED_SELECTIVE[compute_bytes]
        per_text = _WAN_TEXT_SELECTIVE[compute_bytes] * d
    saved = batch * (tokens * (a_d * d + a_f * f) + text_len * per_text)
    if spec.attention_backend == "_native_math":  # the softmax probabilities, heads × N × N per sample
        saved += batch * spec.num_heads * tokens * tokens * compute_bytes
    return saved


def graph_bytes(spec: RoleSpec, *, tokens: int, text_len: int, batch: int, compute_bytes: int) -> int:
    """Activations a role's graded forward keeps until its backward (see the module docstring)."""
    full_block = block_saved_bytes(spec, tokens=tokens, text_len=text_len, batch=batch, compute_bytes=compute_bytes)
    n = spec.num_blocks
    if spec.activation_checkpointing == "off":
        return n * full_block
    m = math.ceil(n / spec.checkpoint_every)
    block_input = batch * tokens * compute_bytes * spec.hidden_dim
    if spec.activation_checkpointing == "full":
        kept = block_input
    else:
        kept = block_input + block_saved_bytes(spec, tokens=tokens, text_len=text_len, batch=batch,
                                               compute_bytes=compute_bytes, mode="selective")
    return m * kept + (n - m) * full_block


def backward_working_bytes(spec: RoleSpec, *, tokens: int, text_len: int, batch: int,
                           compute_bytes: int) -> tuple[int, int]:
    """(recompute of one checkpointed block, activation gradients of one block's backward)."""
    recompute = 0
    if spec.activation_checkpointing != "off":
        recompute = block_saved_bytes(spec, tokens=tokens, text_len=text_len, batch=batch,
                                      compute_bytes=compute_bytes)
    g_d, g_f = _WAN_BACKWARD_GRADS
    return recompute, batch * tokens * (g_d * spec.hidden_dim + g_f * spec.ffn_dim)


def nograd_forward_bytes(spec: RoleSpec, *, tokens: int, samples: int, compute_bytes: int) -> int:
    n_d, n_f = _WAN_NOGRAD
    return samples * tokens * (n_d * spec.hidden_dim + n_f * spec.ffn_dim) * compute_bytes // 2


# -- the estimate -------------------------------------------------------------------------------------------
def estimate_peak_memory(roles: Mapping[str, RoleSpec], *, latent_shape: Sequence[int], text_len: int,
                         batch_size: int, shard_degree: int, mixed_precision: str,
                         ema_role: str | None = None, ema_device: str = "gpu",
                         eager_backward: bool = True, backward_order: Sequence[str] | None = None,
                         frozen_forward_samples: int | None = None, cp_size: int = 1) -> MemoryEstimate:
    """Peak bytes per device of one training step in which every trainable role steps (the module
    docstring has the formula). ``backward_order`` defaults to the trainable roles in ``roles`` order;
    ``frozen_forward_samples`` (default 2·batch: CFG cond + uncond in one forward) sizes frozen roles'
    no-grad forwards. ``cp_size``: the context-parallel degree, which divides each rank's video tokens."""
    if shard_degree < 1:
        raise ValueError(f"shard_degree must be >= 1, got {shard_degree}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    c = 2 if mixed_precision == "bf16" else 4
    s = shard_degree
    order = list(backward_order) if backward_order is not None else [r for r, sp in roles.items() if sp.trainable]
    frozen = [r for r, sp in roles.items() if not sp.trainable]
    samples = 2 * batch_size if frozen_forward_samples is None else frozen_forward_samples

    def shard(numel_bytes: int) -> int:
        return math.ceil(numel_bytes / s)

    def rank_tokens(spec: RoleSpec) -> int:  # this rank's share of a sample's video tokens
        return math.ceil(num_video_tokens(latent_shape, spec.patch_size) / cp_size)

    states: list[MemoryTerm] = []
    grads: dict[str, MemoryTerm] = {}
    for role, sp in roles.items():
        if sp.trainable and sp.trained_params is not None:  # adapters on a frozen base
            trained = sp.trained_params
            states.append(MemoryTerm("weights (frozen base)", role,
                                     shard(sp.weight_bytes * (sp.num_params - trained))))
            states.append(MemoryTerm("weights (fp32 adapters)", role, shard(4 * trained)))
            states.append(MemoryTerm("AdamW m+v", role, shard(8 * trained)))
            grads[role] = MemoryTerm("gradients", role, shard(4 * trained))
        elif sp.trainable:
            states.append(MemoryTerm("weights (fp32 master)", role, shard(4 * sp.num_params)))
            states.append(MemoryTerm("AdamW m+v", role, shard(8 * sp.num_params)))
            grads[role] = MemoryTerm("gradients", role, shard(4 * sp.num_params))
        else:
            states.append(MemoryTerm("weights (frozen)", role, shard(sp.weight_bytes * sp.num_params)))
    if ema_role is not None and ema_device == "gpu":
        ema_spec = roles[ema_role]
        tracked = ema_spec.num_params if ema_spec.trained_params is None else ema_spec.trained_params
        states.append(MemoryTerm("EMA shadow", ema_role, shard(4 * tracked)))
    largest_block = max(sp.block_params for sp in roles.values())
    fsdp = [MemoryTerm("all-gather (2 blocks)", FSDP_ROLE, 2 * c * largest_block)]
    fsdp += [MemoryTerm("root unit (unsharded)", role, c * sp.root_params) for role, sp in roles.items()]
    reduce_scatter = MemoryTerm("unsharded block gradient", FSDP_ROLE, 4 * largest_block)

    def activations(role: str) -> dict[str, int]:
        sp = roles[role]
        kw = {"tokens": rank_tokens(sp), "text_len": text_len, "batch": batch_size, "compute_bytes": c}
        recompute, act_grads = backward_working_bytes(sp, **kw)
        return {"graph": graph_bytes(sp, **kw), "recompute": recompute, "activation gradients": act_grads}

    phases: dict[str, list[MemoryTerm]] = {}

    def graph_term(role: str) -> MemoryTerm:
        return MemoryTerm("activations: graph", role, activations(role)["graph"])

    if order and frozen:  # frozen forwards (DMD2's teacher) run while the first role's graph is alive
        tokens = rank_tokens(roles[frozen[0]])
        nograd = {r: nograd_forward_bytes(roles[r], tokens=tokens, samples=samples, compute_bytes=c) for r in frozen}
        widest = max(nograd, key=lambda r: nograd[r])
        phases["frozen forward"] = states + fsdp + [graph_term(order[0]),
                                                    MemoryTerm("no-grad forward", widest, nograd[widest])]
    # Eager: each role's backward right after its forward. Combined: one backward over every graph, which
    # autograd runs from the most recently built graph back, the others waiting alive.
    sequence = order if eager_backward else order[::-1]
    for i, role in enumerate(sequence):
        waiting = [] if eager_backward else [graph_term(r) for r in sequence[i + 1:]]
        acts = activations(role)
        start = [graph_term(role), MemoryTerm("activations: block recompute", role, acts["recompute"]),
                 MemoryTerm("activations: gradients in flight", role, acts["activation gradients"])]
        dynamic = start if sum(t.bytes for t in start) >= grads[role].bytes else [grads[role]]
        phases[f"backward of {role}"] = (states + fsdp + [reduce_scatter] + [grads[r] for r in sequence[:i]]
                                         + waiting + dynamic)
    done = sequence
    phases["after backward"] = states + fsdp + [grads[r] for r in done]
    phase = max(phases, key=lambda p: sum(t.bytes for t in phases[p]))
    return MemoryEstimate(phase=phase, terms=[t for t in phases[phase] if t.bytes > 0],
                          phases={p: sum(t.bytes for t in terms) for p, terms in phases.items()})


@dataclass(frozen=True)
class RoleShape:
    """A role transformer's architecture: its diffusers config and its global parameter counts."""

    config: Mapping[str, Any]
    num_params: int
    block_params: int
    family: str = "wan"
    """The model family (``fv_accel.models.FAMILIES``), whose ``role_memory_spec`` reads ``config``."""
    trainable_params: int | None = None
    """Parameters that require grad (global count); used for roles with ``models.<role>.lora``."""
    num_experts: int = 1
    """Transformers of the role (``ModelBase.modules()``), all counted in ``num_params``."""


def role_shapes_from_run(method: Any) -> dict[str, RoleShape] | None:
    """RoleShapes of a built run's (possibly sharded) transformers: DTensor ``numel`` is the global count.
    None when a role's family has no activation model (``ModelBase.has_memory_model``)."""
    shapes: dict[str, RoleShape] = {}
    for role, model in method.role_models.items():
        if not model.has_memory_model:
            return None
        # A two-expert role: both experts' weights (and states) count, one expert computes at a time.
        transformer = model.transformer
        params = [p for module in model.modules().values() for p in module.parameters()]
        names = tuple(model.block_class_names)
        blocks = [m for m in transformer.modules() if type(m).__name__.removeprefix("FSDP") in names]
        block_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        shapes[role] = RoleShape(dict(transformer.config), sum(p.numel() for p in params),
                                 block_params, family=model.config.family,
                                 trainable_params=sum(p.numel() for p in params if p.requires_grad),
                                 num_experts=len(model.modules()))
    return shapes


def estimate_run(cfg: Any, shapes: Mapping[str, RoleShape], *, latent_shape: Sequence[int], shard_degree: int,
                 mixed_precision: str, eager_backward: bool = True,
                 backward_order: Sequence[str] | None = None, cp_size: int = 1) -> MemoryEstimate:
    """The estimate of a run configuration (``RunConfig``): each role's checkpointing, attention backend and
    frozen dtype from ``models.<role>``, batch and text length from ``training.data``, the EMA from
    ``callbacks.ema``. What ``--dry-run`` prints, with ``shapes`` from the built models; ``cp_size`` from the
    launcher's layout (``parallelism_config_cp_size``)."""
    from fv_accel.models import FAMILIES

    specs: dict[str, RoleSpec] = {}
    for role, shape in shapes.items():
        model_cfg = cfg.models[role]
        frozen_bytes = 2 if (mixed_precision == "bf16" and model_cfg.frozen_dtype == "bf16") else 4
        # adapters on a base stored like a frozen role; likewise one trained expert beside a frozen one (its
        # fp32 copy is then counted on top of a frozen-dtype one: ≤ 2 bytes per trained parameter too many)
        lora = model_cfg.trainable and (model_cfg.lora is not None or (
            shape.trainable_params is not None and 0 < shape.trainable_params < shape.num_params))
        spec = FAMILIES[shape.family].role_memory_spec(
            shape.config, num_params=shape.num_params, block_params=shape.block_params,
            trainable=model_cfg.trainable, weight_bytes=frozen_bytes if lora or not model_cfg.trainable else 4,
            activation_checkpointing=model_cfg.activation_checkpointing,
            checkpoint_every=model_cfg.activation_checkpointing_every,
            attention_backend=model_cfg.attention_backend)
        spec = dataclasses.replace(spec, num_experts=shape.num_experts)
        if lora:
            if shape.trainable_params is None:
                raise ValueError(f"models.{role}.lora: the estimate needs the role's adapter parameter count")
            spec = dataclasses.replace(spec, trained_params=shape.trainable_params)
        specs[role] = spec
    from fv_accel.checkpoint.layout import EMA_ROLE

    ema = cfg.callbacks.ema
    return estimate_peak_memory(
        specs, latent_shape=latent_shape, text_len=cfg.training.data.text_len,
        batch_size=cfg.training.data.train_batch_size, shard_degree=shard_degree,
        mixed_precision=mixed_precision, ema_role=EMA_ROLE if ema is not None else None,
        ema_device=ema.device if ema is not None else "gpu", eager_backward=eager_backward,
        backward_order=backward_order, cp_size=cp_size)


def format_gib(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f} GiB"


__all__ = ["DEVICE_RESERVE_GIB", "FSDP_ROLE", "GPU_MEMORY_GIB", "MemoryEstimate", "MemoryTerm", "RoleShape", "RoleSpec",
           "block_saved_bytes", "estimate_peak_memory", "estimate_run", "graph_bytes", "num_video_tokens",
           "role_shapes_from_run", "wan_role_spec"]
