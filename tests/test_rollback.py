"""Rolled-back timelines: resuming from a checkpoint older than complete ones in output_dir sets those aside.

Run A leaves checkpoints 2 and 4; run B resumes from 2 with ``keep_last: 1`` and saves 3. Without the set-aside,
retention keeps the newest step numbers (A's 4) and deletes B's 3, and ``latest`` returns to run A.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_recipe_main

from fv_accel.checkpoint import is_complete, list_checkpoints, read_metadata, resolve_checkpoint
from fv_accel.checkpoint.manager import CheckpointManager


def _finetune(toy_root: Path, out: Path, *extra: str) -> int:
    return run_recipe_main("finetune", [
        f"--models.student.init_from={toy_root / 'init'}", f"--training.data.data_path={toy_root / 'data'}",
        "--training.data.train_batch_size=4", "--training.data.text_len=8", "--training.tracker.backends=[]",
        f"--training.checkpoint.output_dir={out}", *extra])


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))


def test_resume_from_an_older_checkpoint_abandons_the_newer_ones(toy_root, tmp_path, capsys, caplog) -> None:
    out = tmp_path / "run"
    assert _finetune(toy_root, out, "--training.loop.max_train_steps=4", "--training.checkpoint.save_steps=2",
                     "--training.checkpoint.keep_last=0") == 0
    assert _names(out) == ["checkpoint-2", "checkpoint-4"]
    a4_meta = read_metadata(out / "checkpoint-4")

    # refuse: exit 2 naming checkpoint-4, and nothing moves
    capsys.readouterr()
    assert _finetune(toy_root, out, "--training.loop.max_train_steps=3", "--training.checkpoint.keep_last=1",
                     f"--training.checkpoint.resume_from_checkpoint={out / 'checkpoint-2'}",
                     "--training.checkpoint.on_newer=refuse") == 2
    err = capsys.readouterr().err
    assert "training.checkpoint.on_newer=refuse" in err and "checkpoint-4" in err, err
    assert _names(out) == ["checkpoint-2", "checkpoint-4"]

    # abandon (the default): checkpoint-4 moves aside before training; B's checkpoint-3 is the live timeline
    with caplog.at_level("WARNING"):
        assert _finetune(toy_root, out, "--training.loop.max_train_steps=3", "--training.checkpoint.keep_last=1",
                         f"--training.checkpoint.resume_from_checkpoint={out / 'checkpoint-2'}") == 0
    names = _names(out)
    abandoned = [n for n in names if n.startswith("checkpoint-4.")]
    assert len(abandoned) == 1 and re.fullmatch(r"checkpoint-4\.abandoned-\d{8}T\d{6}Z", abandoned[0]), names
    assert names == ["checkpoint-3", abandoned[0]]  # keep_last 1 removed 2, never the abandoned one
    assert any("checkpoint-4" in r.getMessage() and "abandon" in r.getMessage() for r in caplog.records)
    assert is_complete(out / abandoned[0]) and read_metadata(out / abandoned[0]) == a4_meta  # moved, untouched
    assert read_metadata(out / "checkpoint-3")["step"] == 3
    assert resolve_checkpoint("latest", out) == out / "checkpoint-3"
    assert [s for s, _ in list_checkpoints(out, complete_only=False)] == [3]


def test_retention_never_takes_an_abandoned_checkpoint(tmp_path) -> None:
    """Retention's leftover sweep (``*.partial``, incomplete, ``*.deleting`` older than the newest) and
    ``keep_last`` leave ``checkpoint-<N>.abandoned-*`` alone, even when it is older than everything kept."""
    from test_retention import make_manager  # the tiny one-Linear method of the retention tests

    out = tmp_path / "out"
    manager: CheckpointManager = make_manager(out, keep_last=1)
    manager.save(1)
    aside = out / "checkpoint-1.abandoned-20260101T000000Z"
    (out / "checkpoint-1").rename(aside)
    (out / "checkpoint-0.partial").mkdir()  # a real leftover, swept by the same pass
    manager.save(2)
    manager.save(3)
    assert _names(out) == ["checkpoint-1.abandoned-20260101T000000Z", "checkpoint-3"]
    assert is_complete(aside)
