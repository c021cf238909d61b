"""Exact resume on 2-process FSDP2 (CPU, fp32): crash, lost completion marker, preemption, resharding.

One uninterrupted reference run (8 steps, checkpoints at 4 and 8, EMA on, per-rank epochs of 6 batches, so the
resumed part crosses an epoch boundary) is shared by every test; each interrupted run must
reproduce its logged losses exactly and its ``checkpoint-8`` bit for bit: weights, optimizer moments and step
counts, LR schedulers, EMA shards, data positions, per-rank RNG.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, run_2proc
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

SCRIPT = "tests/dist_scripts/resume_run.py"
MAX_STEPS = 8


def run_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    """The finetune toy run: 768 rows, 64 per batch and rank → 6 batches per epoch: epoch 1 starts at step 7."""
    return [SCRIPT, f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            f"--training.loop.max_train_steps={MAX_STEPS}", "--training.checkpoint.save_steps=4",
            "--training.checkpoint.keep_last=0", "--training.data.train_batch_size=64",
            "--callbacks.ema.decay=0.5", "--training.tracker.backends=[]", *extra]


def launch(toy_root: Path, out: Path, *extra: str, **env: str) -> Any:
    return run_2proc(run_args(toy_root, out, *extra), cwd=REPO, timeout=600, **env)


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
    return [pickle.loads((path / f"random_state.rank{r}.pt").read_bytes()) for r in range(2)]  # noqa: S301


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
    assert groups == {"roles.student", "optimizers.student", "schedulers.student", "callbacks.ema",
                      "dataloader.rank0", "dataloader.rank1"}, groups
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
    assert not differ, f"{len(differ)} entries differ, e.g. {differ[:5]}"
    assert a["dataloader.rank0.epoch"] == 1 and a["dataloader.rank0.batches_in_epoch"] == 2  # crossed epoch 0→1
    step_keys = [k for k in a if k.startswith("optimizers.student.state.") and k.endswith(".step")]
    assert step_keys and all(float(a[k]) == MAX_STEPS for k in step_keys)
    for r, (x, y) in enumerate(zip(rng_states(ref), rng_states(other), strict=True)):
        assert_same_rng(x, y, f"rank{r}")


def assert_same_losses_after(ref: Path, other: Path, start: int) -> None:
    want = {r["step"]: r["loss"] for r in metrics(ref)}
    got = metrics(other)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))  # rows past the resume step were dropped
    for row in got:
        if row["step"] > start:
            assert row["loss"] == want[row["step"]], f"step {row['step']}: {row['loss']!r} != {want[row['step']]!r}"


@pytest.fixture(scope="module")
def reference(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, plus its final EMA gathered to full tensors (``ema_full.safetensors``)."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = launch(toy_root, out, FVR_DUMP_EMA=str(out.parent / "ema_full.safetensors"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, MAX_STEPS + 1))
    return out


def test_sigkill_after_checkpoint_then_lost_marker(reference: Path, toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # 1. SIGKILL on every rank right after checkpoint-4 became complete: no cleanup of any kind.
    proc = launch(toy_root, out, FVR_SIGKILL_AFTER_SAVE="4")
    assert proc.returncode != 0
    assert (out / "checkpoint-4" / ".metadata").is_file() and not (out / "checkpoint-8").exists()
    # 2. resume from `latest` (= checkpoint-4) to step 8: the same run.
    proc = resume(toy_root, out)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in proc.stderr
    assert_same_losses_after(reference, out, 4)
    assert_same_checkpoint(reference / "checkpoint-8", out / "checkpoint-8")
    # 3. checkpoint-8 loses its completion marker (DCP's .metadata): `latest` must skip it, resume from 4 and
    #    save over the incomplete checkpoint-8 directory.
    (out / "checkpoint-8" / ".metadata").unlink()
    (out / "metrics.jsonl").write_text("")  # rows now come only from this resume (steps 5-8)
    proc = resume(toy_root, out)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in proc.stderr
    assert [r["step"] for r in metrics(out)] == [5, 6, 7, 8]
    want = {r["step"]: r["loss"] for r in metrics(reference)}
    assert all(r["loss"] == want[r["step"]] for r in metrics(out))
    assert_same_checkpoint(reference / "checkpoint-8", out / "checkpoint-8")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_sigterm_on_one_rank(reference: Path, toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "preempted"
    # Only rank 1 gets SIGTERM, during step 3; the per-step all-reduce makes both ranks stop after step 3.
    proc = launch(toy_root, out, FVR_SIGTERM_RANK="1", FVR_SIGTERM_STEP="3")
    assert proc.returncode != 0
    messages = [line for line in proc.stderr.splitlines() if "fv_accel: error: stopped by signal 15" in line]
    assert len(messages) == 2, proc.stderr[-4000:]  # one per rank
    assert all(f"checkpoint: {out / 'checkpoint-3'}" in m and "resume_from_checkpoint=latest" in m
               for m in messages)
    assert "exitcode  : 143" in proc.stderr  # the launcher's per-rank report
    assert "exitcode  : 1 " not in proc.stderr
    ckpt = out / "checkpoint-3"
    assert (ckpt / ".metadata").is_file() and json.loads((ckpt / "metadata.json").read_text())["step"] == 3
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # both ranks' shards
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    resume(toy_root, out)
    assert_same_losses_after(reference, out, 3)
    assert_same_checkpoint(reference / "checkpoint-8", out / "checkpoint-8")


def test_two_rank_checkpoint_loads_in_one_process(reference: Path, toy_root: Path, tmp_path: Path,
                                                  single_process_dist: Any) -> None:
    """DCP reshards the 2-rank checkpoint onto world size 1: weights, optimizer state and the EMA shards."""
    from fv_accel.build import build_run
    from fv_accel.callbacks.ema import load_ema_state_dict
    from fv_accel.callbacks.registry import build_callbacks
    from fv_accel.checkpoint import CheckpointManager
    from fv_accel.config import parse_overrides, resolve_config
    from fv_accel.toy import finetune_default_config

    ckpt = reference / "checkpoint-8"
    ema_ref = load_file(str(reference.parent / "ema_full.safetensors"))  # gathered by the 2-rank run itself
    flat = read_checkpoint(ckpt)
    student = {k[len("roles.student.transformer."):]: v for k, v in flat.items()
               if k.startswith("roles.student.transformer.")}

    # The one-process reader used by export and sampling.
    ema = load_ema_state_dict(ckpt)
    assert ema.keys() == student.keys() == ema_ref.keys()
    assert all(torch.equal(ema[k], ema_ref[k]) for k in ema_ref)
    assert all(v.dtype == torch.float32 for v in ema.values())
    assert any(not torch.equal(ema[k], student[k]) for k in ema)  # decay 0.5: the average is not the weights

    # The whole run state, loaded by a world-size-1 run (as a different topology would).
    cfg = resolve_config(finetune_default_config(toy_root, str(tmp_path / "one")), parse_overrides(
        run_args(toy_root, tmp_path / "one")[1:]))
    built = build_run(cfg, single_process_dist)
    callbacks = build_callbacks(cfg, built.method)
    manager = CheckpointManager(output_dir=tmp_path / "one", method=built.method, data=built.data,
                                callbacks=callbacks, config_dump={}, keep_last=0)
    built.method.on_train_start()
    ema_cb = callbacks.get("ema")
    assert ema_cb is not None
    ema_cb.on_train_start(None)  # type: ignore[arg-type]
    assert manager.load(ckpt) == MAX_STEPS
    weights = built.method.student.transformer.state_dict()
    for k, v in student.items():
        assert torch.equal(weights[k].full_tensor(), v), k
    shadow = ema_cb.shadow_full()  # type: ignore[attr-defined]
    assert all(torch.equal(shadow[k], ema_ref[k]) for k in ema_ref)
    opt = built.method._optimizer_dict["student"].optimizer
    assert all(float(s["step"]) == MAX_STEPS for s in opt.state.values())
    exp_avg = {k: v for k, v in flat.items() if k.endswith(".exp_avg")}
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
