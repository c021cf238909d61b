"""recipes/sample.py with prompts: a run whose init_from is a tiny Wan pipeline, sampled to mp4 files."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, build_tiny_wan_pipeline, load_module, run_recipe_main

PROMPTS = ["a cat walks on the grass", "a dog runs!"]
SAMPLE = load_module(REPO / "recipes" / "sample.py", "sample_prompts_recipe")


@pytest.fixture(scope="module")
def pipeline_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Wan pipeline and a 1-step finetune run (EMA on) of its transformer on the toy latents
    ([16, 2, 8, 8]), normalised by the pipeline's VAE statistics."""
    root = tmp_path_factory.mktemp("sample-prompts")
    pipe = build_tiny_wan_pipeline(root / "tiny-wan", toy_root / "init" / "transformer")
    out = root / "run"
    recipe = {
        "models": {"student": {"family": "wan", "init_from": str(pipe), "trainable": True, "flow_shift": 3.0,
                               "latent_stats": "auto"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 4, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-3, "lr_warmup_steps": 0},
                     "loop": {"max_train_steps": 1},
                     "checkpoint": {"output_dir": str(out), "save_steps": 0},
                     "tracker": {"backends": []}},
        "callbacks": {"ema": {"decay": 0.5, "start_step": 0}},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    assert run_recipe_main("finetune", ["--config", str(root / "run.yaml")]) == 0
    return pipe, out


def _sample(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = SAMPLE.main(list(argv))
    return rc, err.getvalue()


def _read_video(path: Path) -> tuple[int, int, int, Any]:
    """(frames, height, width, all frames as uint8 [F, H, W, 3]) decoded with PyAV."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames.shape[0], frames.shape[1], frames.shape[2], frames


def test_prompts_become_decodable_videos(pipeline_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = pipeline_run
    out = tmp_path / "videos"
    args = ["--checkpoint", str(run), "--role", "student", "--steps", "2", "--seed", "3", "--output", str(out)]
    rc, err = _sample(*args, *[a for p in PROMPTS for a in ("--prompt", p)])
    assert rc == 0, err[-3000:]
    # By hand: the toy latents are [16, 2, 8, 8]; the tiny VAE downsamples time twice (temperal_downsample
    # [False, True, True]: 4 frames per latent frame after the first, which stays alone) and space three times
    # (four dim_mult levels: 8 pixels per cell) → 1 + (2 − 1)·4 = 5 frames of 8·8 = 64 × 64 pixels.
    files = ["00-a-cat-walks-on-the-grass.mp4", "01-a-dog-runs.mp4"]
    assert sorted(p.name for p in out.iterdir()) == [*files, "index.json"]
    decoded = [_read_video(out / f) for f in files]
    assert [d[:3] for d in decoded] == [(5, 64, 64), (5, 64, 64)]
    assert (decoded[0][3] != decoded[1][3]).any()  # different prompts (and seeds), different videos

    index = json.loads((out / "index.json").read_text())
    assert index["videos"] == [{"prompt": p, "file": f, "seed": 3 * 2**32 + i}
                               for i, (p, f) in enumerate(zip(PROMPTS, files, strict=True))]
    assert (index["step"], index["role"], index["steps"], index["seed"]) == (1, "student", 2, 3)
    assert index["frames"] == [5, 64, 64] and index["sampler"] == "EulerSampler"
    assert not list(tmp_path.glob(".videos.tmp-*"))

    # The EMA weights of the same run through the same path; an existing non-empty output is never overwritten.
    rc, err = _sample("--checkpoint", str(run), "--role", "ema", "--steps", "1", "--prompt", PROMPTS[0],
                      "--output", str(tmp_path / "ema"))
    assert rc == 0, err[-3000:]
    assert _read_video(tmp_path / "ema" / files[0])[:3] == (5, 64, 64)
    rc, err = _sample(*args, "--prompt", PROMPTS[0])
    assert rc == 2 and "already exists" in err


def _edited_checkpoint(run: Path, tmp_path: Path, **student: str) -> Path:
    """A copy of the run's checkpoint whose config's models.student has the given keys changed."""
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", ckpt)
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["config"]["models"]["student"].update(student)
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    return ckpt


def test_bad_inputs_exit_2_with_the_reason(pipeline_run: tuple[Path, Path], tmp_path: Path) -> None:
    pipe, run = pipeline_run
    out = tmp_path / "videos"
    base = ["--checkpoint", str(run), "--steps", "1", "--output", str(out)]

    rc, err = _sample(*base, "--role", "critic", "--prompt", "a cat")
    assert rc == 2 and "invalid choice: 'critic'" in err
    rc, err = _sample(*base, "--role", "student", "--prompt", "a cat", "--prompt", " ")
    assert rc == 2 and "--prompt #2 is empty" in err
    (tmp_path / "empty.txt").write_text("\n  \n")
    rc, err = _sample(*base, "--role", "student", "--prompts-file", str(tmp_path / "empty.txt"))
    assert rc == 2 and "holds no prompt" in err
    rc, err = _sample(*base, "--role", "student")
    assert rc == 2 and "--prompt" in err and "--num-samples" in err
    rc, err = _sample(*base, "--role", "teacher", "--prompt", "a cat")
    assert rc == 2 and "the run's config has no models.teacher" in err
    # A finetune student samples with Euler steps: their number is not guessed, nor is guidance dropped.
    rc, err = _sample("--checkpoint", str(run), "--role", "student", "--prompt", "a cat", "--output", str(out))
    assert rc == 2 and "--steps: the student of this finetune run samples with Euler steps" in err
    rc, err = _sample(*base, "--role", "student", "--prompt", "a cat", "--negative-prompt", "blurry")
    assert rc == 2 and "--negative-prompt: only used by guidance" in err

    # A pipeline without its tokenizer: the missing component and the path are named.
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(pipe, no_tok, ignore=shutil.ignore_patterns("tokenizer"))
    ckpt = _edited_checkpoint(run, tmp_path / "a", init_from=str(no_tok))
    rc, err = _sample("--checkpoint", str(ckpt), "--role", "student", "--steps", "1", "--prompt", "a cat",
                      "--output", str(out))
    assert rc == 2 and f"models.student.init_from '{no_tok}' has no tokenizer/" in err, err[-2000:]
    # Identity latent statistics: no VAE to decode with.
    ckpt = _edited_checkpoint(run, tmp_path / "b", latent_stats="identity")
    rc, err = _sample("--checkpoint", str(ckpt), "--role", "student", "--steps", "1", "--prompt", "a cat",
                      "--output", str(out))
    assert rc == 2 and "latent_stats is identity" in err and "no VAE" in err, err[-2000:]
    assert not out.exists()


def test_a_failure_while_writing_leaves_nothing(pipeline_run: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import fv_accel.video

    _, run = pipeline_run
    written: list[Path] = []
    real = fv_accel.video.write_mp4

    def fail_second(frames: Any, path: Path, *, fps: int = 16) -> Path:
        if written:
            raise OSError("disk full")
        written.append(real(frames, path, fps=fps))
        return written[-1]

    monkeypatch.setattr(fv_accel.video, "write_mp4", fail_second)
    out = tmp_path / "videos"
    rc, err = _sample("--checkpoint", str(run), "--role", "student", "--steps", "1", "--prompt", PROMPTS[0],
                      "--prompt", PROMPTS[1], "--output", str(out))
    assert rc == 1 and "disk full" in err
    assert len(written) == 1 and not written[0].exists()  # the first video was written, then removed
    assert list(tmp_path.iterdir()) == []


def test_guidance_pushes_away_from_the_encoded_negative_prompt(pipeline_run: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    """CFG ``u + w·(c − u)`` with the prompt itself as negative prompt is the unguided sample (c = u); another
    negative prompt changes it. So the unconditional branch sees the encoded negative prompt, not zeros."""
    import numpy as np

    _, run = pipeline_run
    base = ["--checkpoint", str(run), "--role", "student", "--steps", "2", "--prompt", PROMPTS[0]]
    videos = {}
    for name, extra in {"plain": [], "self": ["--guidance-scale", "4", "--negative-prompt", PROMPTS[0]],
                        "other": ["--guidance-scale", "4", "--negative-prompt", "a dog runs"]}.items():
        rc, err = _sample(*base, *extra, "--output", str(tmp_path / name))
        assert rc == 0, err[-3000:]
        videos[name] = _read_video(tmp_path / name / "00-a-cat-walks-on-the-grass.mp4")[3].astype(np.int16)
    assert np.abs(videos["self"] - videos["plain"]).max() <= 2  # equal up to float rounding through the codec
    assert np.abs(videos["other"] - videos["plain"]).max() > 8
    index = json.loads((tmp_path / "other" / "index.json").read_text())
    assert (index["guidance_scale"], index["negative_prompt"]) == (4.0, "a dog runs")


def test_sampler_steps_and_guidance_follow_the_method() -> None:
    """A DMD student samples its schedule's K steps (the default), refuses another K and any guidance; the
    teacher and Euler students take both."""
    from types import SimpleNamespace

    from fv_accel.errors import ConfigError
    from fv_accel.methods.dmd2 import DMD2MethodConfig
    from fv_accel.sampling import DMDSampler, EulerSampler

    cfg: Any = SimpleNamespace(method=DMD2MethodConfig(name="dmd2", dmd_denoising_steps=[1000, 500, 250]))
    assert SAMPLE.role_sampler(cfg, "ema", None, 1.0) == (DMDSampler((1000, 500, 250)), 3)
    with pytest.raises(ConfigError, match="its 3-step schedule"):
        SAMPLE.role_sampler(cfg, "student", 4, 1.0)
    with pytest.raises(ConfigError, match="DMDSampler, which takes no guidance"):
        SAMPLE.role_sampler(cfg, "student", None, 5.0)
    assert SAMPLE.role_sampler(cfg, "teacher", 8, 5.0) == (EulerSampler(8, 5.0), 8)


def test_causal_student_streams_any_number_of_frames(pipeline_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The run's Wan weights read as a causal student (same keys): one block covering the clip samples what the
    bidirectional student does (same video); more latent frames than trained stream block by block."""
    import numpy as np

    _, run = pipeline_run
    ckpt = tmp_path / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", ckpt)
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["config"]["models"]["student"].update(family="wan_causal", causal={"num_frames_per_block": 2})
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    common = ["--role", "student", "--steps", "2", "--seed", "3", "--prompt", PROMPTS[0]]
    rc, err = _sample("--checkpoint", str(run), *common, "--output", str(tmp_path / "wan"))
    assert rc == 0, err[-3000:]
    rc, err = _sample("--checkpoint", str(ckpt), *common, "--output", str(tmp_path / "one-block"))
    assert rc == 0, err[-3000:]
    name = "00-a-cat-walks-on-the-grass.mp4"
    wan, causal = (_read_video(tmp_path / d / name)[3].astype(np.int16) for d in ("wan", "one-block"))
    assert np.abs(wan - causal).max() <= 1  # fp32-level differences may flip a rounding

    # 5 latent frames (trained on 2) → blocks [1, 2, 2]; by hand the VAE decodes 1 + 4·4 = 17 frames.
    rc, err = _sample("--checkpoint", str(ckpt), *common, "--num-frames", "5", "--output", str(tmp_path / "long"))
    assert rc == 0, err[-3000:]
    assert _read_video(tmp_path / "long" / name)[:3] == (17, 64, 64)
    assert json.loads((tmp_path / "long" / "index.json").read_text())["latent_shape"] == [16, 5, 8, 8]

    rc, err = _sample("--checkpoint", str(ckpt), *common, "--num-frames", "0", "--output", str(tmp_path / "x"))
    assert rc == 2 and "--num-frames 0: must be >= 1" in err
    rc, err = _sample("--checkpoint", str(ckpt), "--role", "student", "--num-samples", "2", "--num-frames", "3",
                      "--output", str(tmp_path / "x.safetensors"))
    assert rc == 2 and "--num-frames applies to --prompt sampling only" in err
