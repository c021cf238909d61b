"""The finetune recipe end to end: plain process and 2-process FSDP2."""

from __future__ import annotations

import json

from conftest import REPO, run_2proc, run_python, run_recipe_captured, run_recipe_main


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
    assert {p.name.split("_")[2] for p in ckpt.glob("*.distcp")} == {"0", "1"}
    # Complete: DCP's .metadata plus metadata.json {step, config}, and no leftover .partial directory.
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["step"] == 4 and meta["config"]["training"]["loop"]["max_train_steps"] == 4
    assert not list(out.glob("*.partial"))


def test_resume_a_one_process_checkpoint_on_two_processes(toy_root, tmp_path):
    """1 process writes checkpoint-3; 2 processes resume it: rank 1 has no data position of its own and reads
    rank 0's, and the epoch continues after the 3 x 32 rows already seen."""
    out = tmp_path / "run"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}"]
    assert run_recipe_main("finetune", [*args[1:], "--training.loop.max_train_steps=3"]) == 0  # in this process
    proc = run_2proc([*args, "--training.loop.max_train_steps=5",
                      "--training.checkpoint.resume_from_checkpoint=latest"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "saved by 1 rank(s) x batch 32, the run now has 2 x 32: epoch 0 continues after the 96 rows" in proc.stderr
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    meta = json.loads((out / "checkpoint-5" / "metadata.json").read_text())
    assert meta["step"] == 5 and meta["world_size"] == 2
    import torch.distributed.checkpoint as dcp

    keys = [f"dataloader.rank{r}.rows_consumed" for r in range(2)]
    state: dict = dict.fromkeys(keys)
    dcp.load(state, checkpoint_id=str(out / "checkpoint-5"), no_dist=True)
    assert [state[k] for k in keys] == [96 + 2 * 2 * 32] * 2  # both ranks went on from the same position


def test_unloadable_weights_give_one_clear_line(toy_root, tmp_path, capsys, caplog):
    """A truncated safetensors file under init_from: exit 1, one message naming the role and the directory."""
    import shutil

    bad = tmp_path / "bad-init"
    shutil.copytree(toy_root / "init", bad)
    weights = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = run_recipe_captured("finetune", [f"--models.student.init_from={bad}",
                                            f"--training.data.data_path={toy_root / 'data'}",
                                            f"--training.checkpoint.output_dir={tmp_path / 'run'}",
                                            "--training.loop.max_train_steps=1"], capsys, caplog)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fv_accel: error:")]
    assert len(errors) == 1 and f"models.student.init_from '{bad}': cannot load the transformer" in errors[0]
    assert "diffusion_pytorch_model.safetensors" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
