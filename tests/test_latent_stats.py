"""``models.<role>.latent_stats``: a role whose latent statistics cannot be found stops with exit 2 before any
weight is read (unless the config says the data is normalised or where the statistics are); an explicit file
gives exactly (x − mean) / std; roles with different statistics are an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_recipe_main

from fv_accel.config import ModelConfig, resolve_config
from fv_accel.errors import EXIT_CONFIG, ConfigError

CHANNELS = 16  # the tiny Wan's in_channels


def _stats_dir(root: Path, seed: int) -> tuple[Path, list[float], list[float]]:
    """A stats-only pipeline directory: ``vae/config.json`` with 16-channel latents_mean / latents_std."""
    gen = torch.Generator().manual_seed(seed)
    mean = (torch.randn(CHANNELS, generator=gen)).tolist()
    std = (torch.rand(CHANNELS, generator=gen) + 0.5).tolist()
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": CHANNELS,
                                                         "latents_mean": mean, "latents_std": std}))
    return root, mean, std


def _finetune_args(toy_root: Path, out: Path, *extra: str) -> list[str]:
    return [f"--models.student.init_from={toy_root / 'init'}", f"--training.data.data_path={toy_root / 'data'}",
            "--training.data.train_batch_size=4", "--training.data.text_len=8",
            f"--training.checkpoint.output_dir={out}", "--training.loop.max_train_steps=1",
            "--training.tracker.backends=[]", *extra]


def test_transformer_only_init_from_refuses_to_start(toy_root: Path, tmp_path: Path, capsys) -> None:
    """The toy init is a transformer-only download: ``auto`` finds no vae/config.json → exit 2, nothing run."""
    out = tmp_path / "out"
    code = run_recipe_main("finetune", _finetune_args(toy_root, out, "--models.student.latent_stats=auto"))
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG == 2, err[-2000:]
    assert "models.student.latent_stats" in err and str(toy_root / "init") in err
    assert "vae/config.json" in err and "latents_mean" in err and "identity" in err
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()


def test_hub_init_from_without_vae_stops_before_reading_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is checked when the roles load, still before any weight file is opened."""
    import huggingface_hub
    from diffusers import WanTransformer3DModel
    from huggingface_hub.errors import EntryNotFoundError

    from fv_accel.build import load_roles
    from fv_accel.config import RunConfig

    def no_such_file(repo_id: str, filename: str, **_: object) -> str:
        raise EntryNotFoundError(f"{repo_id} has no {filename}")

    def weights_read(*_: object, **__: object) -> None:
        raise AssertionError("weights were read before the statistics were checked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_such_file)
    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", weights_read)
    # model_validate: the config-time check (which skips Hub sources anyway) is not what this test is about.
    cfg = RunConfig.model_validate({"models": {"student": {"init_from": "someone/wan-transformer-only"}},
                                    "method": {"name": "finetune"}})
    with pytest.raises(ConfigError) as info:
        load_roles(cfg, "no")
    assert info.value.exit_code == EXIT_CONFIG
    assert str(info.value).startswith("models.student.latent_stats: ")
    assert "'someone/wan-transformer-only'" in str(info.value) and "vae/config.json" in str(info.value)


def test_identity_runs_and_leaves_latents_as_stored(toy_root: Path, tmp_path: Path, capsys) -> None:
    from fv_accel.models import load_role_model

    code = run_recipe_main("finetune", _finetune_args(toy_root, tmp_path / "out",
                                                      "--models.student.latent_stats=identity"))
    assert code == 0, capsys.readouterr().err[-3000:]
    model = load_role_model("student", ModelConfig(init_from=str(toy_root / "init"), latent_stats="identity",
                                                   trainable=False), mixed_precision="no")
    x = torch.randn(2, CHANNELS, 2, 4, 4)
    assert torch.equal(model.normalize_latents(x), x) and torch.equal(model.denormalize_latents(x), x)
    assert model.load_vae() is None  # identity: validation draws the latents, no VAE decodes them


def test_explicit_stats_path_normalises_with_the_files_values(toy_root: Path, tmp_path: Path) -> None:
    from fv_accel.build import load_roles

    stats, _, _ = _stats_dir(tmp_path / "stats", seed=3)
    cfg = resolve_config({"models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": str(stats)}},
                          "method": {"name": "finetune"}})
    model = load_roles(cfg, "no")["student"]

    # The oracle: the file read back independently, and the formula written out per channel.
    data = json.loads((stats / "vae" / "config.json").read_text())
    mean = torch.tensor(data["latents_mean"])
    std = torch.tensor(data["latents_std"])
    x = torch.randn(2, CHANNELS, 2, 4, 4)
    expected = torch.empty_like(x)
    for c in range(CHANNELS):
        expected[:, c] = (x[:, c] - mean[c]) / std[c]
    assert torch.allclose(model.normalize_latents(x), expected, atol=1e-6, rtol=0)
    assert torch.allclose(model.denormalize_latents(expected), x, atol=1e-5, rtol=0)
    assert model.load_vae() is None  # the directory holds statistics, no VAE weights to decode with


def test_roles_with_different_statistics_are_an_error(toy_root: Path, tmp_path: Path) -> None:
    init = str(toy_root / "init")
    first, _, _ = _stats_dir(tmp_path / "a", seed=1)
    second, _, _ = _stats_dir(tmp_path / "b", seed=2)

    def dmd2(student: str, teacher: str) -> dict:
        return {"models": {"student": {"init_from": init, "latent_stats": student},
                           "teacher": {"init_from": init, "trainable": False, "latent_stats": teacher}},
                "method": {"name": "dmd2"}}

    for student, teacher in [(str(first), str(second)), ("identity", str(second))]:
        with pytest.raises(ConfigError) as info:
            resolve_config(dmd2(student, teacher))
        msg = str(info.value)
        assert info.value.exit_code == EXIT_CONFIG
        assert "models.student" in msg and "models.teacher" in msg and "different latent statistics" in msg
    # The same statistics (here: the same directory, and a copy of it) are one space: accepted.
    copy, _, _ = _stats_dir(tmp_path / "copy", seed=1)
    cfg = resolve_config(dmd2(str(first), str(copy)))
    assert cfg.models["critic"].latent_stats == str(copy)  # the critic defaults to the teacher's settings
