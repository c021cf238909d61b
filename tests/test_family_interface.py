"""The family interface (``fv_accel.models.base.ModelBase``): generic modules ask the family, per-frame timesteps,
the one prepare sequence, and the config's ``family`` names agreeing with the registry."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import torch
from diffusers import WanTransformer3DModel

from fv_accel import flow
from fv_accel.config import ModelConfig
from fv_accel.errors import ConfigError
from fv_accel.models import FAMILIES, Encoders, FrameRule, ModelBase, load_role_model, prepare_transformer
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel

T = 3  # latent frames


def _tiny_wan(**cfg: object) -> WanModel:
    torch.manual_seed(0)
    return WanModel(role="student", transformer=WanTransformer3DModel(**TINY_WAN_CONFIG).eval(),
                    config=ModelConfig(init_from="unused", **cfg))  # type: ignore[arg-type]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, T, 8, 8, generator=gen), torch.randn(2, 8, 32, generator=gen)


def _compiled(blocks: list[torch.nn.Module]) -> list[bool]:
    return [getattr(block, "_compiled_call_impl", None) is not None for block in blocks]


# -- per-frame timesteps ---------------------------------------------------------------------------------------
def test_per_frame_timesteps_all_equal_match_per_sample_timesteps() -> None:
    model = _tiny_wan()
    x, text = _inputs()
    t_b = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        oracle = model.predict_velocity(x, t_b, text)  # diffusers' own [B] path
        per_frame = model.predict_velocity(x, t_b[:, None].expand(2, T), text)
    torch.testing.assert_close(per_frame, oracle, rtol=1e-5, atol=1e-6)


def test_per_frame_timesteps_modulate_each_frame_with_its_own_time() -> None:
    """With both attentions' output projections zeroed no token sees another, so frame f of a per-frame call must
    equal frame f of a per-sample call at frame f's time (the oracle), and the frames differ from each other."""
    model = _tiny_wan()
    with torch.no_grad():
        for block in model.transformer.blocks:
            for attn in (block.attn1, block.attn2):
                attn.to_out[0].weight.zero_()
                attn.to_out[0].bias.zero_()
    x, text = _inputs()
    t_bf = torch.tensor([[100.0, 500.0, 900.0], [700.0, 300.0, 50.0]])
    with torch.no_grad():
        got = model.predict_velocity(x, t_bf, text)
        for f in range(T):
            want = model.predict_velocity(x, t_bf[:, f].contiguous(), text)[:, :, f]
            torch.testing.assert_close(got[:, :, f], want, rtol=1e-5, atol=1e-6, msg=f"frame {f}")
            uniform = model.predict_velocity(x, t_bf[:, (f + 1) % T].contiguous(), text)[:, :, f]
            assert not torch.allclose(got[:, :, f], uniform, atol=1e-3)


def test_per_frame_timesteps_must_have_one_per_latent_frame() -> None:
    model = _tiny_wan()
    x, text = _inputs()
    with pytest.raises(ValueError, match=r"expected \[B, 3\]"):
        model.predict_velocity(x, torch.full((2, T + 1), 500.0), text)


def test_flow_helpers_and_predict_x0_take_per_frame_timesteps() -> None:
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, T, 2, 2, generator=gen), torch.randn(2, 4, T, 2, 2, generator=gen)
    t_bf = torch.tensor([[0.0, 400.0, 1000.0], [250.0, 500.0, 750.0]])
    x_t = flow.add_noise(x0, noise, t_bf)
    for b in range(2):
        for f in range(T):
            s = t_bf[b, f].item() / 1000
            torch.testing.assert_close(x_t[b, :, f], (1 - s) * x0[b, :, f] + s * noise[b, :, f])

    model = _tiny_wan()
    x, text = _inputs()
    t_bf = torch.tensor([[100.0, 500.0, 900.0], [700.0, 300.0, 50.0]])
    with torch.no_grad():
        v = model.predict_velocity(x, t_bf, text)
        x0_hat = model.predict_x0(x, t_bf, text)
    for b in range(2):
        for f in range(T):
            s = t_bf[b, f].item() / 1000
            torch.testing.assert_close(x0_hat[b, :, f], x[b, :, f] - s * v[b, :, f])


# -- generic modules ask the family ----------------------------------------------------------------------------
class _CountingFamily(ModelBase):
    """A family defined here, unknown to fv_accel: what generic code learns from it, it must have asked."""

    normalize_latents = denormalize_latents = predict_velocity = None  # type: ignore[assignment]

    def forward_flops(self, latent_shape, text_len):  # type: ignore[no-untyped-def]
        c, t, h, w = latent_shape
        return 7 * c * t * h * w + text_len

    @classmethod
    def frame_rule(cls, patch_size=None, *, source=None) -> FrameRule:  # type: ignore[no-untyped-def]
        return FrameRule(temporal_factor=8, spatial_factor=4, pixel_multiple=4)


def test_model_forward_flops_asks_the_family() -> None:
    from fv_accel.flops import model_forward_flops

    assert model_forward_flops(_CountingFamily.__new__(_CountingFamily), (2, 3, 4, 5), 6) == 7 * 120 + 6
    model = _tiny_wan()
    from fv_accel.models.wan import wan_forward_flops

    assert model_forward_flops(model, (16, 2, 8, 8), 8) == wan_forward_flops(TINY_WAN_CONFIG, (16, 2, 8, 8), 8)


def test_frame_rule_arithmetic() -> None:
    rule = WanModel.frame_rule()
    assert rule == FrameRule(temporal_factor=4, spatial_factor=8, pixel_multiple=16)
    assert [n for n in range(1, 14) if rule.valid_num_frames(n)] == [1, 5, 9, 13]
    assert rule.num_frames_text == "4k+1" and rule.nearest_num_frames(8) == (5, 9)
    assert rule.nearest_num_frames(0) == (1, 5)


def test_preprocess_checks_the_chosen_familys_frame_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fv_accel.data.preprocess import PreprocessOptions, run_preprocess

    monkeypatch.setitem(FAMILIES, "counting", _CountingFamily)
    opts = PreprocessOptions(model="unused", family="counting", captions=tmp_path / "none.json",
                             output=tmp_path / "out", videos=tmp_path, num_frames=5, height=16, width=16)
    # 5 frames: valid for Wan (4k+1), not for this family (8k+1)
    with pytest.raises(ConfigError, match=r"--num-frames must be 8k\+1 for the counting VAE \(e\.g\. 1 or 9\)"):
        run_preprocess(opts, rank=0, world_size=1, device=torch.device("cpu"), show_progress=False)
    opts.num_frames, opts.height = 9, 6
    with pytest.raises(ConfigError, match="--height/--width must be multiples of 4 for counting"):
        run_preprocess(opts, rank=0, world_size=1, device=torch.device("cpu"), show_progress=False)
    opts.family = "nope"
    with pytest.raises(ConfigError, match="--family: unknown model family 'nope'"):
        run_preprocess(opts, rank=0, world_size=1, device=torch.device("cpu"), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_context_parallel_is_refused_naming_the_family() -> None:
    """The interface's default, for a family that does not override it (Wan does: tests/test_context_parallel.py)."""
    with pytest.raises(ConfigError) as info:
        ModelBase.enable_context_parallel(_tiny_wan(), mesh=None)
    assert str(info.value) == "models.student: context parallel is not supported by family 'wan' yet"


def test_config_family_names_are_the_registry() -> None:
    """The config's ``family`` Literal is the schema users see; it must list exactly the registered families."""
    assert set(get_args(ModelConfig.model_fields["family"].annotation)) == set(FAMILIES)


# -- the one prepare sequence ----------------------------------------------------------------------------------
class _FirstBlockOnly(WanModel):
    def transformer_blocks(self, module: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        return [(module or self.transformer).blocks[0]]


def test_prepare_acts_on_the_familys_blocks() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(init_from="unused", compile="regional", activation_checkpointing="full")
    model = _FirstBlockOnly(role="student", transformer=WanTransformer3DModel(**TINY_WAN_CONFIG).eval(), config=cfg)
    prepare_transformer(model)
    assert _compiled(list(model.transformer.blocks)) == [True, False]
    assert model.transformer.training and model.transformer.gradient_checkpointing
    assert all(p.requires_grad for p in model.transformer.parameters())


def test_prepare_freezes_a_frozen_role_without_checkpointing_it() -> None:
    model = _tiny_wan(trainable=False, compile="regional", activation_checkpointing="full")
    model.transformer.train()
    prepare_transformer(model)
    assert not any(p.requires_grad for p in model.transformer.parameters())
    assert not model.transformer.training and not model.transformer.gradient_checkpointing
    assert _compiled(list(model.transformer.blocks)) == [True, True]


def test_loading_a_role_prepares_it(toy_root: Path) -> None:
    cfg = ModelConfig(init_from=str(toy_root / "init"), latent_stats="identity", trainable=False, compile="regional")
    model = load_role_model("teacher", cfg, mixed_precision="no")
    assert _compiled(list(model.transformer_blocks())) == [True] * TINY_WAN_CONFIG["num_layers"]
    assert not any(p.requires_grad for p in model.transformer.parameters()) and not model.transformer.training


class _FixedEncoders(Encoders):
    """Caption i → ``[i + 1, 4]`` filled with i: what the file must then hold."""

    def encode_text(self, captions: list[str]) -> list[torch.Tensor]:
        return [torch.full((i + 1, 4), float(i)) for i in range(len(captions))]

    def encode_video(self, pixels_cthw: torch.Tensor) -> torch.Tensor:
        raise AssertionError("validation prompts encode no video")


def test_validation_prompts_are_encoded_by_the_students_family(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    from fv_accel.callbacks.validation import ValidationCallback
    from fv_accel.config import RunConfig
    from fv_accel.data.dataset import decode_tensor

    asked: list[tuple[str, str, int]] = []

    class _EncodingFamily(_CountingFamily):
        @classmethod
        def load_encoders(cls, source, *, key, device, text_len, text_dtype,  # type: ignore[no-untyped-def]
                          vae_dtype=None, vae_tiling=False):
            asked.append((source, key, text_len))
            return _FixedEncoders()

    monkeypatch.setitem(FAMILIES, "wan", _EncodingFamily)  # the config's Literal only admits registered names
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "some/pipeline"}},
        "method": {"name": "finetune"},
        "training": {"data": {"text_len": 8}, "checkpoint": {"output_dir": str(tmp_path / "out")},
                     "tracker": {"backends": []}},
        "callbacks": {"validation": {"prompts": ["a cat", "a dog"]}},
    })
    assert cfg.callbacks.validation is not None
    out = ValidationCallback(cfg.callbacks.validation, cfg).encode_captions(None)
    assert asked == [("some/pipeline", "models.student.init_from", 8)]
    rows = pq.read_table(out).to_pylist()
    assert [r["caption"] for r in rows] == ["a cat", "a dog"]
    for i, row in enumerate(rows):
        got = decode_tensor(row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"],
                            where="prompts")
        assert torch.equal(got, torch.full((i + 1, 4), float(i)))


def test_accelerator_default_names_no_family_block(single_process_dist) -> None:
    """build.shard_roles sets each role's block names on the plugin; the default names none, and a model sharded
    directly is wrapped per its own ``_no_split_modules`` (diffusers' Wan: its blocks)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    assert single_process_dist.state.fsdp_plugin.transformer_cls_names_to_wrap is None
    sharded = fsdp2_prepare_model(single_process_dist, WanTransformer3DModel(**TINY_WAN_CONFIG))
    assert all(isinstance(block, FSDPModule) for block in sharded.blocks)


def test_the_memory_estimate_asks_the_family() -> None:
    """The dry run's activation model comes from the family: none for a family without one (the summary says
    'unknown'), the family's own spec otherwise (Wan: heads × head_dim is the hidden size)."""
    from types import SimpleNamespace

    from fv_accel.memory import role_shapes_from_run

    counting = _CountingFamily.__new__(_CountingFamily)
    assert role_shapes_from_run(SimpleNamespace(role_models={"student": counting})) is None
    wan = _tiny_wan()
    shapes = role_shapes_from_run(SimpleNamespace(role_models={"student": wan}))
    assert shapes is not None and shapes["student"].family == "wan"
    assert shapes["student"].num_params == sum(p.numel() for p in wan.transformer.parameters())
    spec = FAMILIES["wan"].role_memory_spec(shapes["student"].config, num_params=10, block_params=1,
                                            trainable=True, weight_bytes=4)
    heads, head_dim = TINY_WAN_CONFIG["num_attention_heads"], TINY_WAN_CONFIG["attention_head_dim"]
    assert spec.hidden_dim == heads * head_dim and spec.num_blocks == TINY_WAN_CONFIG["num_layers"]
