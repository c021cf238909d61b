"""Async checkpoints (``training.checkpoint.async_save``, fv_accel/checkpoint/manager.py + the loop).

In process, world size 1 with a real gloo group (``single_process_dist``), the loop of tests/test_loop.py over
nn.Linear roles. The write is held back deterministically by a storage writer that waits on an event (in the
SIGKILL test: forever), never by timing: the expected values are the live state snapshotted at the save step,
which later steps change.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import PYTHON, REPO, subprocess_env
from test_loop import Harness
from test_resume import read_checkpoint
from test_retention import TinyMethod, make_manager

from fv_accel.callbacks import Callback, CallbackList
from fv_accel.checkpoint import CheckpointManager, resolve_checkpoint
from fv_accel.checkpoint.manager import is_complete, load_rng_file
from fv_accel.errors import CheckpointError
from fv_accel.trainer import Trainer

SAVE_STEPS = 2
MAX_STEPS = 4
#: deadlock guard only: a correct run releases the gate long before this
GATE_TIMEOUT_S = 10.0


class GatedWriter(dcp.FileSystemWriter):
    """Writes nothing until ``gate`` is set; records when its shards are written."""

    def __init__(self, path: Path, gate: threading.Event | None, log: list[str]) -> None:
        super().__init__(str(path), thread_count=2)
        self.gate = gate
        self.log = log

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.gate is not None:
            self.gate.wait(GATE_TIMEOUT_S)
        result = super().write_data(plan, planner)
        self.log.append("written")
        return result


class Position:
    """Stands in for the data stream: how many batches the loop consumed (a Stateful)."""

    def __init__(self) -> None:
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])


class Probe(Callback):
    """Advances the data position and the global RNG every step (so that state captured late is wrong),
    snapshots the live state at the save step, and at the next step records whether the write of that save
    had finished before releasing it."""

    name = "probe"

    def __init__(self, position: Position, log: list[str], gate: threading.Event) -> None:
        self.position = position
        self.log = log
        self.gate = gate
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.seen_at_next_step: list[str] | None = None
        self.checkpoints: CheckpointManager | None = None

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.position.batches += 1
        torch.randn(3)  # the RNG moves on every step
        # The loop saves right after this hook: this is the state checkpoint-<step> must hold.
        self.snapshots[step] = {"tensors": live_tensors(trainer.method), "rng": torch.get_rng_state(),
                                "batches": self.position.batches}
        if step == SAVE_STEPS + 1:
            assert self.checkpoints is not None
            # The step after the save ran its forward, backward and optimizer step; has the write finished?
            self.seen_at_next_step = [*self.log, f"pending={self.checkpoints.pending_step}"]
            self.gate.set()


@dataclass
class Setup:
    trainer: Trainer
    manager: CheckpointManager
    out: Path
    probe: Probe
    log: list[str]


def build(single_process_dist: Any, tmp_path: Path, *, async_save: bool, gated: bool,
          nan_at: int | None = None) -> Setup:
    """The loop (max 4 steps, saves at 2 and 4); with ``gated``, save 2's write waits until the end of step 3
    (or until step ``nan_at`` fetches its batch; that step's loss is NaN, which stops the run)."""
    h = Harness(single_process_dist, tmp_path / ("async" if async_save else "sync"), max_train_steps=MAX_STEPS)
    h.cfg.training.checkpoint.save_steps = SAVE_STEPS
    for scheduler in h.method.get_lr_schedulers(1):
        vars(scheduler).pop("step", None)  # the harness's call recorder (a closure) would land in the state dict
    out = Path(h.cfg.training.checkpoint.output_dir)
    log: list[str] = []
    gate = threading.Event()
    position = Position()
    probe = Probe(position, log, gate)
    callbacks = CallbackList([probe])
    saves = iter([gate if gated else None])  # only the first save (step 2) waits for the gate

    def make_writer(path: Path) -> GatedWriter:
        return GatedWriter(path, next(saves, None), log)

    manager = CheckpointManager(output_dir=out, method=h.method, data=position,  # type: ignore[arg-type]
                                callbacks=callbacks, config_dump={}, async_save=async_save,
                                make_writer=make_writer)
    probe.checkpoints = manager

    def batches() -> Any:
        for step, batch in enumerate(h.batches, start=1):
            if step == nan_at:
                gate.set()
            yield batch

    if nan_at is not None:
        h.method.nan_at[nan_at] = "student_loss"
    trainer = Trainer(accelerator=single_process_dist, method=h.method, data=batches(), cfg=h.cfg,
                      callbacks=callbacks, checkpoints=manager, show_progress=False)
    return Setup(trainer=trainer, manager=manager, out=out, probe=probe, log=log)


def run(single_process_dist: Any, tmp_path: Path, *, async_save: bool,
        gated: bool) -> tuple[Path, Probe, list[str]]:
    setup = build(single_process_dist, tmp_path, async_save=async_save, gated=gated)
    assert setup.trainer.fit() == MAX_STEPS
    return setup.out, setup.probe, setup.log


def live_tensors(method: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the method's checkpoint state, flattened to DCP's keys, copied now."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}", value)
        elif torch.is_tensor(node):
            flat[prefix] = node.detach().clone()

    for name, state in method.checkpoint_state().items():
        walk(name, state.state_dict())
    return flat


def assert_holds(ckpt: Path, snapshot: dict[str, Any]) -> None:
    state = read_checkpoint(ckpt)
    tensors = snapshot["tensors"]
    assert {"roles.student.transformer.weight", "optimizers.critic.state.transformer.weight.exp_avg",
            "optimizers.student.state.transformer.bias.step"} <= tensors.keys()
    differ = [k for k, v in tensors.items() if not torch.equal(state[k], v)]
    assert not differ, differ
    assert state["dataloader.rank0.batches"] == snapshot["batches"]
    rng = load_rng_file(ckpt / "random_state.rank0.pt")
    assert torch.equal(rng["torch"], snapshot["rng"])


def test_loop_continues_while_the_write_is_in_flight(single_process_dist: Any, tmp_path: Path) -> None:
    """checkpoint-2's write is held until the end of step 3: step 3 must have run meanwhile (save 2 still
    pending), and checkpoint-2 must still hold the step-2 state that step 3 changed."""
    out, probe, log = run(single_process_dist, tmp_path, async_save=True, gated=True)
    assert probe.seen_at_next_step == [f"pending={SAVE_STEPS}"]  # nothing written yet, save 2 in flight
    assert log == ["written", "written"]  # save 2 (released at step 3), save 4
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    assert is_complete(out / "checkpoint-2") and is_complete(out / "checkpoint-4")
    step2, step3 = probe.snapshots[2], probe.snapshots[3]
    key = "roles.student.transformer.weight"
    assert not torch.equal(step2["tensors"][key], step3["tensors"][key])  # step 3 changed what save 2 holds
    assert_holds(out / "checkpoint-2", step2)  # staged at step 2, although written after step 3
    assert_holds(out / "checkpoint-4", probe.snapshots[4])


def test_failing_run_lets_the_write_end_and_leaves_a_partial(single_process_dist: Any, tmp_path: Path) -> None:
    """A run that fails (NaN loss at step 3) while save 2 is in flight: before the exception leaves fit(), the
    write has ended (nothing keeps writing while the process group is torn down) and is not finalised: only
    ``checkpoint-2.partial`` (with DCP's shards and .metadata), which `latest` skips."""
    from fv_accel.errors import NonFiniteError

    setup = build(single_process_dist, tmp_path, async_save=True, gated=True, nan_at=3)
    with pytest.raises(NonFiniteError, match="step 3"):
        setup.trainer.fit()
    out = setup.out
    assert setup.manager.pending_step is None  # given up, on this rank alone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2.partial"]
    assert (out / "checkpoint-2.partial" / ".metadata").is_file()  # the write ended before fit() returned
    assert not (out / "checkpoint-2.partial" / "metadata.json").exists()
    assert resolve_checkpoint("latest", out) is None


def test_preemption_while_a_write_is_in_flight_saves_both(single_process_dist: Any, tmp_path: Path) -> None:
    """SIGTERM right after save 2 went async (its write held back): the stop agreed at step 3 must finalise
    save 2, then write checkpoint-3 completely, before Preempted (exit 143) leaves fit(); `latest` is 3."""
    from fv_accel.errors import EXIT_PREEMPTED, Preempted

    setup = build(single_process_dist, tmp_path, async_save=True, gated=True)
    manager, out = setup.manager, setup.out
    # The writer of save 2 holds the probe's gate; the probe would open it at step 3's on_step_end, which could
    # let the step boundary finalise save 2 before the stop. Hand the probe a dummy: this test opens the gate
    # only once the preemption save has begun, so save 2 is certainly still in flight then.
    gate, setup.probe.gate = setup.probe.gate, threading.Event()
    calls: list[tuple[int, bool, int | None]] = []
    save = manager.save

    def recording_save(step: int, *, blocking: bool = False) -> Path:
        calls.append((step, blocking, manager.pending_step))
        if step != SAVE_STEPS:
            gate.set()  # the save after save 2 has begun
        path = save(step, blocking=blocking)
        if step == SAVE_STEPS and not blocking:
            signal.raise_signal(signal.SIGTERM)  # handled (by the trainer's handler) before this returns
        return path

    manager.save = recording_save  # type: ignore[method-assign]
    with pytest.raises(Preempted, match=r"after step 3; checkpoint: .*checkpoint-3\b") as info:
        setup.trainer.fit()
    assert info.value.exit_code == EXIT_PREEMPTED == 143
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # no .partial
    assert is_complete(out / "checkpoint-2") and is_complete(out / "checkpoint-3")
    assert resolve_checkpoint("latest", out) == out / "checkpoint-3"
    assert_holds(out / "checkpoint-2", setup.probe.snapshots[2])  # staged at step 2, written during the stop
    assert_holds(out / "checkpoint-3", setup.probe.snapshots[3])
    assert manager.pending_step is None
    # The scenario really happened: save 2 async, the preemption save at step 3 begun while save 2 was pending.
    assert calls == [(SAVE_STEPS, False, None), (SAVE_STEPS + 1, True, SAVE_STEPS)]
    assert setup.log == ["written", "written"]  # save 2's write (released by the preemption save), then save 3's


def test_async_and_sync_checkpoints_load_to_identical_state(single_process_dist: Any, tmp_path: Path) -> None:
    async_out, async_probe, _ = run(single_process_dist, tmp_path, async_save=True, gated=True)
    sync_out, sync_probe, _ = run(single_process_dist, tmp_path, async_save=False, gated=False)
    assert sync_probe.seen_at_next_step == ["written", "pending=None"]  # the synchronous save blocked
    for step in (2, 4):
        a, s = read_checkpoint(async_out / f"checkpoint-{step}"), read_checkpoint(sync_out / f"checkpoint-{step}")
        assert a.keys() == s.keys()
        differ = [k for k in a if not (torch.equal(a[k], s[k]) if torch.is_tensor(a[k]) else a[k] == s[k])]
        assert not differ, differ
        assert_holds(sync_out / f"checkpoint-{step}", async_probe.snapshots[step])
    # A fresh run loaded from either checkpoint-2 holds the live state of step 2.
    for out in (async_out, sync_out):
        fresh = Harness(single_process_dist, tmp_path / f"load-{out.name}", max_train_steps=MAX_STEPS)
        for scheduler in fresh.method.get_lr_schedulers(1):
            vars(scheduler).pop("step", None)
        manager = CheckpointManager(output_dir=out, method=fresh.method, data=Position(),  # type: ignore[arg-type]
                                    callbacks=CallbackList(), config_dump={})
        assert manager.load(out / "checkpoint-2") == 2
        loaded, want = live_tensors(fresh.method), async_probe.snapshots[2]["tensors"]
        assert loaded.keys() == want.keys()
        assert all(torch.equal(loaded[k], want[k]) for k in want), out


def test_failed_async_write_fails_the_run_and_keeps_latest(single_process_dist: Any, tmp_path: Path) -> None:
    """A write that raises in the background surfaces at finalisation as CheckpointError naming the .partial;
    nothing is renamed and `latest` stays the previous checkpoint."""
    out = tmp_path / "run"

    class Broken(dcp.FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            raise OSError("No space left on device")

    method = TinyMethod()
    manager = make_manager(out, method)
    manager.save(1)
    manager.async_save, manager.make_writer = True, lambda path: Broken(str(path))
    method.train()
    manager.save(2)
    message = r"checkpoint-2\.partial failed on this rank \(OSError: No space left on device\); it stays incomplete$"
    with pytest.raises(CheckpointError, match=message):
        manager.wait_pending()
    assert manager.pending_step is None
    assert resolve_checkpoint("latest", out) == out / "checkpoint-1"
    assert (out / "checkpoint-2.partial").is_dir() and not (out / "checkpoint-2").exists()


KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
import torch
import torch.distributed.checkpoint as dcp
sys.path.insert(0, sys.argv[2])
from test_retention import TinyMethod, make_manager

out = Path(sys.argv[1])


class StuckWriter(dcp.FileSystemWriter):
    # Writes this rank's shards, then never returns: DCP's .metadata (written after) never appears.
    def write_data(self, plan, planner):
        result = super().write_data(plan, planner)
        (out / "WRITTEN").touch()
        while True:
            time.sleep(0.05)


torch.manual_seed(0)
method = TinyMethod()
manager = make_manager(out, method)
manager.async_save = True
method.train()
manager.save(1)
manager.wait_pending()
manager.make_writer = lambda path: StuckWriter(str(path))
method.train()
manager.save(2)
method.train()  # the loop goes on while checkpoint-2 is written
(out / "TRAINED").touch()
manager.wait_pending()  # blocks: killed here
"""


def test_sigkill_during_async_write_leaves_only_a_partial(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([PYTHON, "-c", KILL_SCRIPT, str(out), str(REPO / "tests")], cwd=REPO,
                            env=subprocess_env(PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "WRITTEN").exists() and (out / "TRAINED").exists()):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the async write never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-1", "checkpoint-2.partial"]
    partial = out / "checkpoint-2.partial"
    assert list(partial.glob("*.distcp")) and (partial / "random_state.rank0.pt").is_file()
    assert not (partial / ".metadata").exists() and not (partial / "metadata.json").exists()
    assert resolve_checkpoint("latest", out) == out / "checkpoint-1"

    # The next run resumes from checkpoint-1 (one AdamW step from the initial weights), never from the partial.
    torch.manual_seed(0)  # as the killed run
    expected = TinyMethod()
    expected.train()
    resumed = TinyMethod(fill=5.0)
    manager = make_manager(out, resumed)
    assert manager.load(resolve_checkpoint("latest", out)) == 1  # type: ignore[arg-type]
    assert torch.equal(resumed.model.weight, expected.model.weight)
    assert torch.equal(resumed.model.bias, expected.model.bias)
    resumed.train()
    manager.save(2)  # over the leftover .partial of the killed run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    expected.train()
    assert torch.equal(read_checkpoint(out / "checkpoint-2")["roles.student.transformer.weight"],
                       expected.model.weight)


def test_async_save_setting() -> None:
    from fv_accel.checkpoint.manager import resolve_async_save
    from fv_accel.config import CheckpointConfig

    assert CheckpointConfig().async_save == "auto"
    assert resolve_async_save("auto") is torch.cuda.is_available()
    assert resolve_async_save(True) is True and resolve_async_save(False) is False
    with pytest.raises(ValueError, match="async_save"):
        CheckpointConfig.model_validate({"async_save": "sometimes"})


def test_writer_fails_when_a_write_thread_fails(tmp_path: Path) -> None:
    """With several write threads, DCP alone only prints a helper thread's exception and writes .metadata
    anyway (a checkpoint that looks complete but cannot be loaded); the manager's writer must fail the save."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from fv_accel.checkpoint.manager import default_writer

    helper_took_an_item = threading.Event()

    class HelperFails(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                helper_took_an_item.wait(GATE_TIMEOUT_S)  # holds one file, so a helper thread takes another
            else:
                helper_took_an_item.set()
                raise RuntimeError("disk error in a helper write thread")
            return super().resolve_data(write_item)

    state = {name: torch.full((100,), float(i)) for i, name in enumerate("abcdefgh")}
    with pytest.raises(BaseException, match="a write thread failed"):  # noqa: PT011 - DCP's CheckpointException
        dcp.save(state, storage_writer=default_writer(tmp_path / "ckpt"), planner=HelperFails(), no_dist=True)
    assert helper_took_an_item.is_set()
    assert not (tmp_path / "ckpt" / ".metadata").exists()


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_async_checkpoints_equal_sync(reference: Path, toy_root: Path, tmp_path: Path) -> None:
    """2-process FSDP2 DMD2 (DTensor shards, EMA, two data positions, per-rank RNG), saves at 4 and 8: with
    async_save the losses and both checkpoints are bit for bit those of the synchronous run (the session's
    ``reference`` run of ``tests/test_resume.py``: async_save "auto", synchronous on CPU)."""
    from test_resume import (
        assert_same_checkpoint,
        assert_same_losses,
        assert_same_rng,
        launch,
        metrics,
        rng_states,
    )

    async_ = tmp_path / "async-true"
    proc = launch(toy_root, async_, "--training.checkpoint.async_save=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the async path really ran (one log line per async save, rank 0); the reference's did not (its fixture)
    assert proc.stderr.count("checkpoint-4 complete (async save)") == 1, proc.stderr[-4000:]
    sync = reference
    for out in (sync, async_):
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert_same_losses(sync, metrics(async_))
    a, s = read_checkpoint(async_ / "checkpoint-4"), read_checkpoint(sync / "checkpoint-4")
    assert a.keys() == s.keys() and any(k.startswith("callbacks.ema.") for k in a)
    differ = [k for k in a if not (torch.equal(a[k], s[k]) if torch.is_tensor(a[k]) else a[k] == s[k])]
    assert not differ, differ
    for x, y in zip(rng_states(async_ / "checkpoint-4"), rng_states(sync / "checkpoint-4"), strict=True):
        assert_same_rng(x, y, "random_state")
    assert_same_checkpoint(sync / "checkpoint-8", async_ / "checkpoint-8")
