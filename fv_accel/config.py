"""Run configuration: a strict, typed schema loaded from YAML plus dotted command-line overrides.

Every default lives in exactly one place: the field declarations below. Unknown keys, wrong types and
out-of-range values fail at load time with the full key path (``training.loop.max_train_steps``) and exit
code 2, before any weight file is read.

Recipe files and command-line values are parsed with the YAML 1.2 core schema (``true`` → bool, ``3`` → int,
``[1, 2]`` → list) and then validated by pydantic in strict-ish mode: a string is never silently coerced into
a number.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fv_accel.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict=True: "3" is not an int, 1 is not a bool; floats accept ints (pydantic's strict float rule).
    # use_attribute_docstrings: the docstring under each field is its description, the single source of the
    # key tables in docs/configuration.md (fv_accel/config_doc.py renders them).
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, use_attribute_docstrings=True)


class LoraConfig(_Strict):
    """LoRA adapters (peft) on a trainable role's transformer: the base weights stay frozen and are stored like a
    frozen role's (``frozen_dtype`` under bf16); only the adapters train, are checkpointed and averaged by the EMA
    ([models.md](models.md#lora))."""

    rank: int = Field(16, ge=1)
    """Rank r of each adapter: ``W x + (alpha / r)·B A x`` with A [r, in], B [out, r]."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by ``alpha / rank``."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] | None = None
    """Linear layers to adapt, as peft matches them: a module name or its dotted suffix (``to_q``,
    ``ffn.net.2``). null: the family's default (Wan: attention ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
    ``attn1`` and ``attn2``, and the FFN ``ffn.net.0.proj``, ``ffn.net.2``). An entry matching no linear layer
    is an error (exit 2)."""
    init: Literal["default", "gaussian"] = "default"
    """Initialisation of A (B starts at zero, so step 0 is the base model): ``default`` Kaiming-uniform as in
    peft and ``nn.Linear``; ``gaussian`` normal with std 1/rank. Drawn from a seed derived from the role and
    parameter name, identical on every rank whatever the sharding."""

    @field_validator("target_modules")
    @classmethod
    def _non_empty_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or any(not name for name in value)):
            raise ValueError("must be null or a list of non-empty module names")
        return value


class CausalConfig(_Strict):
    """Block-causal attention of a ``wan_causal`` role ([causal.md](causal.md)): latent frames are grouped in
    blocks; a token attends to every token of its own block and of earlier blocks, never to later ones."""

    num_frames_per_block: int = Field(3, ge=1)
    """Latent frames per block. The first block takes the remainder: 21 frames → 7 blocks of 3, 8 → 2, 3, 3."""
    local_attn_frames: int | None = Field(None, ge=1)
    """Attention window in latent frames (the current block included); null: every earlier frame. Streaming
    keeps a cache of this many frames, so clips longer than training run in bounded memory."""
    sink_frames: int = Field(0, ge=0)
    """With a window: the first frames stay attendable for ever (attention sinks), inside the window's count."""

    @model_validator(mode="after")
    def _sink_inside_window(self) -> CausalConfig:
        if self.sink_frames and self.local_attn_frames is None:
            raise ValueError("sink_frames needs local_attn_frames (a global window keeps every frame anyway)")
        if self.local_attn_frames is not None and self.local_attn_frames < self.num_frames_per_block + self.sink_frames:
            raise ValueError(f"local_attn_frames {self.local_attn_frames} must hold one block "
                             f"({self.num_frames_per_block}) plus the sink frames ({self.sink_frames})")
        return self


class ModelConfig(_Strict):
    """One role model (student, teacher, critic, ...)."""

    family: Literal["wan", "wan_causal"] = "wan"
    """Model family; one file per family in ``fv_accel/models``. ``wan_causal``: a Wan 2.1 transformer with
    block-causal attention and a streaming KV cache (``causal`` below; [causal.md](causal.md))."""
    init_from: str
    """A diffusers pipeline directory, a model directory, or a Hub id."""
    subfolder: str = "transformer"
    """Subfolder of ``init_from`` holding the transformer (``""`` for a bare model directory)."""
    trainable: bool = True
    """Train this role (fp32 master weights, own optimizer); false = frozen, sharded without an optimizer and left
    out of checkpoints."""
    flow_shift: float = Field(3.0, gt=0)
    """Timestep shift ``s·u / (1 + (s − 1)·u)`` used when this role samples training timesteps."""
    frozen_dtype: Literal["bf16", "fp32"] = "bf16"
    """Storage dtype of a frozen role under bf16 mixed precision (ignored in fp32 runs and for trainable roles).
    Either way it computes in bf16, except the modules diffusers keeps in fp32 ([README](../README.md#real-use),
    **Precision**)."""
    activation_checkpointing: Literal["off", "full", "selective"] = "off"
    """Trainable roles only. ``full``: recompute each transformer block in backward; ``selective``: keep the
    outputs of matmuls and attention, recompute the rest (norms, activations, rotary, modulation)."""
    activation_checkpointing_every: int = Field(1, ge=1)
    """With ``full`` or ``selective``: checkpoint blocks 0, N, 2N, ... only (1 = every block); the other blocks
    keep all their activations (faster, more memory)."""
    attention_backend: str | None = None
    """diffusers attention backend for this role (e.g. ``flash``, ``_native_cudnn``); null keeps the default."""
    compile: Literal["off", "regional"] = "off"
    """``regional``: ``torch.compile`` each transformer block before sharding (torchtitan-style); compiles
    once per block shape, so the first steps are slow."""
    latent_stats: str = Field("auto", min_length=1)
    """Where the statistics that normalise this role's latents, (x − mean) / std, come from. ``auto``: the
    ``vae/config.json`` of ``init_from`` (a pipeline; exit 2 when it has none, e.g. a transformer-only
    download); ``identity``: the data is already in the transformer's space (mean 0, std 1; validation then
    draws latents without a VAE); anything else: a pipeline or VAE directory, or Hub id, whose ``vae/config.json``
    (or ``config.json``) holds ``latents_mean`` and ``latents_std`` (its VAE decodes validation videos). All
    roles share one latent space: different statistics between roles are an error (exit 2). A local source is
    checked when the config is resolved, a Hub id when the roles load; both before any weight is read."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the full transformer (trainable roles only); null = full fine-tuning."""
    experts: Literal["both", "high", "low"] | None = None
    """Two-expert pipelines only (Wan 2.2 A14B: ``transformer_2`` and ``boundary_ratio`` in ``model_index.json``):
    which experts train, ``high`` = ``transformer`` (t ≥ boundary·1000), ``low`` = ``transformer_2``; the other
    stays frozen (in ``frozen_dtype``). null = ``both``. With ``lora``, each trained expert gets adapters, a
    frozen one none. Set on a one-expert model: exit 2."""
    causal: CausalConfig | None = None
    """``family: wan_causal`` only (null there = the defaults): block size and attention window."""

    @model_validator(mode="after")
    def _causal_needs_causal_family(self) -> ModelConfig:
        if self.causal is not None and self.family != "wan_causal":
            raise ValueError(f"causal is set on family {self.family!r}; it applies to family 'wan_causal'")
        return self

    @property
    def causal_or_default(self) -> CausalConfig:
        """``causal`` with its defaults filled in (the family ``wan_causal`` reads this)."""
        return self.causal or CausalConfig()

    @model_validator(mode="after")
    def _lora_needs_trainable(self) -> ModelConfig:
        if self.lora is not None and not self.trainable:
            raise ValueError("lora is set on a frozen role (trainable: false); remove lora or set trainable: true")
        return self


class OptimizerConfig(_Strict):
    """AdamW and its learning-rate schedule, for one trainable role."""

    learning_rate: float = Field(1e-4, gt=0)
    """AdamW learning rate (the peak of the schedule)."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    """AdamW (beta1, beta2), each in [0, 1)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    """diffusers schedule, stepped once per optimizer step of the role."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 over this many optimizer steps."""
    fused: bool = False
    """Use the fused AdamW kernel (CUDA only)."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value


class MethodConfigBase(_Strict):
    """What every method's ``Config`` (declared in its own file under ``fv_accel/methods``) derives from."""

    name: str
    """Selects the method (``fv_accel/methods/registry.py``); keys of other methods are unknown keys here."""





class DataConfig(_Strict):
    data_path: str | list[str] | dict[str, int] = ""
    """Parquet directory or file (FastVideo T2V or text-only schema), a list of them, or a mapping
    ``{path: repeat_count}`` (a path with count 3 appears three times per epoch)."""
    seed: int = 0
    """Seed of the data order (per-epoch reshuffle), CFG dropout and the method's generator."""
    train_batch_size: int = Field(1, ge=1)
    """Per process."""
    training_cfg_rate: float = Field(0.0, ge=0, le=1)
    """Probability of replacing a sample's text embedding with zeros (classifier-free guidance dropout)."""
    text_len: int = Field(512, ge=1)
    """Text embeddings are padded with zeros / truncated to this many tokens."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank; 0 loads in the training process."""
    latent_shape: list[int] | None = None
    """[C, T, H, W] of generated latents when the dataset has no latents (text-only, data-free DMD2)."""
    skip_bad_rows: bool = False
    """Replace a malformed row by the next good one (logged and counted) instead of stopping with exit 1."""
    shuffle: Literal["rows", "row_groups"] = "row_groups"
    """Epoch order. ``row_groups``: a permutation of the parquet row groups, rows shuffled within windows of
    ``shuffle_window_groups`` consecutive groups, so each group is read once per pass. ``rows``: one permutation
    of all rows (most random; a sample may cost a whole row-group read, fine when the data fits the cache).
    See [data.md](data.md#loading-sharding-shuffling-resume)."""
    shuffle_window_groups: int = Field(4, ge=1)
    """With ``shuffle: row_groups``: rows are shuffled within this many consecutive groups of the epoch's group
    order. Larger = more mixing, more memory: each loader process caches one window (W × row-group size)."""
    row_group_cache_mb: int = Field(1024, ge=1)
    """Per loader process: parquet row groups up to this size are cached whole (larger ones are streamed); the
    cache holds up to this many MB, and never fewer groups than the shuffle window."""
    negative_prompt_path: str = ""
    """Parquet (text-only schema, first row used) with the negative-prompt embedding, e.g. the
    ``_negative_prompt.parquet`` written by ``recipes/preprocess.py --negative-prompt``; every batch then carries
    it as the unconditional embedding, and validation's CFG uses the same one. "" = none (zeros)."""

    @field_validator("data_path")
    @classmethod
    def _repeat_counts(cls, value: str | list[str] | dict[str, int]) -> str | list[str] | dict[str, int]:
        if isinstance(value, dict) and any(count < 1 for count in value.values()):
            raise ValueError("repeat counts must be >= 1")
        return value


class LoopConfig(_Strict):
    max_train_steps: int = Field(1000, ge=1)
    """Number of optimizer steps (the loop's ``step`` runs 1..N)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is divided by this so gradients are the mean."""
    max_grad_norm: float = 1.0
    """Clip each clip target to this global norm; <= 0 disables clipping (norms are still logged)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss or gradient norm (checked on every rank before any update): ``stop`` exits with code 3
    naming the step and role; ``skip`` drops the update and counts it in ``nonfinite_skips``."""
    max_consecutive_skips: int = Field(10, ge=1)
    """With ``nonfinite: skip``: stop (exit code 3) after this many skipped steps in a row."""


class CheckpointConfig(_Strict):
    output_dir: str = "outputs/run"
    """Where ``resolved_config.yaml``, ``metrics.jsonl``, ``checkpoint-<step>/``, ``validation/`` and ``logs/``
    go. Must be one directory seen by every node (a shared filesystem): checked at start, exit 2 naming the
    ranks that cannot see it."""
    save_steps: int = Field(0, ge=0)
    """Save every N steps; 0 = only at the end."""
    keep_last: int = Field(0, ge=0)
    """Keep the newest N complete checkpoints; 0 = keep all."""
    resume_from_checkpoint: str = ""
    """"" (fresh), "latest" (newest complete checkpoint in output_dir, else fresh) or a checkpoint path."""
    async_save: bool | Literal["auto"] = "auto"
    """Periodic saves copy the state to CPU memory and write it in a background thread while training goes on;
    a checkpoint becomes complete (renamed into place) at the first step boundary after every rank's write
    finished. "auto" = on when CUDA is available, off on CPU. Preemption and end-of-run saves always block.
    See [resume.md](resume.md#async-saves)."""
    on_newer: Literal["abandon", "refuse"] = "abandon"
    """Resuming from a checkpoint older than complete ones in ``output_dir`` (a rollback): ``abandon`` renames the
    newer ones to ``checkpoint-<N>.abandoned-<timestamp>/`` (never deleted automatically) so that retention,
    ``latest`` and the Hub push see only the resumed timeline; ``refuse`` exits 2 naming them."""
    preempt_signals: list[str] = Field(default_factory=lambda: ["SIGTERM", "SIGINT"])
    """Signals that stop the run at the next step boundary with a checkpoint and exit 143 (names as in Python's
    ``signal`` module, e.g. ``SIGUSR1`` for Slurm's ``--signal=USR1@120``); DataLoader workers ignore them."""

    @field_validator("preempt_signals")
    @classmethod
    def _catchable_signals(cls, value: list[str]) -> list[str]:
        import signal

        uncatchable = (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)  # SIGCHLD reports DataLoader worker exits
        signums = [getattr(signal, name, None) for name in value]
        for name, signum in zip(value, signums, strict=True):
            if not isinstance(signum, signal.Signals) or signum in uncatchable:
                raise ValueError(f"{name!r} is not a signal name that can be caught (e.g. SIGTERM, SIGUSR1)")
        if len(set(signums)) != len(signums):
            raise ValueError("lists a signal twice")
        return value


TrackerBackend = Literal["tensorboard", "wandb", "trackio"]


class TrackerConfig(_Strict):
    backends: list[TrackerBackend] = Field(default_factory=lambda: list[TrackerBackend](["tensorboard"]))
    """Accelerate trackers; files go under ``<output_dir>/logs``. ``[]`` = none (``metrics.jsonl`` is always
    written)."""
    project_name: str = "fv_accel"
    """Tracker project / run group name."""
    peak_tflops_per_device: float | None = Field(None, gt=0)
    """Peak TFLOP/s of one device for the MFU metric; null = the bf16 table in ``fv_accel/flops.py`` for
    known GPUs in bf16 runs, else no MFU (achieved ``tflops_per_device`` is still logged)."""


class TrainingConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    """The training dataset and how it is batched, shuffled and loaded ([data.md](data.md))."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """The student's optimizer and learning-rate schedule (DMD2's critic has its own,
    ``method.critic_optimizer``)."""
    loop: LoopConfig = Field(default_factory=LoopConfig)
    """Length of the run, gradient accumulation, clipping and non-finite handling."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Where the run writes, how often it saves, and resuming ([resume.md](resume.md))."""
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    """Metric trackers and the MFU peak ([monitoring.md](monitoring.md))."""
    target_device_memory_gib: float | None = Field(None, gt=0)
    """Device memory (GiB) the ``--dry-run`` peak-memory estimate is checked against, e.g. 79.6 for an 80 GB GPU
    or 140.4 for an H200 (``fv_accel.memory.GPU_MEMORY_GIB``); null = the CUDA device's own, none on CPU."""


class EMAConfig(_Strict):
    decay: float = Field(0.99, gt=0, lt=1)
    """At each update (see ``update``): ema ← decay·ema + (1 − decay)·student."""
    update: Literal["every_step", "generator_steps"] = "every_step"
    """When the EMA updates. ``every_step`` (default, as FastVideo): after every optimizer step of the loop,
    also the critic-only steps of DMD2, where the student's weights did not change (the average then moves
    further toward the current weights). ``generator_steps``: only at steps where the student stepped, so the
    horizon counts student updates (with DMD2's ``generator_update_interval`` N it is N× as many loop steps).
    Identical for methods whose student steps every step (finetune)."""
    start_step: int = Field(0, ge=0)
    """First step at which the EMA updates; its first update copies the student's weights."""
    device: Literal["gpu", "cpu"] = "gpu"
    """Where the fp32 shadow lives. ``gpu``: on the training device (4 bytes per student parameter / shards of
    device memory). ``cpu``: host memory (pinned when CUDA is available), updated through two pinned staging
    buckets (device → host ``non_blocking``, lerp on the CPU): no device memory, 4 bytes per local parameter of
    PCIe traffic per update, 4 bytes per local parameter of host RAM."""


class ValidationConfig(_Strict):
    every_steps: int = Field(0, ge=0)
    """Sample validation videos every N steps; 0 disables."""
    at_start: bool = False
    """Also sample before the first step (step 0) of a fresh run."""
    num_samples: int = Field(4, ge=1)
    """Validation prompts: rows spread evenly over the validation data (the same rows at every step)."""
    seed: int = 0
    """Seed of the sampling noise: identical at every validation, so steps are comparable."""
    data_path: str = ""
    """Parquet file or directory (T2V or text-only schema) holding the validation prompts' precomputed text
    embeddings; "" = use rows of ``training.data.data_path``."""
    prompts: list[str] = Field(default_factory=list)
    """Captions, encoded once by the student pipeline's text encoder (``models.student.init_from`` must be a
    pipeline with ``tokenizer/`` and ``text_encoder/``) into ``<output_dir>/validation/prompts.parquet``;
    used instead of data rows (all of them; ``num_samples`` does not apply). Not together with ``data_path``."""
    num_inference_steps: int = Field(8, ge=1)
    """Euler steps for methods that sample with the flow ODE (finetune); DMD2 uses ``method.dmd_denoising_steps``."""
    guidance_scale: float = Field(1.0, ge=0)
    """CFG scale (uncond + w·(cond − uncond)) of the flow-ODE sampler; 1 = no guidance."""
    fps: int = Field(16, ge=1)
    """Frame rate of the written mp4 files."""

    @model_validator(mode="after")
    def _one_prompt_source(self) -> ValidationConfig:
        if self.prompts and self.data_path:
            raise ValueError("set prompts or data_path, not both")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("prompts must not be empty strings")
        return self


class CallbacksConfig(_Strict):
    ema: EMAConfig | None = None
    """Exponential moving average (EMA) of the student's weights, kept in checkpoints
    ([resume.md](resume.md)). Off (null) until any key below is set."""
    validation: ValidationConfig | None = None
    """Validation videos sampled while training ([monitoring.md](monitoring.md#validation-videos-callbacksvalidation)).
    Off (null) until any key below is set."""


class HubConfig(_Strict):
    repo_id: str | None = None
    """Hub repository to push exports to; null = no pushing."""
    push_every_checkpoint: bool = False
    """Also push an export at every checkpoint (not just at the end)."""
    private: bool = True
    """Create the Hub repository as private."""


class RunConfig(_Strict):
    plugins: list[str] = Field(default_factory=list)
    """Python modules imported before the rest of this configuration is read, e.g. a project's own method
    (registered with ``fv_accel.methods.register_method``) so that ``method.name`` can select it. They must be
    importable on every node (installed, or on ``PYTHONPATH``)."""
    models: dict[str, ModelConfig]
    """One entry per role; ``student`` is required, the other roles are the ones the method asks for (dmd2:
    ``teacher``, frozen, and ``critic``, by default a trainable copy of the teacher's entry)."""
    method: SerializeAsAny[MethodConfigBase]
    """The training method, selected by ``method.name``; its keys are its ``Config``'s (one per method file)."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Settings every method shares: data, optimizer, loop, checkpoints and trackers (sections of their own)."""
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)
    """Optional callbacks, each off until one of its keys is set."""
    hub: HubConfig = Field(default_factory=HubConfig)
    """Pushing exports to the Hugging Face Hub ([export.md](export.md#pushing))."""

    @model_validator(mode="before")
    @classmethod
    def _method_default_roles(cls, data: Any) -> Any:
        """The method's role defaults (dmd2: the critic as a trainable copy of the teacher)."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            return data
        method = _registered_method(data.get("method"))
        if method is None:
            return data
        return {**data, "models": method.default_roles(data["models"])}

    @field_validator("method", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> Any:
        """Validate ``method`` as the ``Config`` of the method its ``name`` selects."""
        if isinstance(value, MethodConfigBase) or not isinstance(value, dict):
            return value
        if "name" not in value:
            raise PydanticCustomError("method_name_missing", "required value is missing")
        from fv_accel.methods.registry import METHODS, method_class

        try:
            method = method_class(value["name"])
        except KeyError:
            raise PydanticCustomError(
                "method_unknown", "no method named '{name}' (registered: {known}; a project's own method is "
                "imported through the plugins key)", {"name": value["name"], "known": ", ".join(sorted(METHODS))},
            ) from None
        return method.Config.model_validate(value)

    @model_validator(mode="after")
    def _roles(self) -> RunConfig:
        if "student" not in self.models:
            raise ValueError("models.student is required")
        method = _registered_method(self.method.name)
        if method is not None:
            problems = method.role_errors({role: m.trainable for role, m in self.models.items()})
            if problems:
                raise ValueError(problems[0])
            method.check_config(self)
        return self


def _registered_method(method: Any) -> Any:
    """The registered method class ``method`` (a ``method`` mapping or a name) selects, else None."""
    name = method.get("name") if isinstance(method, dict) else method
    if not isinstance(name, str):
        return None
    from fv_accel.methods.registry import method_class

    try:
        return method_class(name)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's implicit types, for recipe files and overrides alike.

    PyYAML implements YAML 1.1, where ``1e-4`` is the *string* "1e-4" (the strict schema would reject it as a
    learning rate), ``010`` is 8 (octal), ``1:30`` is 90 (base 60), ``off`` is False and ``2024-01-01`` a date.
    Here ints are ``[-+]?[0-9]+`` (decimal, leading zeros allowed), ``0o17`` or ``0x1f``; floats need a point
    or an exponent; booleans are only true/false; everything else plain is a string.
    """


_INT, _FLOAT, _BOOL = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
_YAML11_ONLY = {_INT, _FLOAT, _BOOL, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}
# A fresh table (never the inherited SafeLoader one) without the YAML 1.1 resolvers; null and merge stay.
_YamlLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?
                 |[-+]?[0-9]+[eE][-+]?[0-9]+
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    # PyYAML's constructor would read "010" as octal and "1:30" as base 60 (YAML 1.1).
    text = loader.construct_scalar(node)
    try:
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer",
                                                node.start_mark) from None


_YamlLoader.add_constructor(_INT, _construct_core_int)


class _YamlDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.2 *or* 1.1 would read as another type. SafeDumper asks only YAML 1.1,
    which would write the string "1e-4" or "0o10" plain, and the resolved config would not load back as
    itself; keeping the 1.1 rules too keeps "1:30" or "off" quoted for readers that still use YAML 1.1."""

    yaml_implicit_resolvers = {
        first: [*_YamlLoader.yaml_implicit_resolvers.get(first, []),
                *yaml.SafeDumper.yaml_implicit_resolvers.get(first, [])]
        for first in {*_YamlLoader.yaml_implicit_resolvers, *yaml.SafeDumper.yaml_implicit_resolvers}
    }


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _comment_start(text: str) -> int | None:
    """Index of the first ``#`` that YAML reads as a comment (one outside every token), or None."""
    spans = [(tok.start_mark.index, tok.end_mark.index) for tok in yaml.scan(text, Loader=_YamlLoader)]
    for i, char in enumerate(text):
        if char == "#" and not any(a <= i < b for a, b in spans):
            return i
    return None


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``--a.b=v`` or ``--a.b v`` → [("a.b", parsed v)]. Values use YAML scalar/list syntax (``_YamlLoader``).

    A value in which YAML would see a comment (``--a.b='run #3'`` → "run", ``--a.b='#ff'`` → null) is an
    error rather than kept literally: the shell already dropped unquoted ``#…``, so a ``#`` that arrives was
    quoted on purpose, and neither truncating it nor guessing a string type for ``5 # steps`` is safe.
    Quoted as a YAML string (``--a.b='"run #3"'``) it is kept.
    """
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --training.loop.max_train_steps=10")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value")
            raw = argv[i + 1]
            i += 1
        try:
            value = _yaml_load(raw) if raw != "" else ""
            comment = _comment_start(raw) if "#" in raw else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override --{key}: cannot parse value {raw!r}: {exc}") from None
        if comment is not None:
            raise ConfigError(
                f"override --{key}: YAML would drop {raw[comment:]!r} from {raw!r} as a comment; to keep the "
                f"text, quote it as a YAML string: --{key}={shlex.quote(json.dumps(raw))}"
            )
        overrides.append((key, value))
        i += 1
    return overrides


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])} is not a section; cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        # Discriminated unions insert the tag name ("dmd2") into the location; drop it from the key path.
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required value is missing"
        elif err["type"] in ("method_name_missing", "method_unknown"):
            path = f"{path}.name"  # the culprit is the key that selects the method, not the whole section
        elif isinstance(err.get("input"), (str, int, float, bool)):
            msg = f"{msg} (got {err['input']!r})"  # e.g. the string "10" where an int was expected
        lines.append(f"{path}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = _yaml_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def apply_overrides(base: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """A copy of the raw config tree ``base`` with the dotted ``overrides`` set (nothing validated yet)."""
    import copy

    tree = copy.deepcopy(base)
    for key, value in overrides:
        _set_dotted(tree, key, value)
    return tree


def resolve_config(base: dict[str, Any], overrides: Sequence[tuple[str, Any]] = ()) -> RunConfig:
    """Apply overrides to a raw config tree, validate it, and check every model source exists."""
    tree = apply_overrides(base, overrides)
    import_plugins(tree.get("plugins", []))
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    for role, model_cfg in cfg.models.items():
        check_model_source(f"models.{role}", model_cfg)
    check_latent_stats(cfg)
    check_validation_prompts(cfg)
    return cfg


def import_plugins(modules: Any) -> None:
    """Import the modules of the ``plugins`` key (a project's own methods register on import); exit 2 naming
    the module that cannot be imported. A wrong type is left to the schema's own error."""
    import importlib

    if not isinstance(modules, list):
        return
    for index, name in enumerate(modules):
        if not isinstance(name, str):
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or any error the module raises while it is imported
            raise ConfigError(f"plugins.{index}: cannot import {name!r} ({type(exc).__name__}: {exc})") from None


def check_validation_prompts(cfg: RunConfig) -> None:
    """Validation captions need the student's pipeline to have its family's text encoder (checked here for a local
    ``init_from``; a Hub id is checked when the callback loads them)."""
    from fv_accel.models import FAMILIES  # lazy: fv_accel.models imports this module

    validation = cfg.callbacks.validation
    if validation is None or not validation.prompts or "student" not in cfg.models:
        return
    student = cfg.models["student"]
    source = student.init_from
    check_pipeline_components(source, list(FAMILIES[student.family].text_encoder_components),
                              what=f"callbacks.validation.prompts: models.student.init_from {source!r}",
                              why="captions are encoded with the student pipeline's text encoder; give "
                                  "callbacks.validation.data_path with precomputed embeddings instead")


def check_pipeline_components(source: str, subfolders: list[str], *, what: str, why: str) -> None:
    """Fail (exit 2) before loading anything when a local pipeline directory lacks a component folder (a Hub
    id is checked when the component is loaded)."""
    local = Path(source).expanduser()
    if not local.exists():
        return
    for sub in subfolders:
        if not (local / sub).is_dir():
            raise ConfigError(f"{what} has no {sub}/ ({why})")


def load_config(path: str | None, argv: list[str], default: dict[str, Any] | None = None) -> RunConfig:
    base = load_yaml(path) if path else (default or {})
    return resolve_config(base, parse_overrides(argv))


def check_model_source(key: str, model_cfg: ModelConfig) -> None:
    """Fail early (exit 2) when ``init_from`` is neither a local model nor a usable Hub id. Reads no weights."""
    source = model_cfg.init_from
    local = Path(source).expanduser()
    sub = model_cfg.subfolder
    if local.exists():
        cfg_file = local / sub / "config.json" if sub else local / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{key}.init_from: {source!r} has no {cfg_file.relative_to(local)} "
                              f"(check {key}.subfolder)")
        return
    if not is_hub_id(source):
        raise ConfigError(f"{key}.init_from: local path {source!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        filename = f"{sub}/config.json" if sub else "config.json"
        if not isinstance(try_to_load_from_cache(source, filename), str):
            raise ConfigError(
                f"{key}.init_from: {source!r} is not a local directory and is not in the Hub cache "
                "(HF_HUB_OFFLINE=1 forbids downloading it)"
            )


def check_latent_stats(cfg: RunConfig) -> None:
    """Every role's latent statistics must be found, and be the same for all roles (exit 2); reads JSON files
    only. Local sources are checked here, a Hub id when the roles load (``fv_accel.build.load_roles``)."""
    from fv_accel.models import resolve_latent_stats  # lazy: fv_accel.models imports this module

    resolve_latent_stats(cfg.models, include_hub=False)


def is_hub_id(source: str) -> bool:
    """``owner/name`` with nothing of that name on disk (a model source to fetch from the Hub)."""
    return (not Path(source).expanduser().exists() and not source.startswith((".", "/", "~"))
            and bool(_HUB_ID.match(source)))


def dump_config(cfg: RunConfig) -> str:
    return yaml.dump(cfg.model_dump(mode="json"), Dumper=_YamlDumper, sort_keys=False)


def write_resolved_config(cfg: RunConfig, output_dir: str | os.PathLike[str]) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resolved_config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, path)
    return path
