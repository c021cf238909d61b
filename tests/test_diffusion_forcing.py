"""``method.name: diffusion_forcing``: per-block timesteps against an independent re-draw, the loss (plain and
teacher-forced) against a plain-PyTorch replay on a tiny causal Wan, in-process and on 2 processes, and the
config error for a non-causal student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, run_2proc
from diffusers import WanTransformer3DModel

from fv_accel.config import RunConfig
from fv_accel.data import LatentBatch
from fv_accel.errors import ConfigError
from fv_accel.methods.diffusion_forcing import DiffusionForcingMethod
from fv_accel.models.wan import TINY_WAN_CONFIG, wan_forward_flops
from fv_accel.models.wan_causal import CausalWanModel

SHAPE = (16, 7, 4, 4)  # blocks of 2, remainder first: frames [0] [1, 2] [3, 4] [5, 6]
BLOCKS = [[0], [1, 2], [3, 4], [5, 6]]


def _method(tmp_path: Path, **method: object) -> DiffusionForcingMethod:
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused", "family": "wan_causal", "flow_shift": 5.0,
                               "causal": {"num_frames_per_block": 2}}},
        "method": {"name": "diffusion_forcing", **method},
        "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })
    torch.manual_seed(0)
    student = CausalWanModel(role="student", transformer=WanTransformer3DModel(**TINY_WAN_CONFIG),
                             config=cfg.models["student"])
    run = DiffusionForcingMethod(cfg=cfg, role_models={"student": student})
    run.on_train_start()
    return run


def _batch(b: int = 3) -> LatentBatch:
    gen = torch.Generator().manual_seed(1)
    return LatentBatch(latents_bcthw=torch.randn(b, *SHAPE, generator=gen),
                       text_embeds_bld=torch.randn(b, 5, 32, generator=gen), text_mask_bl=torch.ones(b, 5),
                       index=torch.arange(b), latent_shape=SHAPE)


def _redraw(gen: torch.Generator, b: int, shape: tuple[int, ...], blocks: list[list[int]], method: dict[str, Any],
            shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, then one timestep per sample and block, written out from the fine-tune's formulas: u uniform, or
    1 − sigmoid(z) with z ~ N(mean, std); clamped; shifted s·u / (1 + (s − 1)·u); ×1000."""
    noise = torch.randn((b, *shape), generator=gen)
    n = b * len(blocks)
    if method.get("weighting_scheme", "uniform") == "uniform":
        u = torch.rand(n, generator=gen)
    else:
        z = torch.randn(n, generator=gen) * method.get("logit_std", 1.0) + method.get("logit_mean", 0.0)
        u = 1 / (1 + torch.exp(z))
    u = u.clamp(1e-4, 1 - 1e-4)
    t = 1000 * shift * u / (1 + (shift - 1) * u)
    t_bf = torch.empty(b, shape[1])
    for i in range(b):
        for k, frames in enumerate(blocks):
            t_bf[i, frames] = t[i * len(blocks) + k]
    return noise, t_bf


def _oracle_loss(student: CausalWanModel, x0: torch.Tensor, text: torch.Tensor, gen: torch.Generator,
                 method: dict[str, Any], blocks: list[list[int]]) -> tuple[float, torch.Tensor]:
    """The step replayed by hand with ``gen`` at the method's state before it. Teacher forcing is rebuilt from
    plain block-causal forwards: block b's velocity is that of a clip holding the clean context (at its
    timestep) in frames before b, block b noisy, and zeros after it (masked out)."""
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    noise, t_bf = _redraw(gen, b, shape, blocks, method, student.flow_shift)
    s = t_bf.view(b, 1, -1, 1, 1) / 1000
    x_t = (1 - s) * x0 + s * noise
    with torch.no_grad():
        if not method.get("teacher_forcing", False):
            v = student.predict_velocity(x_t, t_bf, text)
        else:
            t_c = float(method.get("clean_context_timestep", 0.0))
            clean = x0 if t_c == 0 else (1 - t_c / 1000) * x0 + t_c / 1000 * torch.randn(x0.shape, generator=gen)
            v = torch.empty_like(x0)
            for frames in blocks:
                lo, hi = frames[0], frames[-1] + 1
                clip = torch.cat([clean[:, :, :lo], x_t[:, :, lo:hi], torch.zeros_like(x0[:, :, hi:])], dim=2)
                t = torch.zeros_like(t_bf)
                t[:, :lo] = t_c
                t[:, lo:hi] = t_bf[:, lo:hi]
                v[:, :, lo:hi] = student.predict_velocity(clip, t, text)[:, :, lo:hi]
    return float(((v - (noise - x0)) ** 2).mean()), t_bf


def _copy(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator(device=gen.device)
    out.set_state(gen.get_state())
    return out


@pytest.mark.parametrize("method", [
    {},
    {"weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 0.8},
    {"teacher_forcing": True},
    {"teacher_forcing": True, "clean_context_timestep": 100.0},
])
def test_per_block_timesteps_and_loss_by_hand(tmp_path: Path, method: dict[str, Any]) -> None:
    run = _method(tmp_path, **method)
    batch = _batch()
    for _ in range(2):
        assert run.cuda_generator is not None
        want, t_want = _oracle_loss(run.causal_student, batch.latents_bcthw, batch.text_embeds_bld,  # type: ignore[arg-type]
                                    _copy(run.cuda_generator), method, BLOCKS)
        out = run.single_train_step(batch, 1)
        t_bf = run.last_timesteps_bf
        assert t_bf is not None
        for row in t_bf:
            assert all(bool((row[frames] == row[frames[0]]).all()) for frames in BLOCKS)  # constant in a block
            assert len({float(row[frames[0]]) for frames in BLOCKS}) == len(BLOCKS)  # a draw per block
        torch.testing.assert_close(t_bf, t_want, rtol=1e-6, atol=1e-4)  # the independent re-draw
        assert float(out.losses["loss"].detach()) == pytest.approx(want, rel=1e-6)  # observed: ~1e-7
        b = batch.latents_bcthw.shape[0]  # type: ignore[union-attr]
        if method.get("teacher_forcing"):  # the doubled clip's FLOPs over the clip's (tiny Wan, text of 5)
            ratio = wan_forward_flops(TINY_WAN_CONFIG, (16, 14, 4, 4), 5) / wan_forward_flops(TINY_WAN_CONFIG, SHAPE, 5)
            assert ratio > 2 and out.passes["student"].forward == round(b * ratio)
        else:
            assert out.passes["student"].forward == out.passes["student"].backward == b


def test_student_must_be_causal(tmp_path: Path) -> None:
    from fv_accel.config import resolve_config

    raw = {"models": {"student": {"init_from": "unused"}}, "method": {"name": "diffusion_forcing"},
           "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}}}
    with pytest.raises(ConfigError, match="models.student.family") as err:
        resolve_config(raw)
    assert err.value.exit_code == 2


def test_clean_context_timestep_needs_teacher_forcing() -> None:
    from fv_accel.methods.diffusion_forcing import DiffusionForcingMethodConfig

    with pytest.raises(ValueError, match="method.teacher_forcing"):
        DiffusionForcingMethodConfig(name="diffusion_forcing", clean_context_timestep=50.0)
    DiffusionForcingMethodConfig(name="diffusion_forcing", clean_context_timestep=50.0, teacher_forcing=True)


# -- 2 processes: one iteration of each config against plain PyTorch (a launch per config)  --------------------------------------------
@pytest.fixture(scope="module")
def causal_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The causal toy world's parquet (6 latent frames of 4×4) and a random tiny Wan as the student's init."""
    from fv_accel.toy import CAUSAL_TOY_SPEC, ensure_init_transformer, ensure_toy_data

    root = tmp_path_factory.mktemp("df_toy")
    ensure_toy_data(root, CAUSAL_TOY_SPEC)
    ensure_init_transformer(root)
    return root


def _recipe(root: Path, out: Path, path: Path, **method: object) -> Path:
    path.write_text(yaml.safe_dump({
        "models": {"student": {"init_from": str(root / "init"), "latent_stats": "identity", "family": "wan_causal",
                               "causal": {"num_frames_per_block": 2}}},
        "method": {"name": "diffusion_forcing", **method},
        "training": {"data": {"data_path": str(root / "data"), "train_batch_size": 2, "text_len": 8, "seed": 0,
                              "num_workers": 0},
                     "loop": {"max_train_steps": 1}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out), "save_steps": 0}},
    }))
    return path


@pytest.mark.distributed
def test_one_iteration_on_two_processes_matches_plain_pytorch(causal_toy: Path, tmp_path: Path) -> None:
    from fv_accel.config import ModelConfig
    from fv_accel.data import ParquetLatentDataset
    from fv_accel.models import load_role_model

    methods: list[dict[str, Any]] = [{}, {"teacher_forcing": True, "clean_context_timestep": 100.0}]
    records: list[list[dict[str, Any]]] = [[], []]
    for i, method in enumerate(methods):
        recipe = _recipe(causal_toy, tmp_path / f"run{i}", tmp_path / f"df{i}.yaml", **method)
        spy = tmp_path / f"spy{i}"
        spy.mkdir()
        proc = run_2proc(["tests/dist_scripts/diffusion_forcing_step.py", "--config", str(recipe)], cwd=REPO,
                         FVR_SPY_DIR=str(spy))
        assert proc.returncode == 0, proc.stderr[-4000:]
        for rank in range(2):
            records[rank].append(torch.load(spy / f"rank{rank}.pt", weights_only=False))

    student = load_role_model("student", ModelConfig(init_from=str(causal_toy / "init"), latent_stats="identity",
                                                     family="wan_causal", causal={"num_frames_per_block": 2}),
                              mixed_precision="no")
    assert isinstance(student, CausalWanModel)
    data = ParquetLatentDataset(str(causal_toy / "data"), text_len=8)
    for rank in range(2):
        for method, record in zip(methods, records[rank], strict=True):
            rows = [data.load(i) for i in record["rows"]]
            x0 = torch.stack([r.latents_cthw for r in rows]).float()
            text = torch.stack([r.text_embeds_ld for r in rows]).float()
            gen = torch.Generator()
            gen.set_state(record["generator_state"])
            want, t_bf = _oracle_loss(student, x0, text, gen, method, [[0, 1], [2, 3], [4, 5]])
            torch.testing.assert_close(record["timesteps"], t_bf, rtol=1e-6, atol=1e-4)
            assert record["loss"] == pytest.approx(want, rel=1e-6), (rank, method)
    assert records[0][0]["rows"] != records[1][0]["rows"]
