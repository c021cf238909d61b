"""Sample latents from one role of a checkpoint, conditioned on rows of the run's dataset.

    python recipes/sample.py --checkpoint PATH --role student|ema|teacher --steps K --num-samples N \
        --output FILE.safetensors [--seed S]

One plain process (a GPU when there is one). PATH is a checkpoint-<step> directory or a run's output directory
(its newest complete checkpoint); the weights are read from the DCP shards whatever world size wrote them.
- student / ema: the trained student (``ema``: the EMA weights), with the sampler its method generates with
  (the method class's ``sampler``, ``fv_accel/methods/base.py``): a dmd2 run's student with its DMD schedule
  (``method.dmd_denoising_steps``; K must equal its length), other methods' students with K Euler steps.
- teacher: ``models.teacher.init_from`` of the run's config, K Euler steps of the flow ODE.
Conditioning: N different dataset rows of ``training.data.data_path`` spread evenly over the dataset
(``fv_accel.sampling.spread_rows``, as validation and the toy quality table pick theirs).
Output: ``latents`` float32 [N, C, T, H, W] in the dataset's stored (unnormalised) latent space and
``data_index`` int64 [N] (the row that conditioned each sample). Exit codes: 0 ok, 1 failure, 2 bad arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fv_accel.cli import exit_process
from fv_accel.errors import EXIT_OK, CheckpointError, ConfigError

if TYPE_CHECKING:
    from fv_accel.config import RunConfig
    from fv_accel.models.base import ModelBase

#: samples per forward batch (bounds memory; the result does not depend on it only through the noise order)
CHUNK = 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipes/sample.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint-<step> dir or a run's output dir")
    parser.add_argument("--role", required=True, choices=["student", "ema", "teacher"])
    parser.add_argument("--steps", required=True, type=int, help="number of sampling steps K")
    parser.add_argument("--num-samples", required=True, type=int)
    parser.add_argument("--output", required=True, help="FILE.safetensors")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.num_samples < 1:
        raise ConfigError("--steps and --num-samples must be >= 1")
    if not args.output.endswith(".safetensors"):
        raise ConfigError(f"--output {args.output!r} must end in .safetensors")
    return args


def load_model(cfg: RunConfig, checkpoint: Path, role: str) -> ModelBase:
    """The role's model (family wrapper with latent normalisation) holding the checkpoint's weights."""
    from fv_accel.checkpoint.layout import read_ema_state_dict, read_role_state_dict
    from fv_accel.models import load_role_model

    model_role = "teacher" if role == "teacher" else "student"
    models = cfg.models
    if model_role not in models:
        raise ConfigError(f"{checkpoint}: the run's config has no models.{model_role}")
    mcfg = models[model_role].model_copy(update={"trainable": False})
    # Architecture and latent statistics come from init_from; the weights (student / ema) from the checkpoint.
    model = load_role_model(model_role, mcfg, mixed_precision="no")
    if role != "teacher":
        state = read_ema_state_dict(checkpoint) if role == "ema" else read_role_state_dict(checkpoint, "student")
        try:
            model.transformer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint}: {role} weights do not match models.student: {exc}") from None
    return model


@torch.no_grad()
def sample(checkpoint: Path, role: str, steps: int, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    from fv_accel.checkpoint.manager import read_metadata
    from fv_accel.config import RunConfig
    from fv_accel.data import ParquetLatentDataset
    from fv_accel.methods import method_class
    from fv_accel.sampling import DMDSampler, EulerSampler, Sampler, spread_rows

    meta = read_metadata(checkpoint)
    try:
        cfg = RunConfig.model_validate(meta["config"])
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: metadata.json holds no valid run config ({exc})") from None
    data_cfg = cfg.training.data
    dataset = ParquetLatentDataset(data_cfg.data_path, text_len=data_cfg.text_len,
                                   latent_shape=data_cfg.latent_shape)
    if num_samples > len(dataset):
        raise ConfigError(f"--num-samples {num_samples}: {data_cfg.data_path} has only {len(dataset)} rows "
                          "(each sample is conditioned on a different row)")
    rows = spread_rows(len(dataset), num_samples)
    text = torch.stack([dataset.load(i).text_embeds_ld for i in rows])
    shape = tuple(dataset.latent_shape)

    sampler: Sampler = EulerSampler(steps)
    if role != "teacher":
        sampler = method_class(cfg.method.name).sampler(cfg.method, num_steps=steps)
        if isinstance(sampler, DMDSampler) and sampler.num_steps != steps:
            raise ConfigError(f"--steps {steps}: the {role} of this {cfg.method.name} run samples with its "
                              f"{sampler.num_steps}-step schedule "
                              f"method.dmd_denoising_steps={list(sampler.denoising_steps)}")
    model = load_model(cfg, checkpoint, role)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.transformer.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, num_samples, CHUNK):
        x0 = sampler(model, text[start:start + CHUNK].to(device), None, shape, gen)
        out.append(model.denormalize_latents(x0.float()).float().cpu())
    return {"latents": torch.cat(out).contiguous(), "data_index": torch.tensor(rows, dtype=torch.int64)}


def main(argv: list[str] | None = None) -> int:
    import os

    from safetensors.torch import save_file

    from fv_accel.checkpoint.manager import resolve_checkpoint
    from fv_accel.cli import run_main

    def body() -> int:
        args = parse_args(argv)
        checkpoint = resolve_checkpoint(args.checkpoint, args.checkpoint)
        assert checkpoint is not None
        result = sample(checkpoint, args.role, args.steps, args.num_samples, args.seed)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        save_file(result, str(tmp))  # written whole, then renamed: never a half-written output
        os.replace(tmp, out)
        print(f"wrote {len(result['data_index'])} {args.role} samples ({args.steps} steps) to {out}")
        return EXIT_OK

    return run_main(body)


if __name__ == "__main__":
    exit_process(main())
