"""Preemption with DataLoader workers, signalled the way launchers and schedulers do it.

torchrun forwards a stop signal with ``killpg`` to each rank's process group (every rank is a session leader),
which holds the rank's DataLoader workers too; Slurm signals every process of a job step. The workers must
outlive the signal so that the rank reaches the step boundary, saves with the others and exits 143; the
resumed run must then continue exactly like the uninterrupted reference of ``tests/test_resume.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ACCELERATE, CPU_2PROC, REPO, free_port, run_python, subprocess_env
from test_resume import (
    MAX_STEPS,
    SCRIPT,
    assert_same_checkpoint,
    assert_same_losses,
    assert_same_losses_after,
    launch,
    metrics,
    run_args,
)

from fv_accel.config import DataConfig, parse_overrides, resolve_config
from fv_accel.data import build_data_stream
from fv_accel.errors import ConfigError

NUM_WORKERS = "--training.data.num_workers=2"


# -- the loader, in this process ---------------------------------------------------------------------------


def _signal_self_then_init(worker_id: int, *, init: Any, signums: tuple[int, ...]) -> None:
    """A worker that is signalled during its start-up, before the loader's own worker_init_fn (if any) runs."""
    for signum in signums:
        os.kill(os.getpid(), signum)
    if init is not None:
        init(worker_id)


def _mask(pid: int, field: str) -> set[int]:
    """Signal numbers in ``SigIgn``/``SigBlk`` of /proc/<pid>/status (bit n-1 = signal n)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    bits = int(line.split()[1], 16)
    return {n for n in range(1, 65) if bits >> (n - 1) & 1}


@pytest.mark.timeout(120)  # a deadlocked worker must fail this test, not stall the suite for 10 minutes
def test_loader_workers_outlive_stop_signals(toy_root: Path) -> None:
    """Workers ignore SIGTERM, SIGINT and the configured SIGUSR1, also when one arrives during their start-up
    (before worker_init_fn); they keep producing the epoch's order, and close() still ends them."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    cfg = DataConfig(data_path=str(toy_root / "data"), text_len=8, train_batch_size=64, num_workers=2,
                     shuffle="rows")  # a plain row permutation: the oracle below
    stream = build_data_stream(cfg, rank=0, world_size=1, stop_signals=["SIGUSR1"])
    loader_init = stream.loader.worker_init_fn
    stream.loader.worker_init_fn = lambda wid: _signal_self_then_init(wid, init=loader_init, signums=stops)
    before = set(multiprocessing.active_children())
    order = np.random.default_rng([0, 0]).permutation(768)  # seed 0, epoch 0: the oracle of the row order
    assert next(stream).index.tolist() == order[:64].tolist()
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    for w in workers:
        assert {int(s) for s in stops} <= _mask(w.pid, "SigIgn"), "worker does not ignore the stop signals"
        assert not {int(s) for s in stops} & _mask(w.pid, "SigBlk"), "worker left the stop signals blocked"
        assert int(signal.SIGUSR2) not in _mask(w.pid, "SigIgn")  # only what was asked for
        for s in stops:  # now from outside, as a launcher's killpg would
            os.kill(w.pid, s)
    time.sleep(0.3)
    assert all(w.is_alive() for w in workers)
    for k in range(1, 4):
        assert next(stream).index.tolist() == order[64 * k: 64 * (k + 1)].tolist()
    stream.close()  # a terminate() (SIGTERM) would not end them any more: the stop message must
    deadline = time.monotonic() + 10
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(w.is_alive() for w in workers)


def test_process_exits_with_live_loader_workers(toy_root: Path) -> None:
    """A stream still referenced at interpreter exit: multiprocessing's exit handler terminates (SIGTERM, now
    ignored) and joins the workers, so the stream must shut them down first or the process never exits."""
    code = (
        "import sys\n"
        "from fv_accel.config import DataConfig\n"
        "from fv_accel.data import build_data_stream\n"
        f"cfg = DataConfig(data_path={str(toy_root / 'data')!r}, text_len=8, train_batch_size=64, num_workers=2)\n"
        "stream = build_data_stream(cfg, rank=0, world_size=1)\n"
        "next(stream)\n"
        "KEEP = [stream]\n"
        "KEEP.append(KEEP)  # a cycle: freed only after atexit\n"
        "print('bye', flush=True)\n"
    )
    proc = run_python(["-c", code], cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "bye" in proc.stdout, proc.stderr[-2000:]


def test_preempt_signals_config(toy_root: Path) -> None:
    base = {"models": {"student": {"family": "wan", "init_from": str(toy_root / "init"), "trainable": True,
                                   "latent_stats": "identity"}},
            "method": {"name": "finetune"}}
    assert resolve_config(base, []).training.checkpoint.preempt_signals == ["SIGTERM", "SIGINT"]
    cfg = resolve_config(base, parse_overrides(["--training.checkpoint.preempt_signals=[SIGUSR1, SIGTERM]"]))
    assert cfg.training.checkpoint.preempt_signals == ["SIGUSR1", "SIGTERM"]
    for bad in ("[USR1]", "[SIGKILL]", "[SIG_IGN]", "[SIGTERM, SIGTERM]", "SIGTERM"):
        with pytest.raises(ConfigError, match=r"training\.checkpoint\.preempt_signals"):
            resolve_config(base, parse_overrides([f"--training.checkpoint.preempt_signals={bad}"]))


# -- 2-process toy DMD2 under accelerate launch ------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def launch_and_signal(toy_root: Path, out: Path, signum: int, *extra: str) -> tuple[subprocess.CompletedProcess,
                                                                                    int]:
    """Launch the toy DMD2 with 2 loader workers per rank and, once 2 steps are logged, send ``signum`` to each
    rank's process group from outside (what torchrun does with a signal it forwards). Returns the finished
    launch and the step its rows reached when the signal was sent."""
    cmd = [ACCELERATE, "launch", "--config_file", CPU_2PROC, "--main_process_port", str(free_port()),
           *run_args(toy_root, out, NUM_WORKERS, *extra)]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as fh:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(FVR_RECIPE="distill"), stdout=fh,
                                    stderr=subprocess.STDOUT, text=True)
    try:
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + 240
        while len(rows) < 2:
            assert launcher.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no 2 metrics rows in time"
            time.sleep(0.05)
            rows = metrics(out) if (out / "metrics.jsonl").exists() else []
        ranks = [p for p in _children(launcher.pid)
                 if SCRIPT in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
        assert len(ranks) == 2
        groups = [os.getpgid(p) for p in ranks]
        assert groups == ranks  # torchrun starts every rank as its own session (and process group) leader
        for rank, group in zip(ranks, groups, strict=True):
            workers = _children(rank)
            assert len(workers) >= 2 and all(os.getpgid(w) == group for w in workers)  # killpg reaches them
        sent_at = rows[-1]["step"]
        for group in groups:
            os.killpg(group, signum)
        launcher.wait(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    deadline = time.monotonic() + 20  # the ranks' workers are shut down by the ranks, not left behind
    while any(_process_group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_process_group_alive(g) for g in groups), "processes left in a rank's group"
    return subprocess.CompletedProcess(cmd, launcher.returncode, "", log.read_text()), sent_at


def assert_preempted_then_resumes_exactly(reference: Path, toy_root: Path, out: Path, signum: int,
                                          *extra: str) -> None:
    proc, sent_at = launch_and_signal(toy_root, out, signum, *extra)
    log = proc.stderr
    assert "is killed by signal" not in log, log[-4000:]
    messages = re.findall(rf"fv_accel: error: stopped by signal {int(signum)} after step (\d+); checkpoint: (\S+)\.",
                          log)
    assert len(messages) == 2, log[-4000:]  # one per rank, the same step and checkpoint on both
    assert messages[0] == messages[1]
    step = int(messages[0][0])
    # The signal reached the ranks during step sent_at + 1 at the earliest; one more step if it arrived on a
    # rank after that step's all-reduce. The run must have stopped early, not finished.
    assert sent_at + 1 <= step <= sent_at + 2 < MAX_STEPS, (sent_at, step)
    ckpt = out / f"checkpoint-{step}"
    assert messages[0][1] == str(ckpt)
    assert proc.returncode != 0
    assert log.count("exitcode  : 143") == 2, log[-4000:]  # the launcher's report: both ranks exited 143
    assert (ckpt / ".metadata").is_file() and not list(out.glob("*.partial"))
    assert {p.name.split("_")[2] for p in ckpt.glob("*.distcp")} == {"0", "1"}  # both ranks' shards
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))
    assert_same_losses(reference, metrics(out))

    proc = launch(toy_root, out, NUM_WORKERS, *extra, "--training.checkpoint.resume_from_checkpoint=latest")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {ckpt} at step {step}" in proc.stderr
    assert_same_losses_after(reference, out, 0)
    assert_same_checkpoint(reference / "checkpoint-8", out / "checkpoint-8")


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_each_rank_group_with_workers(reference: Path, toy_root: Path, tmp_path: Path) -> None:
    """SIGTERM by killpg to each rank's group (workers included): checkpoint, 143 on both ranks, exact resume."""
    assert_preempted_then_resumes_exactly(reference, toy_root, tmp_path / "term", signal.SIGTERM)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_early_warning_signal_with_workers(reference: Path, toy_root: Path, tmp_path: Path) -> None:
    """The same with Slurm's early warning, SIGUSR1 configured in training.checkpoint.preempt_signals."""
    assert_preempted_then_resumes_exactly(reference, toy_root, tmp_path / "usr1", signal.SIGUSR1,
                                          "--training.checkpoint.preempt_signals=[SIGTERM, SIGINT, SIGUSR1]")
