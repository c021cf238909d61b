"""Context parallel (Ulysses, ``parallelism_config_cp_size``): 2 CPU processes splitting each sample's tokens
give the losses and gradient norms of 1 process on the same batch, and layouts fv_accel cannot run exit 2.

The oracle is the 1-process run: plain attention over the whole sequence, no all-to-all, no CP group. A
missing ×cp gradient scale halves every gradient norm; noise seeded per rank instead of per data rank gives
the two halves of a sample different noise and a different loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import CPU_CP2_2PROC, REPO, run_2proc, run_recipe_main

REL_TOL = 1e-4


def _rows(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_rel_diff(cp: list[dict[str, float]], one: list[dict[str, float]], keys: list[str]) -> float:
    assert [r["step"] for r in cp] == [r["step"] for r in one]
    worst = 0.0
    for a, b in zip(cp, one, strict=True):
        for key in keys:
            assert key in a and key in b, f"step {a['step']}: {key} missing"
            worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    return worst


def _finetune_args(toy_root: Path, out: Path) -> list[str]:
    return [f"--models.student.init_from={toy_root / 'init'}", f"--training.data.data_path={toy_root / 'data'}",
            f"--training.checkpoint.output_dir={out}", "--training.loop.max_train_steps=3",
            "--training.tracker.backends=[]"]


@pytest.mark.distributed
def test_cp2_finetune_equals_one_process(toy_root: Path, tmp_path: Path) -> None:
    """The toy fine-tune (batch 32, fp32): 3 steps on cp = 2 × dp = 1 against 1 process."""
    proc = run_2proc(["recipes/finetune.py", *_finetune_args(toy_root, tmp_path / "cp2")], cwd=REPO,
                     config=CPU_CP2_2PROC)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "layout: 1 data rank(s) x context parallel 2" in proc.stderr
    assert run_recipe_main("finetune", _finetune_args(toy_root, tmp_path / "one")) == 0
    cp, one = _rows(tmp_path / "cp2"), _rows(tmp_path / "one")
    assert [r["step"] for r in cp] == [1, 2, 3]
    worst = _max_rel_diff(cp, one, ["loss", "grad_norm/student"])
    assert worst < REL_TOL, f"cp=2 vs 1 process: max relative difference {worst:.3g}"
    # the CP run's samples per step are its data ranks' (1), not its processes' (2)
    assert cp[0]["samples_per_s"] * cp[0]["step_time_s"] == pytest.approx(32)


@pytest.mark.distributed
def test_cp2_dmd2_generator_and_critic_equal_one_process(toy_root: Path, tmp_path: Path) -> None:
    """DMD2 with the generator stepping every step: the student (through the CFG-batched frozen teacher and the
    critic) and the critic, 2 steps, cp = 2 against 1 process."""
    init = str(toy_root / "init")
    recipe = {
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "dmd_denoising_steps": [1000, 750, 500, 250], "generator_update_interval": 1},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 2}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(tmp_path / "unused")}},
    }
    path = tmp_path / "dmd2.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_2proc(["recipes/distill.py", "--config", str(path),
                      f"--training.checkpoint.output_dir={tmp_path / 'cp2'}"], cwd=REPO, config=CPU_CP2_2PROC)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run_recipe_main("distill", ["--config", str(path),
                                       f"--training.checkpoint.output_dir={tmp_path / 'one'}"]) == 0
    cp, one = _rows(tmp_path / "cp2"), _rows(tmp_path / "one")
    worst = _max_rel_diff(cp, one, ["generator_loss", "critic_loss", "grad_norm/student", "grad_norm/critic"])
    assert worst < REL_TOL, f"cp=2 vs 1 process (DMD2): max relative difference {worst:.3g}"


def test_layout_not_matching_the_process_count_exits_2(toy_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """cp = 2 launched as 1 process: exit 2 naming the layout keys, before any role is built."""
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    out = tmp_path / "run"
    assert run_recipe_main("finetune", _finetune_args(toy_root, out)) == 2
    err = capsys.readouterr().err
    assert ("parallelism_config_dp_replicate_size (1) × parallelism_config_dp_shard_size (1) × "
            "parallelism_config_cp_size (2) = 2, but 1 processes were launched") in err
    assert not out.exists()  # nothing written: the check runs before the run directory is touched


def test_replicate_without_shard_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from fv_accel.errors import ConfigError
    from fv_accel.runtime import parallelism_from_env

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "2")
    with pytest.raises(ConfigError, match="parallelism_config_dp_replicate_size > 1 needs "
                                          "parallelism_config_dp_shard_size > 1"):
        parallelism_from_env(2)
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    assert parallelism_from_env(4).data_parallel_size == 4


def _three_head_wan(path: Path) -> Path:
    from diffusers import WanTransformer3DModel

    from fv_accel.models.wan import TINY_WAN_CONFIG

    WanTransformer3DModel(**{**TINY_WAN_CONFIG, "num_attention_heads": 3}).save_pretrained(path / "transformer")
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["heads", "backend"])
def test_cp_the_model_cannot_split_exits_2(case: str, toy_root: Path, tmp_path: Path) -> None:
    """cp = 2 with a 3-head transformer (Ulysses splits heads), or with an attention backend diffusers cannot
    run under context parallel: exit 2 naming the key, before any weight is read."""
    args = _finetune_args(toy_root, tmp_path / "run")
    if case == "heads":
        args.append(f"--models.student.init_from={_three_head_wan(tmp_path / 'wan3')}")
        expected = "models.student: parallelism_config_cp_size 2 does not divide the transformer's 3 attention heads"
    else:
        args.append("--models.student.attention_backend=_native_math")
        expected = "models.student.attention_backend '_native_math' cannot run under parallelism_config_cp_size 2"
    proc = run_2proc(["recipes/finetune.py", *args], cwd=REPO, config=CPU_CP2_2PROC)
    # the launcher itself exits 1 when a rank fails; the ranks' exit code is in its report
    assert proc.returncode != 0 and "(exitcode: 2)" in proc.stderr, proc.stderr[-4000:]
    assert "(exitcode: 1)" not in proc.stderr
    assert expected in proc.stderr
    assert "filled student" not in proc.stderr  # refused while the weights were still on meta


@pytest.mark.distributed
@pytest.mark.slow
def test_cp2_validation_videos_equal_one_process(toy_root: Path, tmp_path: Path) -> None:
    """Validation at step 0 (3 prompts, 2 sampling steps) under cp = 2: the CP group samples each prompt
    together (not one prompt per rank) and writes the videos of 1 process, to one 8-bit level."""
    import av
    import numpy as np

    def frames(path: Path) -> np.ndarray:
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)

    args = ["--training.loop.max_train_steps=1", "--training.data.train_batch_size=2",
            "--callbacks.validation.at_start=true", "--callbacks.validation.num_samples=3",
            "--callbacks.validation.num_inference_steps=2"]
    proc = run_2proc(["recipes/finetune.py", *_finetune_args(toy_root, tmp_path / "cp2"), *args], cwd=REPO,
                     config=CPU_CP2_2PROC)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert run_recipe_main("finetune", [*_finetune_args(toy_root, tmp_path / "one"), *args]) == 0
    names = [f"student-{i:02d}.mp4" for i in range(3)]
    for out in ("cp2", "one"):
        assert sorted(p.name for p in (tmp_path / out / "validation" / "step-0").glob("*.mp4")) == names
    for name in names:
        cp, one = (frames(tmp_path / out / "validation" / "step-0" / name) for out in ("cp2", "one"))
        assert cp.shape == one.shape
        assert np.abs(cp - one).max() <= 1, name


def test_tokens_not_dividing_by_cp_exit_2() -> None:
    """Latents [16, 3, 4, 4] with Wan's (1, 2, 2) patches are 3 × 2 × 2 = 12 tokens: cp 2, 3, 4 split them,
    cp 5 cannot (counted by hand)."""
    from types import SimpleNamespace

    from fv_accel.build import check_context_parallel_tokens
    from fv_accel.errors import ConfigError

    data = SimpleNamespace(dataset=SimpleNamespace(latent_shape=(16, 3, 4, 4)))
    roles = {"student": SimpleNamespace(latent_patch_size=(1, 2, 2))}
    for cp in (1, 2, 3, 4):
        check_context_parallel_tokens(roles, data, cp)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"make 12 tokens per sample for models.student, not divisible by "
                                          r"parallelism_config_cp_size 5"):
        check_context_parallel_tokens(roles, data, 5)  # type: ignore[arg-type]


class _Mesh:
    """A stand-in for Accelerate's mesh of ``(dp_replicate, dp_shard, cp)`` sizes seen from ``rank`` (row-major,
    cp innermost, as ``init_device_mesh`` lays ranks out)."""

    def __init__(self, names: tuple[str, ...], sizes: tuple[int, ...], rank: int) -> None:
        self.mesh_dim_names, self._sizes, self._rank = names, sizes, rank

    def size(self, dim: int) -> int:
        return self._sizes[dim]

    def get_coordinate(self) -> list[int]:
        coordinate, rest = [], self._rank
        for size in reversed(self._sizes):
            coordinate.append(rest % size)
            rest //= size
        return coordinate[::-1]


@pytest.mark.parametrize(("names", "sizes"), [(("dp_replicate", "dp_shard", "cp"), (2, 2, 2)),
                                              (("dp_shard", "cp"), (3, 2)), (("cp",), (4,))])
def test_cp_peers_share_a_data_rank(names: tuple[str, ...], sizes: tuple[int, ...]) -> None:
    """With cp innermost, ranks 2d and 2d + 1 (cp = 2) are one sample's halves: data rank d of world / cp."""
    from types import SimpleNamespace

    from fv_accel.runtime import Topology

    world, cp = math.prod(sizes), sizes[-1]
    for rank in range(world):
        accelerator = SimpleNamespace(process_index=rank, num_processes=world, local_process_index=rank,
                                      torch_device_mesh=_Mesh(names, sizes, rank))
        topology = Topology.from_accelerator(accelerator)  # type: ignore[arg-type]
        assert (topology.data_rank, topology.data_world_size, topology.cp_size) == (rank // cp, world // cp, cp)
