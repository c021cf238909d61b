"""``callbacks.validation.prompts``: captions encoded once by the student pipeline's text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, build_tiny_wan_pipeline, run_python

from fv_accel.data.dataset import decode_tensor

PROMPTS = ["a cat walks on the grass", "a dog runs"]


@pytest.fixture(scope="module")
def pipeline(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("prompts") / "tiny-wan", toy_root / "init" / "transformer")


def _args(toy_root: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return ["recipes/finetune.py", f"--models.student.init_from={init}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.data.train_batch_size=4", "--callbacks.validation.every_steps=1",
            "--callbacks.validation.num_inference_steps=2", f"--callbacks.validation.prompts={json.dumps(PROMPTS)}",
            *extra]


def test_prompts_are_encoded_once_and_sampled(toy_root: Path, pipeline: Path, tmp_path: Path) -> None:
    from fv_accel.models import FAMILIES

    out = tmp_path / "run"
    proc = run_python(_args(toy_root, pipeline, out, "--training.loop.max_train_steps=1"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation: encoded 2 prompt(s)" in proc.stderr
    index = json.loads((out / "validation" / "step-1" / "index.json").read_text())
    assert index["sources"] == [f"prompt {i}: {p}" for i, p in enumerate(PROMPTS)]
    assert index["files"]["student"] == ["student-00.mp4", "student-01.mp4"]
    assert all((out / "validation" / "step-1" / f).stat().st_size > 0 for f in index["files"]["student"])

    # The file holds exactly what the pipeline's text encoder gives for these captions.
    table = pq.read_table(out / "validation" / "prompts.parquet").to_pylist()
    assert [r["caption"] for r in table] == PROMPTS
    expected = FAMILIES["wan"].load_encoders(str(pipeline), key="test", device=torch.device("cpu"), text_len=8,
                                             text_dtype=torch.float32).encode_text(PROMPTS)
    for row, want in zip(table, expected, strict=True):
        got = decode_tensor(row["text_embedding_bytes"], row["text_embedding_shape"], row["text_embedding_dtype"],
                            where="prompts")
        assert torch.equal(got, want)

    # Resuming into the same output dir reuses the file instead of loading the text encoder again.
    stamp = (out / "validation" / "prompts.parquet").stat().st_mtime_ns
    proc = run_python(_args(toy_root, pipeline, out, "--training.loop.max_train_steps=2",
                            "--training.checkpoint.resume_from_checkpoint=latest"), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation: encoded" not in proc.stderr
    assert (out / "validation" / "prompts.parquet").stat().st_mtime_ns == stamp
    assert (out / "validation" / "step-2" / "student-01.mp4").is_file()


def test_prompts_need_a_text_encoder_and_exclude_data_path(toy_root: Path, tmp_path: Path) -> None:
    proc = run_python(_args(toy_root, toy_root / "init", tmp_path / "a", "--training.loop.max_train_steps=1"),
                      cwd=REPO)
    assert proc.returncode == 2
    assert f"callbacks.validation.prompts: models.student.init_from '{toy_root / 'init'}' has no tokenizer/" \
        in proc.stderr and "Traceback" not in proc.stderr
    proc = run_python(_args(toy_root, toy_root / "init", tmp_path / "b", "--training.loop.max_train_steps=1",
                            f"--callbacks.validation.data_path={toy_root / 'data'}"), cwd=REPO)
    assert proc.returncode == 2
    assert "callbacks.validation" in proc.stderr and "set prompts or data_path, not both" in proc.stderr
