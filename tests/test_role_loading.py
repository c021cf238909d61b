"""Memory-efficient role loading (fv_accel.build.load_roles → shard_roles): roles are built on ``meta``,
sharded, then each rank fills its shards from the safetensors files.

Oracles: a plain ``diffusers`` ``from_pretrained`` of the same directory (every parameter and buffer, dtype
included, and the forward output), and the RSS of the same script on a tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ACCELERATE, CPU_2PROC, REPO, free_port, subprocess_env

SCRIPT = str(REPO / "tests" / "dist_scripts" / "role_loading.py")
HUB_ID = "fv-test/tiny-wan-critic"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
#: ≥ 100 M parameters (147 M): big enough that a role's bytes dominate the interpreter's own RSS noise.
BIG_WAN: dict[str, Any] = {"num_attention_heads": 8, "attention_head_dim": 128, "text_dim": 4096,
                           "freq_dim": 256, "ffn_dim": 4096, "num_layers": 8, "rope_max_seq_len": 1024}


def write_wan(root: Path, seed: int, overrides: dict[str, Any] | None = None) -> Path:
    """A random Wan transformer in diffusers format at ``root/transformer``; parameters drawn directly (the
    default initialisers of a 147 M model cost seconds)."""
    from diffusers import WanTransformer3DModel

    from fv_accel.models import TINY_WAN_CONFIG

    with torch.device("meta"):
        model = WanTransformer3DModel(**{**TINY_WAN_CONFIG, **(overrides or {})})
    gen = torch.Generator().manual_seed(seed)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(root / "transformer")
    return root


def hub_cache(hf_home: Path, model_dir: Path) -> None:
    """``model_dir`` laid out as huggingface_hub's cache holds a download of ``HUB_ID`` at ``main``."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def launch(mode: str, init_dir: Path, out: Path, *extra: str, **env: str) -> list[dict[str, Any]]:
    """The 3-role DMD2 build of ``tests/dist_scripts/role_loading.py`` on 2 CPU processes, bf16 (so the frozen
    teacher is bf16); one report per rank."""
    import subprocess

    out.mkdir(parents=True)
    cmd = [ACCELERATE, "launch", "--config_file", CPU_2PROC, "--main_process_port", str(free_port()),
           "--mixed_precision", "bf16", SCRIPT, mode, str(init_dir), str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def finetune_config(init: str, toy_root: Path, tmp_path: Path) -> Any:
    from fv_accel.config import resolve_config

    return resolve_config({
        "models": {"student": {"init_from": init, "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 1, "text_len": 8},
                     "loop": {"max_train_steps": 1}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(tmp_path / "out")}},
    })


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_shards_equal_a_full_load(tmp_path: Path) -> None:
    """Student (local dir, activation checkpointing), critic (Hub id from the offline cache, other weights),
    frozen teacher (local dir, bf16 with diffusers' fp32-kept modules): every parameter and buffer (the RoPE
    tables computed at construction) equals diffusers' own full load, before and after a forward; the
    optimizers step the sharded parameters. The shard offsets also hold for HSDP-shaped placements."""
    local = write_wan(tmp_path / "local", seed=0)
    hf_home = tmp_path / "hf"
    hub_cache(hf_home, write_wan(tmp_path / "hub", seed=1))
    reports = launch("compare", local, tmp_path / "out", HUB_ID, HF_HOME=str(hf_home))
    for report in reports:
        assert report["hsdp_slices_match"], report["rank"]
        compare = report["compare"]
        assert compare["optimizer_params"] == {"student": True, "critic": True}, report["rank"]
        for role in ("student", "critic", "teacher"):
            got = compare[role]
            assert got["buffers"] == ["rope.freqs_cos", "rope.freqs_sin"]
            assert got["num_compared"] > 60
            for when in ("before_forward", "after_forward"):
                assert got[when] == {"missing": [], "extra": [], "differ": []}, (report["rank"], role, when)


def test_meta_build_matches_from_pretrained_in_one_process(toy_root: Path, tmp_path: Path,
                                                           single_process_dist: Any) -> None:
    """World size 1, fp32: the filled student computes what diffusers' full load computes, and its trainable
    parameters are the optimizer's."""
    from diffusers import WanTransformer3DModel

    from fv_accel.build import build_run

    init = str(toy_root / "init")
    cfg = finetune_config(init, toy_root, tmp_path)
    method = build_run(cfg, single_process_dist, with_data=False).method
    [optimizer] = method.get_optimizers(1)
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [
        id(p) for p in method.student.transformer.parameters()]
    oracle = WanTransformer3DModel.from_pretrained(init, subfolder="transformer", torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 4, generator=gen)
    t = torch.tensor([999.0, 250.0])
    text = torch.randn(2, 8, 32, generator=gen)
    with torch.no_grad():
        got = method.student.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                         return_dict=False)[0]
        want = oracle(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_peak_rss_stays_within_one_and_a_half_roles(tmp_path: Path) -> None:
    """3-role DMD2 build of a 147 M-parameter Wan (student and critic fp32, teacher bf16): each rank's peak RSS
    grows by at most 1.5 × one fp32 role over the same script on the tiny Wan. Its own shards are 1.25 roles
    (half of 1 + 1 + 0.5); loading every role in full first (before this change) grew it by 3.3-3.5×."""
    tiny = launch("rss", write_wan(tmp_path / "tiny", seed=0), tmp_path / "tiny_out")
    big = launch("rss", write_wan(tmp_path / "big", seed=0, overrides=BIG_WAN), tmp_path / "big_out")
    role_bytes = 4 * big[0]["num_params"]
    assert big[0]["num_params"] >= 100_000_000
    growth = [(b["peak_rss_bytes"] - t["peak_rss_bytes"]) / role_bytes for b, t in zip(big, tiny, strict=True)]
    assert all(g <= 1.5 for g in growth), f"peak RSS growth per rank, in fp32 roles: {growth}"


def test_missing_weight_file_names_the_role(toy_root: Path, tmp_path: Path, single_process_dist: Any) -> None:
    """A transformer directory with its config but no safetensors weights: CheckpointError naming the key."""
    from fv_accel.build import build_run
    from fv_accel.errors import CheckpointError

    (tmp_path / "init" / "transformer").mkdir(parents=True)
    shutil.copy(toy_root / "init" / "transformer" / "config.json", tmp_path / "init" / "transformer")
    cfg = finetune_config(str(tmp_path / "init"), toy_root, tmp_path)
    with pytest.raises(CheckpointError, match=r"models\.student\.init_from: .* has no diffusion_pytorch_model"):
        build_run(cfg, single_process_dist, with_data=False)


def test_roles_with_the_same_weights_read_each_tensor_once(toy_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 and a bf16 role built empty from one directory and filled together: each stored tensor is read
    once, and both equal diffusers' full load in their dtype (fp32-kept modules included)."""
    import safetensors
    from diffusers import WanTransformer3DModel

    from fv_accel.config import ModelConfig
    from fv_accel.models import WanModel
    from fv_accel.models.sharded_load import fill_from_safetensors, materialize

    init = str(toy_root / "init")
    cfg = ModelConfig(init_from=init, latent_stats="identity")
    reads: list[str] = []
    real_open = safetensors.safe_open

    class CountingOpen:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.handle = real_open(*args, **kwargs)

        def __enter__(self) -> Any:
            inner = self.handle.__enter__()

            class Handle:
                def keys(self) -> list[str]:
                    return inner.keys()

                def get_slice(self, name: str) -> Any:
                    stored = inner.get_slice(name)

                    class Slice:
                        def get_shape(self) -> list[int]:
                            return stored.get_shape()

                        def __getitem__(self, index: Any) -> torch.Tensor:
                            reads.append(name)
                            return stored[index]

                    return Slice()

                def get_tensor(self, name: str) -> Any:
                    reads.append(name)
                    return inner.get_tensor(name)

            return Handle()

        def __exit__(self, *exc: Any) -> None:
            self.handle.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    modules = {dtype: WanModel.empty_transformer(cfg, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    for module in modules.values():
        materialize(module, torch.device("cpu"))
    fill_from_safetensors(list(modules.values()), WanModel.weight_files("student", cfg), key="models.student")
    assert sorted(reads) == sorted(modules[torch.float32].state_dict())
    for dtype, module in modules.items():
        oracle = WanTransformer3DModel.from_pretrained(init, subfolder="transformer", torch_dtype=dtype)
        want = {n: t for n, t in [*oracle.named_parameters(), *oracle.named_buffers()]}
        got = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
        assert sorted(got) == sorted(want)
        assert {n for n in got if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])} == set()
    assert modules[torch.bfloat16].condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


def test_sharded_weight_files_through_their_index(toy_root: Path, tmp_path: Path) -> None:
    """A transformer saved in several files with diffusers' index (how the 14B ships) fills like one file."""
    from diffusers import WanTransformer3DModel

    from fv_accel.config import ModelConfig
    from fv_accel.models import WanModel
    from fv_accel.models.sharded_load import WEIGHTS_INDEX, fill_from_safetensors, materialize

    oracle = WanTransformer3DModel.from_pretrained(str(toy_root / "init"), subfolder="transformer")
    oracle.save_pretrained(tmp_path / "sharded" / "transformer", max_shard_size="40KB")
    cfg = ModelConfig(init_from=str(tmp_path / "sharded"), latent_stats="identity")
    files = WanModel.weight_files("student", cfg)
    assert (tmp_path / "sharded" / "transformer" / WEIGHTS_INDEX).is_file() and len(files) > 1
    module = WanModel.empty_transformer(cfg, dtype=torch.float32)
    materialize(module, torch.device("cpu"))
    fill_from_safetensors([module], files, key="models.student")
    got, want = module.state_dict(), oracle.state_dict()
    assert got.keys() == want.keys()
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
