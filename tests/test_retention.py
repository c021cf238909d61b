"""Checkpoint completeness and retention (fv_accel/checkpoint/manager.py), in one process with a tiny model.

A save "killed midway" is simulated by an exception raised at a chosen point inside ``CheckpointManager.save``:
the manager has no cleanup on that path, so the directory tree is exactly what a SIGKILL at that point leaves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fv_accel.checkpoint.manager as manager_mod
from fv_accel.callbacks import CallbackList
from fv_accel.checkpoint import CheckpointManager, resolve_checkpoint
from fv_accel.checkpoint.manager import is_complete, list_checkpoints, resume_command
from fv_accel.checkpoint.states import ModelState, OptimizerState, RoleModuleContainer
from fv_accel.errors import CheckpointError
from fv_accel.methods.base import TrainingMethod


class TinyMethod:
    """The part of the TrainingMethod API the manager uses: one trainable nn.Linear and its AdamW."""

    def __init__(self, fill: float = 0.0) -> None:
        self.model = nn.Linear(3, 2)
        with torch.no_grad():
            self.model.weight.fill_(fill)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)

    def optimizers(self) -> dict[str, Any]:
        return {"student": self.optimizer}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"roles.student.transformer": ModelState(self.model),
                "optimizers.student": OptimizerState(RoleModuleContainer({"transformer": self.model}),
                                                     self.optimizer)}

    def train(self) -> None:
        self.model(torch.ones(4, 3)).sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def random_state(self) -> dict[str, Any]:
        return {}

    def load_random_state(self, state: dict[str, Any]) -> None:
        pass

    def seed_optimizer_state_for_resume(self) -> None:
        TrainingMethod.seed_optimizer_state_for_resume(self)  # type: ignore[arg-type]


class Killed(Exception):
    pass


def make_manager(out: Path, method: TinyMethod | None = None, keep_last: int = 2) -> CheckpointManager:
    return CheckpointManager(output_dir=out, method=method or TinyMethod(), data=None,  # type: ignore[arg-type]
                             callbacks=CallbackList(), config_dump={"test": True}, keep_last=keep_last)


def complete_steps(out: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(out)]


def all_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


# Points inside save() where a kill leaves a different tree: shards written but no RNG; RNG written but no
# metadata.json; everything written, not yet renamed; and (when the step's directory already exists) the old
# one moved aside but the new one not yet in place.
KILL_POINTS = ["capture_rng_state", "_write_atomic", "_fsync_dir", "replace_final"]


def kill_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    if point == "replace_final":
        real = manager_mod.os.replace

        def replace(src: Any, dst: Any) -> None:
            if str(src).endswith(".partial"):
                raise Killed(point)
            real(src, dst)

        monkeypatch.setattr(manager_mod.os, "replace", replace)
    else:
        def boom(*args: Any, **kwargs: Any) -> None:
            raise Killed(point)

        monkeypatch.setattr(manager_mod, point, boom)


def test_keep_last_under_repeated_saves(tmp_path: Path) -> None:
    out = tmp_path / "run"
    method = TinyMethod()
    manager = make_manager(out, method)
    for step in range(1, 7):
        method.train()
        manager.save(step)
        assert complete_steps(out) == list(range(max(1, step - 1), step + 1))
        assert all_names(out) == [f"checkpoint-{s}" for s in complete_steps(out)]
    assert resolve_checkpoint("latest", out) == out / "checkpoint-6"
    meta = json.loads((out / "checkpoint-6" / "metadata.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 1 and meta["config"] == {"test": True}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_save_never_costs_the_last_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              point: str) -> None:
    out = tmp_path / "run"
    method = TinyMethod()
    manager = make_manager(out, method)
    for step in (1, 2, 3):
        method.train()
        manager.save(step)
    if point == "replace_final":  # a leftover incomplete checkpoint-4 makes save() move it aside first
        (out / "checkpoint-4").mkdir()
    with monkeypatch.context() as m:
        kill_at(m, point)
        method.train()
        with pytest.raises(Killed):
            manager.save(4)
    # The killed save left debris but took nothing away: 2 and 3 are still complete, `latest` is 3.
    assert complete_steps(out) == [2, 3]
    assert resolve_checkpoint("latest", out) == out / "checkpoint-3"
    assert any(name.startswith("checkpoint-4") for name in all_names(out))
    # A restarted run saves step 4 again over the debris, then 5: retention removes 2, 3 and all debris.
    restarted = make_manager(out, method)
    restarted.save(4)
    assert complete_steps(out) == [3, 4]
    method.train()
    restarted.save(5)
    assert all_names(out) == ["checkpoint-4", "checkpoint-5"]


def test_incomplete_and_stale_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Nothing complete: `latest` starts fresh; an explicit incomplete path is an error naming it.
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "__0_0.distcp").write_bytes(b"half")
    assert resolve_checkpoint("latest", out) is None
    with pytest.raises(CheckpointError, match="checkpoint-7.*incomplete"):
        resolve_checkpoint(str(out / "checkpoint-7"), out)
    # Saving over the incomplete directory of the same step works.
    manager = make_manager(out, TinyMethod(fill=1.0), keep_last=0)
    manager.save(7)
    assert is_complete(out / "checkpoint-7") and (out / "checkpoint-7" / "__0_0.distcp").read_bytes() != b"half"
    # A complete checkpoint-7 from another timeline (a run resumed from an earlier step) is replaced, not kept.
    other = TinyMethod(fill=2.0)
    make_manager(out, other, keep_last=0).save(7)
    reloaded = TinyMethod(fill=0.0)
    make_manager(out, reloaded).load(out / "checkpoint-7")
    assert torch.equal(reloaded.model.weight, torch.full((2, 3), 2.0))


def test_load_restores_and_proves_optimizer_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    method = TinyMethod()
    for _ in range(3):
        method.train()
    make_manager(out, method).save(3)
    fresh = TinyMethod(fill=5.0)
    assert make_manager(out, fresh).load(out / "checkpoint-3") == 3
    assert torch.equal(fresh.model.weight, method.model.weight)
    for p_ref, p_new in zip(method.model.parameters(), fresh.model.parameters(), strict=True):
        ref, new = method.optimizer.state[p_ref], fresh.optimizer.state[p_new]
        assert float(new["step"]) == 3 and torch.equal(new["exp_avg_sq"], ref["exp_avg_sq"])


def test_optimizer_that_never_stepped_stays_empty(tmp_path: Path) -> None:
    """Saving must not change the run: an AdamW without state (a DMD2 student before its first generator
    step) is saved without state and comes back empty, so its first real step is step 1 in both runs."""
    out = tmp_path / "run"
    method = TinyMethod()
    make_manager(out, method).save(1)
    assert not method.optimizer.state  # DCP's save did not materialise state
    assert json.loads((out / "checkpoint-1" / "metadata.json").read_text())["optimizers_without_state"] == ["student"]
    fresh = TinyMethod()
    make_manager(out, fresh).load(out / "checkpoint-1")
    assert not fresh.optimizer.state
    fresh.train()
    method.train()
    assert torch.equal(fresh.model.weight, method.model.weight)


def test_resume_command_replaces_the_resume_option() -> None:
    cmd = resume_command(["recipes/distill.py", "--config", "a b.yaml",
                          "--training.checkpoint.resume_from_checkpoint", "/x/checkpoint-3", "--training.loop.max_train_steps=9"])
    assert cmd == ("accelerate launch [same launcher flags] recipes/distill.py --config 'a b.yaml' "
                   "--training.loop.max_train_steps=9 --training.checkpoint.resume_from_checkpoint=latest")
