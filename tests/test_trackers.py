"""Trackers through Accelerate: TensorBoard under <output_dir>/logs with the resolved config as
hyper-parameters; a backend whose package is missing is a configuration error (exit 2) before anything runs."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from conftest import REPO, run_python, run_recipe_main


def _args(toy_root, out, *extra):
    return ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=1", "--training.data.train_batch_size=2", *extra]


def tensorboard_hparams(logs) -> dict:
    """The hyper-parameters Accelerate's add_hparams wrote (TensorBoard's hparams plugin, session start)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for f in logs.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(f)).Load():
            for value in event.summary.value:
                if value.tag.endswith("session_start_info"):
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    for key, v in data.session_start_info.hparams.items():
                        found[key] = v.number_value if v.WhichOneof("kind") == "number_value" else (
                            v.string_value if v.WhichOneof("kind") == "string_value" else v.bool_value)
    return found


def test_tensorboard_logs_resolved_config_as_hparams(toy_root, tmp_path):
    out = tmp_path / "run"
    assert run_recipe_main("finetune", _args(toy_root, out, "--training.optimizer.learning_rate=0.003")[1:]) == 0
    hparams_files = list((out / "logs" / "fv_accel").rglob("hparams.yml"))
    assert len(hparams_files) == 1
    hparams = yaml.safe_load(hparams_files[0].read_text())
    # the flattened resolved config: dotted keys, the override's value, lists as strings
    assert hparams["training.optimizer.learning_rate"] == 0.003
    assert hparams["training.loop.max_train_steps"] == 1
    assert hparams["method.name"] == "finetune"
    assert hparams["models.student.init_from"] == str(toy_root / "init")
    assert hparams["training.tracker.backends"] == "['tensorboard']"
    # ... and TensorBoard's hparams plugin accepted every one of them
    tb = tensorboard_hparams(out / "logs")
    assert set(tb) == set(hparams)
    assert tb["training.optimizer.learning_rate"] == pytest.approx(0.003)
    assert tb["method.name"] == "finetune"
    assert tb["training.loop.max_train_steps"] == 1


def test_no_backends_writes_no_logs(toy_root, tmp_path):
    out = tmp_path / "run"
    assert run_recipe_main("finetune", _args(toy_root, out, "--training.tracker.backends=[]")[1:]) == 0
    assert (out / "metrics.jsonl").is_file()
    assert not (out / "logs").exists()


@pytest.mark.parametrize("backend", ["wandb", "trackio"])
def test_missing_tracker_package_is_a_config_error(toy_root, backend):
    from fv_accel.config import resolve_config
    from fv_accel.errors import EXIT_CONFIG, ConfigError
    from fv_accel.tracking import check_tracker_backends

    if importlib.util.find_spec(backend) is not None:
        pytest.skip(f"{backend} is installed")
    cfg = resolve_config({"models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
                          "method": {"name": "finetune"},
                          "training": {"tracker": {"backends": ["tensorboard", backend]}}})
    with pytest.raises(ConfigError) as err:
        check_tracker_backends(cfg)
    assert err.value.exit_code == EXIT_CONFIG
    assert f"training.tracker.backends: '{backend}' needs the '{backend}' package" in str(err.value)
    assert f"fv_accel[{backend}]" in str(err.value)
    check_tracker_backends(resolve_config({"models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
                                           "method": {"name": "finetune"}}))  # tensorboard alone is fine


def test_missing_tracker_package_exits_2_before_building(toy_root, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    out = tmp_path / "run"
    proc = run_python(_args(toy_root, out, "--training.tracker.backends=[tensorboard, wandb]"), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training.tracker.backends: 'wandb' needs the 'wandb' package" in proc.stderr
    assert not out.exists()  # failed before anything was built or written
