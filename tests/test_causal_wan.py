"""The causal Wan family (``fv_accel/models/wan_causal.py``): the attention rule, the mask path against the
bidirectional Wan, causality, streaming against the masked forward (with and without window and sinks, beyond
the RoPE table), teacher forcing against its truncated-clip oracle, cache lifetime, activation checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_tiny_wan_pipeline, run_torchrun
from diffusers import WanTransformer3DModel

from fv_accel.config import CausalConfig, ModelConfig
from fv_accel.errors import ConfigError
from fv_accel.models import FAMILIES, is_on_meta, load_role_model, materialize_roles
from fv_accel.models.checkpointing import apply_activation_checkpointing
from fv_accel.models.lora import base_weight_name, is_adapter_name, merge_into
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel
from fv_accel.models.wan_causal import CausalRope, CausalWanModel, frame_mask, teacher_forcing_frame_mask

HW = (4, 4)  # latent side → 2×2 = 4 tokens per frame
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _transformer(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_WAN_CONFIG).eval()


def _causal(per_block: int = 2, window: int | None = None, sink: int = 0, seed: int = 0) -> CausalWanModel:
    cfg = ModelConfig(init_from="unused", family="wan_causal",
                      causal=CausalConfig(num_frames_per_block=per_block, local_attn_frames=window, sink_frames=sink))
    return CausalWanModel(role="student", transformer=_transformer(seed), config=cfg)


def _clip(frames: int, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, *HW, generator=gen), torch.randn(batch, 6, 32, generator=gen)


# -- the attention rule ----------------------------------------------------------------------------------------
def test_frame_mask_by_hand() -> None:
    # blocks [1, 2, 2]; window 3 frames of which 1 sink: a block ending at e sees [e − 2, e) ∪ {0}.
    want = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 1, 1, 1],  # frame 1 is outside [3, 5) and not a sink
        [1, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(frame_mask([1, 2, 2], 4, 1), want)
    full = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(frame_mask([1, 2], None, 0), full)
    # teacher forcing, blocks [1, 2], no window: [clean0 clean1 clean2 | noisy0 noisy1 noisy2]
    tf = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [1, 0, 0, 0, 1, 1],
        [1, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(teacher_forcing_frame_mask([1, 2], None, 0), tf)


def test_registered_and_block_sizes() -> None:
    assert FAMILIES["wan_causal"] is CausalWanModel
    assert _causal(per_block=3).block_sizes(8) == [2, 3, 3]


# -- mask path -------------------------------------------------------------------------------------------------
def test_one_block_covering_the_clip_equals_bidirectional_wan() -> None:
    frames = 3
    causal = _causal(per_block=frames)
    plain = WanModel(role="student", transformer=_transformer(), config=ModelConfig(init_from="unused"))
    x, text = _clip(frames)
    t_b = torch.tensor([300.0, 800.0])
    t_bf = torch.tensor([[100.0, 500.0, 900.0], [700.0, 300.0, 50.0]])
    with torch.no_grad():
        for t in (t_b, t_bf):
            torch.testing.assert_close(causal.predict_velocity(x, t, text), plain.predict_velocity(x, t, text), **TOL)
        # outside the class (no call state) the transformer is plain Wan too
        torch.testing.assert_close(causal.transformer(x, t_b, text, return_dict=False)[0],
                                   plain.transformer(x, t_b, text, return_dict=False)[0], **TOL)


@pytest.mark.parametrize(("window", "sink"), [(None, 0), (4, 1)])
def test_block_output_ignores_later_frames_and_sees_earlier_ones(window: int | None, sink: int) -> None:
    model = _causal(per_block=2, window=window, sink=sink)
    frames = 7  # blocks [1, 2, 2, 2]
    x, text = _clip(frames)
    t = torch.tensor([500.0, 200.0])
    with torch.no_grad():
        base = model.predict_velocity(x, t, text)
        later = x.clone()
        later[:, :, 5:] += 1.0  # the last block
        out = model.predict_velocity(later, t, text)
        torch.testing.assert_close(out[:, :, :5], base[:, :, :5], rtol=0, atol=0)
        assert (out[:, :, 5:] - base[:, :, 5:]).abs().max() > 1e-3
        earlier = x.clone()
        earlier[:, :, 0] += 1.0  # the first block (a sink when sink = 1)
        out = model.predict_velocity(earlier, t, text)
        assert (out[:, :, 5:] - base[:, :, 5:]).abs().max() > 1e-3
        if window is not None:  # frame 1 is outside the last block's window [3, 7) ∪ {0}
            outside = x.clone()
            outside[:, :, 1] += 1.0
            out = model.predict_velocity(outside, t, text)
            torch.testing.assert_close(out[:, :, 5:], base[:, :, 5:], rtol=0, atol=0)
            assert (out[:, :, 1:3] - base[:, :, 1:3]).abs().max() > 1e-3


# -- streaming -------------------------------------------------------------------------------------------------
def _stream_equals_masked(model: CausalWanModel, frames: int, *, check_blocks: list[int] | None = None) -> None:
    """CAUSAL_API.md's statement: the masked forward of [clean blocks < b at t = 0, noisy block b at t_b] gives
    for block b what streaming gives after committing the clean blocks < b at t_ctx = 0."""
    x, text = _clip(frames)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    sizes = model.block_sizes(frames)
    with torch.no_grad(), model.stream(text, num_frames=frames, latent_hw=HW) as stream:
        assert stream.block_sizes == sizes
        for b, (start, size) in enumerate(zip(stream.block_starts, sizes, strict=True)):
            end = start + size
            t_b = torch.tensor([900.0 - 37 * b, 400.0 + 11 * b])
            noisy = model.add_noise(x[:, :, start:end], noise[:, :, start:end], t_b)
            if check_blocks is None or b in check_blocks:
                clip = torch.cat([x[:, :, :start], noisy], dim=2)
                t_bf = torch.cat([torch.zeros(2, start), t_b[:, None].expand(2, size)], dim=1)
                want = model.predict_velocity(clip, t_bf, text)[:, :, start:]
                got = stream.predict_velocity(noisy, t_b, frame_start=start)
                torch.testing.assert_close(got, want, **TOL, msg=f"block {b}")
                want_x0 = model.predict_x0(clip, t_bf, text)[:, :, start:]
                torch.testing.assert_close(stream.predict_x0(noisy, t_b, frame_start=start), want_x0, **TOL)
            stream.commit(x[:, :, start:end], frame_start=start)
            if stream.capacity is not None:
                assert len(stream.frames) <= stream.capacity


@pytest.mark.parametrize(("per_block", "window", "sink"), [(2, None, 0), (2, 4, 1), (1, 2, 0)])
def test_stream_block_by_block_equals_masked_forward(per_block: int, window: int | None, sink: int) -> None:
    _stream_equals_masked(_causal(per_block=per_block, window=window, sink=sink), 7)


def test_stream_beyond_window_and_rope_table_equals_masked_forward() -> None:
    model = _causal(per_block=2, window=4, sink=1)
    frames = 40  # > rope_max_seq_len (32) and ≫ window: the cache rolls, keeping frame 0
    assert frames > TINY_WAN_CONFIG["rope_max_seq_len"]
    _stream_equals_masked(model, frames, check_blocks=[1, 15, 19])


def test_extended_rope_table_matches_the_buffer() -> None:
    rope = _causal().transformer.rope
    assert isinstance(rope, CausalRope)
    rows = rope.freqs_cos.shape[0]
    cos, sin = rope._time_table(rows + 8)
    assert cos.shape[0] == rows + 8
    torch.testing.assert_close(cos[:rows], rope.freqs_cos[:, :rope.t_dim], rtol=0, atol=0)
    torch.testing.assert_close(sin[:rows], rope.freqs_sin[:, :rope.t_dim], rtol=0, atol=0)
    pos = torch.arange(rows, rows + 8, dtype=torch.float64)[:, None]
    inv = 1.0 / (10000.0 ** (torch.arange(0, rope.t_dim, 2, dtype=torch.float64) / rope.t_dim))
    torch.testing.assert_close(cos[rows:, 0::2], (pos * inv).cos().float(), rtol=0, atol=1e-6)


def test_caches_cleared_on_exit_and_on_exception() -> None:
    model = _causal(per_block=2)
    x, text = _clip(3)
    cross = [block.attn2.processor for block in model.transformer.blocks]
    with torch.no_grad(), model.stream(text, num_frames=3, latent_hw=HW) as stream:
        stream.commit(x[:, :, :1], frame_start=0)
        stream.predict_velocity(x[:, :, 1:], torch.tensor([500.0, 500.0]), frame_start=1)
        assert stream.kv is not None and stream.frames == [0]
        assert len(stream._text_kv) == len(cross)  # text keys/values cached by the no-grad forwards
    assert stream.kv is None and stream.frames == [] and all(p.cache is None for p in cross)
    assert stream._text_kv == {}
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        stream.predict_velocity(x[:, :, 1:], torch.tensor([500.0, 500.0]), frame_start=1)
    with pytest.raises(KeyError), torch.no_grad(), model.stream(text, num_frames=3, latent_hw=HW) as failing:
        failing.commit(x[:, :, :1], frame_start=0)
        raise KeyError("boom")
    assert failing.kv is None and failing.frames == [] and all(p.cache is None for p in cross)
    assert model._stream is None


def test_other_forwards_inside_a_stream_do_not_use_its_text_cache() -> None:
    model = _causal(per_block=2)
    x, text = _clip(3)
    other = text.flip(0) + 1.0
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        want = model.predict_velocity(x, t, other)
        with model.stream(text, num_frames=3, latent_hw=HW) as stream:
            stream.commit(x[:, :, :1], frame_start=0)
            torch.testing.assert_close(model.predict_velocity(x, t, other), want, rtol=0, atol=0)


def test_stream_refuses_a_block_whose_context_is_not_cached() -> None:
    model = _causal(per_block=2)
    x, text = _clip(5)
    with torch.no_grad(), model.stream(text, num_frames=5, latent_hw=HW) as stream:
        stream.commit(x[:, :, :1], frame_start=0)
        with pytest.raises(ValueError, match=r"needs frames \[1, 2\]"):
            stream.predict_velocity(x[:, :, 3:5], torch.tensor([1.0, 1.0]), frame_start=3)


# -- teacher forcing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("window", "sink"), [(None, 0), (4, 1)])
def test_teacher_forcing_equals_truncated_clean_context_clip(window: int | None, sink: int) -> None:
    model = _causal(per_block=2, window=window, sink=sink)
    frames = 7
    x, text = _clip(frames)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    t_bf = torch.tensor([[900.0, 700, 700, 500, 500, 300, 300], [100.0, 800, 800, 600, 600, 950, 950]])
    x_t = model.add_noise(x, noise, t_bf)
    with torch.no_grad():
        got = model.predict_velocity_teacher_forced(x_t, t_bf, x, text)
        for start, size in zip([0, 1, 3, 5], model.block_sizes(frames), strict=True):
            end = start + size
            clip = torch.cat([x[:, :, :start], x_t[:, :, start:end]], dim=2)
            t_clip = torch.cat([torch.zeros(2, start), t_bf[:, start:end]], dim=1)
            want = model.predict_velocity(clip, t_clip, text)[:, :, start:]
            torch.testing.assert_close(got[:, :, start:end], want, **TOL, msg=f"block at {start}")


# -- activation checkpointing ----------------------------------------------------------------------------------
def _streamed_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    model = _causal(per_block=1, window=2, sink=0)
    if checkpointing:
        apply_activation_checkpointing(model.transformer, "full")
    x, text = _clip(3, batch=1)
    t = torch.tensor([600.0])
    losses = []
    with model.stream(text, num_frames=3, latent_hw=HW) as stream:
        stream.commit(x[:, :, :1], frame_start=0)
        losses.append(stream.predict_x0(x[:, :, 1:2], t, frame_start=1).square().mean())
        stream.commit(x[:, :, 1:2], frame_start=1)  # changes the cache between the forward and the backward
        losses.append(stream.predict_velocity(x[:, :, 2:3], t, frame_start=2).square().mean())
        torch.stack(losses).sum().backward()
    return {n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.grad is not None}


def test_activation_checkpointing_recomputes_the_streamed_forward() -> None:
    plain, checkpointed = _streamed_grads(False), _streamed_grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any(n.endswith("attn2.to_k.weight") for n in plain)  # text keys recomputed under grad, not cached
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, **TOL, msg=name)


def test_context_parallel_refused() -> None:
    with pytest.raises(ConfigError, match="wan_causal"):
        _causal().enable_context_parallel(object())


# -- loading through the config --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal_wan")
    _transformer(0).save_pretrained(root / "t1")
    _transformer(1).save_pretrained(root / "t2")
    return {
        "transformer": root / "t1",
        "pipeline": build_tiny_wan_pipeline(root / "pipe", root / "t1"),
        "two_experts": build_tiny_wan_pipeline(root / "pipe2", root / "t1", root / "t2", boundary_ratio=0.5),
    }


def _role_cfg(init: Path, **extra: object) -> ModelConfig:
    return ModelConfig.model_validate({"family": "wan_causal", "init_from": str(init), "latent_stats": "identity",
                                       "causal": {"num_frames_per_block": 2}, **extra})


@pytest.mark.parametrize("on_meta", [False, True])
def test_loads_a_wan_pipeline_through_the_config(tiny_dirs: dict[str, Path], on_meta: bool) -> None:
    model = load_role_model("student", _role_cfg(tiny_dirs["pipeline"]), mixed_precision="no", on_meta=on_meta)
    assert isinstance(model, CausalWanModel)
    if on_meta:
        assert is_on_meta(model.transformer)
        materialize_roles({"student": model}, torch.device("cpu"))
    oracle = _causal(per_block=2, seed=0)  # the same weights (seed 0), built directly
    assert model.transformer.state_dict().keys() == oracle.transformer.state_dict().keys()
    x, text = _clip(5)
    t = torch.tensor([400.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(model.predict_velocity(x, t, text), oracle.predict_velocity(x, t, text), **TOL)


def test_bare_transformer_dir_loads(tiny_dirs: dict[str, Path]) -> None:
    model = load_role_model("student", _role_cfg(tiny_dirs["transformer"], subfolder=""), mixed_precision="no")
    assert isinstance(model, CausalWanModel) and model.causal.num_frames_per_block == 2


def test_two_expert_pipeline_refused(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"models\.student\.init_from: family wan_causal takes one transformer"):
        load_role_model("student", _role_cfg(tiny_dirs["two_experts"]), mixed_precision="no", on_meta=True)


def test_lora_adapts_the_causal_attention(tiny_dirs: dict[str, Path]) -> None:
    """LoRA works unchanged (the processors call the adapted linears): the adapted model equals a plain causal
    model whose weights are the merged W + (alpha/r)·B A, on the mask path and the streaming path."""
    cfg = _role_cfg(tiny_dirs["pipeline"], lora={"rank": 2, "alpha": 4.0})
    model = load_role_model("student", cfg, mixed_precision="no")
    adapters = {}
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if is_adapter_name(name):
                if ".lora_B." in name:  # B starts at zero: make the update visible
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
                adapters[name] = p.detach().clone()
    assert adapters
    base = {base_weight_name(n): t for n, t in model.transformer.state_dict().items() if not is_adapter_name(n)}
    merged = merge_into(base, adapters, rank=2, alpha=4.0)
    oracle = _causal(per_block=2)
    oracle.transformer.load_state_dict(merged)
    x, text = _clip(5)
    t = torch.tensor([400.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(model.predict_velocity(x, t, text), oracle.predict_velocity(x, t, text), **TOL)
        assert (model.predict_velocity(x, t, text) - _causal(per_block=2).predict_velocity(x, t, text)).abs().max() \
            > 1e-3  # the adapters change the output
        outs = []
        for m in (model, oracle):
            with m.stream(text, num_frames=5, latent_hw=HW) as stream:
                stream.commit(x[:, :, :1], frame_start=0)
                outs.append(stream.predict_velocity(x[:, :, 1:3], t, frame_start=1))
        torch.testing.assert_close(outs[0], outs[1], **TOL)


# -- FSDP2, 2 processes ----------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_fsdp2_two_processes_equal_the_unsharded_model(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Loaded on meta, sharded over 2 ranks and filled by build_run (activation checkpointing on): mask path,
    teacher forcing, streaming and the gradients of a streamed loss equal the unsharded model's."""
    script = str(Path(__file__).parent / "dist_scripts" / "causal_wan.py")
    proc = run_torchrun(script, str(tiny_dirs["transformer"]), str(tmp_path), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        rep = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert rep["type"] == "CausalWanModel" and rep["sharded"] is True
        for key in ("mask", "teacher", "stream"):
            assert rep[key] < 1e-5, (rank, key, rep[key])
        assert rep["grad_scale"] > 1e-3 and rep["grad"] < 1e-6, rep
