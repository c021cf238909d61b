"""recipes/preprocess.py with a tiny random AutoencoderKLWan, a tiny UMT5 and a local WordLevel tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_2proc, run_recipe_main

from fv_accel.data import ParquetLatentDataset
from fv_accel.data.preprocess import load_clip, write_text_rows

WORDS = ["a", "red", "blue", "cat", "dog", "runs", "jumps", "over", "the", "hill", "slowly"]
SRC_FPS = 16


def make_tiny_pipeline(root: Path) -> Path:
    """A diffusers-style pipeline dir with vae/, text_encoder/, tokenizer/ built from configs (no download)."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    pipe = root / "pipe"
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(pipe / "vae")
    UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(pipe / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(pipe / "tokenizer")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return pipe


def write_video(path: Path, levels: list[int], *, width: int = 48, height: int = 32, fps: int = SRC_FPS) -> None:
    """A ``fps`` video whose frame i is uniformly grey at ``levels[i]`` (left half) and black (right half)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0"}
        for level in levels:
            img = np.zeros((height, width, 3), dtype=np.uint8)
            img[:, : width // 2] = level
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    pipe = make_tiny_pipeline(root)
    videos = root / "videos"
    write_video(videos / "a.mp4", [10 * i + 20 for i in range(12)])
    write_video(videos / "sub" / "b.mp4", [200 - 10 * i for i in range(12)])
    write_video(videos / "short.mp4", [50, 60, 70])  # 3 frames at 16 fps: too short for 5 frames at 8 fps
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    captions = [{"path": "a.mp4", "cap": "a red cat runs"}, {"path": "sub/b.mp4", "cap": ["a blue dog jumps"]},
                {"path": "short.mp4", "cap": "the hill"}, {"path": "broken.mp4", "cap": "a dog"},
                {"path": "missing.mp4", "cap": "a cat"}]
    (root / "videos2caption.json").write_text(json.dumps(captions))
    return root, pipe, videos


def _preprocess_main(argv: list[str]) -> int:
    return run_recipe_main("preprocess", argv)


# --cpu: the expected encodings below are computed on the CPU in fp32, so the recipe must run there too.
ARGS = ["--cpu", "--height", "16", "--width", "16", "--num-frames", "5", "--fps", "8", "--text-len", "8", "--no-progress"]


def test_load_clip_samples_fps_resizes_and_crops(world):
    _, _, videos = world
    clip = load_clip(videos / "a.mp4", height=16, width=16, num_frames=5, fps=8)
    assert clip.shape == (3, 5, 16, 16)
    # 16 fps → 8 fps takes source frames 0, 2, 4, 6, 8; levels 20, 40, 60, 80, 100 (crf 0: near lossless)
    # 48x32 → scale 0.5 → 24x16 → centre crop 16 wide: columns 4..11 come from the grey half, 12..19 black.
    grey = (clip[:, :, 4:12, 1:7].mean(dim=(0, 2, 3)) + 1) * 127.5
    black = (clip[:, :, 4:12, 9:15].mean(dim=(0, 2, 3)) + 1) * 127.5
    assert grey.tolist() == pytest.approx([20, 40, 60, 80, 100], abs=3)
    assert black.max() < 3


def test_preprocess_rows_equal_encoder_outputs_and_resume(world, tmp_path, capsys):
    root, pipe, videos = world
    out = tmp_path / "out"
    cmd = ["recipes/preprocess.py", "--model", str(pipe), "--videos", str(videos), "--captions",
           str(root / "videos2caption.json"), "--output", str(out), *ARGS]
    assert _preprocess_main(cmd[1:]) == 0  # the command line itself runs in the 2-process test below
    summary = json.loads((out / "_preprocess_summary.json").read_text())
    assert summary["written"] == 2 and summary["already_done"] == 0
    assert summary["skipped"] == {"too_short": 1, "unreadable": 1, "missing": 1}
    printed = capsys.readouterr().out
    assert "2 written, 0 already done, 3 skipped" in printed and "skipped 1 × too_short" in printed

    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    vae = AutoencoderKLWan.from_pretrained(pipe, subfolder="vae").eval()
    encoder = UMT5EncoderModel.from_pretrained(pipe, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(pipe, subfolder="tokenizer")
    ds = ParquetLatentDataset(str(out), text_len=8)
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    assert sorted(r["id"] for r in table) == ["a.mp4", "sub/b.mp4"]
    for i, row in enumerate(table):
        assert row["vae_latent_shape"] == [16, 2, 2, 2] and row["vae_latent_dtype"] == "float32"
        assert (row["width"], row["height"], row["num_frames"], row["fps"]) == (16, 16, 5, 8.0)
        clip = load_clip(videos / row["file_name"], height=16, width=16, num_frames=5, fps=8)
        with torch.no_grad():
            expected = vae.encode(clip[None]).latent_dist.mean[0]
        assert torch.allclose(ds[i].latents_cthw, expected, atol=1e-6, rtol=0)
        tokens = tokenizer(row["caption"], return_tensors="pt")
        n = tokens.input_ids.shape[1]  # words + </s>: stored trimmed to the real length
        assert row["text_embedding_shape"] == [n, 32]
        with torch.no_grad():
            hidden = encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[0]
        assert torch.allclose(ds[i].text_embeds_ld[:n], hidden, atol=1e-5, rtol=0)
        assert ds[i].text_mask_l.tolist() == [True] * n + [False] * (8 - n)

    # Rerun: everything already written is skipped, nothing new is written.
    files_before = sorted(p.name for p in out.glob("*.parquet"))
    assert _preprocess_main(cmd[1:]) == 0
    summary = json.loads((out / "_preprocess_summary.json").read_text())
    assert summary["written"] == 0 and summary["already_done"] == 2
    assert sorted(p.name for p in out.glob("*.parquet")) == files_before


def test_preprocess_text_only_and_bad_arguments(world, tmp_path, capsys):
    root, pipe, _ = world
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\nthe dog jumps over the hill\na blue cat slowly runs\n")
    out = tmp_path / "text"
    assert _preprocess_main(["--model", str(pipe), "--text-only", "--captions", str(prompts),
                             "--output", str(out), "--rows-per-shard", "2", "--negative-prompt", "the dog",
                             *ARGS]) == 0
    ds = ParquetLatentDataset(str(out), text_len=8, latent_shape=[16, 2, 2, 2])
    assert ds.kind == "text_only" and len(ds) == 3  # the negative prompt file is not a training row
    assert len(list(out.glob("rank000-*.parquet"))) == 2  # 2 rows per shard
    from fv_accel.config import DataConfig
    from fv_accel.data import build_data_stream

    cfg = DataConfig(data_path=str(out), text_len=8, latent_shape=[16, 2, 2, 2], train_batch_size=3,
                     negative_prompt_path=str(out / "_negative_prompt.parquet"))
    batch = next(build_data_stream(cfg, rank=0, world_size=1))
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokens = AutoTokenizer.from_pretrained(pipe, subfolder="tokenizer")("the dog", return_tensors="pt")
    with torch.no_grad():
        neg = UMT5EncoderModel.from_pretrained(pipe, subfolder="text_encoder")(**tokens).last_hidden_state[0]
    assert batch.uncond_embeds_bld.shape == (3, 8, 32)
    assert torch.allclose(batch.uncond_embeds_bld[2, :3], neg, atol=1e-5) and batch.uncond_embeds_bld[:, 3:].eq(0).all()
    capsys.readouterr()
    code = _preprocess_main(["--model", str(tmp_path / "nope"), "--text-only", "--captions", str(prompts),
                             "--output", str(out)])
    assert code == 2 and f"--model: local path '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
    code = _preprocess_main(["--model", str(pipe), "--videos", str(tmp_path), "--captions", str(prompts),
                             "--output", str(out), "--num-frames", "8"])
    assert code == 2 and "--num-frames must be 4k+1" in capsys.readouterr().err
    broken = tmp_path / "caps.json"
    broken.write_text(json.dumps([{"path": "a.mp4", "cap": ""}]))
    code = _preprocess_main(["--model", str(pipe), "--videos", str(tmp_path), "--captions", str(broken),
                             "--output", str(out)])
    assert code == 1 and f"{broken} entry 0: caption is missing or empty" in capsys.readouterr().err


@pytest.mark.distributed
def test_preprocess_two_processes_each_write_their_share(world, tmp_path):
    root, pipe, videos = world
    out = tmp_path / "out2"
    proc = run_2proc(["recipes/preprocess.py", "--model", str(pipe), "--videos", str(videos), "--captions",
                      str(root / "videos2caption.json"), "--output", str(out), *ARGS], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pyarrow.parquet as pq

    ids = {f.name: pq.read_table(f, columns=["id"]).column("id").to_pylist() for f in out.glob("*.parquet")}
    # entries 0, 2, 4 go to rank 0 (only a.mp4 is usable), entries 1, 3 to rank 1 (sub/b.mp4)
    assert ids == {"rank000-00000.parquet": ["a.mp4"], "rank001-00000.parquet": ["sub/b.mp4"]}
    summary = json.loads((out / "_preprocess_summary.json").read_text())
    assert summary["written"] == 2 and sum(summary["skipped"].values()) == 3


def _grey_levels(clip: torch.Tensor) -> list[float]:
    """Per-frame brightness of the grey half of a 16×16 crop of a ``write_video`` clip."""
    return ((clip[:, :, 4:12, 1:7].mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()


def test_load_clip_picks_the_nearest_source_frame(tmp_path):
    # 25 fps → 16 fps: target j (time j/16) lies between source frames, and the nearest one is sometimes
    # the frame before (j=2: 25·2/16 = 3.125 → frame 3, not 4), unlike 16 → 8 fps where every target is exact.
    src_fps, fps, num_frames = 25, 16, 5
    levels = [10 + 20 * i for i in range(10)]  # frame i is grey at 10 + 20 i: the level gives back the index
    write_video(tmp_path / "v.mp4", levels, fps=src_fps)
    nearest = [min(range(len(levels)), key=lambda i: (abs(i / src_fps - j / fps), -i)) for j in range(num_frames)]
    first_after = [min(i for i in range(len(levels)) if i / src_fps >= j / fps) for j in range(num_frames)]
    assert nearest == [0, 2, 3, 5, 6] and nearest != first_after  # the two rules differ here: [0, 2, 4, 5, 7]
    clip = load_clip(tmp_path / "v.mp4", height=16, width=16, num_frames=num_frames, fps=fps)
    picked = [round((g - 10) / 20) for g in _grey_levels(clip)]
    assert picked == nearest


def test_preprocess_refuses_height_width_that_do_not_patch(world, tmp_path, capsys):
    from fv_accel.models.wan import WanModel

    # 8× VAE downsampling then 2×2 patches: frames must be multiples of 16 (8 would leave an odd latent side).
    assert WanModel.pixel_multiple() == 16 and WanModel.pixel_multiple((1, 1, 1)) == 8
    root, pipe, videos = world
    out = tmp_path / "out"
    args = [a for a in ARGS if a not in ("--height", "--width", "16")]
    code = _preprocess_main(["--model", str(pipe), "--videos", str(videos), "--captions",
                             str(root / "videos2caption.json"), "--output", str(out), *args,
                             "--height", "24", "--width", "16"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--height/--width must be multiples of 16" in err and "got 24x16" in err
    assert not out.exists()  # refused before anything was encoded or written


def test_preprocess_holds_one_decoded_clip_at_a_time(world, tmp_path, monkeypatch):
    import weakref

    import fv_accel.data.preprocess as pre

    root, pipe, videos = world
    captions = [{"path": p, "cap": c} for p in ("a.mp4", "sub/b.mp4") for c in ("a red cat", "a blue dog")]
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    alive: list[weakref.ref[torch.Tensor]] = []
    peak = 0

    def counting_load_clip(*args, **kwargs):
        nonlocal peak
        clip = load_clip(*args, **kwargs)
        alive.append(weakref.ref(clip))
        peak = max(peak, sum(r() is not None for r in alive))
        return clip

    monkeypatch.setattr(pre, "load_clip", counting_load_clip)
    out = tmp_path / "out"
    assert _preprocess_main(["--model", str(pipe), "--videos", str(videos), "--captions", str(tmp_path / "caps.json"),
                             "--output", str(out), "--text-batch-size", "8", *ARGS]) == 0
    summary = json.loads((out / "_preprocess_summary.json").read_text())
    assert summary["written"] == 4 and len(alive) == 4
    assert peak == 1  # all 4 clips share one caption batch; holding them for it would make this 4


def _text_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out, columns=["id", "caption"]).to_pylist()


def test_text_only_rerun_after_inserting_a_prompt_encodes_each_caption_once(world, tmp_path):
    import hashlib
    from collections import Counter

    _, pipe, _ = world
    prompts = tmp_path / "prompts.txt"
    out = tmp_path / "text"
    argv = ["--model", str(pipe), "--text-only", "--captions", str(prompts), "--output", str(out), *ARGS]
    lines = ["a red cat", "the dog jumps", "a red cat"]
    prompts.write_text("\n".join(lines) + "\n")
    assert _preprocess_main(argv) == 0
    lines.insert(1, "a blue dog runs")
    prompts.write_text("\n".join(lines) + "\n")
    assert _preprocess_main(argv) == 0
    summary = json.loads((out / "_preprocess_summary.json").read_text())
    assert (summary["written"], summary["already_done"]) == (1, 3)
    rows = _text_rows(out)
    assert Counter(r["caption"] for r in rows) == Counter(lines)  # each line once: the new one in, none twice

    def key(text: str) -> str:
        return "prompt-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    assert sorted(r["id"] for r in rows) == sorted([key("a red cat"), key("a red cat") + "#2",
                                                    key("the dog jumps"), key("a blue dog runs")])


def test_text_only_refuses_an_output_keyed_by_line(world, tmp_path, capsys):
    _, pipe, _ = world
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "old"
    write_text_rows(out / "rank000-00000.parquet", ["prompt-00000000"], ["a red cat"], [torch.zeros(2, 32)])
    code = _preprocess_main(["--model", str(pipe), "--text-only", "--captions", str(prompts), "--output", str(out),
                             *ARGS])
    assert code == 2 and "keyed by line number" in capsys.readouterr().err
    assert len(_text_rows(out)) == 1
