"""LoRA on a two-expert role (Wan 2.2 A14B layout, ``models.<role>.lora`` with ``experts``), in one process:
adapters in each trained expert only, the checkpoint and EMA hold adapters only per expert, a resume continues
bitwise, and the diffusers LoRA export (one file per trained expert) loaded with diffusers' own
``load_lora_weights`` (``load_into_transformer_2`` for the low-noise expert) computes what the ``--merge-lora``
export computes.

Oracles: adapter names from a plain diffusers model's module names (``test_lora.expected_adapter_names``); the
init files' weights for the frozen bases; the uninterrupted run's losses and adapters for the resume; diffusers'
peft-based LoRA forward against the merged weights, and the base, which the adapted experts must differ from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import build_tiny_wan_pipeline, run_recipe_main
from safetensors.torch import load_file
from test_lora import expected_adapter_names

from fv_accel.checkpoint.layout import EMA_SHADOW_PREFIX, dcp_entries, read_role_state_dict
from fv_accel.config import resolve_config

RANK, ALPHA = 2, 4.0
#: both sides of the boundary get samples from the toy data's uniform timesteps in every few steps
BOUNDARY = 0.5
EXPERTS = ("transformer", "transformer_2")


@pytest.fixture(scope="module")
def pipe_dir(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny two-expert WanPipeline (different random experts), the base of every run here."""
    from fv_accel.toy import ensure_init_transformer

    second = ensure_init_transformer(toy_root, seed=1, name="init_expert2")
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("a14b") / "pipe", toy_root / "init" / "transformer",
                                   second / "transformer", boundary_ratio=BOUNDARY)


def _config(init: Path, toy_root: Path, out: Path, *, steps: int = 4, **student: Any) -> dict[str, Any]:
    return {
        "models": {"student": {"init_from": str(init), "latent_stats": "identity",
                               "lora": {"rank": RANK, "alpha": ALPHA}, **student}},
        "method": {"name": "finetune", "weighting_scheme": "uniform"},
        "training": {"data": {"data_path": str(toy_root / "data"), "seed": 0, "train_batch_size": 4, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-2},
                     "loop": {"max_train_steps": steps, "max_grad_norm": 1.0},
                     "checkpoint": {"output_dir": str(out), "save_steps": 2, "keep_last": 0},
                     "tracker": {"backends": []}},
        "callbacks": {"ema": {"decay": 0.5}},
    }


def _finetune(config: dict[str, Any], path: Path, *extra: str) -> None:
    path.write_text(yaml.safe_dump(config))
    assert run_recipe_main("finetune", ["--config", str(path), *extra]) == 0


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r}


@pytest.fixture(scope="module")
def runs(pipe_dir: Path, toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Both experts with LoRA: an uninterrupted 4-step run, and one resumed from its checkpoint-2."""
    root = tmp_path_factory.mktemp("lora_two_experts")
    full, resumed = root / "full", root / "resumed"
    _finetune(_config(pipe_dir, toy_root, full), root / "full.yaml")
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    _finetune(_config(pipe_dir, toy_root, resumed), root / "resumed.yaml",
              "--training.checkpoint.resume_from_checkpoint=latest")
    return full, resumed


def test_checkpoint_and_ema_hold_each_experts_adapters_only(runs: tuple[Path, Path], pipe_dir: Path) -> None:
    entries = dcp_entries(runs[0] / "checkpoint-4")
    names = expected_adapter_names(pipe_dir)  # both experts have the tiny architecture
    for expert in EXPERTS:
        prefix = f"roles.student.{expert}."
        assert {k[len(prefix):] for k in entries if k.startswith(prefix)} == names, expert
    assert {k.split(".")[2] for k in entries if k.startswith("roles.")} == set(EXPERTS)
    shadow = {k[len(EMA_SHADOW_PREFIX):] for k in entries if k.startswith(EMA_SHADOW_PREFIX)}
    assert shadow == names | {f"transformer_2.{n}" for n in names}


def test_resume_continues_bitwise(runs: tuple[Path, Path]) -> None:
    full, resumed = runs
    reference, after = _losses(full), _losses(resumed)
    assert sorted(after) == [3, 4]
    assert all(after[step] == reference[step] for step in after), (after, reference)
    for expert in EXPERTS:
        a = read_role_state_dict(full / "checkpoint-4", "student", module=expert)
        b = read_role_state_dict(resumed / "checkpoint-4", "student", module=expert)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), expert
        assert any(torch.count_nonzero(v) for k, v in a.items() if ".lora_B." in k), expert  # trained off B = 0


@pytest.mark.parametrize("role", ["student", "ema"])
def test_lora_export_loads_in_diffusers_like_the_merged_export(role: str, runs: tuple[Path, Path], pipe_dir: Path,
                                                               tmp_path: Path) -> None:
    from diffusers import WanPipeline

    from fv_accel.export import export_checkpoint

    checkpoint = runs[0] / "checkpoint-4"
    lora = export_checkpoint(checkpoint, role=role, output=tmp_path / "lora", dtype="fp32")
    merged = export_checkpoint(checkpoint, role=role, output=tmp_path / "merged", dtype="fp32", merge_lora=True)
    assert lora.is_lora and sorted(lora.files) == ["README.md", "pytorch_lora_weights.safetensors",
                                                   "transformer_2/pytorch_lora_weights.safetensors"]
    card = (tmp_path / "lora" / "README.md").read_text()
    assert f'load_lora_weights("{tmp_path / "lora"}")' in card
    assert 'weight_name="transformer_2/pytorch_lora_weights.safetensors"' in card
    assert "load_into_transformer_2=True" in card
    assert merged.is_pipeline and not merged.is_lora

    base = WanPipeline.from_pretrained(pipe_dir)
    adapted = WanPipeline.from_pretrained(pipe_dir)
    adapted.load_lora_weights(str(tmp_path / "lora"))  # the card's two calls
    adapted.load_lora_weights(str(tmp_path / "lora"), weight_name="transformer_2/pytorch_lora_weights.safetensors",
                              load_into_transformer_2=True)
    full = WanPipeline.from_pretrained(tmp_path / "merged")
    assert full.config.boundary_ratio == BOUNDARY

    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([250.0, 900.0])
    for expert in EXPERTS:
        with torch.no_grad():
            out = {name: getattr(pipe, expert)(x, t, e, return_dict=False)[0]
                   for name, pipe in {"base": base, "adapter": adapted, "merged": full}.items()}
        torch.testing.assert_close(out["adapter"], out["merged"], atol=1e-5, rtol=0, msg=expert)
        assert (out["adapter"] - out["base"]).abs().max() > 1e-4, expert


def _full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in module.named_parameters()}


@pytest.mark.parametrize("experts", ["both", "high"])
def test_only_the_trained_experts_adapters_train(experts: str, pipe_dir: Path, toy_root: Path, tmp_path: Path,
                                                 fresh_world: Any) -> None:
    """3 steps: each trained expert has the adapters alone trainable and in the optimizer, its base bitwise the
    init file's, its B off zero; a frozen expert (``high``: transformer_2) has no adapter and keeps its weights.
    The two experts draw different initial A matrices."""
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.runtime import build_accelerator
    from fv_accel.trainer import Trainer

    accelerator = build_accelerator()
    cfg = resolve_config(_config(pipe_dir, toy_root, tmp_path / "run", steps=3, experts=experts))
    built = build_run(cfg, accelerator)
    method = built.method
    student = method.student
    trained = EXPERTS if experts == "both" else ("transformer",)
    names = expected_adapter_names(pipe_dir)
    in_optimizer = {id(p) for g in method.roles["student"].optimizer.param_groups for p in g["params"]}
    for expert, module in student.modules().items():
        want = names if expert in trained else set()
        assert {n for n, p in module.named_parameters() if ".lora_" in n} == want, expert
        assert {n for n, p in module.named_parameters() if p.requires_grad} == want, expert
        assert {n for n, p in module.named_parameters() if id(p) in in_optimizer} == want, expert
    assert {k for k in method.checkpoint_state() if k.startswith("roles.")} == {
        f"roles.student.{e}" for e in trained}
    before = {e: _full(m) for e, m in student.modules().items()}
    if experts == "both":
        a_name = "blocks.0.attn1.to_q.lora_A.default.weight"
        assert not torch.equal(before["transformer"][a_name], before["transformer_2"][a_name])
    Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg, callbacks=CallbackList([]),
            checkpoints=None, show_progress=False).fit()
    for expert, module in student.modules().items():
        stored = load_file(str(pipe_dir / expert / "diffusion_pytorch_model.safetensors"))
        after = _full(module)
        for name, value in after.items():
            if ".lora_B." in name:
                assert torch.count_nonzero(value) > 0, (expert, name)
            elif ".lora_A." not in name:
                assert torch.equal(value, stored[name.replace(".base_layer.", ".")]), (expert, name)
        assert any(not torch.equal(after[n], before[expert][n]) for n in after) is (expert in trained), expert


def test_a14b_lora_recipe_states_its_estimate(tmp_path: Path) -> None:
    """``recipes/configs/wan2.2_t2v_a14b_lora.yaml`` adapts both experts and quotes the dry run's peaks; its
    state terms are the hand formulas of ``fv_accel/memory.py`` for two 14B experts of P parameters with A
    adapter parameters each (rank 32 on the default targets: 8 attention linears D→D and the two FFN linears per
    block, r·(in + out) each)."""
    import math

    from conftest import REPO
    from test_memory_estimate import ARCH, LATENT, config_dict, wan_counts

    from fv_accel.config import load_yaml
    from fv_accel.memory import GiB, RoleShape, estimate_run

    recipe = REPO / "recipes" / "configs" / "wan2.2_t2v_a14b_lora.yaml"
    for sub in EXPERTS:  # a config-only A14B layout (the estimate reads no weights)
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(config_dict("14b")))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}))
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    tree = load_yaml(recipe)
    tree["models"]["student"]["init_from"] = str(tmp_path)
    tree["training"]["data"]["data_path"] = str(tmp_path)
    cfg = resolve_config(tree)
    student = cfg.models["student"]
    assert student.experts in (None, "both") and student.subfolder == "transformer" and student.lora is not None
    d, f, n = 5120, ARCH["14b"]["ffn_dim"], ARCH["14b"]["num_layers"]
    p, blk = wan_counts(d, f, n)
    a_blk = student.lora.rank * (8 * (d + d) + (d + f) + (f + d))
    a = n * a_blk
    # what the dry run counts on the built role: both experts' bases and adapters, the largest (adapted) block
    shape = RoleShape(config_dict("14b"), 2 * (p + a), blk + a_blk, trainable_params=2 * a, num_experts=2)
    text = recipe.read_text()
    for shards, stated in ((8, 39.78), (16, 36.24)):
        est = estimate_run(cfg, {"student": shape}, latent_shape=LATENT, shard_degree=shards, mixed_precision="bf16")
        terms = {t.name: t.bytes for t in est.terms if t.role == "student"}
        assert terms["weights (frozen base)"] == math.ceil(2 * 2 * p / shards)
        assert terms["weights (fp32 adapters)"] == math.ceil(4 * 2 * a / shards)
        assert terms["AdamW m+v"] == math.ceil(8 * 2 * a / shards)
        assert round(est.peak_bytes / GiB, 2) == stated
        assert f"{stated:.2f} GiB" in text


def test_sampling_recipe_loads_each_experts_adapters(runs: tuple[Path, Path]) -> None:
    """recipes/sample.py's model of the run holds, in each expert, the checkpoint's adapters (student and EMA)."""
    from conftest import REPO, load_module

    from fv_accel.checkpoint.layout import read_ema_state_dict

    recipe = load_module(REPO / "recipes" / "sample.py", "sample_recipe_lora_two_experts")
    ckpt = runs[0] / "checkpoint-4"
    run_cfg, _ = recipe.read_run_config(ckpt)
    for role in ("student", "ema"):
        model = recipe.load_model(run_cfg, ckpt, role)
        for expert, module in model.modules().items():
            saved = (read_ema_state_dict(ckpt, module=expert) if role == "ema"
                     else read_role_state_dict(ckpt, "student", module=expert))
            params = dict(module.named_parameters())
            assert {n for n in params if ".lora_" in n} == set(saved), (role, expert)
            assert all(torch.equal(params[n].detach(), v.float()) for n, v in saved.items()), (role, expert)


def test_experts_low_exports_the_low_noise_lora_alone(pipe_dir: Path, toy_root: Path, tmp_path: Path,
                                                      fresh_world: Any) -> None:
    """``experts: low``: the LoRA export has transformer_2's file only (a plain ``load_lora_weights(dir)`` finds
    no file instead of loading it into ``transformer``); the merged pipeline links ``transformer`` from the base
    bitwise and its ``transformer_2`` equals the diffusers-loaded LoRA's."""
    from diffusers import WanPipeline

    from fv_accel.export import export_checkpoint
    from fv_accel.run import train
    from fv_accel.runtime import build_accelerator

    train(resolve_config(_config(pipe_dir, toy_root, tmp_path / "run", steps=2, experts="low")), build_accelerator())
    checkpoint = tmp_path / "run" / "checkpoint-2"
    lora = export_checkpoint(checkpoint, role="student", output=tmp_path / "lora", dtype="fp32")
    export_checkpoint(checkpoint, role="student", output=tmp_path / "merged", dtype="fp32", merge_lora=True)
    assert sorted(lora.files) == ["README.md", "transformer_2/pytorch_lora_weights.safetensors"]
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "load_into_transformer_2=True" in card and f'load_lora_weights("{tmp_path / "lora"}")' not in card
    base_high = load_file(str(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    merged_high = load_file(str(tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert base_high.keys() == merged_high.keys() and all(torch.equal(base_high[k], merged_high[k]) for k in base_high)

    adapted = WanPipeline.from_pretrained(pipe_dir)
    with pytest.raises(OSError, match="no file named"):
        adapted.load_lora_weights(str(tmp_path / "lora"))
    adapted.load_lora_weights(str(tmp_path / "lora"), weight_name="transformer_2/pytorch_lora_weights.safetensors",
                              load_into_transformer_2=True)
    full = WanPipeline.from_pretrained(tmp_path / "merged")
    base = WanPipeline.from_pretrained(pipe_dir)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([250.0, 400.0])
    with torch.no_grad():
        out = {name: pipe.transformer_2(x, t, e, return_dict=False)[0]
               for name, pipe in {"base": base, "adapter": adapted, "merged": full}.items()}
    torch.testing.assert_close(out["adapter"], out["merged"], atol=1e-5, rtol=0)
    assert (out["adapter"] - out["base"]).abs().max() > 1e-4
