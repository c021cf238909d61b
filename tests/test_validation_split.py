"""Validation split over ranks: rank r samples prompts r, r + W, ...; every rank runs the same forwards; prompt
i's noise depends only on (seed, i), so W ranks give the videos one rank gives.

Oracles: hand-written index lists; each prompt sampled alone with a generator seeded ``seed·2³² + i`` (the
documented rule) through the plain single-generator sampler; and a real 2-process run against a 1-process run.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from conftest import REPO, run_2proc, run_recipe_main

from fv_accel.callbacks.validation import ValidationCallback, merge_rank_latents, rank_prompts
from fv_accel.config import RunConfig
from fv_accel.data import LatentBatch
from fv_accel.methods.finetune import FinetuneMethod
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel
from fv_accel.runtime import Topology
from fv_accel.sampling import euler_sample

SEED = 11
LATENT_SHAPE = (16, 1, 4, 4)
NUM_PROMPTS = 5


def test_rank_prompts_by_hand() -> None:
    # 5 prompts on 3 ranks: 0,3 | 1,4 | 2 (+ 2 repeated as padding, discarded)
    assert [rank_prompts(5, r, 3) for r in range(3)] == [([0, 3], 2), ([1, 4], 2), ([2, 2], 1)]
    # fewer prompts than ranks: the idle rank still runs one (dummy) forward, on prompt 0
    assert [rank_prompts(1, r, 2) for r in range(2)] == [([0], 1), ([0], 0)]
    assert [rank_prompts(4, r, 2) for r in range(2)] == [([0, 2], 2), ([1, 3], 2)]
    assert rank_prompts(3, 0, 1) == ([0, 1, 2], 3)


def test_merge_rank_latents_restores_prompt_order() -> None:
    # prompt i's latent is filled with i; rank r holds r, r + 3, ...
    per_rank = [{"student": torch.tensor([float(i) for i in range(r, 5, 3)]).view(-1, 1)} for r in range(3)]
    merged = merge_rank_latents(per_rank, 5)
    assert torch.equal(merged["student"], torch.arange(5.0).view(5, 1))


def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_batch_size: int
           ) -> tuple[ValidationCallback, FinetuneMethod, WanModel, torch.Tensor]:
    cfg = RunConfig.model_validate({
        "models": {"student": {"init_from": "unused", "latent_stats": "identity"}},  # built here, never loaded
        "method": {"name": "finetune"},
        "training": {"data": {"train_batch_size": train_batch_size},
                     "checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
        "callbacks": {"validation": {"every_steps": 1, "seed": SEED, "num_inference_steps": 2}},
    })
    torch.manual_seed(0)
    from diffusers import WanTransformer3DModel

    from fv_accel.models.base import LatentStats

    student = WanModel(role="student", transformer=WanTransformer3DModel(**TINY_WAN_CONFIG),
                       config=cfg.models["student"], latent_stats=LatentStats(mean=None, std=None, origin="identity"))
    method = FinetuneMethod(cfg=cfg, role_models={"student": student})
    text = torch.randn(NUM_PROMPTS, 8, TINY_WAN_CONFIG["text_dim"], generator=torch.Generator().manual_seed(1))
    prompts = LatentBatch(latents_bcthw=None, text_embeds_bld=text, text_mask_bl=torch.ones(NUM_PROMPTS, 8),
                          index=torch.arange(NUM_PROMPTS), latent_shape=LATENT_SHAPE)
    assert cfg.callbacks.validation is not None
    callback = ValidationCallback(cfg.callbacks.validation, cfg)
    monkeypatch.setattr(callback, "load_prompts", lambda trainer=None: prompts)
    return callback, method, student, text


def _expected(student: WanModel, text: torch.Tensor) -> torch.Tensor:
    """Each prompt alone, its noise from a generator seeded SEED·2³² + i (the documented per-prompt seed)."""
    return torch.cat([euler_sample(student, text[i:i + 1], latent_shape=LATENT_SHAPE, num_steps=2,
                                   shift=student.flow_shift,
                                   generator=torch.Generator().manual_seed(SEED * 2**32 + i))
                      for i in range(NUM_PROMPTS)])


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_each_rank_samples_its_prompts_with_the_same_forwards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              world_size: int) -> None:
    """Simulated ranks in one process (the transport is tested by the 2-process run below): rank r's latents
    are prompts r, r + W, ... exactly as sampled alone, every rank calls the sampler with the same batch sizes
    (the FSDP collectives stay aligned), and the merged result is the one-rank result."""
    callback, method, student, text = _setup(tmp_path, monkeypatch, train_batch_size=2)
    expected = _expected(student, text)

    batch_sizes: list[int] = []
    real_sampler = method.validation_sampler()

    def spy(model, text_bld, uncond, latent_shape, generator):  # type: ignore[no-untyped-def]
        batch_sizes.append(text_bld.shape[0])
        return real_sampler(model, text_bld, uncond, latent_shape, generator)

    monkeypatch.setattr(method, "validation_sampler", lambda: spy)
    monkeypatch.setattr(ValidationCallback, "_gather", staticmethod(lambda local, n, topology: local))
    per_rank, calls = [], []
    for rank in range(world_size):
        batch_sizes.clear()
        trainer = SimpleNamespace(method=method, callbacks=SimpleNamespace(get=lambda name: None),
                                  is_main=rank == 0,
                                  topology=Topology(rank=rank, world_size=world_size, data_rank=rank,
                                                    data_world_size=world_size))
        local = callback.sample(trainer)  # type: ignore[arg-type]
        mine = list(range(rank, NUM_PROMPTS, world_size))
        assert local["student"].shape == (len(mine), *LATENT_SHAPE)
        torch.testing.assert_close(local["student"], expected[mine], rtol=0, atol=1e-6)
        per_rank.append(local)
        calls.append(list(batch_sizes))
    per_rank_count = -(-NUM_PROMPTS // world_size)
    full, last = divmod(per_rank_count, 2)
    assert all(c == [2] * full + [last] * (last > 0) for c in calls)  # identical forwards on every rank
    torch.testing.assert_close(merge_rank_latents(per_rank, NUM_PROMPTS)["student"], expected, rtol=0, atol=1e-6)


def test_noise_does_not_depend_on_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 1 and of 4 give each prompt the same noise (one generator per prompt, not per batch)."""
    results = []
    for batch in (1, 4):
        callback, method, student, text = _setup(tmp_path, monkeypatch, train_batch_size=batch)
        trainer = SimpleNamespace(method=method, callbacks=SimpleNamespace(get=lambda name: None), is_main=True,
                                  topology=Topology())
        results.append(callback.sample(trainer)["student"])  # type: ignore[arg-type]
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0], _expected(student, text), rtol=0, atol=1e-6)


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_write_the_videos_of_one_rank(toy_root: Path, tmp_path: Path) -> None:
    """The same toy run (validation at step 0, before any update, student and EMA variants) on 1 and on 2
    processes: the same files, frame for frame."""
    outs = {1: tmp_path / "one", 2: tmp_path / "two"}
    for world, out in outs.items():
        args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
                f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
                "--training.loop.max_train_steps=1", "--training.data.train_batch_size=2",
                "--callbacks.validation.at_start=true", "--callbacks.validation.num_samples=3",
                "--callbacks.validation.num_inference_steps=2", "--callbacks.ema.decay=0.5",
                "--training.tracker.backends=[]"]
        if world == 1:  # in this process: saves an interpreter start
            assert run_recipe_main("finetune", args[1:]) == 0
            continue
        proc = run_2proc(args, cwd=REPO, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"{v}-{i:02d}.mp4" for v in ("ema", "student") for i in range(3)]
    for out in outs.values():
        assert sorted(p.name for p in (out / "validation" / "step-0").glob("*.mp4")) == names
    for name in names:
        one = _decode(outs[1] / "validation" / "step-0" / name)
        two = _decode(outs[2] / "validation" / "step-0" / name)
        assert len(one) == len(two) == 8
        for a, b in zip(one, two, strict=True):
            assert np.array_equal(a, b), name
