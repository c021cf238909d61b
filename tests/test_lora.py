"""LoRA on a role (``models.<role>.lora``), in one process: config errors, which parameters adapt and train, the
frozen base stored in bf16, the adapter-only model state, and DMD2 with a LoRA student and critic.

Oracles: the adapted layers are computed here from a plain diffusers ``WanTransformer3DModel``'s module names
and the suffix rule written out in this file; the frozen base is compared with the init's safetensors file; the
adapted model at initialisation is compared with the plain base model (B = 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fv_accel.config import RunConfig, resolve_config
from fv_accel.errors import ConfigError

WAN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def expected_adapter_names(init: Path, targets: tuple[str, ...] = WAN_TARGETS) -> set[str]:
    """``<linear>.lora_{A,B}.default.weight`` for every nn.Linear of a plain Wan whose name is a target or ends in
    ``.<target>``."""
    from diffusers import WanTransformer3DModel

    plain = WanTransformer3DModel.from_pretrained(init / "transformer")
    linears = [n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)
               and any(n == t or n.endswith("." + t) for t in targets)]
    return {f"{n}.lora_{ab}.default.weight" for n in linears for ab in "AB"}


def _model_cfg(init: Path, **extra: Any) -> dict[str, Any]:
    return {"init_from": str(init), "latent_stats": "identity", **extra}


def test_lora_on_a_frozen_role_is_a_config_error(toy_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"models.teacher.*lora is set on a frozen role") as info:
        resolve_config({"models": {"student": _model_cfg(toy_root / "init"),
                                   "teacher": _model_cfg(toy_root / "init", trainable=False, lora={"rank": 4})},
                        "method": {"name": "dmd2"}})
    assert info.value.exit_code == 2


def test_unmatched_target_modules_are_named(toy_root: Path) -> None:
    from fv_accel.models import load_role_model

    cfg = resolve_config({"models": {"student": _model_cfg(
        toy_root / "init", lora={"rank": 4, "target_modules": ["to_q", "attn3.to_q", "nope"]})},
        "method": {"name": "finetune"}})
    with pytest.raises(ConfigError, match=r"models.student.lora.target_modules: \['attn3.to_q', 'nope'\]") as info:
        load_role_model("student", cfg.models["student"], mixed_precision="no", on_meta=True)
    assert info.value.exit_code == 2


def test_adapters_are_the_only_trainable_parameters_and_start_at_the_base(toy_root: Path) -> None:
    from diffusers import WanTransformer3DModel

    from fv_accel.models import load_role_model

    init = toy_root / "init"
    cfg = resolve_config({"models": {"student": _model_cfg(init, lora={"rank": 3, "alpha": 6.0})},
                          "method": {"name": "finetune"}})
    model = load_role_model("student", cfg.models["student"], mixed_precision="bf16")
    transformer = model.transformer
    assert type(transformer) is WanTransformer3DModel  # still the diffusers class (FSDP wrapping, export)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable == expected_adapter_names(init)
    params = dict(transformer.named_parameters())
    assert params["blocks.0.ffn.net.2.lora_A.default.weight"].shape == (3, 64)  # [r, in]
    assert params["blocks.0.ffn.net.2.lora_B.default.weight"].shape == (32, 3)  # [out, r]
    # the frozen base is stored like a frozen role's (bf16 but diffusers' fp32 modules); adapters fp32
    assert all(p.dtype == torch.float32 for n, p in params.items() if n in trainable)
    assert params["blocks.0.attn1.to_q.base_layer.weight"].dtype == torch.bfloat16
    assert params["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
    assert all(torch.count_nonzero(params[n]) == 0 for n in trainable if ".lora_B." in n)
    assert all(torch.count_nonzero(params[n]) > 0 for n in trainable if ".lora_A." in n)

    # B = 0: the adapted model computes what the plain base does (fp32 run: no bf16 rounding to compare)
    fp32 = load_role_model("student", cfg.models["student"], mixed_precision="no")
    base = WanTransformer3DModel.from_pretrained(init / "transformer")
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 8, 32, generator=g)
    t = torch.tensor([250.0, 900.0])
    fp32.transformer.eval()
    with torch.no_grad():
        ours = fp32.transformer(x, t, e, return_dict=False)[0]
        reference = base(x, t, e, return_dict=False)[0]
    assert torch.equal(ours, reference)


def _one_adapter(rows: int) -> torch.nn.Module:
    """A module with one parameter named ``x.lora_A.default.weight`` of shape [rows, 10]."""
    return torch.nn.ModuleDict({"x": torch.nn.ModuleDict({"lora_A": torch.nn.ModuleDict(
        {"default": torch.nn.Linear(10, rows, bias=False)})})})


def test_adapter_init_does_not_depend_on_the_sharding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank of a 2-rank FSDP2 layout (rows 0-1 and 2-3 of A [4, 10]) gets the rows of the one-process
    tensor: the full tensor is drawn and sliced, not a shard-sized draw."""
    import fv_accel.models.sharded_load as sharded_load
    from fv_accel.config import LoraConfig
    from fv_accel.models.lora import init_adapters

    lora = LoraConfig(rank=4)
    whole = _one_adapter(4)
    init_adapters(whole, "student", lora)
    value = whole.get_parameter("x.lora_A.default.weight").detach()
    assert value.abs().max() <= 1 / 10**0.5 and value.std() > 0.05  # U(-1/sqrt(in), 1/sqrt(in))
    for rank in range(2):
        # a sharded parameter has the full shape; its local storage holds this rank's rows
        rows, local = slice(2 * rank, 2 * rank + 2), torch.empty(2, 10)
        monkeypatch.setattr(sharded_load, "local_index",
                            lambda t, local=local, rows=rows: (local, (rows, slice(0, 10))))
        init_adapters(_one_adapter(4), "student", lora)
        assert torch.equal(local, value[rows])
    monkeypatch.undo()
    other = _one_adapter(4)
    init_adapters(other, "critic", lora)  # another role draws other values
    assert not torch.equal(other.get_parameter("x.lora_A.default.weight"), value)


def test_trainable_only_model_state_saves_and_loads_the_adapters_alone(toy_root: Path) -> None:
    from fv_accel.checkpoint.states import ModelState
    from fv_accel.models import load_role_model

    init = toy_root / "init"
    cfg = resolve_config({"models": {"student": _model_cfg(init, lora={"rank": 2})}, "method": {"name": "finetune"}})
    model = load_role_model("student", cfg.models["student"], mixed_precision="no")
    state = ModelState(model.transformer, trainable_only=True)
    saved = state.state_dict()
    assert set(saved) == expected_adapter_names(init)
    other = load_role_model("student", cfg.models["student"], mixed_precision="no")
    target = {k: torch.full_like(v, 0.5) for k, v in saved.items()}
    ModelState(other.transformer, trainable_only=True).load_state_dict(target)
    params = dict(other.transformer.named_parameters())
    assert all(torch.equal(params[k], target[k]) for k in target)
    with pytest.raises(RuntimeError, match="trainable-only weights"):
        ModelState(other.transformer, trainable_only=True).load_state_dict(
            {k: v for k, v in target.items() if "blocks.1." not in k})


def _dmd2_config(toy_root: Path, out: Path) -> RunConfig:
    init = toy_root / "init"
    return resolve_config({
        "models": {"student": _model_cfg(init, lora={"rank": 4, "alpha": 8.0}),
                   "critic": _model_cfg(init, lora={"rank": 2, "target_modules": ["to_q", "to_v"]}),
                   "teacher": _model_cfg(init, trainable=False)},
        "method": {"name": "dmd2", "generator_update_interval": 2, "dmd_denoising_steps": [1000, 500]},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 4}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out)}},
    })


def test_dmd2_with_lora_student_and_critic_under_bf16(toy_root: Path, tmp_path: Path, fresh_world: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """4 steps (student at 2 and 4): each LoRA role's base stays bitwise the init file's weights (in bf16),
    its B matrices leave zero; the optimizers hold the adapters only."""
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.runtime import build_accelerator
    from fv_accel.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    accelerator = build_accelerator()
    cfg = _dmd2_config(toy_root, tmp_path)
    built = build_run(cfg, accelerator)
    method = built.method
    init_file = load_file(str(toy_root / "init" / "transformer" / "diffusion_pytorch_model.safetensors"))
    keep_fp32 = ("time_embedder", "scale_shift_table", "norm2")

    def full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in module.named_parameters()}

    expected = {"student": expected_adapter_names(toy_root / "init"),
                "critic": expected_adapter_names(toy_root / "init", ("to_q", "to_v"))}
    for role, names in expected.items():
        optimizer = method.roles[role].optimizer
        module = method.role_models[role].transformer
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert {n for n, p in module.named_parameters() if id(p) in in_optimizer} == names
    trainer = Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg,
                      callbacks=CallbackList([]), checkpoints=None, show_progress=False)
    trainer.fit()
    for role, names in expected.items():
        after = full(method.role_models[role].transformer)
        assert {n for n in after if ".lora_" in n} == names
        for name, value in after.items():
            if name in names:
                assert value.dtype == torch.float32
                if ".lora_B." in name:
                    assert torch.count_nonzero(value) > 0, (role, name)
                continue
            stored = init_file[name.replace(".base_layer.", ".")]
            dtype = torch.float32 if any(k in name.split(".") for k in keep_fp32) else torch.bfloat16
            assert value.dtype == dtype, (role, name)
            assert torch.equal(value, stored.to(dtype)), (role, name)


def test_the_push_retry_command_keeps_merge_lora(tmp_path: Path) -> None:
    """A failed push tells the user a command that redoes the same export: parsed back, it asks for the same."""
    import shlex

    from fv_accel.export import parse_args, retry_command

    argv = ["--checkpoint", "run", "--role", "ema", "--output", "out", "--merge-lora", "--push-to-hub", "me/x"]
    command = shlex.split(retry_command(parse_args(argv), tmp_path / "checkpoint-4"))
    assert command[:2] == ["python", "recipes/export.py"]
    again = parse_args(command[2:])
    assert again.merge_lora and again.role == "ema" and again.push_to_hub == "me/x"
    assert not parse_args(argv[:6]).merge_lora


def test_a_lora_export_counts_as_an_earlier_export(tmp_path: Path) -> None:
    """The Hub push re-exports into one directory each time: a LoRA export there must be replaceable."""
    from fv_accel.export import is_previous_export

    (tmp_path / "README.md").write_text("card")
    assert not is_previous_export(tmp_path)  # a card alone is not an export
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert is_previous_export(tmp_path)
