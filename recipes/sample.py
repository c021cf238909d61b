"""Sample one role of a checkpoint: prompts to mp4 videos, or latents for rows of the run's dataset.

    python recipes/sample.py --checkpoint PATH --role student|ema|teacher --prompt "..." [--prompt ...] \
        [--prompts-file FILE] --output DIR [--steps K] [--seed S] [--guidance-scale W --negative-prompt TEXT] \
        [--num-frames F]
    python recipes/sample.py --checkpoint PATH --role student|ema|teacher --num-samples N \
        --output FILE.safetensors [--steps K] [--seed S]

One plain process (a GPU when there is one). PATH is a checkpoint-<step> directory or a run's output directory
(its newest complete checkpoint); the weights are read from the DCP shards whatever world size wrote them.
- student / ema: the trained student (``ema``: the EMA weights), with the sampler its method generates with
  (the method class's ``sampler``, ``fv_accel/methods/base.py``): a dmd2 run's student with its DMD schedule
  (``method.dmd_denoising_steps``; K defaults to its length and must equal it), other methods' students with
  K Euler steps.
- teacher: ``models.teacher.init_from`` of the run's config, K Euler steps of the flow ODE.
Prompts (videos): encoded by the text encoder of the role's ``init_from`` pipeline (as its family loads it,
``fv_accel/prompts.py``), sampled at the run's latent shape (``training.data.latent_shape``, else its data's),
decoded by the VAE its latent statistics come from, one ``<i>-<slug>.mp4`` per prompt plus ``index.json``.
Prompt i's noise is seeded with ``prompt_seed(S, i)`` as validation does, so its video does not depend on the
other prompts. Guidance (``--guidance-scale`` != 1, against the encoded ``--negative-prompt``, "" by default as
in diffusers' WanPipeline) only for samplers that take it (Euler). ``--num-frames F`` samples F latent frames
instead of the run's (the VAE decodes 1 + (F − 1)·4 video frames for Wan); a causal student (``family:
wan_causal``) streams block by block (``fv_accel/causal_sampling.py``), so F may exceed the trained length: with
``local_attn_frames`` its cache stays within the window, without one it grows with F (memory is the bound).
Rows (latents): N different dataset rows of ``training.data.data_path`` spread evenly over the dataset
(``fv_accel.sampling.spread_rows``, as validation and the toy quality table pick theirs); the file holds
``latents`` float32 [N, C, T, H, W] in the dataset's stored (unnormalised) latent space and ``data_index`` int64
[N] (the row that conditioned each sample).
Outputs are written under a temporary name and renamed: a failure leaves nothing half-written.
Exit codes: 0 ok, 1 failure, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fv_accel.cli import exit_process
from fv_accel.errors import EXIT_OK, CheckpointError, ConfigError

if TYPE_CHECKING:
    from fv_accel.config import ModelConfig, RunConfig
    from fv_accel.models.base import ModelBase
    from fv_accel.sampling import Sampler

#: samples per forward batch in the latent mode (bounds memory; the result depends on it through the noise order)
CHUNK = 16
INDEX_FILE = "index.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recipes/sample.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint-<step> dir or a run's output dir")
    parser.add_argument("--role", required=True, choices=["student", "ema", "teacher"])
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps K (Euler samplers; a DMD student's default is its schedule's length)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt to sample (repeatable)")
    parser.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    parser.add_argument("--num-samples", type=int, default=None, help="latent mode: number of dataset rows")
    parser.add_argument("--output", required=True, help="DIR (prompts) or FILE.safetensors (--num-samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance (Euler samplers only; 1: none)")
    parser.add_argument("--negative-prompt", default=None, help="the unconditional prompt of guidance (default '')")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--num-frames", type=int, default=None,
                        help="latent frames to sample (default: the run's); a causal student may exceed it")
    args = parser.parse_args(argv)
    args.prompts = read_prompts(args.prompt, args.prompts_file)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be >= 1")
    if args.prompts is None:
        if args.num_samples is None:
            raise ConfigError("give --prompt/--prompts-file (videos) or --num-samples (latents for dataset rows)")
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples {args.num_samples}: must be >= 1")
        if not args.output.endswith(".safetensors"):
            raise ConfigError(f"--output {args.output!r} must end in .safetensors")
        if args.guidance_scale != 1.0 or args.negative_prompt is not None:
            raise ConfigError("--guidance-scale / --negative-prompt apply to --prompt sampling only")
        if args.num_frames is not None:
            raise ConfigError("--num-frames applies to --prompt sampling only (dataset rows keep their shape)")
        return args
    if args.num_samples is not None:
        raise ConfigError("--num-samples (dataset rows) and --prompt/--prompts-file exclude each other")
    if args.output.endswith(".safetensors"):
        raise ConfigError(f"--output {args.output!r}: prompts are written as a directory of mp4 files")
    if args.negative_prompt is not None and args.guidance_scale == 1.0:
        raise ConfigError("--negative-prompt: only used by guidance; set --guidance-scale too")
    if args.fps < 1:
        raise ConfigError(f"--fps {args.fps}: must be >= 1")
    if args.num_frames is not None and args.num_frames < 1:
        raise ConfigError(f"--num-frames {args.num_frames}: must be >= 1 latent frame")
    return args


def read_prompts(flags: list[str] | None, prompts_file: str | None) -> list[str] | None:
    """``--prompt`` values then ``--prompts-file``'s lines (blank lines skipped); None when neither is given.
    An empty list or an empty prompt is an error (exit 2) naming where it came from."""
    if flags is None and prompts_file is None:
        return None
    prompts: list[str] = []
    for i, prompt in enumerate(flags or []):
        if not prompt.strip():
            raise ConfigError(f"--prompt #{i + 1} is empty")
        prompts.append(prompt)
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--prompts-file {prompts_file!r}: cannot read it ({exc.strerror})") from None
        prompts.extend(line.strip() for line in lines if line.strip())
    if not prompts:
        raise ConfigError(f"--prompts-file {prompts_file!r} holds no prompt" if prompts_file else "no prompt given")
    return prompts


def slug(prompt: str, max_len: int = 40) -> str:
    """A file-name-safe digest of ``prompt``: lowercase ASCII words joined by '-' ("prompt" if none is left)."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:max_len].rstrip("-") or "prompt"


def video_file_name(index: int, prompt: str) -> str:
    return f"{index:02d}-{slug(prompt)}.mp4"


def read_run_config(checkpoint: Path) -> tuple[RunConfig, int]:
    """The run's config and the checkpoint's step, from its metadata."""
    from fv_accel.checkpoint.manager import read_metadata
    from fv_accel.config import RunConfig

    meta = read_metadata(checkpoint)
    try:
        cfg = RunConfig.model_validate(meta["config"])
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: metadata.json holds no valid run config ({exc})") from None
    return cfg, int(meta["step"])


def role_model_config(cfg: RunConfig, checkpoint: Path, role: str) -> tuple[str, ModelConfig]:
    """``models.<name>`` the role is built from: the teacher's own, the student's for student and ema."""
    model_role = "teacher" if role == "teacher" else "student"
    if model_role not in cfg.models:
        raise ConfigError(f"{checkpoint}: the run's config has no models.{model_role}")
    return model_role, cfg.models[model_role].model_copy(update={"trainable": False})


def role_sampler(cfg: RunConfig, role: str, steps: int | None, guidance_scale: float) -> tuple[Sampler, int]:
    """The sampler the role generates with and its number of steps; a step count or guidance the sampler cannot
    honour is an error (exit 2), not silently ignored."""
    from fv_accel.methods import method_class
    from fv_accel.sampling import DMDSampler, EulerSampler

    who = "the teacher" if role == "teacher" else f"the {role} of this {cfg.method.name} run"
    sampler: Sampler
    if role == "teacher":
        sampler = EulerSampler(steps or 1, guidance_scale)
    else:
        sampler = method_class(cfg.method.name).sampler(cfg.method, num_steps=steps or 1,
                                                        guidance_scale=guidance_scale)
    if isinstance(sampler, DMDSampler):
        if steps is not None and steps != sampler.num_steps:
            raise ConfigError(f"--steps {steps}: {who} samples with its {sampler.num_steps}-step schedule "
                              f"method.dmd_denoising_steps={list(sampler.denoising_steps)}")
        steps = sampler.num_steps
    elif steps is None:
        raise ConfigError(f"--steps: {who} samples with Euler steps of the flow ODE; give their number")
    if guidance_scale != 1.0 and getattr(sampler, "guidance_scale", 1.0) != guidance_scale:
        raise ConfigError(f"--guidance-scale {guidance_scale}: {who} samples with {type(sampler).__name__}, which "
                          "takes no guidance")
    return sampler, steps


def load_model(cfg: RunConfig, checkpoint: Path, role: str) -> ModelBase:
    """The role's model (family wrapper with latent normalisation) holding the checkpoint's weights."""
    from fv_accel.checkpoint.layout import read_ema_state_dict, read_role_state_dict, saved_modules
    from fv_accel.models import load_role_model

    model_role, mcfg = role_model_config(cfg, checkpoint, role)
    # Architecture and latent statistics come from init_from; the weights (student / ema) from the checkpoint.
    model = load_role_model(model_role, mcfg, mixed_precision="no")
    if role == "teacher":
        return model
    saved = saved_modules(checkpoint, "student")
    # Each trained module (a frozen expert keeps init_from's weights); none saved: the reader names the miss.
    for name in [n for n in model.modules() if n in saved] or ["transformer"]:
        state = (read_ema_state_dict(checkpoint, module=name) if role == "ema"
                 else read_role_state_dict(checkpoint, "student", module=name))
        state = {k: v.float() for k, v in state.items()}
        module = model.modules()[name]
        try:
            if mcfg.lora is None:
                module.load_state_dict(state, strict=True)
                continue
            # A LoRA run saved the adapters alone; the base is init_from's, as loaded above.
            adapters = {n for n, p in module.named_parameters() if p.requires_grad}
            if set(state) != adapters:
                raise RuntimeError(f"the checkpoint's {len(state)} tensors are not {name}'s {len(adapters)} "
                                   f"LoRA adapters (models.student.lora changed?)")
            module.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint}: {role} weights do not match models.student: {exc}") from None
    return model


def sampling_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- latents for dataset rows ---------------------------------------------------------------------------------
@torch.no_grad()
def sample(checkpoint: Path, role: str, steps: int | None, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    from fv_accel.data import ParquetLatentDataset
    from fv_accel.sampling import spread_rows

    cfg, _ = read_run_config(checkpoint)
    data_cfg = cfg.training.data
    dataset = ParquetLatentDataset(data_cfg.data_path, text_len=data_cfg.text_len,
                                   latent_shape=data_cfg.latent_shape)
    if num_samples > len(dataset):
        raise ConfigError(f"--num-samples {num_samples}: {data_cfg.data_path} has only {len(dataset)} rows "
                          "(each sample is conditioned on a different row)")
    rows = spread_rows(len(dataset), num_samples)
    text = torch.stack([dataset.load(i).text_embeds_ld for i in rows])
    shape = tuple(dataset.latent_shape)

    sampler, _ = role_sampler(cfg, role, steps, 1.0)
    model = load_model(cfg, checkpoint, role)
    device = sampling_device()
    for module in model.modules().values():  # both experts of a two-expert model
        module.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, num_samples, CHUNK):
        x0 = sampler(model, text[start:start + CHUNK].to(device), None, shape, gen)
        out.append(model.denormalize_latents(x0.float()).float().cpu())
    return {"latents": torch.cat(out).contiguous(), "data_index": torch.tensor(rows, dtype=torch.int64)}


def write_latents(args: argparse.Namespace, checkpoint: Path) -> None:
    import os

    from safetensors.torch import save_file

    result = sample(checkpoint, args.role, args.steps, args.num_samples, args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(result, str(tmp))  # written whole, then renamed: never a half-written output
    os.replace(tmp, out)
    print(f"wrote {len(result['data_index'])} {args.role} samples to {out}")


# -- prompts to videos ----------------------------------------------------------------------------------------
def check_output_dir(out: Path) -> None:
    """Nothing is overwritten: an existing file or non-empty directory at ``--output`` is an error (exit 2)."""
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists():
        raise ConfigError(f"--output {str(out)!r} already exists; give a new (or empty) directory")


def run_latent_shape(cfg: RunConfig) -> tuple[int, int, int, int]:
    """The latent shape the run trained on: ``training.data.latent_shape``, else its data's."""
    from fv_accel.data import ParquetLatentDataset

    data_cfg = cfg.training.data
    if data_cfg.latent_shape is not None:
        c, t, h, w = (int(x) for x in data_cfg.latent_shape)
        return c, t, h, w
    return ParquetLatentDataset(data_cfg.data_path, text_len=data_cfg.text_len).latent_shape


@torch.no_grad()
def sample_videos(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    """Sample and decode every prompt, write the mp4 files and the index into ``--output`` (via a temporary
    sibling directory); the index is returned."""
    import gc
    import json
    import os
    import shutil

    from fv_accel.config import check_pipeline_components
    from fv_accel.models import FAMILIES
    from fv_accel.prompts import encode_prompts, pad_embeddings, prompt_seed
    from fv_accel.video import decode_with_vae, write_mp4

    out = Path(args.output).expanduser()
    check_output_dir(out)
    cfg, step = read_run_config(checkpoint)
    model_role, mcfg = role_model_config(cfg, checkpoint, args.role)
    sampler, steps = role_sampler(cfg, args.role, args.steps, args.guidance_scale)
    family = FAMILIES[mcfg.family]
    source, key = mcfg.init_from, f"models.{model_role}.init_from"
    # Cheap checks first: both the text encoder and the VAE must exist before any weight is read.
    check_pipeline_components(source, list(family.text_encoder_components), what=f"--prompt: {key} {source!r}",
                              why="prompts are encoded by the text encoder of the role's pipeline")
    stats = family.resolve_latent_stats(model_role, mcfg)
    if stats is None or stats.vae_source is None:
        raise ConfigError(f"--prompt: models.{model_role}.latent_stats is {stats.origin if stats else 'unknown'}, "
                          "which names no VAE to decode videos with; sample latents with --num-samples instead")
    shape = run_latent_shape(cfg)
    if args.num_frames is not None:
        shape = (shape[0], args.num_frames, shape[2], shape[3])
    text_len = cfg.training.data.text_len
    device = sampling_device()

    guided = args.guidance_scale != 1.0
    negative = args.negative_prompt or ""
    embeddings = encode_prompts(family, source, [*args.prompts, *([negative] if guided else [])], key=key,
                                what="--prompt", device=device, text_len=text_len)
    text = pad_embeddings(embeddings, text_len)
    uncond = text[-1:] if guided else None

    model = load_model(cfg, checkpoint, args.role)
    for module in model.modules().values():  # both experts of a two-expert model
        module.to(device).eval()
    latents = []
    for i in range(len(args.prompts)):  # one at a time: a full-size video's activations are large
        gen = torch.Generator(device=device).manual_seed(prompt_seed(args.seed, i))
        x0 = sampler(model, text[i:i + 1].to(device), None if uncond is None else uncond.to(device), shape, gen)
        latents.append(model.denormalize_latents(x0.float()).float().cpu())
    vae = model.load_vae()
    if vae is None:
        raise ConfigError(f"--prompt: models.{model_role} ({source!r}) has no VAE to decode videos with")
    del model  # the VAE decodes alone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        videos, frames_fhw = [], [0, 0, 0]
        for i, (prompt, lat) in enumerate(zip(args.prompts, latents, strict=True)):
            frames = decode_with_vae(vae, lat)[0]
            frames_fhw = list(frames.shape[:3])
            name = video_file_name(i, prompt)
            write_mp4(frames, tmp / name, fps=args.fps)
            videos.append({"prompt": prompt, "file": name, "seed": prompt_seed(args.seed, i)})
        index = {"checkpoint": str(checkpoint), "step": step, "role": args.role, "method": cfg.method.name,
                 "sampler": type(sampler).__name__, "steps": steps, "seed": args.seed,
                 "guidance_scale": args.guidance_scale, "negative_prompt": negative if guided else None,
                 "latent_shape": list(shape), "frames": frames_fhw, "fps": args.fps, "videos": videos}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        os.replace(tmp, out)  # an empty directory at out is replaced; check_output_dir refused anything else
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def main(argv: list[str] | None = None) -> int:
    from fv_accel.checkpoint.manager import resolve_checkpoint
    from fv_accel.cli import run_main

    def body() -> int:
        args = parse_args(argv)
        checkpoint = resolve_checkpoint(args.checkpoint, args.checkpoint)
        assert checkpoint is not None
        if args.prompts is None:
            write_latents(args, checkpoint)
        else:
            index = sample_videos(args, checkpoint)
            print(f"wrote {len(index['videos'])} {args.role} video(s) of checkpoint step {index['step']} "
                  f"({index['steps']} steps) to {args.output}")
        return EXIT_OK

    return run_main(body)


if __name__ == "__main__":
    exit_process(main())
