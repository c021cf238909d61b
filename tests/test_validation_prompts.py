"""``callbacks.validation.prompts``: captions encoded once by the student pipeline's text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tiny_wan_pipeline, run_recipe_captured

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


def _run(args: list[str], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    """``python recipes/finetune.py ARGS`` in this process (saves an interpreter start): exit code, stderr."""
    proc = run_recipe_captured("finetune", args[1:], capsys, caplog)
    return proc.returncode, proc.stderr


def test_prompts_are_encoded_once_and_sampled(toy_root: Path, pipeline: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    from fv_accel.models import FAMILIES

    out = tmp_path / "run"
    code, err = _run(_args(toy_root, pipeline, out, "--training.loop.max_train_steps=1"), capsys, caplog)
    assert code == 0, err[-3000:]
    assert "validation: encoded 2 prompt(s)" in err
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
    code, err = _run(_args(toy_root, pipeline, out, "--training.loop.max_train_steps=2",
                           "--training.checkpoint.resume_from_checkpoint=latest"), capsys, caplog)
    assert code == 0, err[-3000:]
    assert "resumed from" in err and "validation: encoded" not in err
    assert (out / "validation" / "prompts.parquet").stat().st_mtime_ns == stamp
    assert (out / "validation" / "step-2" / "student-01.mp4").is_file()


def test_prompts_need_a_text_encoder_and_exclude_data_path(toy_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    code, err = _run(_args(toy_root, toy_root / "init", tmp_path / "a", "--training.loop.max_train_steps=1"),
                     capsys, caplog)
    assert code == 2
    assert f"callbacks.validation.prompts: models.student.init_from '{toy_root / 'init'}' has no tokenizer/" \
        in err and "Traceback" not in err
    code, err = _run(_args(toy_root, toy_root / "init", tmp_path / "b", "--training.loop.max_train_steps=1",
                           f"--callbacks.validation.data_path={toy_root / 'data'}"), capsys, caplog)
    assert code == 2
    assert "callbacks.validation" in err and "set prompts or data_path, not both" in err
