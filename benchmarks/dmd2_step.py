"""DMD2 iteration benchmark: fv_accel's real path vs. a bare PyTorch loop doing the same passes.

Student, teacher and critic use the Wan2.1-T2V-1.3B configuration with random weights (no download). The fv_accel
side goes through the real code: ``build_accelerator`` (FSDP2, world size 1, bf16 with fp32 master weights),
``WanModel.from_transformer`` (per-role attention backend, activation checkpointing, compile), ``DMD2Method``,
``build.shard_roles`` (each trainable role in its own ``accelerator.prepare``; the frozen bf16 teacher sharded
without an optimizer) and ``Trainer.train_step``. The bare side is plain modules, bf16 autocast, the same AdamW,
the same DMD2 passes, no FSDP and no Accelerate, in the same process afterwards.

Both sides count model FLOPs with ``fv_accel.flops`` (no-grad forwards count, activation-checkpoint recompute does
not) and the comparison is made on achieved FLOP/s, which is robust to the random rollout length.

    # one H100, the issue's target shape (81 frames, 480x832)
    python benchmarks/dmd2_step.py --json $OUT/dmd2.json
    # smoke test on a CPU (tiny model, a few steps)
    python benchmarks/dmd2_step.py --model tiny --frames 5 --height 64 --width 64 --text-len 8 --cycles 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["1.3b", "tiny"], default="1.3b")
    p.add_argument("--frames", type=int, default=81, help="video frames (latent T = (frames - 1) / 4 + 1)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--interval", type=int, default=5, help="generator_update_interval")
    p.add_argument("--denoising-steps", type=int, nargs="+", default=[1000, 750, 500, 250])
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--cycles", type=int, default=2, help="measured cycles (1 generator + interval-1 critic its)")
    p.add_argument("--warmup-cycles", type=int, default=1)
    p.add_argument("--ac", choices=["full", "selective", "off"], default="full",
                   help="activation checkpointing, trainable roles")
    p.add_argument("--ac-every", type=int, default=1, help="checkpoint every N-th block only (1 = all)")
    p.add_argument("--attn", default=None, help="diffusers attention backend for all roles (e.g. _native_cudnn)")
    p.add_argument("--attn-teacher", default=None, help="override --attn for the teacher")
    p.add_argument("--compile", choices=["off", "regional"], default="off")
    p.add_argument("--no-fused", action="store_true", help="use the foreach AdamW instead of the fused one")
    p.add_argument("--reuse-rollout", action="store_true",
                   help="critic trains on the generator iteration's rollout (changes the algorithm)")
    p.add_argument("--only", choices=["both", "fv", "bare"], default="both")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def latent_shape(args: argparse.Namespace) -> tuple[int, int, int, int]:
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        raise SystemExit("--frames must be 4k+1 and --height/--width multiples of 16")
    return (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    from fv_accel.models import TINY_WAN_CONFIG, WAN_1_3B_CONFIG

    cfg = dict(WAN_1_3B_CONFIG if args.model == "1.3b" else TINY_WAN_CONFIG)
    if args.model == "tiny":
        cfg["rope_max_seq_len"] = 1024
    return cfg


def text_dim(args: argparse.Namespace) -> int:
    return int(model_config(args)["text_dim"])


def new_transformer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random-weight Wan transformer built directly on ``device`` (keep-in-fp32 modules stay fp32)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**model_config(args))
    if dtype != torch.float32:
        keep = tuple(WanTransformer3DModel._keep_in_fp32_modules)
        model.to(dtype)
        for name, module in model.named_modules():
            if any(part in keep for part in name.split(".")):
                module.float()
    return model


class SyntheticBatches:
    """Random latents and text embeddings in the shapes of the run, pinned on the host like real batches."""

    def __init__(self, args: argparse.Namespace) -> None:
        from fv_accel.data import LatentBatch

        shape = latent_shape(args)
        b = args.batch_size
        pin = torch.cuda.is_available()
        g = torch.Generator().manual_seed(0)
        self.batch = LatentBatch(
            latents_bcthw=torch.randn((b, *shape), generator=g),
            text_embeds_bld=torch.randn(b, args.text_len, text_dim(args), generator=g),
            text_mask_bl=torch.ones(b, args.text_len, dtype=torch.bool),
            index=torch.arange(b),
            latent_shape=shape,
        )
        if pin:
            self.batch.latents_bcthw = self.batch.latents_bcthw.pin_memory()  # type: ignore[union-attr]
            self.batch.text_embeds_bld = self.batch.text_embeds_bld.pin_memory()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self.batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def summarise(times: list[tuple[bool, float, float]], interval: int) -> dict[str, float]:
    """times: (is_generator_iteration, seconds, flops) per measured iteration."""
    gen = [t for g, t, _ in times if g]
    crit = [t for g, t, _ in times if not g]
    total_t = sum(t for _, t, _ in times)
    total_f = sum(f for _, _, f in times)
    out = {"tflops_per_s": total_f / total_t / 1e12}
    if gen:
        out["generator_s"] = statistics.median(gen)
    if crit:
        out["critic_s"] = statistics.median(crit)
    if gen and crit:
        out["cycle_s"] = out["generator_s"] + (interval - 1) * out["critic_s"]
    return out


# -------------------------------------------------------------------------------------------------------------
# fv_accel path
# -------------------------------------------------------------------------------------------------------------


def run_fv(args: argparse.Namespace) -> dict[str, Any]:
    from fv_accel.build import shard_roles
    from fv_accel.config import RunConfig
    from fv_accel.methods import method_class
    from fv_accel.models import WanModel
    from fv_accel.runtime import build_accelerator
    from fv_accel.trainer import Trainer

    if torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    accelerator = build_accelerator()
    device = accelerator.device
    bf16 = accelerator.mixed_precision == "bf16"
    role = {"family": "wan", "init_from": "random-weights", "attention_backend": args.attn, "compile": args.compile}
    cfg = RunConfig.model_validate({
        "models": {
            "student": {**role, "trainable": True, "activation_checkpointing": args.ac,
                        "activation_checkpointing_every": args.ac_every},
            "critic": {**role, "trainable": True, "activation_checkpointing": args.ac,
                       "activation_checkpointing_every": args.ac_every},
            "teacher": {**role, "trainable": False, "attention_backend": args.attn_teacher or args.attn},
        },
        "method": {
            "name": "dmd2", "rollout_mode": "simulate", "dmd_denoising_steps": args.denoising_steps,
            "generator_update_interval": args.interval, "real_score_guidance_scale": args.guidance,
            "reuse_generator_rollout_for_critic": args.reuse_rollout,
            "critic_optimizer": {"learning_rate": 1e-6, "betas": [0.0, 0.999], "fused": not args.no_fused},
        },
        "training": {
            "data": {"train_batch_size": args.batch_size, "text_len": args.text_len},
            "optimizer": {"learning_rate": 1e-6, "betas": [0.0, 0.999], "fused": not args.no_fused},
            "loop": {"max_train_steps": 1_000_000, "max_grad_norm": 1.0},
            "checkpoint": {"output_dir": "/tmp/fv_accel_bench"},
            "tracker": {"backends": []},
        },
    })
    roles = {}
    for seed, (name, mcfg) in enumerate(cfg.models.items()):
        dtype = torch.bfloat16 if (not mcfg.trainable and bf16) else torch.float32
        roles[name] = WanModel.from_transformer(name, new_transformer(args, device, dtype, seed), mcfg)
    method = method_class("dmd2")(cfg=cfg, role_models=roles)
    shard_roles(accelerator, method, cfg)
    trainer = Trainer(accelerator=accelerator, method=method, data=SyntheticBatches(args), cfg=cfg,
                      show_progress=False)
    method.on_train_start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[tuple[bool, float, float]] = []
    n_warm = args.warmup_cycles * args.interval
    for step in range(1, (args.warmup_cycles + args.cycles) * args.interval + 1):
        _sync(device)
        t0 = time.perf_counter()
        row = trainer.train_step(step)
        _sync(device)
        dt = time.perf_counter() - t0
        if step > n_warm and row is not None:
            flops = row.get("tflops_per_device", 0.0) * row["step_time_s"] * 1e12
            times.append((method.is_generator_step(step), dt, flops))
    out = summarise(times, args.interval)
    out["peak_mem_gib"] = _peak_gib(device)
    del trainer, method, roles
    accelerator._models.clear()
    accelerator._optimizers.clear()
    accelerator._schedulers.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -------------------------------------------------------------------------------------------------------------
# bare PyTorch loop: the same passes, no FSDP, no Accelerate
# -------------------------------------------------------------------------------------------------------------


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    from fv_accel import flow
    from fv_accel.models.wan import wan_forward_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    student = new_transformer(args, device, torch.float32, 0)
    critic = new_transformer(args, device, torch.float32, 1)
    teacher = new_transformer(args, device, torch.bfloat16 if bf16 else torch.float32, 2).requires_grad_(False)
    for m in (student, critic, teacher):
        if args.attn:
            m.set_attention_backend(args.attn_teacher if (m is teacher and args.attn_teacher) else args.attn)
    from fv_accel.models.checkpointing import apply_activation_checkpointing

    for m in (student, critic):  # the same checkpointing functions as the fv_accel side
        apply_activation_checkpointing(m, args.ac, args.ac_every)
    if args.compile == "regional":
        for m in (student, critic, teacher):
            for block in m.blocks:
                block.compile()
    fused = {"fused": True} if (device.type == "cuda" and not args.no_fused) else {}
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.0, 0.999), **fused)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-6, betas=(0.0, 0.999), **fused)
    batch = SyntheticBatches(args).batch
    text = batch.text_embeds_bld.to(device)
    uncond = torch.zeros_like(text)
    shape = batch.latent_shape
    b = text.shape[0]
    steps = args.denoising_steps
    gen = torch.Generator(device=device).manual_seed(0)
    choice = torch.Generator().manual_seed(0)  # host-side: the rollout length needs no device sync
    fwd = wan_forward_flops(model_config(args), shape, args.text_len)

    def x0(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        with amp:
            v = model(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        return flow.x0_from_velocity(x, v.float(), t)

    def rollout(grad: bool) -> tuple[torch.Tensor, int]:
        k = int(torch.randint(len(steps), (1,), generator=choice))
        x = torch.randn((b, *shape), generator=gen, device=device)
        for j in range(k):
            with torch.no_grad():
                pred = x0(student, x, torch.full((b,), float(steps[j]), device=device), text)
            x = flow.add_noise(pred, torch.randn(pred.shape, generator=gen, device=device),
                               torch.full((b,), float(steps[j + 1]), device=device))
        with torch.set_grad_enabled(grad):
            return x0(student, x, torch.full((b,), float(steps[k]), device=device), text), k + 1

    def score_t() -> torch.Tensor:
        t = 20 + 960 * torch.rand(b, generator=gen, device=device)
        return flow.shift_timestep(t, 3.0).clamp(20, 980)

    times: list[tuple[bool, float, float]] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_warm = args.warmup_cycles * args.interval
    for it in range(1, (args.warmup_cycles + args.cycles) * args.interval + 1):
        _sync(device)
        t0 = time.perf_counter()
        is_gen = it % args.interval == 0
        samples = 0  # forward-sample units (a backward counts 2)
        loss = torch.zeros((), device=device)
        rolled = None
        if is_gen:
            xs, n = rollout(True)
            samples += n * b + 2 * b
            t = score_t()
            xt = flow.add_noise(xs.detach(), torch.randn(xs.shape, generator=gen, device=device), t)
            with torch.no_grad():
                f = x0(critic, xt, t, text)
                r = x0(teacher, torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([text, uncond]))
                r_c, r_u = r.chunk(2)
                r = r_u + args.guidance * (r_c - r_u)
                g = (f - r) / (xs.detach() - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            samples += b + 2 * b
            loss = loss + 0.5 * torch.mean((xs - (xs - g).detach()) ** 2)
            if args.reuse_rollout:
                rolled = xs.detach()
        if rolled is None:
            with torch.no_grad():
                rolled, n = rollout(False)
            samples += n * b
        t = score_t()
        eps = torch.randn(rolled.shape, generator=gen, device=device)
        xt = flow.add_noise(rolled, eps, t)
        with amp:
            v = critic(hidden_states=xt, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        loss = loss + torch.mean((v.float() - (eps - rolled)) ** 2)
        samples += 3 * b
        loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 1.0)
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        if is_gen:
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt_s.step()
            opt_s.zero_grad(set_to_none=True)
        _sync(device)
        dt = time.perf_counter() - t0
        if it > n_warm:
            times.append((is_gen, dt, samples * fwd))
    out = summarise(times, args.interval)
    out["peak_mem_gib"] = _peak_gib(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    from fv_accel.flops import peak_tflops_per_device

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = latent_shape(args)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "args": vars(args), "latent_shape": list(shape),
        "date": time.strftime("%Y-%m-%d"),
    }
    peak = peak_tflops_per_device(device, "bf16" if device.type == "cuda" else "no", None)
    if args.only in ("both", "fv"):
        results["fv_accel"] = run_fv(args)
    if args.only in ("both", "bare"):
        results["bare"] = run_bare(args)
    rows = [k for k in ("fv_accel", "bare") if k in results]
    print(f"\nDMD2 on {results['device']} | latent {list(shape)} | interval {args.interval} | "
          f"steps {args.denoising_steps} | AC {args.ac}/{args.ac_every} | attn {args.attn or 'default'} | compile {args.compile}")
    print(f"{'':10}{'gen it s':>10}{'critic it s':>12}{'cycle s':>10}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for k in rows:
        r = results[k]
        mfu = f"{r['tflops_per_s'] / peak:.1%}" if peak else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        print(f"{k:10}{r.get('generator_s', float('nan')):>10.3f}{r.get('critic_s', float('nan')):>12.3f}"
              f"{r.get('cycle_s', float('nan')):>10.3f}{r['tflops_per_s']:>10.2f}{mfu:>8}{mem:>10}")
        if peak:
            r["mfu"] = r["tflops_per_s"] / peak
    if len(rows) == 2:
        ratio = results["bare"]["tflops_per_s"] / results["fv_accel"]["tflops_per_s"]
        results["fv_over_bare_time_per_flop"] = ratio
        print(f"fv_accel / bare (time per model FLOP): {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
