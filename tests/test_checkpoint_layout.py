"""fv_accel/checkpoint/layout.py: the names it builds are the ones a real run writes, and its one-process readers
return exactly what was saved.

Oracles: the on-disk layout as docs/resume.md documents it, spelled out here by hand; tensors saved with plain
``dcp.save`` and compared with ``torch.equal`` (after ``Tensor.to`` where the reader casts).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from conftest import run_recipe_main

from fv_accel.checkpoint import layout
from fv_accel.errors import CheckpointError


def _save(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)


def test_directory_names() -> None:
    assert layout.checkpoint_dir_name(40) == "checkpoint-40"
    assert layout.checkpoint_step("checkpoint-40") == 40
    for other in ("checkpoint-40.partial", "checkpoint-40.abandoned-20260101T000000Z", "checkpoint-x", "ckpt-4"):
        assert layout.checkpoint_step(other) is None, other
    assert layout.leftover_of("checkpoint-7") == (7, None)
    assert layout.leftover_of("checkpoint-7.partial") == (7, ".partial")
    assert layout.leftover_of("checkpoint-7.stale") == (7, ".stale")
    assert layout.leftover_of("checkpoint-7.deleting") == (7, ".deleting")
    assert layout.leftover_of("checkpoint-7.abandoned-20260101T000000Z") is None  # never deleted by retention
    assert layout.random_state_file(3) == "random_state.rank3.pt"
    assert layout.is_random_state_file("random_state.rank3.pt") and not layout.is_random_state_file("__0_0.distcp")


def test_a_real_run_writes_exactly_the_layouts_names(toy_root: Path, tmp_path: Path) -> None:
    """A one-process toy fine-tune with EMA, 2 steps, checkpoint at the end: its files and DCP keys are the
    documented ones, and each is what layout.py builds."""
    data = tmp_path / "data"  # without world.safetensors: no after-training quality table
    data.mkdir()
    for part in (toy_root / "data").glob("*.parquet"):
        (data / part.name).symlink_to(part.resolve())
    out = tmp_path / "out"
    config = {
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(data), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 2},
                     "checkpoint": {"output_dir": str(out)},
                     "tracker": {"backends": []}},
        "callbacks": {"ema": {"decay": 0.5}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert run_recipe_main("finetune", ["--config", str(tmp_path / "run.yaml")]) == 0

    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] == [layout.checkpoint_dir_name(2)]
    ckpt = out / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir() if not p.name.endswith(".distcp")}
    assert files == {".metadata", "metadata.json", "random_state.rank0.pt"}
    assert files == {layout.DCP_METADATA_FILE, layout.METADATA_FILE, layout.random_state_file(0)}

    keys = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    states = {".".join(k.split(".")[:3 if k.startswith("roles.") else 2]) for k in keys}
    assert states == {"roles.student.transformer", "optimizers.student", "schedulers.student", "callbacks.ema",
                      "dataloader.rank0"}
    assert states == {layout.role_module_key("student", "transformer"), layout.optimizer_key("student"),
                      layout.scheduler_key("student"), layout.callback_key("ema"), layout.dataloader_key(0)}
    assert layout.saved_roles(keys) == ["student"]
    assert any(k.startswith("optimizers.student.state.") for k in keys)
    assert layout.optimizer_state_prefix("student") == "optimizers.student.state."
    assert "callbacks.ema.initialized" in keys and layout.EMA_INITIALIZED_KEY == "callbacks.ema.initialized"
    shadow = {k[len("callbacks.ema.shadow."):] for k in keys if k.startswith("callbacks.ema.shadow.")}
    assert shadow and layout.EMA_SHADOW_PREFIX == "callbacks.ema.shadow."

    # The readers on this checkpoint equal DCP's own loader over the hand-spelled keys.
    student_keys = [k for k in keys if k.startswith("roles.student.transformer.")]
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    plain = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in student_keys}  # type: ignore[union-attr]
    _dcp_load(plain, ckpt)
    read = layout.read_role_state_dict(ckpt, "student")
    assert read.keys() == {k[len("roles.student.transformer."):] for k in student_keys}
    assert all(torch.equal(read[k[len("roles.student.transformer."):]], v) for k, v in plain.items())
    ema = layout.read_ema_state_dict(ckpt)
    assert ema.keys() == read.keys() and set(shadow) <= set(ema)
    assert layout.read_ema_initialized(ckpt)


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen),
               "count": torch.arange(5, dtype=torch.int64)}
    shadow = {"w": torch.randn(4, 3, generator=gen)}  # the EMA tracks w only
    ckpt = tmp_path / "ckpt"
    _save({"roles.student.transformer": dict(tensors), "callbacks.ema": {"shadow": dict(shadow), "initialized": True}},
          ckpt)
    return {"path": ckpt, "tensors": tensors, "shadow": shadow}


def _spy_dcp_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    real = dcp.load

    def spy(state: dict[str, Any], **kwargs: Any) -> None:
        calls.append(dict(state))
        real(state, **kwargs)

    monkeypatch.setattr(dcp, "load", spy)
    return calls


def test_role_reader_returns_the_saved_tensors_allocated_once_in_their_final_dtype(
        saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    want = saved["tensors"]
    got = layout.read_role_state_dict(saved["path"], "student")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want)

    calls = _spy_dcp_load(monkeypatch)

    def to_bf16(name: str, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if dtype.is_floating_point else dtype

    got = layout.read_role_state_dict(saved["path"], "student", to_bf16)
    for k, v in want.items():
        assert got[k].dtype == to_bf16(k, v.dtype) and torch.equal(got[k], v.to(got[k].dtype)), k
    # DCP filled the very tensors returned, already in bf16: no full copy in the saved fp32 was made.
    assert len(calls) == 1
    assert all(calls[0][f"roles.student.transformer.{k}"] is got[k] for k in want)


def test_ema_reader_takes_the_shadow_and_only_the_untracked_student_tensors(
        saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_dcp_load(monkeypatch)
    got = layout.read_ema_state_dict(saved["path"])
    want = {**saved["tensors"], **saved["shadow"]}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["w"], saved["tensors"]["w"])  # the shadow, not the student's w
    assert sorted(calls[0]) == ["callbacks.ema.initialized", "callbacks.ema.shadow.w",
                                "roles.student.transformer.b", "roles.student.transformer.count"]
    only = layout.read_ema_state_dict(saved["path"], with_student_rest=False)
    assert only.keys() == {"w"} and torch.equal(only["w"], saved["shadow"]["w"])


def test_reader_errors_name_the_checkpoint_and_the_cause(saved: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"holds no weights for role 'critic' \(trainable roles saved: student\)"):
        layout.read_role_state_dict(saved["path"], "critic")
    with pytest.raises(CheckpointError, match="not a readable DCP checkpoint"):
        layout.read_role_state_dict(tmp_path / "missing", "student")
    _save({"roles.student.transformer": {"w": torch.zeros(2)}}, tmp_path / "no_ema")
    with pytest.raises(CheckpointError, match="no_ema: holds no EMA weights"):
        layout.read_ema_state_dict(tmp_path / "no_ema")
    _save({"callbacks.ema": {"shadow": {"w": torch.zeros(2)}, "initialized": False}}, tmp_path / "early")
    with pytest.raises(CheckpointError, match="early: the EMA had not started yet"):
        layout.read_ema_state_dict(tmp_path / "early", with_student_rest=False)
    assert not layout.read_ema_initialized(tmp_path / "early")
