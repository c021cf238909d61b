"""The finetune recipe end to end: plain process and 2-process FSDP2."""

from __future__ import annotations

import json

from conftest import REPO, run_2proc, run_python


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_finetune_plain_process(toy_root, tmp_path):
    out = tmp_path / "run"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=3"]
    proc = run_python(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and "grad_norm/student" in r and "lr/student" in r for r in rows)
    assert (out / "checkpoint-3" / ".metadata").is_file()
    assert (out / "resolved_config.yaml").is_file()


def test_finetune_two_processes_fsdp2(toy_root, tmp_path):
    out = tmp_path / "run2"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=4"]
    proc = run_2proc(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpt = out / "checkpoint-4"
    assert (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Complete: DCP's .metadata plus metadata.json {step, config}, and no leftover .partial directory.
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["step"] == 4 and meta["config"]["training"]["loop"]["max_train_steps"] == 4
    assert not list(out.glob("*.partial"))
