"""Causal Wan family (``family: wan_causal``): a Wan 2.1 transformer with block-causal self-attention.

Same module tree, weights and state-dict keys as diffusers' ``WanTransformer3DModel`` (it loads any Wan 2.1
text-to-video transformer and exports in diffusers layout); only the self-attention processors and the RoPE
module's forward differ, and both fall back to plain bidirectional Wan when called outside this class.

Attention rule (one definition, used by the mask path and the streaming path alike). Latent frames are grouped
in blocks (:func:`fv_accel.causal_blocks.block_sizes`, remainder first). With W = ``local_attn_frames`` and
S = ``sink_frames``, a query in a block ending at frame ``e`` (exclusive) sees key frame ``k`` iff::

    k < e  and  (W is None  or  k >= e - (W - S)  or  k < S)

i.e. its own block and earlier ones (bidirectional inside a block, causal across blocks); with a window, the
last W − S frames up to the block's end plus the first S frames (attention sinks), at most W frames in all
(the config keeps W ≥ block size + S, so a block always sees itself).

Paths:

- mask (:meth:`CausalWanModel.predict_velocity`, training): the whole clip in one forward, self-attention under
  a dense ``[N, N]`` boolean mask (torch SDPA; the configured ``attention_backend`` is not used there). Cost: at
  480×832 (1,560 tokens per latent frame) and 21 frames N = 32,760, the mask has N² = 1.073e9 entries, 1.07 GB
  as bool (built once per clip shape and kept), and SDPA with an arbitrary mask cannot use the flash kernel. A
  GPU run at that size wants a flex-attention block mask instead (not implemented here).
- teacher forcing (:meth:`CausalWanModel.predict_velocity_teacher_forced`): the doubled sequence
  [clean | noisy], mask ``[2N, 2N]`` (4.3 GB as bool at the size above).
- streaming (:meth:`CausalWanModel.stream`, inference and rollouts): one block per forward against a per-layer
  cache of keys (after RoPE) and values of the committed frames, plus a cross-attention key/value cache of the
  text. Cache bytes per layer = 2·B·cache_tokens·heads·head_dim·bytes; Wan 1.3B (12 heads × 128) at 480×832,
  21 frames, B = 1, bf16: 2·32,760·1,536·2 = 201 MB per layer, 6.04 GB over its 30 layers.

Per-call state (mode, mask, snapshot of the cache) travels as a third element of the RoPE output tuple, which
diffusers hands from the root ``forward`` through every block to ``attn1``: the transformer is always called
through its root ``forward`` (FSDP2's root hook gathers the root-level parameters), and activation
checkpointing's recomputation in backward sees exactly the state of the original call, even when other
streaming calls happened in between. Grad-enabled forwards never write a cache (commits run under no_grad and
replace cache tensors instead of writing into them), so recomputation is safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed

from fv_accel import flow
from fv_accel.causal_blocks import block_sizes as partition
from fv_accel.causal_blocks import block_starts
from fv_accel.config import CausalConfig, ModelConfig
from fv_accel.errors import ConfigError
from fv_accel.models.base import LatentStats
from fv_accel.models.wan import WanModel, read_boundary_ratio

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_wan import (
        WanAttention,
        WanTransformer3DModel,
        WanTransformerBlock,
    )

Mode = Literal["mask", "stream", "commit"]
ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default, which WanTransformer3DModel uses


def visible(query_block_end: int, key_frame: int, window: int | None, sink: int) -> bool:
    """The attention rule of the module docstring: may a query in the block ending at ``query_block_end``
    (exclusive) see key frame ``key_frame``?"""
    if key_frame >= query_block_end:
        return False
    return window is None or key_frame >= query_block_end - (window - sink) or key_frame < sink


def frame_mask(sizes: list[int], window: int | None, sink: int) -> torch.Tensor:
    """[F, F] bool, row = query frame, column = key frame, for blocks of ``sizes``."""
    ends = [end for end, size in zip(accumulate(sizes), sizes, strict=True) for _ in range(size)]
    frames = sum(sizes)
    return torch.tensor([[visible(ends[q], k, window, sink) for k in range(frames)] for q in range(frames)])


def teacher_forcing_frame_mask(sizes: list[int], window: int | None, sink: int) -> torch.Tensor:
    """[2F, 2F] bool over [clean frames | noisy frames]: a clean frame sees clean frames by the rule; a noisy
    frame of block b sees the noisy frames of its own block and the clean frames of blocks before b (by the
    rule); nothing sees another block's noisy frames."""
    frames = sum(sizes)
    causal = frame_mask(sizes, window, sink)
    block_of = torch.tensor([b for b, size in enumerate(sizes) for _ in range(size)])
    same_block = block_of[:, None] == block_of[None, :]
    mask = torch.zeros(2 * frames, 2 * frames, dtype=torch.bool)
    mask[:frames, :frames] = causal
    mask[frames:, :frames] = causal & ~same_block  # clean copies of strictly earlier blocks
    mask[frames:, frames:] = same_block
    return mask


@dataclass
class _Call:
    """State of one root forward, read by the RoPE module and the self-attention processors."""

    mode: Mode
    frame_positions: torch.Tensor | None = None
    """RoPE frame position of every input frame (None: 0, 1, ...)."""
    mask: torch.Tensor | None = None
    """mask mode: [N, N] bool over the input tokens."""
    context: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
    """stream/commit: per layer, the cached keys/values this block sees, [B, tokens, heads, head_dim] (None:
    no cached frame is visible)."""
    writes: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """commit: per layer, the block's own keys (after RoPE) and values, filled by the processors."""


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved rotary embedding (pairs of channels rotated), as diffusers' WanAttnProcessor applies it.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CausalRope(WanRotaryPosEmbed):
    """Wan's RoPE with frame positions given per call (absolute frames when streaming; the clean and noisy
    copies of a frame share one under teacher forcing), beyond ``rope_max_seq_len`` too (the temporal table is
    extended with the same formula). The instance's class is swapped in place, so buffers and keys stay Wan's."""

    call: _Call | None = None

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return cast("torch.Tensor", self.freqs_cos), cast("torch.Tensor", self.freqs_sin)

    def _time_table(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        full_cos, full_sin = self._tables()
        cos, sin = full_cos[:, :self.t_dim], full_sin[:, :self.t_dim]
        if rows > cos.shape[0]:
            ext_cos, ext_sin = get_1d_rotary_pos_embed(self.t_dim, rows, ROPE_THETA, use_real=True,
                                                       repeat_interleave_real=True, freqs_dtype=torch.float64)
            cos, sin = ext_cos.to(cos), ext_sin.to(sin)
        return cos, sin

    def forward(self, hidden_states: torch.Tensor) -> Any:
        call = self.call
        positions = None if call is None else call.frame_positions
        p_t, p_h, p_w = cast("tuple[int, int, int]", tuple(self.patch_size))
        full_cos, full_sin = self._tables()
        if positions is None and call is not None and hidden_states.shape[2] // p_t > full_cos.shape[0]:
            positions = torch.arange(hidden_states.shape[2] // p_t)  # longer than the table: extend it
        if positions is None:
            cos, sin = super().forward(hidden_states)
        else:
            _, _, frames, height, width = hidden_states.shape
            ppf, pph, ppw = frames // p_t, height // p_h, width // p_w
            if positions.numel() != ppf:
                raise ValueError(f"{positions.numel()} frame positions for {ppf} frames")
            t_cos, t_sin = self._time_table(int(positions.max()) + 1)
            index = positions.to(t_cos.device)
            split = [self.t_dim, self.h_dim, self.w_dim]
            parts = []
            for table, t_table in ((full_cos, t_cos), (full_sin, t_sin)):
                _, h_tab, w_tab = table.split(split, dim=1)
                grid = torch.cat([t_table[index].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                                  h_tab[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                                  w_tab[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1)], dim=-1)
                parts.append(grid.reshape(1, ppf * pph * ppw, 1, -1))
            cos, sin = parts
        # A plain 3-tuple: hooks that rebuild tuples (type(x)(...)) keep every element.
        return (cos, sin) if call is None else (cos, sin, call)


class CausalSelfAttnProcessor:
    """``attn1`` of a causal Wan block. Without a call state (a RoPE output of two elements) it is diffusers'
    bidirectional self-attention; otherwise mask / stream / commit as in the module docstring."""

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[Any, ...] | None = None) -> torch.Tensor:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        call: _Call | None = None
        if rotary_emb is not None:
            query = _apply_rope(query, rotary_emb[0], rotary_emb[1])
            key = _apply_rope(key, rotary_emb[0], rotary_emb[1])
            if len(rotary_emb) > 2:
                call = rotary_emb[2]
        if call is not None and call.mode == "mask":
            assert call.mask is not None
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=call.mask).transpose(1, 2)
        else:
            keys, values = key, value
            if call is not None:
                assert call.context is not None
                cached = call.context[self.layer]
                if cached is not None:
                    ctx_k, ctx_v = cached
                    keys, values = torch.cat([ctx_k, key], dim=1), torch.cat([ctx_v, value], dim=1)
                if call.mode == "commit":
                    call.writes[self.layer] = (key.detach(), value.detach())
            out = dispatch_attention_fn(query, keys, values, attn_mask=attention_mask, dropout_p=0.0,
                                        is_causal=False, backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        return cast("torch.Tensor", attn.to_out[1](attn.to_out[0](out)))


class CachedCrossAttnProcessor(WanAttnProcessor):
    """``attn2`` of a causal Wan block: inside a stream, no-grad forwards reuse the text keys/values computed
    once per stream (``cache``, per layer). Grad-enabled forwards always recompute them, so ``attn2.to_k``/
    ``to_v`` get their gradients and recomputation under activation checkpointing matches the forward."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: Any = None) -> torch.Tensor:
        cache = self.cache
        if cache is None or torch.is_grad_enabled() or attn.add_k_proj is not None or encoder_hidden_states is None:
            out: torch.Tensor = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                 rotary_emb)
            return out
        if self.layer not in cache:
            key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
            cache[self.layer] = (key, attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
        key, value = cache[self.layer]
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).type_as(query)
        return cast("torch.Tensor", attn.to_out[1](attn.to_out[0](out)))


def install_causal_attention(transformer: WanTransformer3DModel) -> None:
    """Swap in the causal RoPE and processors (no parameter or key changes)."""
    rope = transformer.rope
    if not isinstance(rope, CausalRope):
        rope.__class__ = CausalRope
    for layer, block in enumerate(cast("list[WanTransformerBlock]", transformer.blocks)):
        block.attn1.set_processor(CausalSelfAttnProcessor(layer))  # type: ignore[arg-type]
        block.attn2.set_processor(CachedCrossAttnProcessor(layer))  # type: ignore[arg-type]


class CausalWanModel(WanModel):
    """Wan 2.1 with block-causal self-attention (mask path), teacher forcing, and a KV-cached streaming path
    (:meth:`stream`); the attention rule is in the module docstring. One transformer: two-expert pipelines are
    refused. Context parallel is refused (the streaming cache and the mask are not split)."""

    streams: ClassVar[bool] = True  # the shared samplers generate block by block (fv_accel/causal_sampling.py)

    def __init__(self, *, role: str, transformer: WanTransformer3DModel, config: ModelConfig,
                 latent_stats: LatentStats | None = None, transformer_2: WanTransformer3DModel | None = None,
                 boundary_ratio: float | None = None) -> None:
        if transformer_2 is not None:
            raise ConfigError(f"models.{role}.init_from: family wan_causal takes one transformer; "
                              f"{config.init_from!r} is a two-expert pipeline")
        super().__init__(role=role, transformer=transformer, config=config, latent_stats=latent_stats)
        self.causal: CausalConfig = config.causal_or_default
        install_causal_attention(transformer)
        self._mask_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._stream: CausalStream | None = None

    @classmethod
    def from_config(cls, role: str, model_cfg: ModelConfig, *, dtype: torch.dtype,
                    latent_stats: LatentStats | None = None, on_meta: bool = False,
                    frozen_dtype: torch.dtype | None = None) -> WanModel:
        if read_boundary_ratio(role, model_cfg) is not None:  # before any weight is read
            raise ConfigError(f"models.{role}.init_from: family wan_causal takes one transformer; "
                              f"{model_cfg.init_from!r} is a two-expert pipeline (set subfolder to one expert)")
        return super().from_config(role, model_cfg, dtype=dtype, latent_stats=latent_stats, on_meta=on_meta,
                                   frozen_dtype=frozen_dtype)

    def enable_context_parallel(self, mesh: Any) -> None:
        raise ConfigError(f"models.{self.role}: context parallel (parallelism_config_cp_size > 1) is not "
                          "supported by family 'wan_causal'; set parallelism_config_cp_size to 1")

    def block_sizes(self, num_frames: int) -> list[int]:
        return partition(num_frames, self.causal.num_frames_per_block)

    # -- mask path ----------------------------------------------------------------------------------------
    def _tokens_per_frame(self, x: torch.Tensor) -> int:
        _, p_h, p_w = self.latent_patch_size
        return (x.shape[3] // p_h) * (x.shape[4] // p_w)

    def _token_mask(self, kind: str, frames: int, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
        key = (kind, frames, tokens_per_frame, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            sizes = self.block_sizes(frames)
            window, sink = self.causal.local_attn_frames, self.causal.sink_frames
            per_frame = (frame_mask(sizes, window, sink) if kind == "causal"
                         else teacher_forcing_frame_mask(sizes, window, sink))
            mask = per_frame.to(device).repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
            self._mask_cache = {key: mask}  # one clip shape at a time: the mask is N² bytes
        return mask

    def _call(self, call: _Call, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        rope = cast("CausalRope", self.transformer.rope)
        rope.call = call
        try:
            return self._expert_velocity(self.transformer, x, t, text)
        finally:
            rope.call = None

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        """Block-causal velocity of a whole clip [B, C, F, H, W]; ``t`` [B] or [B, F]."""
        mask = self._token_mask("causal", x_t.shape[2], self._tokens_per_frame(x_t), x_t.device)
        return self._call(_Call(mode="mask", mask=mask), x_t, t, text_embeds_bld)

    def predict_velocity_teacher_forced(self, x_t: torch.Tensor, t: torch.Tensor, x_clean: torch.Tensor,
                                        text_embeds_bld: torch.Tensor, *, t_clean: float = 0.0) -> torch.Tensor:
        """Velocity of the noisy clip ``x_t`` when each block b sees itself and the CLEAN frames of blocks < b
        (``x_clean`` embedded at ``t_clean``): one forward over [clean | noisy] (2F frames, mask
        :func:`teacher_forcing_frame_mask`), the two copies of a frame at one RoPE position."""
        if x_clean.shape != x_t.shape:
            raise ValueError(f"x_clean {list(x_clean.shape)} and x_t {list(x_t.shape)} differ in shape")
        batch, frames = x_t.shape[0], x_t.shape[2]
        t_bf = t.float()[:, None].expand(batch, frames) if t.ndim == 1 else t.float()
        t_all = torch.cat([torch.full_like(t_bf, float(t_clean)), t_bf], dim=1)
        mask = self._token_mask("teacher", frames, self._tokens_per_frame(x_t), x_t.device)
        positions = torch.arange(frames).repeat(2)
        call = _Call(mode="mask", mask=mask, frame_positions=positions)
        out = self._call(call, torch.cat([x_clean.to(x_t.dtype), x_t], dim=2), t_all, text_embeds_bld)
        return out[:, :, frames:].clone()

    # -- streaming ------------------------------------------------------------------------------------------
    def stream(self, text_embeds_bld: torch.Tensor, *, num_frames: int, latent_hw: tuple[int, int]) -> CausalStream:
        """A streaming rollout of ``num_frames`` latent frames of ``latent_hw`` (a context manager)."""
        return CausalStream(self, text_embeds_bld, num_frames=num_frames, latent_hw=latent_hw)


class CausalStream:
    """One rollout's caches (see :meth:`CausalWanModel.stream`). Cache layout per layer: keys (after RoPE) and
    values of the cached frames in frame order, [B, frames·tokens_per_frame, heads, head_dim]; ``frames`` lists
    their absolute indices. With a window it holds at most S + (W − S − smallest block) frames: the sinks and
    the most recent others (what the next block can see); older frames are dropped at commit (the roll)."""

    def __init__(self, model: CausalWanModel, text_embeds_bld: torch.Tensor, *, num_frames: int,
                 latent_hw: tuple[int, int]) -> None:
        self.model = model
        self.text = text_embeds_bld
        self.num_frames = num_frames
        self.latent_hw = latent_hw
        self.block_sizes: list[int] = model.block_sizes(num_frames)
        causal = model.causal
        self.block_starts: list[int] = block_starts(num_frames, causal.num_frames_per_block)
        self.window, self.sink = causal.local_attn_frames, causal.sink_frames
        self.capacity = None if self.window is None else self.sink + max(0, self.window - self.sink
                                                                          - min(self.block_sizes))
        """Frames kept (None: all)."""
        _, p_h, p_w = model.latent_patch_size
        self.tokens_per_frame = (latent_hw[0] // p_h) * (latent_hw[1] // p_w)
        self.frames: list[int] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._text_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._active = False

    def _cross_processors(self) -> list[CachedCrossAttnProcessor]:
        blocks = cast("list[WanTransformerBlock]", self.model.transformer_blocks())
        return [cast("CachedCrossAttnProcessor", block.attn2.processor) for block in blocks]

    def _clear(self) -> None:
        self.frames = []
        self.kv = None
        self._text_kv = {}
        for proc in self._cross_processors():
            proc.cache = None

    def __enter__(self) -> CausalStream:
        if self.model._stream is not None:
            raise RuntimeError(f"models.{self.model.role}: a stream is already open on this model")
        self._clear()
        self.model._stream = self
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._clear()
        self._active = False
        self.model._stream = None

    # -- cache bookkeeping --------------------------------------------------------------------------------
    def _needed(self, frame_start: int, frames: int) -> list[int]:
        end = frame_start + frames
        return [k for k in range(frame_start) if visible(end, k, self.window, self.sink)]

    def _token_index(self, slots: list[int]) -> torch.Tensor | slice:
        tpf = self.tokens_per_frame
        if not slots:
            return slice(0, 0)
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0] * tpf, (slots[-1] + 1) * tpf)
        device = self.text.device
        return (torch.tensor(slots, dtype=torch.long, device=device)[:, None] * tpf + torch.arange(tpf, device=device)).flatten()

    @staticmethod
    def _take(x: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
        return x[:, index] if isinstance(index, slice) else x.index_select(1, index)

    def _context(self, frame_start: int, frames: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        if not self._active:
            raise RuntimeError("CausalStream used outside its `with` block")
        if frame_start < 0 or frames < 1:
            raise ValueError(f"stream: block at frame {frame_start} with {frames} frames")
        needed = self._needed(frame_start, frames)
        missing = sorted(set(needed) - set(self.frames))
        if missing:
            raise ValueError(f"stream: block at frame {frame_start} needs frames {missing} that are not in the "
                             "cache; commit the blocks before it, in order")
        layers = len(self.model.transformer_blocks())
        if not needed or self.kv is None:
            return [None] * layers
        index = self._token_index([self.frames.index(k) for k in needed])
        return [(self._take(k, index), self._take(v, index)) for k, v in self.kv]

    def _run(self, call: _Call, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The text cache is attached for this call only: the model's other forwards (another text) inside the
        # `with` block must not see it.
        procs = self._cross_processors()
        for proc in procs:
            proc.cache = self._text_kv
        try:
            return self.model._call(call, x, t, self.text)
        finally:
            for proc in procs:
                proc.cache = None

    def _timesteps(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            return torch.full((x.shape[0],), float(t), device=x.device)
        return t

    # -- API ------------------------------------------------------------------------------------------------
    def predict_velocity(self, x_t_block: torch.Tensor, t: torch.Tensor, *, frame_start: int) -> torch.Tensor:
        """Velocity of one block at absolute frames [frame_start, frame_start + f), attending to the cached
        frames the rule allows plus itself. Writes nothing (safe under grad and activation checkpointing)."""
        frames = x_t_block.shape[2]
        call = _Call(mode="stream", context=self._context(frame_start, frames),
                     frame_positions=torch.arange(frame_start, frame_start + frames))
        return self._run(call, x_t_block, self._timesteps(t, x_t_block))

    def predict_x0(self, x_t_block: torch.Tensor, t: torch.Tensor, *, frame_start: int) -> torch.Tensor:
        t = self._timesteps(t, x_t_block)
        velocity = self.predict_velocity(x_t_block, t, frame_start=frame_start)
        return flow.x0_from_velocity(x_t_block.float(), velocity, t)

    @torch.no_grad()
    def commit(self, x_block: torch.Tensor, *, frame_start: int, t_ctx: float = 0.0) -> None:
        """Write the block's keys/values (a no-grad forward of ``x_block`` at ``t_ctx``) at its absolute frames.
        Frames already cached at or after ``frame_start`` are replaced (a rewind). Cache tensors are replaced,
        never written into, so views held by earlier calls (activation checkpointing) stay valid."""
        frames = x_block.shape[2]
        if self.frames and frame_start > self.frames[-1] + 1:
            raise ValueError(f"stream.commit at frame {frame_start}: the cache ends at frame {self.frames[-1]}; "
                             "commit the blocks in order")
        call = _Call(mode="commit", context=self._context(frame_start, frames),
                     frame_positions=torch.arange(frame_start, frame_start + frames))
        self._run(call, x_block, self._timesteps(t_ctx, x_block))
        kept = [k for k in self.frames if k < frame_start]
        new_frames = kept + list(range(frame_start, frame_start + frames))
        if self.capacity is not None:
            sinks = [k for k in new_frames if k < self.sink]
            rest = [k for k in new_frames if k >= self.sink]
            new_frames = sinks + rest[len(rest) - (self.capacity - len(sinks)):] if len(new_frames) > self.capacity \
                else new_frames
        old_index = self._token_index([self.frames.index(k) for k in new_frames if k < frame_start])
        new_index = self._token_index([k - frame_start for k in new_frames if k >= frame_start])
        # Layer by layer, each entry replaced by a new tensor (never written into: calls hold the tensors they
        # read, not this list), so a layer's old cache is freed as its new one is made: one layer's copy at a
        # time on top of the cache (Wan 14B, 21 frames, bf16: 671 MB), not a second cache (26.8 GB).
        first = self.kv is None
        layers = [] if self.kv is None else self.kv
        for layer in range(len(self.model.transformer_blocks())):
            block_k, block_v = call.writes[layer]
            parts_k, parts_v = [self._take(block_k, new_index)], [self._take(block_v, new_index)]
            if first:
                layers.append((torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)))
                continue
            old_k, old_v = layers[layer]
            parts_k.insert(0, self._take(old_k, old_index))
            parts_v.insert(0, self._take(old_v, old_index))
            del old_k, old_v
            layers[layer] = (torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1))
        self.kv = layers
        self.frames = new_frames

    def cache_bytes(self) -> int:
        """Bytes the self-attention cache holds now (text cache excluded)."""
        if self.kv is None:
            return 0
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)
