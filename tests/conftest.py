"""Shared test fixtures: offline, single-threaded, tiny models, and a 2-process FSDP2 launcher."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
CPU_2PROC = str(REPO / "accelerate_configs" / "cpu_fsdp2_2proc.yaml")
CPU_CP2_2PROC = str(REPO / "accelerate_configs" / "cpu_cp2_2proc.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_python(args: list[str], *, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """One plain process: ``python <args>``."""
    return subprocess.run([PYTHON, *args], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def run_2proc(args: list[str], *, cwd: Path, timeout: float = 300, config: str = CPU_2PROC,
              **env: str) -> subprocess.CompletedProcess:
    """Two CPU processes with FSDP2 over gloo: ``accelerate launch --config_file <config> <args>`` (default
    ``cpu_fsdp2_2proc.yaml``; :data:`CPU_CP2_2PROC` for context parallel 2)."""
    cmd = [ACCELERATE, "launch", "--config_file", config, "--main_process_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def run_torchrun(script: str, *args: str, nproc: int = 2, cwd: Path, timeout: float = 300,
                 **env: str) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), script, *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=timeout)


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def load_module(path: Path, name: str) -> Any:
    """A script (a recipe, a benchmark) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_recipe_main(name: str, argv: list[str]) -> int:
    """``recipes/<name>.py``'s main() in this process (saves an interpreter start per call): a world-size-1
    run with fresh Accelerate state, torn down afterwards."""
    import importlib.util

    from fv_accel.runtime import reset_accelerate_state

    spec = importlib.util.spec_from_file_location(f"{name}_recipe", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    reset_accelerate_state()
    try:
        return module.main(argv)
    finally:
        reset_accelerate_state()
        for key in _DIST_ENV:
            os.environ.pop(key, None)


def run_recipe_captured(name: str, argv: list[str], capsys: pytest.CaptureFixture[str],
                        caplog: pytest.LogCaptureFixture) -> subprocess.CompletedProcess:
    """:func:`run_recipe_main` with what ``python recipes/<name>.py ARGV`` would print: its exit code, stdout,
    and stderr with the log records (pytest's handler takes them, at INFO as the CLI logs), as a
    ``CompletedProcess`` like :func:`run_python`'s."""
    import logging

    caplog.set_level(logging.INFO, logger="fv_accel")
    caplog.clear()
    capsys.readouterr()
    code = run_recipe_main(name, argv)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([name, *argv], code, captured.out, captured.err + caplog.text)


def record_calls(obj: Any, name: str, keep: Any) -> list[Any]:
    """Replace ``obj.<name>`` by a wrapper that appends ``keep(*args)`` to the returned list, then calls the
    original (a spy on a model's ``predict_velocity`` / ``predict_x0``, which take ``(x_t, t, text)``)."""
    calls: list[Any] = []
    original = getattr(obj, name)

    def spy(*args: Any) -> Any:
        calls.append(keep(*args))
        return original(*args)

    setattr(obj, name, spy)
    return calls


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy dataset and a random tiny Wan init, built once per test session."""
    from fv_accel.toy import ensure_init_transformer, ensure_toy_data

    root = tmp_path_factory.mktemp("toy")
    ensure_toy_data(root)
    ensure_init_transformer(root)
    return root


@pytest.fixture(scope="session")
def reference(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tests/test_resume.py``'s uninterrupted 2-process DMD2 run, plus its final EMA gathered to full tensors
    (``ema_full.safetensors``). Session-scoped here, not module-scoped there: ``tests/test_preemption_workers.py``
    and ``tests/test_async_checkpoint.py`` compare against the same run, which would otherwise be launched once
    per module."""
    from test_resume import MAX_STEPS, launch, metrics

    out = tmp_path_factory.mktemp("resume") / "reference"
    proc = launch(toy_root, out, FVR_DUMP_EMA=str(out.parent / "ema_full.safetensors"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(async save)" not in proc.stderr  # synchronous: test_async_checkpoint compares async saves with it
    assert [r["step"] for r in metrics(out)] == list(range(1, MAX_STEPS + 1))
    return out


@pytest.fixture
def single_process_dist(fresh_world):
    """An in-process world-size-1 gloo group with a fresh Accelerate state (torn down afterwards)."""
    from fv_accel.runtime import build_accelerator

    return build_accelerator()


@pytest.fixture
def fresh_world(monkeypatch: pytest.MonkeyPatch):
    """A clean in-process world of one (``build_accelerator`` creates the gloo group), torn down afterwards."""
    from fv_accel.runtime import reset_accelerate_state

    for key in (*_DIST_ENV, "FSDP_RESHARD_AFTER_FORWARD", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    reset_accelerate_state()
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    reset_accelerate_state()
    for key in _DIST_ENV:
        os.environ.pop(key, None)


def build_tiny_wan_pipeline(out: Path, transformer_dir: Path, transformer_2_dir: Path | None = None,
                            boundary_ratio: float | None = None) -> Path:
    """A complete WanPipeline directory, everything tiny and made locally (no download); with
    ``transformer_2_dir`` and ``boundary_ratio`` a two-expert (Wan 2.2 A14B) layout."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["a", "cat", "dog", "walks", "runs", "on", "the", "grass", "toy", "condition", "video"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    # d_model 32 = the tiny transformer's text_dim; z_dim 16 = its in_channels.
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    transformer = WanTransformer3DModel.from_pretrained(transformer_dir)
    transformer_2 = WanTransformer3DModel.from_pretrained(transformer_2_dir) if transformer_2_dir else None
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer, transformer_2=transformer_2,
                boundary_ratio=boundary_ratio).save_pretrained(out)
    return out
