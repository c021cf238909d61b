"""The teacher's ODE trajectories for ``method.name: ode_init``, generated once, on every rank.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] recipes/ode_pairs.py \
        --teacher PIPELINE_OR_MODEL_DIR --data DATA_DIR [--output DIR] [--denoising-steps 1000,750,500,250] \
        [--teacher-steps 48] [--shift 5.0] [--guidance-scale W] [--negative-prompt-path FILE] [--seed 0] \
        [--num-rows 2048] [--rows-per-shard 16] [--batch-size 1] [--dtype bf16|fp32] [--text-len 512] \
        [--subfolder transformer] [--latent-stats auto]

For ``--num-rows`` rows spread evenly over DATA_DIR (a FastVideo-layout latent dataset: the row's text embedding
conditions the teacher, its latent only fixes the shape) the teacher integrates the flow ODE from per-row seeded
noise with ``--teacher-steps`` Euler steps on its ``--shift``-ed schedule, classifier-free guidance ``W`` against
zeros (or the ``--negative-prompt-path`` embedding), and records its states at the student's timesteps
``--denoising-steps`` (as given, like ``method.dmd_denoising_steps``) and its final x0. Output: parquet shards in
``--output`` (default: DATA_DIR's sibling ``<DATA_DIR>_ode_pairs``) plus the manifest ``_ode_pairs.json``; train on
them with ``method.name: ode_init`` and ``training.data.data_path: <output>``. Layout, schema and the storage
arithmetic: ``fv_accel/ode_pairs.py``.

Every rank loads the whole teacher (no sharding: it only runs forwards) and writes its share of the shards;
a rerun (any world size) writes only the missing shards; a rerun with other settings is refused (exit 2). The
teacher computes under the launcher's mixed precision (bf16: autocast). Defaults of ``--denoising-steps`` and
``--guidance-scale`` are DMD2's (``fv_accel/methods/dmd2.py``). Exit codes: 0 ok, 1 failure, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fv_accel.cli import exit_process, run_main, setup_logging
from fv_accel.errors import EXIT_OK, ConfigError

logger = logging.getLogger("fv_accel")


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers expected") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from fv_accel.methods.dmd2 import DMD2MethodConfig

    defaults = DMD2MethodConfig(name="dmd2")
    parser = argparse.ArgumentParser(prog="recipes/ode_pairs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="the teacher's init_from (pipeline or model directory)")
    parser.add_argument("--subfolder", default="transformer", help="the transformer's subfolder ('' for none)")
    parser.add_argument("--latent-stats", default="auto", help="as models.<role>.latent_stats")
    parser.add_argument("--data", required=True, help="the source latent dataset directory")
    parser.add_argument("--output", default=None, help="default: <data>_ode_pairs beside the data")
    parser.add_argument("--denoising-steps", type=_steps, default=defaults.dmd_denoising_steps,
                        help="the student's timesteps, comma-separated, strictly descending in (0, 1000]")
    parser.add_argument("--teacher-steps", type=int, default=48)
    parser.add_argument("--shift", type=float, default=5.0, help="the teacher's schedule shift")
    parser.add_argument("--guidance-scale", type=float, default=defaults.real_score_guidance_scale)
    parser.add_argument("--negative-prompt-path", default=None,
                        help="parquet with the unconditional embedding (default: zeros)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-rows", type=int, default=2048, help="rows taken (spread evenly); 0: all")
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1, help="rows per teacher forward")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="storage dtype of the latents")
    parser.add_argument("--text-len", type=int, default=512)
    args = parser.parse_args(argv)
    try:
        DMD2MethodConfig(name="dmd2", dmd_denoising_steps=args.denoising_steps)
    except ValueError:
        raise ConfigError(f"--denoising-steps {args.denoising_steps}: must be strictly descending integers in "
                          "(0, 1000]") from None
    for flag, value, low in (("--teacher-steps", args.teacher_steps, 1), ("--num-rows", args.num_rows, 0),
                             ("--rows-per-shard", args.rows_per_shard, 1), ("--batch-size", args.batch_size, 1),
                             ("--text-len", args.text_len, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be >= {low}")
    if args.shift <= 0:
        raise ConfigError(f"--shift {args.shift}: must be > 0")
    return args


def default_output(data: str) -> Path:
    source = Path(data).expanduser().resolve()
    return source.with_name(f"{source.name}_ode_pairs")


def main(argv: list[str] | None = None) -> int:
    import os

    rank = int(os.environ.get("RANK", "0"))  # before any process group exists: only for logging
    setup_logging(rank)

    def body() -> int:
        import torch

        from fv_accel.config import ModelConfig
        from fv_accel.data.dataset import ParquetLatentDataset, build_index, load_negative_prompt
        from fv_accel.models import load_role_model
        from fv_accel.ode_pairs import OdePairsSpec, check_or_write_manifest, missing_shards, write_ode_pairs
        from fv_accel.runtime import Topology, build_accelerator, rank0_result

        args = parse_args(argv)
        source = Path(args.data).expanduser().resolve()
        if not source.is_dir():
            raise ConfigError(f"--data {args.data!r}: not a directory")
        out = Path(args.output).expanduser().resolve() if args.output else default_output(args.data)
        accelerator = build_accelerator()
        topology = Topology.from_accelerator(accelerator)
        index = rank0_result(lambda: build_index(str(source)))
        dataset = ParquetLatentDataset(str(source), text_len=args.text_len, index=index)
        if dataset.kind == "text_only":
            raise ConfigError(f"--data {args.data!r}: text-only rows carry no latent shape; give a T2V dataset")
        uncond_ld = None
        if args.negative_prompt_path:
            uncond_ld = load_negative_prompt(args.negative_prompt_path, args.text_len)
        mixed = accelerator.mixed_precision
        spec = OdePairsSpec(
            teacher=args.teacher, teacher_subfolder=args.subfolder, latent_stats=args.latent_stats,
            source=str(source), source_rows=len(dataset),
            num_rows=min(args.num_rows or len(dataset), len(dataset)), rows_per_shard=args.rows_per_shard,
            denoising_steps=tuple(args.denoising_steps), teacher_steps=args.teacher_steps, shift=args.shift,
            guidance_scale=args.guidance_scale,
            uncond=str(Path(args.negative_prompt_path).resolve()) if args.negative_prompt_path else "zeros",
            seed=args.seed, text_len=args.text_len, dtype=args.dtype,
            compute=f"{accelerator.device.type}/{mixed}")
        # Rank 0 checks (or writes) the manifest for all: a mismatched rerun fails here on every rank, before the
        # teacher loads, and 64 ranks do not each write it.
        rank0_result(lambda: check_or_write_manifest(spec, out), topology=topology)
        # fp32 weights; bf16 compute through autocast (an unsharded module is not cast by FSDP's policy).
        mcfg = ModelConfig(init_from=args.teacher, subfolder=args.subfolder, trainable=False, flow_shift=args.shift,
                           latent_stats=args.latent_stats)
        teacher = load_role_model("teacher", mcfg, mixed_precision="no")
        for module in teacher.modules().values():
            module.to(accelerator.device).eval()
        written = write_ode_pairs(spec, teacher, dataset, out, rank=topology.rank, world_size=topology.world_size,
                                  uncond_ld=uncond_ld, batch_size=args.batch_size,
                                  autocast_dtype=torch.bfloat16 if mixed == "bf16" else None)
        logger.warning("rank %d wrote %d shard(s) of %d rows to %s", topology.rank, len(written),
                       spec.rows_per_shard, out)
        accelerator.wait_for_everyone()

        def unseen() -> list[int]:  # shards another node wrote where rank 0 cannot see them
            return missing_shards(out, spec.num_shards)

        lost = rank0_result(unseen, topology=topology)
        if lost:
            raise ConfigError(f"--output {str(out)!r}: rank 0 does not see shard(s) {lost[:8]} that other ranks "
                              "wrote; the output must be a directory shared by all nodes")
        if topology.is_main:
            print(f"ODE pairs: {spec.num_rows} rows in {spec.num_shards} shard(s) at {out}", flush=True)
        return EXIT_OK

    return run_main(body, rank=rank)


if __name__ == "__main__":
    exit_process(main())
