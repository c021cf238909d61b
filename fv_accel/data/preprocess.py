"""Preprocessing: videos + captions → parquet shards in FastVideo's T2V schema (or text-only schema).

Runs the pipeline's real encoders once, offline, so training never touches them. The model family
(``--family``, ``fv_accel.models.FAMILIES``) loads them (``ModelBase.load_encoders``) and states the clip sizes
the pipeline's VAE accepts (``ModelBase.frame_rule`` with ``source=--model``: Wan reads the VAE's own factors,
8× or 16× spatial). For Wan: the diffusers ``AutoencoderKLWan`` (subfolder ``vae``) turns each clip into the mean
of its latent distribution, stored unnormalised ``[C, T, H, W]`` as FastVideo stores it; UMT5 (``text_encoder``
with the pipeline's ``tokenizer``) turns each caption into ``[L, D]`` embeddings trimmed to the caption's real
token count (the dataset pads).

Each process of an ``accelerate launch`` takes every ``world_size``-th entry of the caption file and writes its
own shards ``rank<r>-<k>.parquet``, each renamed into place only when complete. A shard's ``id`` column is the
record of what is done, so a rerun skips those entries (whatever the number of processes) and a crash loses
at most the shard being written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from fv_accel.config import is_hub_id
from fv_accel.data.dataset import T2V_COLUMNS, TEXT_ONLY_COLUMNS
from fv_accel.errors import ConfigError, DataError
from fv_accel.models import FAMILIES, Encoders, FrameRule, ModelBase

logger = logging.getLogger(__name__)

T2V_SCHEMA = pa.schema([
    ("id", pa.string()), ("vae_latent_bytes", pa.binary()), ("vae_latent_shape", pa.list_(pa.int64())),
    ("vae_latent_dtype", pa.string()), ("text_embedding_bytes", pa.binary()),
    ("text_embedding_shape", pa.list_(pa.int64())), ("text_embedding_dtype", pa.string()),
    ("file_name", pa.string()), ("caption", pa.string()), ("media_type", pa.string()), ("width", pa.int64()),
    ("height", pa.int64()), ("num_frames", pa.int64()), ("duration_sec", pa.float64()), ("fps", pa.float64()),
])
TEXT_ONLY_SCHEMA = pa.schema([
    ("id", pa.string()), ("text_embedding_bytes", pa.binary()), ("text_embedding_shape", pa.list_(pa.int64())),
    ("text_embedding_dtype", pa.string()), ("caption", pa.string()),
])
assert set(T2V_COLUMNS) <= set(T2V_SCHEMA.names) and set(TEXT_ONLY_COLUMNS) <= set(TEXT_ONLY_SCHEMA.names)

SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SkipClip(Exception):  # noqa: N818 - a reason, not a failure of the run
    """This clip cannot be used; the message is the reason shown in the summary."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category


# ----------------------------------------------------------------------------------------------------------
# Caption files
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionEntry:
    id: str
    caption: str
    path: str | None  # video path relative to --videos (None in text-only files)


def _caption_text(value: Any, where: str) -> str:
    # FastVideo's videos2caption.json sometimes holds a list of captions per clip; the first one is used.
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: caption is missing or empty")
    return value


def read_captions(path: str | os.PathLike[str], *, need_paths: bool) -> list[CaptionEntry]:
    """JSON list of ``{"path", "cap"}`` (FastVideo's videos2caption.json; ``caption`` also accepted), CSV with a
    header ``path,caption`` (or ``cap``), or, for text-only data, a ``.txt`` file with one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--captions: {p} does not exist")
    raw: list[tuple[str | None, Any, str]] = []  # (path, caption, where)
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of {{\"path\", \"cap\"}} objects")
        for i, item in enumerate(data):
            where = f"{p} entry {i}"
            if isinstance(item, str):
                raw.append((None, item, where))
            elif isinstance(item, dict):
                raw.append((item.get("path"), item.get("cap", item.get("caption")), where))
            else:
                raise DataError(f"{where}: expected an object with \"path\" and \"cap\"")
    elif suffix == ".csv":
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            cap_key = "caption" if "caption" in fields else "cap" if "cap" in fields else None
            if cap_key is None:
                raise DataError(f"{p}: CSV needs a header with a 'caption' (or 'cap') column, got {fields}")
            for i, row in enumerate(reader):
                raw.append((row.get("path"), row[cap_key], f"{p} line {i + 2}"))
    elif suffix == ".txt":
        raw = [(None, line, f"{p} line {i + 1}") for i, line in enumerate(p.read_text().splitlines())
               if line.strip()]
    else:
        raise ConfigError(f"--captions: {p} must be .json, .csv or .txt")
    entries: list[CaptionEntry] = []
    seen: Counter[str] = Counter()
    for video, cap, where in raw:
        caption = _caption_text(cap, where)
        if need_paths and not video:
            raise DataError(f"{where}: no video \"path\"")
        # Captions without a video are keyed by their text, not their line: a rerun after lines were inserted
        # or removed then encodes exactly the new captions (sha256: the same in every Python process).
        base = str(video) if video else f"prompt-{hashlib.sha256(caption.encode()).hexdigest()[:16]}"
        seen[base] += 1
        # The same clip with a second caption (or the same caption twice) is a second sample with its own id.
        ident = base if seen[base] == 1 else f"{base}#{seen[base]}"
        entries.append(CaptionEntry(id=ident, caption=caption, path=str(video) if video else None))
    if not entries:
        raise DataError(f"{p}: no captions")
    return entries


# ----------------------------------------------------------------------------------------------------------
# Video frames
# ----------------------------------------------------------------------------------------------------------


def _frame_times(stream: Any, frames: Iterable[Any]) -> Iterator[tuple[float, Any]]:
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    for n, frame in enumerate(frames):
        t = frame.time
        if t is None:
            if not rate:
                raise SkipClip("unreadable", "frames carry no timestamps and the stream no frame rate")
            t = n / rate
        yield float(t), frame


def resize_center_crop(frames_thwc: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 ``[T, h, w, 3]`` → float32 ``[3, T, height, width]`` in [-1, 1]: scale so the frame covers the
    target (aspect ratio kept, antialiased bilinear), then crop the centre."""
    x = torch.from_numpy(frames_thwc).permute(0, 3, 1, 2).float()  # [T, 3, h, w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def load_clip(path: str | os.PathLike[str], *, height: int, width: int, num_frames: int,
              fps: float) -> torch.Tensor:
    """The first ``num_frames`` frames of the video resampled to ``fps`` (target frame j at time j/fps takes the
    source frame nearest in time; of two equally near, the later), resized and centre-cropped: float32
    ``[3, num_frames, height, width]`` in [-1, 1]. Raises :class:`SkipClip`."""
    import av

    p = Path(path)
    if not p.is_file():
        raise SkipClip("missing", f"{p} does not exist")
    targets = [j / fps for j in range(num_frames)]
    # Each picked frame is resized and cropped at once: memory holds num_frames frames at the target size,
    # never num_frames full-resolution source frames.
    picked: list[torch.Tensor] = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise SkipClip("unreadable", f"{p} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start: float | None = None
            prev: tuple[float, Any] | None = None
            last_time = 0.0
            for t, frame in _frame_times(stream, container.decode(stream)):
                start = t if start is None else start
                t -= start
                last_time = t
                # Assign every target time this frame (or the previous one) is nearest to.
                while len(picked) < num_frames and t >= targets[len(picked)]:
                    target = targets[len(picked)]
                    best = prev if prev is not None and target - prev[0] < t - target else (t, frame)
                    picked.append(resize_center_crop(best[1].to_ndarray(format="rgb24")[None], height, width))
                if len(picked) == num_frames:
                    break
                prev = (t, frame)
    except SkipClip:
        raise
    except Exception as exc:  # av raises its own error types for corrupt containers and codecs
        raise SkipClip("unreadable", f"{p}: {type(exc).__name__}: {exc}") from None
    if len(picked) < num_frames:
        need = (num_frames - 1) / fps
        raise SkipClip("too_short", f"{p}: {last_time:.2f}s of frames, {need:.2f}s needed for {num_frames} "
                       f"frames at {fps:g} fps")
    return torch.cat(picked, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------


def check_model_source(model: str) -> None:
    """Fail (exit 2) before loading anything when ``--model`` is neither a local path nor a Hub id (the family
    checks the pipeline's components when it loads them)."""
    if not Path(model).expanduser().exists() and not is_hub_id(model):
        raise ConfigError(f"--model: local path {model!r} does not exist")


def family_class(family: str) -> type[ModelBase]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ConfigError(f"--family: unknown model family {family!r} (known: {', '.join(sorted(FAMILIES))})"
                          ) from None


# ----------------------------------------------------------------------------------------------------------
# Output shards
# ----------------------------------------------------------------------------------------------------------


def done_ids(output: Path) -> set[str]:
    """Ids in the complete shards of ``output`` (temporaries are hidden files and are not read)."""
    ids: set[str] = set()
    for f in sorted(output.glob("*.parquet")):
        try:
            ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        except Exception as exc:
            raise DataError(f"{f}: existing shard is unreadable ({exc}); remove it and rerun") from None
    return ids


class ShardWriter:
    """Buffers rows and writes ``<output>/rank<r>-<k>.parquet`` files atomically, ``rows_per_shard`` each."""

    def __init__(self, output: Path, *, rank: int, schema: pa.Schema, rows_per_shard: int,
                 row_group_size: int) -> None:
        self.output = output
        self.rank = rank
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.rows: list[dict[str, Any]] = []
        taken = [int(m.group(1)) for f in output.glob(f"rank{rank:03d}-*.parquet")
                 if (m := re.match(rf"rank{rank:03d}-(\d+)\.parquet$", f.name))]
        self.next_index = max(taken, default=-1) + 1
        self.files: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        final = self.output / f"rank{self.rank:03d}-{self.next_index:05d}.parquet"
        tmp = self.output / f".{final.name}.tmp"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        # One value per page and small row groups: a reader can fetch one row without decoding its neighbours.
        pq.write_table(table, tmp, row_group_size=self.row_group_size, use_dictionary=["id", "caption"],
                       write_batch_size=1)
        os.replace(tmp, final)
        self.files.append(final)
        self.next_index += 1
        self.rows = []


NEGATIVE_PROMPT_FILE = "_negative_prompt.parquet"  # leading "_": never listed as training data


def write_negative_prompt(path: Path, encoders: Encoders, prompt: str, save_dtype: str) -> None:
    """One text-only row with the negative prompt's embedding (for ``training.data.negative_prompt_path``)."""
    write_text_rows(path, ["negative_prompt"], [prompt], encoders.encode_text([prompt]), save_dtype)


def write_text_rows(path: Path, ids: list[str], captions: list[str], embeddings: list[torch.Tensor],
                    save_dtype: str = "float32", metadata: dict[str, str] | None = None) -> None:
    """Text-only rows (caption + ``[L, D]`` embedding each) as one parquet file, written atomically."""
    rows = [{"id": i, "caption": c, **tensor_columns("text_embedding", e, save_dtype)}
            for i, c, e in zip(ids, captions, embeddings, strict=True)]
    table = pa.Table.from_pylist(rows, schema=TEXT_ONLY_SCHEMA)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def tensor_columns(prefix: str, tensor: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    t = tensor.to(SAVE_DTYPES[dtype_name]).contiguous()
    # bfloat16 has no numpy dtype: take the raw bytes through a same-width integer view.
    raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return {f"{prefix}_bytes": raw, f"{prefix}_shape": list(t.shape), f"{prefix}_dtype": dtype_name}


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PreprocessOptions:
    model: str
    captions: Path
    output: Path
    videos: Path | None = None  # None: text-only mode
    family: str = "wan"  # fv_accel.models.FAMILIES: whose encoders and frame rule
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: float = 16.0
    text_len: int = 512
    save_dtype: str = "float32"
    vae_dtype: str = "fp32"
    text_encoder_dtype: str = "auto"
    rows_per_shard: int = 64
    row_group_size: int = 4
    text_batch_size: int = 32
    negative_prompt: str | None = None
    vae_tiling: bool = False


@dataclass
class Summary:
    written: int = 0
    already_done: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first message per skip category
    files: list[str] = field(default_factory=list)

    def skip(self, exc: SkipClip) -> None:
        self.skipped[exc.category] += 1
        self.examples.setdefault(exc.category, str(exc))

    def merge(self, other: Summary) -> None:
        self.written += other.written
        self.already_done += other.already_done
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        self.files += other.files

    def to_json(self) -> dict[str, Any]:
        return {"written": self.written, "already_done": self.already_done, "skipped": dict(self.skipped),
                "skip_examples": self.examples, "files": sorted(self.files)}


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_frame_size(rule: FrameRule, opts: PreprocessOptions) -> None:
    """Clips the family's VAE and patching accept (``ModelBase.frame_rule``), else exit 2 naming the flag."""
    if not rule.valid_num_frames(opts.num_frames):
        below, above = rule.nearest_num_frames(opts.num_frames)
        raise ConfigError(f"--num-frames must be {rule.num_frames_text} for the {opts.family} VAE (e.g. {below} or "
                          f"{above}), got {opts.num_frames}")
    multiple, factor = rule.pixel_multiple, rule.spatial_factor
    if opts.height % multiple or opts.width % multiple:
        raise ConfigError(f"--height/--width must be multiples of {multiple} for {opts.family} ({factor}× VAE "
                          f"downsampling, then {multiple // factor}×{multiple // factor} patches), got "
                          f"{opts.height}x{opts.width}")


def run_preprocess(opts: PreprocessOptions, *, rank: int, world_size: int, device: torch.device,
                   show_progress: bool = True) -> Summary:
    """This rank's share of the caption file → its shards. Returns this rank's summary.

    Host memory: each clip is VAE-encoded as soon as it is decoded, so one decoded clip is alive at a time
    (float32 [3, 81, 480, 832] = 388 MB per rank at 480p; a caption batch of 32 clips would take 11.6 GiB).
    What waits for the batched text encoder is latents, 48× smaller (float32 [16, 21, 60, 104] = 8.4 MB each).
    """
    from tqdm.auto import tqdm

    text_only = opts.videos is None
    if opts.videos is not None and not opts.videos.is_dir():
        raise ConfigError(f"--videos: {opts.videos} is not a directory")
    family = family_class(opts.family)
    # Checked before anything is loaded or written: a wrong size would otherwise surface at training step 1.
    if not text_only:
        check_frame_size(family.frame_rule(source=opts.model), opts)
    entries = read_captions(opts.captions, need_paths=not text_only)
    opts.output.mkdir(parents=True, exist_ok=True)
    done = done_ids(opts.output)
    if text_only and any(re.fullmatch(r"prompt-\d{8}(#\d+)?", i) for i in done):
        raise ConfigError(f"--output: {opts.output} holds text-only rows keyed by line number (an older "
                          "preprocess); rows are now keyed by caption, so write to a new --output")
    mine = entries[rank::world_size]
    summary = Summary(already_done=sum(e.id in done for e in mine))
    todo = [e for e in mine if e.id not in done]
    text_dtype = opts.text_encoder_dtype
    if text_dtype == "auto":
        text_dtype = "bf16" if device.type == "cuda" else "fp32"
    check_model_source(opts.model)
    encoders = family.load_encoders(opts.model, key="--model", device=device, text_len=opts.text_len,
                                    text_dtype=_TORCH_DTYPES[text_dtype],
                                    vae_dtype=None if text_only else _TORCH_DTYPES[opts.vae_dtype],
                                    vae_tiling=opts.vae_tiling)
    if opts.negative_prompt is not None and rank == 0:
        write_negative_prompt(opts.output / NEGATIVE_PROMPT_FILE, encoders, opts.negative_prompt, opts.save_dtype)
    writer = ShardWriter(opts.output, rank=rank, schema=TEXT_ONLY_SCHEMA if text_only else T2V_SCHEMA,
                         rows_per_shard=opts.rows_per_shard, row_group_size=opts.row_group_size)
    # One bar (rank 0's share) rather than world_size bars overwriting each other; the shares are equal in size.
    bar = tqdm(total=len(todo), desc=f"preprocess (rank 0 of {world_size})", disable=not show_progress or rank != 0,
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), opts.text_batch_size):
            chunk = todo[start:start + opts.text_batch_size]
            latents: dict[str, torch.Tensor] = {}
            if not text_only:
                for entry in chunk:
                    try:
                        # Encoded as soon as decoded, never bound to a name: one decoded clip alive at a time.
                        latents[entry.id] = encoders.encode_video(load_clip(
                            opts.videos / entry.path, height=opts.height,  # type: ignore[operator]  # with --videos, read_captions(need_paths=True) gave every entry a path
                            width=opts.width, num_frames=opts.num_frames, fps=opts.fps))
                    except SkipClip as exc:
                        summary.skip(exc)
                        logger.warning("skipping %s (%s)", entry.id, exc)
                        bar.update(1)
                chunk = [e for e in chunk if e.id in latents]
            if not chunk:
                continue
            texts = encoders.encode_text([e.caption for e in chunk])
            for entry, text in zip(chunk, texts, strict=True):
                row: dict[str, Any] = {"id": entry.id, "caption": entry.caption,
                                       **tensor_columns("text_embedding", text, opts.save_dtype)}
                if not text_only:
                    row.update(tensor_columns("vae_latent", latents.pop(entry.id), opts.save_dtype))
                    row.update(file_name=entry.path, media_type="video", width=opts.width, height=opts.height,
                               num_frames=opts.num_frames, duration_sec=opts.num_frames / opts.fps,
                               fps=float(opts.fps))
                writer.add(row)
                summary.written += 1
                bar.update(1)
        writer.flush()
    finally:
        bar.close()
    summary.files = [str(f) for f in writer.files]
    return summary
