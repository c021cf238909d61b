"""recipes/export.py on a checkpoint written by 2 FSDP2 ranks: exact weights, diffusers loading, card, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_2proc
from safetensors.torch import load_file

from fv_accel.export import export_checkpoint, main

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_rank_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export2") / "run"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=2", "--training.data.train_batch_size=4",
            "--callbacks.ema.decay=0.5"]
    proc = run_2proc(args, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name.split("_")[2] for p in (out / "checkpoint-2").glob("*.distcp")} == {"0", "1"}
    return out


def checkpoint_tensors(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under ``prefix``, read with DCP's own converter (not the export code)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    state = torch.load(flat, weights_only=False)
    flat.unlink()

    def walk(tree: dict, path: str = "") -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for key, value in tree.items():
            name = f"{path}{key}"
            if isinstance(value, dict):
                found.update(walk(value, name + "."))
            elif isinstance(value, torch.Tensor):
                found[name] = value
        return found

    return {k[len(prefix):]: v for k, v in walk(state).items() if k.startswith(prefix)}


def test_export_two_rank_checkpoint_fp32_is_exact(two_rank_run: Path, tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel
    from huggingface_hub import ModelCard

    out = tmp_path / "export"
    # The output dir (not a checkpoint-<step>): the newest complete checkpoint is used.
    assert main(["--checkpoint", str(two_rank_run), "--role", "student", "--output", str(out),
                 "--dtype", "fp32"]) == 0
    expected = checkpoint_tensors(two_rank_run / "checkpoint-2", "roles.student.transformer.")
    assert len(expected) > 20
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert exported[key].dtype == torch.float32
        assert torch.equal(exported[key], value), key
    model = WanTransformer3DModel.from_pretrained(out / "transformer")
    loaded = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    card = ModelCard.load(out / "README.md")
    assert set(card.data.tags) >= {"fv-accel", "diffusers", "text-to-video", "distillation"}
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    assert "training step **2**" in card.text and "written by 2 ranks" in card.text
    assert 'WanTransformer3DModel.from_pretrained(' in card.text
    assert not (out / "model_index.json").exists()  # the init was a bare transformer, not a pipeline
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary leftovers


def test_export_differs_from_init_and_bf16_keeps_fp32_modules(two_rank_run: Path, toy_root: Path,
                                                              tmp_path: Path) -> None:
    init = load_file(str(toy_root / "init" / "transformer" / "diffusion_pytorch_model.safetensors"))
    expected = checkpoint_tensors(two_rank_run / "checkpoint-2", "roles.student.transformer.")
    moved = sum(not torch.equal(init[k], expected[k]) for k in expected)
    assert moved > len(expected) // 2  # two optimizer steps changed most tensors

    result = export_checkpoint(two_rank_run / "checkpoint-2", role="student", output=tmp_path / "bf16")
    assert result.dtype == "bf16" and result.step == 2 and not result.is_pipeline
    exported = load_file(str(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors"))
    fp32_keys = {k for k, v in exported.items() if v.dtype == torch.float32}
    assert fp32_keys and all(any(m in k.split(".") for m in ("scale_shift_table", "time_embedder", "norm1",
                                                              "norm2", "norm3")) for k in fp32_keys)
    for key, value in exported.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key
    assert sum(v.dtype == torch.bfloat16 for v in exported.values()) > len(exported) // 2

    # Re-exporting into an earlier export replaces it atomically.
    again = export_checkpoint(two_rank_run / "checkpoint-2", role="student", output=tmp_path / "bf16",
                              dtype="fp32")
    assert again.output == tmp_path / "bf16"
    assert load_file(str(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors"))[
        "patch_embedding.weight"].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


def test_export_sharded_for_large_models(two_rank_run: Path, tmp_path: Path) -> None:
    export_checkpoint(two_rank_run, role="student", output=tmp_path / "sharded", dtype="fp32",
                      max_shard_size="50KB")
    files = sorted(p.name for p in (tmp_path / "sharded" / "transformer").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) >= 3
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tmp_path / "sharded" / "transformer")
    expected = checkpoint_tensors(two_rank_run / "checkpoint-2", "roles.student.transformer.")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_export_errors_are_clear_and_leave_nothing(two_rank_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = ["--role", "student", "--output", str(out)]

    code, err = _fails(["--checkpoint", str(tmp_path / "missing"), *base], capsys)
    assert code == 1 and "does not exist" in err and "missing" in err

    incomplete = tmp_path / "run" / "checkpoint-7"
    shutil.copytree(two_rank_run / "checkpoint-2", incomplete)
    (incomplete / ".metadata").unlink()  # a save that died before DCP's completion marker
    code, err = _fails(["--checkpoint", str(incomplete), *base], capsys)
    assert code == 1 and "incomplete" in err and "checkpoint-7" in err

    code, err = _fails(["--checkpoint", str(two_rank_run), "--role", "critic", "--output", str(out)], capsys)
    assert code == 1 and "no 'critic' role" in err and "student" in err

    code, err = _fails(["--checkpoint", str(two_rank_run), *base, "--dtype", "fp16"], capsys)
    assert code == 2 and "--dtype" in err
    code, err = _fails(["--checkpoint", str(two_rank_run), *base, "--private"], capsys)
    assert code == 2 and "--push-to-hub" in err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = _fails(["--checkpoint", str(two_rank_run), "--role", "student", "--output", str(foreign)], capsys)
    assert code == 2 and "not an earlier export" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    # A base model that vanished after training: clear message, nothing written.
    moved = tmp_path / "run2" / "checkpoint-2"
    shutil.copytree(two_rank_run / "checkpoint-2", moved)
    data = json.loads((moved / "metadata.json").read_text())
    data["config"]["models"]["student"]["init_from"] = str(tmp_path / "gone")
    (moved / "metadata.json").write_text(json.dumps(data))
    code, err = _fails(["--checkpoint", str(moved), *base], capsys)
    assert code == 1 and "init_from" in err and "gone" in err

    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "run", "run2"]  # no temporary leftovers


def test_export_ema_matches_checkpoint_shadow_and_differs_from_student(two_rank_run: Path, tmp_path: Path) -> None:
    shadow = checkpoint_tensors(two_rank_run / "checkpoint-2", "callbacks.ema.shadow.")
    assert shadow, "the run kept no EMA (callbacks.ema.decay was set)"
    student = checkpoint_tensors(two_rank_run / "checkpoint-2", "roles.student.transformer.")
    code = main(["--checkpoint", str(two_rank_run), "--role", "ema", "--output", str(tmp_path / "ema"),
                 "--dtype", "fp32"])
    assert code == 0
    exported = load_file(str(tmp_path / "ema" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(student)
    for key, value in exported.items():
        assert torch.equal(value, shadow.get(key, student[key])), key
    differing = sum(not torch.equal(exported[k], student[k]) for k in shadow)
    assert differing > len(shadow) // 2  # decay 0.5 over two steps: the average lags the weights
    assert "EMA of the student (decay 0.5)" in (tmp_path / "ema" / "README.md").read_text()
