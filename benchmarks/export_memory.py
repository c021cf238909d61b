"""Peak host memory of ``fv_accel.export`` on a random Wan checkpoint (student + EMA shadow in fp32).

    python benchmarks/export_memory.py --root /tmp/export_mem            # ~75 M parameters, bf16 export
    python benchmarks/export_memory.py --root /tmp/export_mem --legacy   # the former read-everything path

``make`` writes ``<root>/init`` (the transformer config) and ``<root>/run/checkpoint-1`` (DCP, one rank) once;
each measurement then runs in a fresh interpreter: it imports everything, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), exports, and prints one JSON line with the peak RSS above that baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

#: ~75 M parameters: large enough that the model dwarfs allocator noise, small enough for a 2-vCPU container.
MID_WAN_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2], "num_attention_heads": 8, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 256, "freq_dim": 256, "ffn_dim": 4096, "num_layers": 4,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32,
}
#: tensors the EMA does not track (as if frozen): the export takes them from the student
UNTRACKED_PREFIXES = ("patch_embedding.",)


def make_checkpoint(root: Path, config: dict[str, Any], *, seed: int = 0) -> Path:
    """A one-rank DCP checkpoint with the student's weights and an EMA shadow that differs from them."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from diffusers import WanTransformer3DModel

    from fv_accel.checkpoint.layout import (
        EMA_INITIALIZED_KEY,
        EMA_SHADOW_PREFIX,
        METADATA_FILE,
        checkpoint_dir_name,
        role_module_key,
    )

    ckpt = root / "run" / checkpoint_dir_name(1)
    if (ckpt / METADATA_FILE).is_file():
        return ckpt
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config)
    model.save_config(root / "init" / "transformer")
    flat: dict[str, Any] = {EMA_INITIALIZED_KEY: True}
    gen = torch.Generator().manual_seed(seed + 1)
    for name, value in model.state_dict().items():
        value = value.float()
        flat[f"{role_module_key('student', 'transformer')}.{name}"] = value
        if not name.startswith(UNTRACKED_PREFIXES):
            flat[EMA_SHADOW_PREFIX + name] = value + 1e-3 * torch.randn(value.shape, generator=gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(flat, checkpoint_id=str(ckpt), no_dist=True)
    run_config = {"models": {"student": {"init_from": str(root / "init"), "subfolder": "transformer"}},
                  "method": {"name": "finetune"}, "callbacks": {"ema": {"decay": 0.99}}}
    (ckpt / METADATA_FILE).write_text(json.dumps({"config": run_config, "step": 1, "world_size": 1}))
    return ckpt


def _hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def measure(checkpoint: Path, output: Path, *, role: str, dtype: str, legacy: bool, max_shard_size: str
            ) -> dict[str, Any]:
    """Run one export in this process and report its peak RSS above the post-import baseline."""
    import diffusers  # noqa: F401 - imported before the baseline, like the export's own imports
    from torch.distributed.checkpoint import FileSystemReader

    from fv_accel import export
    from fv_accel.checkpoint import layout
    from fv_accel.models import FAMILIES

    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    student_prefix = layout.role_module_key("student", "transformer") + "."
    student = {k: v for k, v in meta.items() if k.startswith(student_prefix)}
    dtype_of = export.export_dtype_of(export.transformer_class(FAMILIES["wan"]), export.DTYPES[dtype])
    prefix = len(student_prefix)
    num_params = sum(v.size.numel() for v in student.values())
    export_bytes = sum(v.size.numel() * dtype_of(k[prefix:], v.properties.dtype).itemsize
                       for k, v in student.items())
    largest_fp32 = max(v.size.numel() * 4 for v in student.values())

    baseline = _rss_kib()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    if legacy:
        # The former path: every EMA tensor and the whole student in fp32, then a cast copy of everything.
        config = json.loads((checkpoint / layout.METADATA_FILE).read_text())["config"]
        state = layout.read_role_state_dict(checkpoint, "student" if role == "ema" else role)
        if role == "ema":
            state.update(layout.read_ema_state_dict(checkpoint, with_student_rest=False))
        cast = {k: v.to(dtype_of(k, v.dtype)) for k, v in state.items()}
        model = export.build_transformer(config["models"]["student"], cast, export.DTYPES[dtype])
        model.save_pretrained(output / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
        del state, cast, model
    else:
        export.export_checkpoint(checkpoint, role=role, output=output, dtype=dtype, max_shard_size=max_shard_size)
    seconds = time.perf_counter() - t0
    peak = _hwm_kib()
    return {"role": role, "dtype": dtype, "legacy": legacy, "num_parameters": num_params,
            "export_mib": export_bytes / 2**20, "fp32_copy_mib": num_params * 4 / 2**20,
            "largest_fp32_tensor_mib": largest_fp32 / 2**20, "baseline_rss_mib": baseline / 1024,
            "peak_above_baseline_mib": (peak - baseline) / 1024, "seconds": seconds}


def run_measurement(checkpoint: Path, output: Path, *, role: str = "ema", dtype: str = "bf16", legacy: bool = False,
                    max_shard_size: str = "20MB") -> dict[str, Any]:
    """``measure`` in a fresh interpreter (a clean heap and peak mark); returns its JSON line."""
    cmd = [sys.executable, __file__, "--measure", str(checkpoint), "--output", str(output), "--role", role,
           "--dtype", dtype, "--max-shard-size", max_shard_size] + (["--legacy"] if legacy else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"export measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="where the checkpoint is made (reused when present)")
    parser.add_argument("--measure", type=Path, help="(internal) checkpoint to export in this process")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--role", default="ema", choices=["ema", "student"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-shard-size", default="20MB")
    parser.add_argument("--legacy", action="store_true")
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.output, role=args.role, dtype=args.dtype, legacy=args.legacy,
                                 max_shard_size=args.max_shard_size)))
        return
    if args.root is None:
        parser.error("--root is required")
    ckpt = make_checkpoint(args.root, MID_WAN_CONFIG)
    for legacy in ((False, True) if args.legacy else (False,)):
        for role in ("ema", "student"):
            out = args.root / f"export-{role}{'-legacy' if legacy else ''}"
            print(json.dumps(run_measurement(ckpt, out, role=role, dtype=args.dtype, legacy=legacy,
                                             max_shard_size=args.max_shard_size)), flush=True)


if __name__ == "__main__":
    main()
