"""A LoRA fine-tune on 2 processes (FSDP2 over gloo, activation checkpointing): the checkpoint holds the adapters
only, a resume continues bitwise, and the diffusers LoRA export, loaded by diffusers' own loaders onto the base,
computes what the ``--merge-lora`` export computes.

Oracles: the adapter names from a plain diffusers model's module names (``test_lora.expected_adapter_names``);
the uninterrupted run's losses and weights for the resume; diffusers' peft-based LoRA forward for the merge
(W + (alpha/r)·B·A) and the base model, which the LoRA must differ from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, build_tiny_wan_pipeline, run_2proc
from test_lora import expected_adapter_names

from fv_accel.checkpoint.layout import dcp_entries, read_role_state_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]

RANK, ALPHA = 4, 8.0


def _config(toy_root: Path, out: Path) -> dict[str, Any]:
    return {
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity",
                               "activation_checkpointing": "full", "lora": {"rank": RANK, "alpha": ALPHA}}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "seed": 0, "train_batch_size": 8, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-3},
                     "loop": {"max_train_steps": 4},
                     "checkpoint": {"output_dir": str(out), "save_steps": 2},
                     "tracker": {"backends": []}},
    }


def _launch(toy_root: Path, out: Path, *extra: str) -> None:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(_config(toy_root, out)))
    proc = run_2proc(["recipes/finetune.py", "--config", str(config), *extra], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted 4-step run, and one resumed from its checkpoint-2 (copied to a new output dir)."""
    root = tmp_path_factory.mktemp("lora2")
    full, resumed = root / "full", root / "resumed"
    _launch(toy_root, full)
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    _launch(toy_root, resumed, "--training.checkpoint.resume_from_checkpoint=latest")
    return full, resumed


def test_checkpoint_holds_the_adapters_only(runs: tuple[Path, Path], toy_root: Path) -> None:
    checkpoint = runs[0] / "checkpoint-4"
    prefix = "roles.student.transformer."
    saved = {k[len(prefix):] for k in dcp_entries(checkpoint) if k.startswith("roles.")}
    assert saved == expected_adapter_names(toy_root / "init")
    assert {p.name.split("_")[2] for p in checkpoint.glob("*.distcp")} == {"0", "1"}  # both ranks saved shards


def test_resume_continues_bitwise(runs: tuple[Path, Path]) -> None:
    full, resumed = runs
    reference, after = _losses(full), _losses(resumed)
    assert sorted(after) == [3, 4]
    assert all(after[step] == reference[step] for step in after), (after, reference)
    a = read_role_state_dict(full / "checkpoint-4", "student")
    b = read_role_state_dict(resumed / "checkpoint-4", "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(v) for k, v in a.items() if ".lora_B." in k)  # trained away from B = 0


def test_lora_export_loads_in_diffusers_like_the_merged_export(runs: tuple[Path, Path], toy_root: Path,
                                                               tmp_path: Path) -> None:
    from diffusers import WanPipeline, WanTransformer3DModel

    from fv_accel.export import export_checkpoint

    checkpoint = runs[0] / "checkpoint-4"
    lora = export_checkpoint(checkpoint, role="student", output=tmp_path / "lora", dtype="fp32")
    merged = export_checkpoint(checkpoint, role="student", output=tmp_path / "merged", dtype="fp32",
                               merge_lora=True)
    assert lora.is_lora and sorted(lora.files) == ["README.md", "pytorch_lora_weights.safetensors"]
    assert "load_lora_weights" in (tmp_path / "lora" / "README.md").read_text()
    assert str(toy_root / "init") in (tmp_path / "lora" / "README.md").read_text()  # names the base
    assert not merged.is_lora and (tmp_path / "merged" / "transformer" / "config.json").is_file()

    base_dir = toy_root / "init" / "transformer"
    base = WanTransformer3DModel.from_pretrained(base_dir)
    adapted = WanTransformer3DModel.from_pretrained(base_dir)
    adapted.load_lora_adapter(str(tmp_path / "lora"), prefix="transformer", use_safetensors=True)
    pipe = WanPipeline.from_pretrained(build_tiny_wan_pipeline(tmp_path / "pipe", base_dir))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    full = WanTransformer3DModel.from_pretrained(tmp_path / "merged" / "transformer")

    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        out = {name: model(x, t, e, return_dict=False)[0]
               for name, model in {"base": base, "adapter": adapted, "pipeline": pipe.transformer,
                                   "merged": full}.items()}
    torch.testing.assert_close(out["adapter"], out["merged"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["pipeline"], out["merged"], atol=1e-5, rtol=0)
    assert (out["adapter"] - out["base"]).abs().max() > 1e-3


def test_both_lora_exports_push_to_the_hub(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """``recipes/export.py --push-to-hub`` uploads exactly what it exported, for the LoRA and the --merge-lora form."""
    from conftest import run_python
    from hub_server import FakeHub
    from test_hub import hub_env, tree_bytes

    with FakeHub() as hub:
        hub.home = str(tmp_path / "hf_home")
        for name, extra, wanted in (
                ("lora", [], {"README.md", "pytorch_lora_weights.safetensors"}),
                ("merged", ["--merge-lora"], {"README.md", "transformer/config.json",
                                              "transformer/diffusion_pytorch_model.safetensors"})):
            out = tmp_path / name
            proc = run_python(["recipes/export.py", "--checkpoint", str(runs[0] / "checkpoint-4"), "--role",
                               "student", "--output", str(out), *extra, "--push-to-hub", f"me/{name}"],
                              cwd=REPO, **hub_env(hub))
            assert proc.returncode == 0, proc.stderr[-3000:]
            files = hub.repos[f"me/{name}"].branches["main"]
            assert files == tree_bytes(out) and set(files) == wanted, (name, sorted(files))
