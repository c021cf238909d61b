"""Wan 2.1 / 2.2 family: diffusers ``WanTransformer3DModel``."""

from __future__ import annotations

import contextlib
import html
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from fv_accel.config import ModelConfig, check_pipeline_components, is_hub_id
from fv_accel.errors import CheckpointError, ConfigError
from fv_accel.models.base import Encoders, FrameRule, LatentStats, ModelBase
from fv_accel.models.prepare import prepare_transformer

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    from fv_accel.memory import Checkpointing, RoleSpec

logger = logging.getLogger(__name__)

# Only WanModel.predict_velocity calls the transformer, and it never hands out the output view (see there).
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPWanTransformer3DModel\) returned a view",
                        category=UserWarning)

#: A ~41k-parameter Wan transformer for tests and the toy world (text embeddings of width 32).
TINY_WAN_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}

#: Wan2.1-T2V-1.3B transformer configuration (for benchmarks with random weights).
WAN_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}


@contextlib.contextmanager
def _device_count_at_least_one() -> Iterator[None]:
    """diffusers' ``enable_parallelism`` picks a device as ``rank % torch.accelerator.device_count()``, which
    divides by zero on a CPU-only build; that device is unused by the Ulysses path, so report one there."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _read_json(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({type(exc).__name__}: {exc})") from None


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("diffusion_pytorch_model*"))


def read_latent_stats(role: str, model_cfg: ModelConfig, *, include_hub: bool = True) -> LatentStats | None:
    """``models.<role>.latent_stats`` → the statistics (see ``ModelConfig.latent_stats``). Reads JSON only."""
    key = f"models.{role}.latent_stats"
    choice = model_cfg.latent_stats
    if choice == "identity":
        return LatentStats(mean=None, std=None, origin="identity")
    names: tuple[str, ...]  # config files that may hold the statistics, in order
    if choice == "auto":
        source, names = model_cfg.init_from, ("vae/config.json",)
        missing = (f"'auto' needs vae/config.json with latents_mean/latents_std in models.{role}.init_from "
                   f"{source!r}, which has none (a transformer-only model?)")
    else:
        source, names = choice, ("vae/config.json", "config.json")
        missing = f"{source!r} has no vae/config.json or config.json with latents_mean/latents_std"
    fix = (f"set {key} to a pipeline or VAE directory (or Hub id) that has them, or to 'identity' if the data "
           "is already normalised")
    local = Path(source).expanduser()
    found: tuple[str, dict[str, Any]] | None = None
    if local.exists():
        for name in names:
            if (local / name).is_file():
                found = (name, _read_json(local / name, key))
                break
    elif not is_hub_id(source):
        raise ConfigError(f"{key}: local path {source!r} does not exist")
    elif not include_hub:
        return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        for name in names:
            try:
                path = hf_hub_download(source, name)
            except EntryNotFoundError:  # also: not in the cache under HF_HUB_OFFLINE=1
                continue
            except RepositoryNotFoundError:
                raise ConfigError(f"{key}: Hub repository {source!r} not found") from None
            except Exception as exc:  # network, HTTP: not a configuration problem
                raise CheckpointError(f"{key}: cannot read {name} of {source!r} ({type(exc).__name__}: "
                                      f"{(str(exc).strip().splitlines() or [''])[0]})") from None
            found = (name, _read_json(Path(path), key))
            break
    if found is None:
        raise ConfigError(f"{key}: {missing}; {fix}")
    name, data = found
    if not isinstance(data, dict) or "latents_mean" not in data or "latents_std" not in data:
        raise ConfigError(f"{key}: {name} of {source!r} has no latents_mean/latents_std; {fix}")
    subfolder = name.rpartition("/")[0]
    has_vae = not local.exists() or _has_weights(local / subfolder)
    return LatentStats(mean=tuple(float(v) for v in data["latents_mean"]),
                       std=tuple(float(v) for v in data["latents_std"]), origin=f"{source}/{name}",
                       vae_source=source if has_vae else None, vae_subfolder=subfolder)


def read_vae_factors(source: str, *, key: str) -> tuple[int, int]:
    """(spatial, temporal) compression of the VAE of pipeline ``source``: ``scale_factor_spatial`` and
    ``scale_factor_temporal`` of its ``vae/config.json``, which diffusers' ``WanPipeline`` reads the same way
    (Wan 2.2 TI2V-5B's 48-channel VAE: 16, 4). Wan 2.1 VAE configs carry neither: 8, 4 then, as for a source
    without a readable ``vae/config.json`` (loading its encoders then reports what is missing)."""
    default_spatial, default_temporal = WanModel.vae_spatial_factor, WanModel.vae_temporal_factor
    local = Path(source).expanduser()
    path: Path | None = local / "vae" / "config.json"
    if not local.exists():
        path = None
        if is_hub_id(source):
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

            try:
                path = Path(hf_hub_download(source, "vae/config.json"))
            except (EntryNotFoundError, RepositoryNotFoundError):  # also: not cached under HF_HUB_OFFLINE=1
                pass
            except Exception as exc:  # network, HTTP: not a configuration problem
                raise CheckpointError(f"{key}: cannot read vae/config.json of {source!r} ({type(exc).__name__}: "
                                      f"{(str(exc).strip().splitlines() or [''])[0]})") from None
    if path is None or not path.is_file():
        return default_spatial, default_temporal
    config = _read_json(path, key)
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} is not a JSON object")
    spatial = config.get("scale_factor_spatial") or default_spatial
    temporal = config.get("scale_factor_temporal") or default_temporal
    return int(spatial), int(temporal)


#: ``_class_name`` of the diffusers pipelines whose layout this family trains: text-to-video, with one expert
#: (Wan 2.1, Wan 2.2 TI2V-5B) or two (Wan 2.2 A14B). Image-to-video pipelines need image conditioning
#: (CLIP image embeddings or first-frame latents) that no method provides.
SUPPORTED_PIPELINES = ("WanPipeline",)


def _read_model_index(role: str, model_cfg: ModelConfig) -> dict[str, Any] | None:
    """``model_index.json`` of ``init_from`` (a pipeline), or None for a bare model / transformer-only source."""
    key = f"models.{role}.init_from"
    local = Path(model_cfg.init_from).expanduser()
    if local.exists():
        path = local / "model_index.json"
        return _read_json(path, key) if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        found = hf_hub_download(model_cfg.init_from, "model_index.json")
    except Exception:  # not a pipeline repository, or not cached offline: the transformer load reports the rest
        return None
    return _read_json(Path(found), key)


def read_boundary_ratio(role: str, model_cfg: ModelConfig) -> float | None:
    """The expert switch of a two-expert pipeline (Wan 2.2 A14B: ``transformer_2`` listed and ``boundary_ratio``
    set in ``model_index.json``), or None for one expert. Reads JSON only. ConfigError (exit 2) for a layout
    this family cannot train (an image-to-video pipeline, a second expert without a boundary, ``experts`` set
    on one expert), so nothing else trains silently in its place."""
    key = f"models.{role}.init_from"
    index = _read_model_index(role, model_cfg) if model_cfg.subfolder == "transformer" else None
    boundary: float | None = None
    if index is not None:
        name = index.get("_class_name")
        if name not in SUPPORTED_PIPELINES:
            missing = [c for c in ("image_encoder", "image_processor") if (index.get(c) or [None])[0]]
            needs = f" (it has {', '.join(missing)})" if missing else ""
            raise ConfigError(f"{key}: {model_cfg.init_from!r} is a {name} pipeline, which needs image "
                              f"conditioning{needs} that fv_accel does not provide; supported: "
                              f"{', '.join(SUPPORTED_PIPELINES)} (text-to-video)")
        if (index.get("transformer_2") or [None])[0]:
            ratio = index.get("boundary_ratio")
            if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
                raise ConfigError(f"{key}: {model_cfg.init_from!r} lists transformer_2 but its model_index.json "
                                  f"has boundary_ratio {ratio!r}; a number in (0, 1) is needed to route timesteps "
                                  "between the experts")
            boundary = float(ratio)
    if boundary is None and model_cfg.experts is not None:
        raise ConfigError(f"models.{role}.experts: {model_cfg.init_from!r} (subfolder {model_cfg.subfolder!r}) has "
                          "one transformer; experts applies to two-expert pipelines (transformer_2 and "
                          "boundary_ratio in model_index.json); remove it")
    return boundary


def check_text_to_video_transformer(role: str, config: Mapping[str, Any]) -> None:
    """ConfigError (exit 2) for a transformer that needs image conditioning (Wan I2V: ``image_dim`` set, or more
    input than output channels for the concatenated first-frame latents): it would train on wrong inputs."""
    image_dim = config.get("image_dim")
    c_in, c_out = config.get("in_channels"), config.get("out_channels") or config.get("in_channels")
    if image_dim is not None or c_in != c_out:
        raise ConfigError(f"models.{role}.init_from: an image-to-video transformer (image_dim={image_dim}, "
                          f"in_channels={c_in}, out_channels={c_out}) needs image embeddings and conditioning "
                          "latents that fv_accel does not provide; use a text-to-video Wan transformer")


def wan_forward_flops(config: Mapping[str, Any], latent_shape: Sequence[int], text_len: int) -> int:
    """Forward FLOPs of one sample through a Wan transformer with diffusers ``config`` (the counting convention
    of ``fv_accel/flops.py``). With D = heads·head_dim, N = (T/p_t)(H/p_h)(W/p_w) video tokens, L text tokens,
    F = ffn_dim, P = p_t·p_h·p_w, n layers::

        patch embedding       2·N·(C_in·P)·D
        time embedding        2·f·D + 2·D·D + 2·D·6D          (f = freq_dim)
        text embedding        2·L·D_text·D + 2·L·D·D
        per block             self-attention   4·2·N·D²  + 4·N²·D
                              cross-attention  2·2·N·D² + 2·2·L·D² + 4·N·L·D
                              feed-forward     2·2·N·D·F
        output projection     2·N·D·(C_out·P)

    Per-frame timesteps embed the time once per token instead of once per sample (N× the small time term),
    not counted here.
    """
    c_in, t, h, w = (int(x) for x in latent_shape)
    pt, ph, pw = (int(x) for x in config["patch_size"])
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent shape {list(latent_shape)} is not divisible by patch size {[pt, ph, pw]}")
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    n = (t // pt) * (h // ph) * (w // pw)
    length = int(text_len)
    patch = pt * ph * pw
    f_ffn = int(config["ffn_dim"])
    c_out = int(config.get("out_channels") or c_in)
    embed = 2 * n * (c_in * patch) * d
    time = 2 * int(config["freq_dim"]) * d + 2 * d * d + 2 * d * 6 * d
    text = 2 * length * int(config["text_dim"]) * d + 2 * length * d * d
    self_attn = 4 * 2 * n * d * d + 4 * n * n * d
    cross_attn = 2 * 2 * n * d * d + 2 * 2 * length * d * d + 4 * n * length * d
    ffn = 2 * 2 * n * d * f_ffn
    out = 2 * n * d * (c_out * patch)
    return embed + time + text + int(config["num_layers"]) * (self_attn + cross_attn + ffn) + out


def _clean_prompt(text: str) -> str:
    # Like diffusers' Wan pipeline prompt cleaning (ftfy when installed, HTML unescape, whitespace).
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class WanEncoders(Encoders):
    """A Wan pipeline's UMT5 text encoder (``text_encoder`` with its ``tokenizer``) and, for videos, its
    ``AutoencoderKLWan`` (``vae``), whose latent mean is stored unnormalised ``[C, T, H, W]`` as FastVideo does."""

    def __init__(self, *, tokenizer: Any, text_encoder: torch.nn.Module, vae: AutoencoderKLWan | None,
                 device: torch.device, text_len: int) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = device
        self.text_len = text_len

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> list[torch.Tensor]:
        tokens = self.tokenizer([_clean_prompt(c) for c in captions], padding="max_length",
                                max_length=self.text_len, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, :n].cpu() for i, n in enumerate(lengths)]

    @torch.no_grad()
    def encode_video(self, pixels_cthw: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise RuntimeError("WanEncoders: loaded without a VAE (vae_dtype=None), cannot encode videos")
        x = pixels_cthw.unsqueeze(0).to(self.device, next(self.vae.parameters()).dtype)
        return self.vae.encode(x).latent_dist.mean[0].float().cpu()


class WanModel(ModelBase):
    block_class_names = ("WanTransformerBlock",)
    has_memory_model = True
    text_encoder_components = ("tokenizer", "text_encoder")
    transformer: WanTransformer3DModel
    #: Wan 2.1's VAE (``AutoencoderKLWan``) maps 8×8 pixels to one latent cell and 4 frames to one latent frame
    #: (the first frame alone: clips have 4k+1 frames). A pipeline's own VAE may differ (TI2V-5B: 16×16 pixels):
    #: :meth:`frame_rule` with its ``source`` reads the factors from its ``vae/config.json``.
    vae_spatial_factor = 8
    vae_temporal_factor = 4
    #: ``patch_size`` (t, h, w) of every published Wan 2.1 / 2.2 transformer.
    default_patch_size = (1, 2, 2)
    #: LoRA's default targets: the self- and cross-attention projections (``attn1``/``attn2`` q, k, v and output)
    #: and both FFN linears of every block; not the embedders, the modulation or ``proj_out``.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

    @classmethod
    def role_memory_spec(cls, config: Mapping[str, Any], *, num_params: int, block_params: int, trainable: bool,
                         weight_bytes: int, activation_checkpointing: Checkpointing = "off", checkpoint_every: int = 1,
                         attention_backend: str | None = None) -> RoleSpec:
        from fv_accel.memory import wan_role_spec

        return wan_role_spec(config, num_params=num_params, block_params=block_params, trainable=trainable,
                             weight_bytes=weight_bytes, activation_checkpointing=activation_checkpointing,
                             checkpoint_every=checkpoint_every, attention_backend=attention_backend)

    @classmethod
    def diffusers_model_class(cls) -> str:
        return "WanTransformer3DModel"

    @classmethod
    def diffusers_pipeline_class(cls) -> str:
        return "WanPipeline"

    @classmethod
    def pixel_multiple(cls, patch_size: tuple[int, ...] | None = None, *, source: str | None = None) -> int:
        """Frame height and width must be multiples of this (16 for Wan 2.1, 32 for TI2V-5B): the VAE's spatial
        factor times the transformer's spatial patch, or the patching drops the last row/column of an odd
        latent side."""
        return cls.frame_rule(patch_size, source=source).pixel_multiple

    @classmethod
    def frame_rule(cls, patch_size: tuple[int, ...] | None = None, *, source: str | None = None) -> FrameRule:
        """With ``source`` (a pipeline) its VAE's factors (:func:`read_vae_factors`), else Wan 2.1's."""
        spatial, temporal = cls.vae_spatial_factor, cls.vae_temporal_factor
        if source is not None:
            spatial, temporal = read_vae_factors(source, key="--model")
        _, patch_h, patch_w = patch_size or cls.default_patch_size
        return FrameRule(temporal_factor=temporal, spatial_factor=spatial,
                         pixel_multiple=spatial * math.lcm(patch_h, patch_w))

    @classmethod
    def load_encoders(cls, source: str, *, key: str, device: torch.device, text_len: int, text_dtype: torch.dtype,
                      vae_dtype: torch.dtype | None = None, vae_tiling: bool = False) -> WanEncoders:
        from transformers import AutoTokenizer, UMT5EncoderModel

        check_pipeline_components(source, [*cls.text_encoder_components] + (["vae"] if vae_dtype is not None else []),
                                  what=f"{key}: {source!r}", why="a diffusers pipeline directory is needed")
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder: torch.nn.Module = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder",
                                                                         torch_dtype=text_dtype)
        text_encoder.to(device).eval().requires_grad_(False)
        vae = None
        if vae_dtype is not None:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype)
            vae.to(device).eval().requires_grad_(False)
            if vae_tiling:
                vae.enable_tiling()  # bounded activation memory for large frames; latents change slightly
        return WanEncoders(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, device=device,
                           text_len=text_len)

    def transformer_blocks(self, module: torch.nn.Module | None = None) -> Sequence[torch.nn.Module]:
        return list(cast("WanTransformer3DModel", module or self.transformer).blocks)

    def enable_context_parallel(self, mesh: Any) -> None:
        """Ulysses context parallel through diffusers' plan for this transformer (``_cp_plan``): the video
        tokens and RoPE tables are split after patch embedding, each attention exchanges heads for tokens
        (all-to-all, so the head count must divide by the degree), the text stays whole, and ``proj_out``'s
        output is gathered. Ring attention is not offered: the CPU backend cannot run it, so it is untested."""
        from diffusers import ContextParallelConfig

        degree = mesh.size()
        heads = int(self.transformer.config["num_attention_heads"])
        if heads % degree:
            raise ConfigError(f"models.{self.role}: parallelism_config_cp_size {degree} does not divide the "
                              f"transformer's {heads} attention heads (Ulysses splits heads); use a divisor of "
                              f"{heads}")
        # diffusers looks the group up by the dimension names "ring" and "ulysses": the same ranks as the cp
        # sub-mesh, seen as a (1, degree) mesh.
        config = ContextParallelConfig(ulysses_degree=degree,
                                       mesh=mesh._unflatten(0, (1, degree), ("ring", "ulysses")))
        backend = self.config.attention_backend or "native"
        try:
            with _device_count_at_least_one():
                for expert in self.modules().values():
                    # mypy sees diffusers' dummy class behind the public name
                    cast("WanTransformer3DModel", expert).enable_parallelism(config=config)  # type: ignore[arg-type]
        except ValueError as exc:  # diffusers refuses attention backends without context-parallel support
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(f"models.{self.role}.attention_backend {backend!r} cannot run under "
                              f"parallelism_config_cp_size {degree}: {first}") from None

    def forward_flops(self, latent_shape: Sequence[int], text_len: int) -> int | None:
        return wan_forward_flops(dict(self.transformer.config), latent_shape, text_len)

    @property
    def latent_patch_size(self) -> tuple[int, int, int]:
        t, h, w = (int(p) for p in self.transformer.config["patch_size"])
        return t, h, w

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config["in_channels"])

    def __init__(
        self,
        *,
        role: str,
        transformer: WanTransformer3DModel,
        config: ModelConfig,
        latent_stats: LatentStats | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
    ) -> None:
        super().__init__(role=role, transformer=transformer, config=config)
        if (transformer_2 is None) != (boundary_ratio is None):
            raise ValueError("transformer_2 and boundary_ratio go together")
        self.transformer_2 = transformer_2
        """The low-noise expert of a two-expert pipeline (Wan 2.2 A14B); None: one transformer."""
        self.boundary_ratio = boundary_ratio
        """Timesteps t ≥ boundary_ratio·1000 go to ``transformer`` (high noise), the others to ``transformer_2``."""
        self.latent_stats = latent_stats or LatentStats(mean=None, std=None, origin="identity")
        """Statistics of this model's latent space (``models.<role>.latent_stats``); None given: identity."""
        channels = transformer.config["in_channels"]
        mean_c, std_c = self.latent_stats.values(channels)
        mean = torch.tensor(mean_c, dtype=torch.float32)
        std = torch.tensor(std_c, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ConfigError(f"models.{role}.latent_stats: {self.latent_stats.origin} has {mean.numel()} "
                              f"channels, the transformer expects {channels}")
        self._mean = mean.view(1, channels, 1, 1, 1)
        self._std = std.view(1, channels, 1, 1, 1)

    @classmethod
    def resolve_latent_stats(cls, role: str, model_cfg: ModelConfig, *, include_hub: bool = True
                             ) -> LatentStats | None:
        return read_latent_stats(role, model_cfg, include_hub=include_hub)

    @classmethod
    def from_config(cls, role: str, model_cfg: ModelConfig, *, dtype: torch.dtype,
                    latent_stats: LatentStats | None = None, on_meta: bool = False,
                    frozen_dtype: torch.dtype | None = None) -> WanModel:
        """Load ``init_from``; the statistics are resolved first (when not given), so a role without them stops
        before its weights are read. ``on_meta``: build the transformer without reading any weight (see
        :meth:`empty_transformer`); :func:`fv_accel.build.shard_roles` fills it after sharding."""
        # The defining module: diffusers' top-level name is typed as its dummy (torch-less) stand-in.
        from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

        stats = latent_stats or read_latent_stats(role, model_cfg)
        boundary = read_boundary_ratio(role, model_cfg)
        configs = {"transformer": model_cfg}
        if boundary is not None:
            configs["transformer_2"] = model_cfg.model_copy(update={"subfolder": "transformer_2"})
        trained = cls.trained_module_names(model_cfg, two_experts=boundary is not None)
        experts: dict[str, WanTransformer3DModel] = {}
        for name, cfg in configs.items():
            check_text_to_video_transformer(role, WanTransformer3DModel.load_config(cfg.init_from,
                                                                                  subfolder=cfg.subfolder or None))
            # A frozen expert of a trained role is stored like a frozen role.
            wanted = dtype if name in trained or frozen_dtype is None else frozen_dtype
            if on_meta:
                experts[name] = cls.empty_transformer(cfg, dtype=wanted)
            else:
                experts[name] = WanTransformer3DModel.from_pretrained(cfg.init_from, subfolder=cfg.subfolder or None,
                                                                      torch_dtype=wanted)
        return cls(role=role, transformer=experts["transformer"], config=model_cfg, latent_stats=stats,
                   transformer_2=experts.get("transformer_2"), boundary_ratio=boundary)

    @staticmethod
    def trained_module_names(model_cfg: ModelConfig, *, two_experts: bool) -> tuple[str, ...]:
        """The modules that train: none for a frozen role; with two experts those ``models.<role>.experts`` picks."""
        if not model_cfg.trainable:
            return ()
        if not two_experts:
            return ("transformer",)
        return {"both": ("transformer", "transformer_2"), "high": ("transformer",),
                "low": ("transformer_2",)}[model_cfg.experts or "both"]

    def modules(self) -> dict[str, torch.nn.Module]:
        found: dict[str, torch.nn.Module] = {"transformer": self.transformer}
        if self.transformer_2 is not None:
            found["transformer_2"] = self.transformer_2
        return found

    def trained_modules(self) -> tuple[str, ...]:
        return self.trained_module_names(self.config, two_experts=self.transformer_2 is not None)

    def lora_modules(self) -> tuple[str, ...]:
        # the experts ``models.<role>.experts`` trains, whether or not this instance is loaded to train
        return self.trained_module_names(self.config.model_copy(update={"trainable": True}),
                                         two_experts=self.transformer_2 is not None)

    def module_config(self, name: str) -> ModelConfig:
        if name == "transformer_2":
            return self.config.model_copy(update={"subfolder": "transformer_2"})
        return super().module_config(name)

    @staticmethod
    def empty_transformer(model_cfg: ModelConfig, *, dtype: torch.dtype) -> WanTransformer3DModel:
        """The transformer ``from_pretrained(init_from, torch_dtype=dtype)`` returns, with its parameters on the
        ``meta`` device: same default dtype at construction, same fp32 parameters (``_keep_in_fp32_modules``),
        and the buffers computed on the host as its constructor computes them (the non-persistent RoPE tables,
        which no weight file holds). Reads ``config.json`` only."""
        from accelerate import init_empty_weights
        from diffusers import WanTransformer3DModel

        config = WanTransformer3DModel.load_config(model_cfg.init_from, subfolder=model_cfg.subfolder or None)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with init_empty_weights(include_buffers=False):
                transformer = WanTransformer3DModel.from_config(config)
        finally:
            torch.set_default_dtype(previous)
        keep_fp32 = set(transformer._keep_in_fp32_modules or ())
        for name, param in transformer.named_parameters():
            if param.is_floating_point():
                wanted = torch.float32 if keep_fp32 & set(name.split(".")) else dtype
                param.data = param.data.to(wanted)
        transformer.register_to_config(_name_or_path=model_cfg.init_from)
        return transformer.eval()

    @classmethod
    def weight_files(cls, role: str, model_cfg: ModelConfig) -> list[Path]:
        """The safetensors files :meth:`empty_transformer`'s parameters are filled from."""
        from fv_accel.models.sharded_load import diffusers_weight_files

        return diffusers_weight_files(model_cfg.init_from, model_cfg.subfolder, key=f"models.{role}.init_from")

    @classmethod
    def from_transformer(
        cls,
        role: str,
        transformer: WanTransformer3DModel,
        model_cfg: ModelConfig,
        *,
        latent_stats: LatentStats | None = None,
    ) -> WanModel:
        """Wrap an already built transformer and prepare it as a loaded role is (:func:`prepare_transformer`:
        requires_grad, attention backend, activation checkpointing, compile); benchmarks and tests build
        random-weight transformers this way. No ``latent_stats``: identity."""
        model = cls(role=role, transformer=transformer, config=model_cfg, latent_stats=latent_stats)
        prepare_transformer(model)
        return model

    def load_vae(self) -> torch.nn.Module | None:
        """The VAE the latent statistics came from (identity: none)."""
        source = self.latent_stats.vae_source
        if source is None:
            return None
        from diffusers import AutoencoderKLWan

        # fp32: Wan's VAE is decoded in fp32 by diffusers' own pipelines too (bf16 decoding bands colours).
        vae = AutoencoderKLWan.from_pretrained(source, subfolder=self.latent_stats.vae_subfolder or None,
                                               torch_dtype=torch.float32)
        logger.info("%s: decoding validation videos with the VAE of %s", self.role, source)
        return vae.to(self.device).eval().requires_grad_(False)

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return (latents_bcthw - self._mean.to(latents_bcthw.device)) / self._std.to(latents_bcthw.device)

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw * self._std.to(latents_bcthw.device) + self._mean.to(latents_bcthw.device)

    def fp32_modules(self, module: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """The modules diffusers keeps in fp32 (``_keep_in_fp32_modules``: the time embedder, the blocks'
        affine ``norm2``) that hold parameters, outermost only. Parameterless ones (RoPE, ``norm1``/``norm3``,
        which compute in fp32 anyway) need no unit. ``scale_shift_table`` is a parameter of the block (and the
        root) itself, not a module: FSDP2's policy is per unit, so it is gathered in bf16 with its unit."""
        transformer = module or self.transformer
        keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
        found: list[tuple[str, torch.nn.Module]] = []
        for name, sub in transformer.named_modules():
            if name.rpartition(".")[2] not in keep or not any(True for _ in sub.parameters()):
                continue
            if not any(name.startswith(f"{outer}.") for outer, _ in found):
                found.append((name, sub))
        return [sub for _, sub in found]

    def per_token_timesteps(self, t_bf: torch.Tensor, latent_shape_bcfhw: Sequence[int]) -> torch.Tensor:
        """Per-frame timesteps [B, F] → one per video token [B, N], in the transformer's token order (frame,
        then row, then column of patches): the 2-D ``timestep`` diffusers' ``WanTransformer3DModel`` takes
        (as Wan 2.2 TI2V does), which modulates each token with its own time embedding."""
        _, _, frames, height, width = (int(x) for x in latent_shape_bcfhw)
        patch_t, patch_h, patch_w = self.latent_patch_size
        if t_bf.ndim != 2 or t_bf.shape[1] != frames:
            raise ValueError(f"per-frame timesteps of shape {list(t_bf.shape)} for latents with {frames} frames: "
                             f"expected [B, {frames}]")
        if patch_t != 1:
            raise ValueError(f"models.{self.role}: per-frame timesteps need a temporal patch of 1, the transformer "
                             f"folds {patch_t} latent frames into one token")
        return t_bf.float().repeat_interleave((height // patch_h) * (width // patch_w), dim=1)

    def high_noise_mask(self, t: torch.Tensor) -> torch.Tensor:
        """Which samples the high-noise expert (``transformer``) takes: t ≥ boundary·1000, as diffusers'
        ``WanPipeline`` switches. Per-frame timesteps [B, F] route a sample by its noisiest frame (the max):
        one expert per sample, chosen by the frame that needs the most denoising."""
        assert self.boundary_ratio is not None
        t_b = t if t.ndim == 1 else t.amax(dim=1)
        return t_b >= self.boundary_ratio * 1000

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        """One expert per sample with two experts (:meth:`high_noise_mask`): the batch is split by expert and
        re-joined in order. Reading the split costs a device→host sync per forward. An expert with no sample
        in the batch still runs, on the first sample, adding 0× its output to the result, (1) under FSDP2 over
        several ranks, where every rank must call both experts in the same order (their all-gathers and
        reduce-scatters are collectives), and (2) when it trains and gradients are on: it then gets zero
        gradients rather than none, so AdamW steps (and keeps state for) both experts at every step of the
        role, on one process as on many, and a checkpoint always holds both experts' optimizer state."""
        if self.transformer_2 is None:
            return self._expert_velocity(self.transformer, x_t, t, text_embeds_bld)
        high = self.high_noise_mask(t)
        out = torch.empty(x_t.shape, dtype=torch.float32, device=x_t.device)
        collective = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        trained = self.trained_modules() if torch.is_grad_enabled() else ()
        keep_alive: list[torch.Tensor] = []
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        experts = (("transformer", self.transformer, high), ("transformer_2", self.transformer_2, ~high))
        for name, expert, mask in experts:
            index = mask.nonzero().squeeze(1)
            if index.numel():
                parts.append((index, self._expert_velocity(expert, x_t[index], t[index], text_embeds_bld[index])))
            elif collective or name in trained:
                # At a timestep of its own range: an expert never evaluates the other's noise levels.
                edge = float(self.boundary_ratio or 0) * 1000
                t_own = t[:1].clamp(min=edge) if name == "transformer" else t[:1].clamp(max=edge - 1.0)
                keep_alive.append(self._expert_velocity(expert, x_t[:1], t_own, text_embeds_bld[:1]))
        # index_put (out-of-place) keeps the graph of both parts; rows are disjoint and cover the batch.
        for index, velocity in parts:
            out = out.index_put((index,), velocity)
        for velocity in keep_alive:
            out = out + 0.0 * velocity.sum()
        return out

    def _expert_velocity(self, expert: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                         text_embeds_bld: torch.Tensor) -> torch.Tensor:
        # FSDP2 leaves inputs alone (runtime.mixed_precision_policy): the latents and text go in the blocks'
        # compute dtype, the timestep in fp32 exactly as given (the sinusoidal embedding at t ≈ 1000 changes
        # completely with a bf16 rounding of t).
        dtype = self.compute_dtype
        timestep = t.float() if t.ndim == 1 else self.per_token_timesteps(t, x_t.shape)
        out = expert(
            hidden_states=x_t.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text_embeds_bld.to(dtype),
            return_dict=False,
        )[0]
        # The transformer's output is a view (its final reshape), which FSDP2 warns about: an in-place op on
        # it would drop the pre-backward hook. Callers get a tensor of their own, so it never happens.
        return out.float() if out.dtype != torch.float32 else out.clone()
