"""``method.name: ode_init``: the student's input frames, timesteps and loss against hand computations (a
constructed student with causal blocks, in process), and one step on 2 processes (FSDP2 over gloo) against the
same loss computed with plain PyTorch on the tiny Wan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_2proc, run_recipe_main
from torch import nn

from fv_accel.causal_blocks import block_sizes
from fv_accel.config import RunConfig
from fv_accel.data import LatentBatch
from fv_accel.errors import ConfigError, DataError
from fv_accel.methods.ode_init import OdeInitMethod
from fv_accel.models import ModelBase

SLOPE, BIAS = 0.3, 0.1
STEPS = [1000, 750, 500, 250]


class BlockModel(ModelBase):
    """v̂ = SLOPE·x_t + BIAS; causal blocks of 2 frames (remainder first); records every call."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def block_sizes(self, num_frames: int) -> list[int]:
        return block_sizes(num_frames, 2)

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.transformer.slope * x_t.float() + BIAS


def _method(tmp_path: Path, **method: object) -> tuple[OdeInitMethod, BlockModel]:
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused"}},  # never loaded
        "method": {"name": "ode_init", **method},
        "training": {"checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })
    module = nn.Module()
    module.slope = nn.Parameter(torch.tensor(SLOPE))
    student = BlockModel(role="student", transformer=module, config=cfg.models["student"])
    run = OdeInitMethod(cfg=cfg, role_models={"student": student})
    run.on_train_start()
    return run, student


def _batch(b: int = 3, f: int = 5) -> LatentBatch:
    gen = torch.Generator().manual_seed(0)
    shape = (2, f, 2, 3)
    return LatentBatch(latents_bcthw=torch.randn(b, *shape, generator=gen),
                       text_embeds_bld=torch.randn(b, 3, 4, generator=gen), text_mask_bl=torch.ones(b, 3),
                       index=torch.arange(b), latent_shape=shape,
                       trajectory_bkcthw=torch.randn(b, len(STEPS), *shape, generator=gen),
                       trajectory_timesteps_bk=torch.tensor([STEPS] * b, dtype=torch.float32))


def _check_step(run: OdeInitMethod, student: BlockModel, batch: LatentBatch) -> torch.Tensor:
    """One step: the input, timesteps and loss against the hand computation; returns the drawn indices."""
    out = run.single_train_step(batch, 1)
    x_t, t = student.calls[-1]
    idx = run.last_step_indices_bf
    assert idx is not None
    traj, x0 = batch.trajectory_bkcthw, batch.latents_bcthw
    assert traj is not None and x0 is not None
    b, _, _, f, _, _ = traj.shape
    expected = torch.empty_like(x0)
    for i in range(b):
        for j in range(f):
            expected[i, :, j] = traj[i, int(idx[i, j]), :, j]
            assert float(t[i, j]) == STEPS[int(idx[i, j])]
    torch.testing.assert_close(x_t, expected, rtol=0, atol=0)
    sigma = t.view(b, 1, f, 1, 1) / 1000
    x0_hat = expected - sigma * (SLOPE * expected + BIAS)
    torch.testing.assert_close(out.losses["loss"], ((x0_hat - x0) ** 2).mean(), rtol=1e-6, atol=1e-7)
    return idx


def test_each_block_draws_its_step_and_frames_come_from_it(tmp_path: Path) -> None:
    run, student = _method(tmp_path)
    batch = _batch()
    draws = [_check_step(run, student, batch) for _ in range(6)]
    for idx in draws:  # blocks [1, 2, 2] of 5 frames: one step per block
        assert torch.equal(idx[:, 1], idx[:, 2]) and torch.equal(idx[:, 3], idx[:, 4])
    stacked = torch.stack(draws)
    assert (stacked[..., 0] != stacked[..., 1]).any() and (stacked[..., 1] != stacked[..., 3]).any()
    assert set(stacked.unique().tolist()) == {0, 1, 2, 3}


def test_same_step_across_blocks(tmp_path: Path) -> None:
    run, student = _method(tmp_path, same_step_across_blocks=True)
    batch = _batch()
    draws = torch.stack([_check_step(run, student, batch) for _ in range(6)])
    assert (draws == draws[..., :1]).all()
    assert (draws[:, 0, 0] != draws[:, 1, 0]).any()  # still one draw per sample


def test_pairs_recorded_at_other_timesteps_are_refused(tmp_path: Path) -> None:
    run, _ = _method(tmp_path, denoising_step_list=[1000, 500])
    with pytest.raises(DataError, match="denoising_step_list"):
        run.single_train_step(_batch(), 1)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "_ode_pairs.json").write_text(json.dumps({"denoising_steps": STEPS, "num_shards": 0}))
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused"}},
        "method": {"name": "ode_init", "denoising_step_list": [1000, 500]},
        "training": {"data": {"data_path": str(pairs)}, "checkpoint": {"output_dir": str(tmp_path / "o")}},
    })
    with pytest.raises(ConfigError, match="1000, 750, 500, 250"):
        OdeInitMethod(cfg=cfg, role_models={"student": _method(tmp_path)[1]})


@pytest.mark.distributed
def test_one_step_on_two_processes_matches_plain_pytorch(toy_root: Path, tmp_path: Path, fresh_world: None) -> None:
    pairs = tmp_path / "pairs"
    assert run_recipe_main("ode_pairs", [
        "--teacher", str(toy_root / "init"), "--latent-stats", "identity", "--data", str(toy_root / "data"),
        "--output", str(pairs), "--num-rows", "8", "--rows-per-shard", "4", "--teacher-steps", "2",
        "--text-len", "8", "--dtype", "fp32"]) == 0
    recipe = tmp_path / "ode_init.yaml"
    recipe.write_text(yaml.safe_dump({
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "ode_init", "denoising_step_list": STEPS},
        "training": {"data": {"data_path": str(pairs), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 1}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(tmp_path / "run"), "save_steps": 0}},
    }))
    spy = tmp_path / "spy"
    spy.mkdir()
    proc = run_2proc(["tests/dist_scripts/ode_init_step.py", "--config", str(recipe)], cwd=REPO,
                     FVR_SPY_DIR=str(spy))
    assert proc.returncode == 0, proc.stderr[-4000:]

    # plain PyTorch on one process: the init weights, the pairs' rows, x_t gathered by hand, the MSE
    from fv_accel.config import ModelConfig
    from fv_accel.data import ParquetLatentDataset
    from fv_accel.models import load_role_model

    model = load_role_model("student", ModelConfig(init_from=str(toy_root / "init"), latent_stats="identity"),
                            mixed_precision="no")
    data = ParquetLatentDataset(str(pairs), text_len=8)
    seen: list[int] = []
    for rank in range(2):
        record = json.loads((spy / f"rank{rank}.json").read_text())
        rows, idx = record["rows"], record["indices"]
        seen += rows
        samples = [data.load(i) for i in rows]
        x_t = torch.stack([torch.stack([s.trajectory_kcthw[idx[b][f], :, f] for f in range(2)], dim=1)
                           for b, s in enumerate(samples)])
        t = torch.tensor([[float(STEPS[k]) for k in per_frame] for per_frame in idx])
        text = torch.stack([s.text_embeds_ld for s in samples])
        x0 = torch.stack([s.latents_cthw for s in samples])
        with torch.no_grad():
            v = model.predict_velocity(x_t, t, text)
            loss = ((x_t - t.view(2, 1, 2, 1, 1) / 1000 * v - x0) ** 2).mean()
        assert abs(float(loss) - record["loss"]) <= 1e-5 * abs(float(loss)), (rank, float(loss), record["loss"])
        assert all(row[0] == row[1] for row in idx)  # a bidirectional Wan: one block, one step per sample
    assert len(set(seen)) == 4  # the ranks took different rows
    assert any(k != 0 for rank in range(2)
               for row in json.loads((spy / f"rank{rank}.json").read_text())["indices"] for k in row)
