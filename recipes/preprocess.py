"""Preprocess videos + captions into parquet latents (FastVideo T2V schema) with the pipeline's real encoders.

    accelerate launch [--config_file accelerate_configs/<topology>.yaml] recipes/preprocess.py \
        --model PIPELINE_DIR_OR_HUB_ID --videos DIR --captions FILE --output DIR \
        [--height 480 --width 832 --num-frames 81 --fps 16] [--text-len 512] [--save-dtype float32] ...

    # text-only (data-free DMD2): captions only
    accelerate launch [...] recipes/preprocess.py --model ... --text-only --captions prompts.txt --output DIR

Each process encodes its own share and writes its own shards; rerunning skips entries already written.
Exit codes: 0 done (skipped clips are listed in the summary), 1 failure or nothing usable, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fv_accel.cli import exit_process
from fv_accel.errors import EXIT_FAILURE, EXIT_OK


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="recipes/preprocess.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers pipeline dir or Hub id (vae/, text_encoder/, tokenizer/)")
    p.add_argument("--family", default="wan", help="model family whose encoders and frame rule apply "
                   "(fv_accel.models.FAMILIES; as models.<role>.family)")
    p.add_argument("--videos", type=Path, default=None, help="folder the caption file's paths are relative to")
    p.add_argument("--captions", type=Path, required=True,
                   help="videos2caption.json ([{\"path\", \"cap\"}]), CSV (path,caption) or, text-only, a .txt")
    p.add_argument("--output", type=Path, required=True, help="output folder for the parquet shards")
    p.add_argument("--text-only", action="store_true", help="captions only → text-only schema (data-free DMD2)")
    p.add_argument("--height", type=int, default=480, help="frame height in pixels (Wan: a multiple of 16)")
    p.add_argument("--width", type=int, default=832, help="frame width in pixels (Wan: a multiple of 16)")
    p.add_argument("--num-frames", type=int, default=81, help="frames per clip (the family's rule; Wan: 4k+1)")
    p.add_argument("--fps", type=float, default=16.0, help="frames are resampled to this rate")
    p.add_argument("--text-len", type=int, default=512, help="tokenizer max length (UMT5: 512)")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the stored latents and embeddings (FastVideo's own reader assumes float32)")
    p.add_argument("--vae-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--text-encoder-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--rows-per-shard", type=int, default=64)
    p.add_argument("--row-group-size", type=int, default=4)
    p.add_argument("--text-batch-size", type=int, default=32,
                   help="captions encoded per text-encoder call (clips are encoded one at a time)")
    p.add_argument("--negative-prompt", default=None,
                   help="also encode this prompt into OUTPUT/_negative_prompt.parquet "
                        "(for training.data.negative_prompt_path)")
    p.add_argument("--vae-tiling", action="store_true", help="encode in tiles (less memory, slightly different)")
    p.add_argument("--cpu", action="store_true", help="encode on the CPU even when a GPU is available")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.text_only == (args.videos is not None):
        p.error("give --videos DIR, or --text-only (not both)")
    for name in ("height", "width", "num_frames", "fps", "text_len", "rows_per_shard", "row_group_size",
                 "text_batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    from fv_accel.cli import run_main, setup_logging

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    def body() -> int:
        args = parse_args(argv)
        import torch
        import torch.distributed as dist
        from accelerate import PartialState

        from fv_accel.data.preprocess import PreprocessOptions, Summary, run_preprocess

        state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
        opts = PreprocessOptions(
            model=args.model, family=args.family, captions=args.captions, output=args.output, videos=args.videos,
            height=args.height, width=args.width, num_frames=args.num_frames, fps=args.fps,
            text_len=args.text_len, save_dtype=args.save_dtype, vae_dtype=args.vae_dtype,
            text_encoder_dtype=args.text_encoder_dtype, rows_per_shard=args.rows_per_shard,
            row_group_size=args.row_group_size, text_batch_size=args.text_batch_size,
            negative_prompt=args.negative_prompt, vae_tiling=args.vae_tiling,
        )
        mine = run_preprocess(opts, rank=state.process_index, world_size=state.num_processes,
                              device=state.device, show_progress=not args.no_progress)
        summaries = [mine]
        if dist.is_initialized() and state.num_processes > 1:
            gathered: list[Summary | None] = [None] * state.num_processes
            dist.all_gather_object(gathered, mine)
            summaries = [s for s in gathered if s is not None]
        total = Summary()
        for s in summaries:
            total.merge(s)
        if state.is_main_process:
            report = total.to_json()
            (args.output / "_preprocess_summary.json").write_text(json.dumps(report, indent=2))
            skipped = sum(total.skipped.values())
            print(f"preprocess: {total.written} written, {total.already_done} already done, {skipped} skipped"
                  + "".join(f"\n  skipped {n} × {cat} (e.g. {total.examples[cat]})"
                            for cat, n in sorted(total.skipped.items()))
                  + f"\n  output: {args.output} ({len(report['files'])} new shard file(s))")
        if total.written + total.already_done == 0:
            print("fv_accel: error: no clip could be preprocessed", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK

    return run_main(body, rank=rank)


if __name__ == "__main__":
    exit_process(main())
