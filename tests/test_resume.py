"""Exact resume on 2-process FSDP2 (CPU, fp32) with DMD2 (student, critic, frozen teacher;
generator_update_interval=3: the student steps at 3 and 6): crash, lost completion marker, preemption,
resharding.

One uninterrupted reference run (8 steps, checkpoints at 4 and 8, EMA on, per-rank epochs of 6 batches, so the
resumed part crosses an epoch boundary) is shared by every test; each interrupted run must reproduce its
logged losses exactly and its ``checkpoint-8`` bit for bit: student and critic weights, both optimizers' moments
and step counts, both LR schedulers, EMA shards, data positions, per-rank RNG.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from conftest import REPO, run_2proc
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fv_accel.checkpoint.manager import load_rng_file

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

SCRIPT = "tests/dist_scripts/resume_run.py"
MAX_STEPS = 8
#: optimizer steps of each role in 8 steps (the student steps at 3 and 6)
ROLE_STEPS = {"student": 2, "critic": 8}


def dmd2_config(toy_root: Path, out: Path) -> dict[str, Any]:
    """Toy DMD2, teacher = critic init = student init = the random tiny Wan (quality is irrelevant here).
    768 rows, 64 per batch and rank → 6 batches per epoch: epoch 1 starts at step 7."""
    init = str(toy_root / "init")
    return {
        "models": {"student": {"family": "wan", "init_from": init, "trainable": True, "flow_shift": 3.0,
                               "latent_stats": "identity"},
                   "teacher": {"family": "wan", "init_from": init, "trainable": False, "flow_shift": 3.0,
                               "latent_stats": "identity"}},
        "method": {"name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": [1000, 500],
                   "generator_update_interval": 3, "real_score_guidance_scale": 1.0,
                   "critic_optimizer": {"learning_rate": 8e-4, "betas": [0.0, 0.999]}},
        "training": {"data": {"data_path": str(toy_root / "data"), "seed": 0, "train_batch_size": 64,
                              "text_len": 8},
                     "optimizer": {"learning_rate": 2e-4, "betas": [0.0, 0.999]},
                     "loop": {"max_train_steps": MAX_STEPS, "max_grad_norm": 1.0},
                     "checkpoint": {"output_dir": str(out), "save_steps": 4, "keep_last": 0},
                     "tracker": {"backends": []}},
        "callbacks": {"ema": {"decay": 0.5, "start_step": 0}},
    }


def run_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    config = out.parent / f"{out.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(dmd2_config(toy_root, out)))
    return [SCRIPT, "--config", str(config), *extra]


def launch(toy_root: Path, out: Path, *extra: str, **env: str) -> Any:
    return run_2proc(run_args(toy_root, out, *extra), cwd=REPO, timeout=600, FVR_RECIPE="distill", **env)


def resume(toy_root: Path, out: Path, **env: str) -> Any:
    proc = launch(toy_root, out, "--training.checkpoint.resume_from_checkpoint=latest", **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Every entry of a DCP checkpoint, tensors reassembled to full size, in this (non-distributed) process."""
    entries = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat: dict[str, Any] = {k: torch.empty(v.size, dtype=v.properties.dtype) if isinstance(v, TensorStorageMetadata)
                            else None for k, v in entries.items()}
    dcp.load(flat, checkpoint_id=str(path), no_dist=True)
    return flat


def rng_states(path: Path) -> list[dict[str, Any]]:
    return [load_rng_file(path / f"random_state.rank{r}.pt") for r in range(2)]


def assert_same_rng(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_rng(a[k], b[k], f"{where}.{k}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_rng(x, y, f"{where}[{i}]")
    elif hasattr(a, "shape"):  # numpy arrays
        assert (a == b).all(), where
    else:
        assert a == b, where


def assert_same_checkpoint(ref: Path, other: Path) -> None:
    a, b = read_checkpoint(ref), read_checkpoint(other)
    assert a.keys() == b.keys()
    groups = {k.split(".")[0] + "." + k.split(".")[1] for k in a}
    # trainable roles, their optimizers and schedulers, EMA, both ranks' data positions: nothing else
    assert groups == {"roles.student", "optimizers.student", "schedulers.student", "roles.critic",
                      "optimizers.critic", "schedulers.critic", "callbacks.ema", "dataloader.rank0",
                      "dataloader.rank1"}, groups  # never the frozen teacher
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
    assert not differ, f"{len(differ)} entries differ, e.g. {differ[:5]}"
    assert a["dataloader.rank0.epoch"] == 1 and a["dataloader.rank0.batches_in_epoch"] == 2  # crossed epoch 0→1
    for role, num_steps in ROLE_STEPS.items():
        step_keys = [k for k in a if k.startswith(f"optimizers.{role}.state.") and k.endswith(".step")]
        assert step_keys and all(float(a[k]) == num_steps for k in step_keys), role
    assert a["callbacks.ema.num_updates"] == MAX_STEPS  # callbacks.ema.update: every_step (the default)
    for r, (x, y) in enumerate(zip(rng_states(ref), rng_states(other), strict=True)):
        assert_same_rng(x, y, f"rank{r}")


LOSSES = ("critic_loss", "generator_loss")


def assert_same_losses(ref: Path, rows: list[dict[str, Any]]) -> None:
    want = {r["step"]: r for r in metrics(ref)}
    for row in rows:
        expected = want[row["step"]]
        assert [k for k in LOSSES if k in row] == [k for k in LOSSES if k in expected]
        for k in LOSSES:
            assert row.get(k) == expected.get(k), f"step {row['step']} {k}: {row.get(k)!r} != {expected.get(k)!r}"


def assert_same_losses_after(ref: Path, other: Path, start: int) -> None:
    got = metrics(other)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))  # rows past the resume step were dropped
    assert sum("generator_loss" in r for r in got) == 2
    assert_same_losses(ref, [r for r in got if r["step"] > start])


def test_preemption_crash_and_lost_marker(reference: Path, toy_root: Path, tmp_path: Path) -> None:
    """One interrupted timeline, each segment resumed with ``latest``: SIGTERM on one rank at step 2 → resume →
    SIGKILL right after checkpoint-4 → resume to 8 (bitwise = reference) → checkpoint-8 loses its .metadata →
    resume from 4 again (bitwise = reference). Chained so that 4 launches cover all three failure kinds."""
    out = tmp_path / "interrupted"

    # 1. Only rank 1 gets SIGTERM, during step 2; the per-step all-reduce makes both ranks stop after step 2.
    #    The student has not stepped yet (its first step is 3): its optimizer is saved without state and must
    #    come back empty, or the resumed run would count one extra AdamW step.
    proc = launch(toy_root, out, FVR_SIGTERM_RANK="1", FVR_SIGTERM_STEP="2")
    assert proc.returncode != 0
    messages = [line for line in proc.stderr.splitlines() if "fv_accel: error: stopped by signal 15" in line]
    assert len(messages) == 2, proc.stderr[-4000:]  # one per rank
    assert all(f"checkpoint: {out / 'checkpoint-2'}" in m and "resume_from_checkpoint=latest" in m
               for m in messages)
    assert "exitcode  : 143" in proc.stderr  # the launcher's per-rank report
    assert "exitcode  : 1 " not in proc.stderr
    ckpt = out / "checkpoint-2"
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert (ckpt / ".metadata").is_file() and meta["step"] == 2 and meta["optimizers_without_state"] == ["student"]
    assert {p.name.split("_")[2] for p in ckpt.glob("*.distcp")} == {"0", "1"}  # both ranks' shards
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert_same_losses(reference, metrics(out))

    # 2. Resume from `latest` (= checkpoint-2); every rank SIGKILLs itself right after checkpoint-4 completes:
    #    no cleanup of any kind.
    proc = launch(toy_root, out, "--training.checkpoint.resume_from_checkpoint=latest", FVR_SIGKILL_AFTER_SAVE="4")
    assert proc.returncode != 0
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stderr
    assert (out / "checkpoint-4" / ".metadata").is_file() and not (out / "checkpoint-8").exists()

    # 3. Resume from `latest` (= checkpoint-4) to step 8: the same run as the uninterrupted one.
    proc = resume(toy_root, out)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in proc.stderr
    assert_same_losses_after(reference, out, 0)
    assert_same_checkpoint(reference / "checkpoint-8", out / "checkpoint-8")

    # 4. checkpoint-8 loses its completion marker (DCP's .metadata): `latest` must skip it, resume from 4 and
    #    save over the incomplete checkpoint-8 directory.
    (out / "checkpoint-8" / ".metadata").unlink()
    (out / "metrics.jsonl").write_text("")  # rows now come only from this resume (steps 5-8)
    proc = resume(toy_root, out)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in proc.stderr
    assert [r["step"] for r in metrics(out)] == [5, 6, 7, 8]
    assert_same_losses(reference, metrics(out))
    assert_same_checkpoint(reference / "checkpoint-8", out / "checkpoint-8")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-8"]


def test_two_rank_checkpoint_loads_in_one_process(reference: Path, toy_root: Path, tmp_path: Path,
                                                  single_process_dist: Any) -> None:
    """DCP reshards the 2-rank checkpoint onto world size 1: weights, optimizer state and the EMA shards."""
    from fv_accel.build import build_run
    from fv_accel.callbacks.registry import build_callbacks
    from fv_accel.checkpoint import CheckpointManager
    from fv_accel.checkpoint.layout import read_ema_state_dict
    from fv_accel.config import parse_overrides, resolve_config

    ckpt = reference / "checkpoint-8"
    ema_ref = load_file(str(reference.parent / "ema_full.safetensors"))  # gathered by the 2-rank run itself
    flat = read_checkpoint(ckpt)
    student = {k[len("roles.student.transformer."):]: v for k, v in flat.items()
               if k.startswith("roles.student.transformer.")}

    # The one-process reader used by export and sampling.
    ema = read_ema_state_dict(ckpt)
    assert ema.keys() == student.keys() == ema_ref.keys()
    assert all(torch.equal(ema[k], ema_ref[k]) for k in ema_ref)
    assert all(v.dtype == torch.float32 for v in ema.values())
    assert any(not torch.equal(ema[k], student[k]) for k in ema)  # decay 0.5: the average is not the weights

    # The whole run state, loaded by a world-size-1 run (as a different topology would).
    cfg = resolve_config(dmd2_config(toy_root, tmp_path / "one"), parse_overrides([]))
    built = build_run(cfg, single_process_dist)
    callbacks = build_callbacks(cfg, built.method)
    manager = CheckpointManager(output_dir=tmp_path / "one", method=built.method, data=built.data,
                                callbacks=callbacks, config_dump={}, keep_last=0)
    built.method.on_train_start()
    ema_cb = callbacks.get("ema")
    assert ema_cb is not None
    ema_cb.on_train_start(None)  # type: ignore[arg-type]
    assert manager.load(ckpt) == MAX_STEPS
    # The data position carries over to the new world size: epoch 1, after the 2 x 64 x 2 rows the two ranks
    # consumed of its order; the one process continues with the next 64 rows of that order.
    data = built.data
    assert data is not None and (data.epoch, data.rows_consumed) == (1, 2 * 64 * 2)
    order = data.sampler.epoch_order(1).tolist()  # epoch 1's order (row-group windows by default)
    assert next(data).index.tolist() == order[256:320]
    weights = built.method.student.transformer.state_dict()
    for k, v in student.items():
        assert torch.equal(weights[k].full_tensor(), v), k
    critic = built.method.role_models["critic"].transformer.state_dict()
    critic_ref = {k[len("roles.critic.transformer."):]: v for k, v in flat.items()
                  if k.startswith("roles.critic.transformer.")}
    assert critic_ref.keys() == critic.keys()
    assert all(torch.equal(critic[k].full_tensor(), v) for k, v in critic_ref.items())
    shadow = ema_cb.shadow_full()  # type: ignore[attr-defined]
    assert all(torch.equal(shadow[k], ema_ref[k]) for k in ema_ref)
    opt = built.method.roles["student"].optimizer.optimizer
    assert all(float(s["step"]) == ROLE_STEPS["student"] for s in opt.state.values())
    exp_avg = {k: v for k, v in flat.items() if k.startswith("optimizers.student.") and k.endswith(".exp_avg")}
    assert len(exp_avg) == len(opt.state)
    names = {id(p): n for n, p in built.method.student.transformer.named_parameters()}
    for p, s in opt.state.items():
        assert torch.equal(s["exp_avg"].full_tensor(), exp_avg[f"optimizers.student.state.transformer.{names[id(p)]}.exp_avg"])
    with ema_cb.swapped_in():  # type: ignore[attr-defined]
        inside = {k: v.full_tensor().clone() for k, v in built.method.student.transformer.state_dict().items()}
    assert all(torch.equal(inside[k], ema_ref[k]) for k in ema_ref)
    after = built.method.student.transformer.state_dict()
    assert all(torch.equal(after[k].full_tensor(), student[k]) for k in student)  # restored exactly
    shutil.rmtree(tmp_path / "one", ignore_errors=True)
