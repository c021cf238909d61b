"""Wan 2.2 TI2V-5B layout, tiny: one 48-channel transformer, a 48-channel residual VAE that folds 2×2 pixels
before its 8× downsampling (16× in all, ``scale_factor_spatial: 16``), ``expand_timesteps: true``.

Oracles: the latent and video sizes follow from the VAE's strides by hand (F frames → (F-1)/4+1 latent frames,
H pixels → H/16 cells, and back), stored latents equal the VAE's own encoding, the exported files are the
base pipeline's apart from the trained transformer, and the per-token timesteps diffusers' ``WanPipeline`` passes
under ``expand_timesteps`` (all equal in text-to-video) give the velocity of one timestep per sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_recipe_main
from safetensors.torch import load_file

from fv_accel.config import ModelConfig, resolve_config
from fv_accel.models import WanModel
from fv_accel.models.base import FrameRule
from fv_accel.models.wan import TINY_WAN_CONFIG

Z_DIM = 48
#: per-channel statistics of the tiny VAE: distinct, so a role that ignored them would train in another space
LATENTS_MEAN = [round(-0.5 + i / 47, 4) for i in range(Z_DIM)]
LATENTS_STD = [round(0.5 + 1.5 * i / 47, 4) for i in range(Z_DIM)]
WORDS = ["a", "cat", "dog", "walks", "runs", "on", "the", "grass", "red", "ball"]
HEIGHT, WIDTH, FRAMES = 32, 64, 5  # multiples of 32 (16× VAE, 2×2 patches); 4k+1 frames
LATENT = [Z_DIM, (FRAMES - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16]  # [48, 2, 2, 4]


def build_tiny_ti2v_pipeline(out: Path) -> Path:
    """A WanPipeline directory in TI2V-5B's layout (everything tiny, built locally, no download)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8))
    # TI2V-5B's VAE config (is_residual, 12 = 3·2·2 channels in and out after patchify, 48 latent channels,
    # 16× spatial, 4× temporal) with tiny widths.
    vae = AutoencoderKLWan(base_dim=4, decoder_base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                           latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    transformer = WanTransformer3DModel(**{**TINY_WAN_CONFIG, "in_channels": Z_DIM, "out_channels": Z_DIM})
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer, expand_timesteps=True).save_pretrained(out)
    return out


def write_video(path: Path, num_frames: int, seed: int) -> None:
    """A smooth moving colour gradient at 16 fps, ``WIDTH``×``HEIGHT`` (crf 0: near lossless)."""
    import av

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "0"}
        for f in range(num_frames):
            img = np.stack([(xx * 3 + 20 * f + 40 * seed) % 256, (yy * 5 + 60 * seed) % 256,
                            np.full_like(xx, 90 + 10 * f)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pipeline and its preprocessed data (four clips, encoded by its 48-channel VAE)."""
    root = tmp_path_factory.mktemp("ti2v")
    pipe = build_tiny_ti2v_pipeline(root / "tiny-ti2v")
    videos = root / "videos"
    captions = []
    for i, text in enumerate(["a cat walks", "a dog runs", "a red ball", "the cat on the grass"]):
        write_video(videos / f"{i}.mp4", 12, seed=i)
        captions.append({"path": f"{i}.mp4", "cap": text})
    (root / "captions.json").write_text(json.dumps(captions))
    data = root / "data"
    code = run_recipe_main("preprocess", ["--cpu", "--model", str(pipe), "--videos", str(videos), "--captions",
                                          str(root / "captions.json"), "--output", str(data), "--height",
                                          str(HEIGHT), "--width", str(WIDTH), "--num-frames", str(FRAMES),
                                          "--fps", "16", "--text-len", "8", "--no-progress"])
    assert code == 0
    return {"root": root, "pipe": pipe, "videos": videos, "data": data}


def test_frame_rule_comes_from_the_pipelines_vae(world: dict[str, Path], tmp_path: Path) -> None:
    """TI2V-5B's VAE: 16× spatial → sides multiple of 16·2 = 32; a Wan 2.1 VAE config without the factors: 8, 4."""
    assert WanModel.frame_rule(source=str(world["pipe"])) == FrameRule(temporal_factor=4, spatial_factor=16,
                                                                       pixel_multiple=32)
    wan21 = tmp_path / "wan21"
    (wan21 / "vae").mkdir(parents=True)
    (wan21 / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    assert WanModel.frame_rule(source=str(wan21)) == WanModel.frame_rule() == FrameRule(4, 8, 16)


def test_preprocess_encodes_48_channel_latents(world: dict[str, Path]) -> None:
    from diffusers import AutoencoderKLWan

    from fv_accel.data import ParquetLatentDataset
    from fv_accel.data.preprocess import load_clip

    ds = ParquetLatentDataset(str(world["data"]), text_len=8)
    assert len(ds) == 4 and list(ds.latent_shape) == LATENT
    vae = AutoencoderKLWan.from_pretrained(world["pipe"], subfolder="vae").eval()
    import pyarrow.parquet as pq

    rows = pq.read_table(world["data"], columns=["id", "file_name"]).to_pylist()
    for i, row in enumerate(rows):
        clip = load_clip(world["videos"] / row["file_name"], height=HEIGHT, width=WIDTH, num_frames=FRAMES, fps=16)
        with torch.no_grad():
            expected = vae.encode(clip[None]).latent_dist.mean[0]
        torch.testing.assert_close(ds[i].latents_cthw, expected, rtol=0, atol=1e-6)


def test_preprocess_refuses_sides_that_are_not_multiples_of_32(world: dict[str, Path], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """16 pixels suit Wan 2.1 (8× VAE, 2×2 patches) but give TI2V one latent cell: half a patch."""
    out = tmp_path / "out"
    code = run_recipe_main("preprocess", ["--cpu", "--model", str(world["pipe"]), "--videos", str(world["videos"]),
                                          "--captions", str(world["root"] / "captions.json"), "--output", str(out),
                                          "--height", "16", "--width", "32", "--num-frames", str(FRAMES),
                                          "--text-len", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--height/--width must be multiples of 32 for wan (16× VAE downsampling, then 2×2 patches), got 16x32" \
        in err
    assert not out.exists()


def test_per_token_timesteps_of_expand_timesteps_equal_one_timestep_per_sample(world: dict[str, Path]) -> None:
    """Training passes one t per sample; the exported pipeline (expand_timesteps) passes t for every token.
    In text-to-video all tokens share t, so both give the same velocity up to float rounding."""
    model = WanModel.from_config("student", ModelConfig(init_from=str(world["pipe"])), dtype=torch.float32)
    torch.manual_seed(0)
    x = torch.randn(2, *LATENT)
    text = torch.randn(2, 3, 32)
    t = torch.tensor([870.0, 130.0])
    tokens = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)
    with torch.no_grad():
        got = model.predict_velocity(x, t, text)
        per_token = model.transformer(hidden_states=x, timestep=t[:, None].expand(2, tokens),
                                      encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(got, per_token, rtol=1e-5, atol=1e-5)


def test_finetune_validates_with_its_vae_and_exports_a_ti2v_pipeline(world: dict[str, Path], tmp_path: Path,
                                                                     fresh_world: Any) -> None:
    import av
    from diffusers import DiffusionPipeline

    from fv_accel.export import export_checkpoint
    from fv_accel.run import train
    from fv_accel.runtime import build_accelerator

    out = tmp_path / "run"
    cfg = resolve_config({
        "models": {"student": {"init_from": str(world["pipe"]), "latent_stats": "auto", "flow_shift": 5.0}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(world["data"]), "train_batch_size": 2, "text_len": 8},
                     "optimizer": {"learning_rate": 1e-3},
                     "loop": {"max_train_steps": 2}, "tracker": {"backends": []},
                     "checkpoint": {"output_dir": str(out)}},
        "callbacks": {"validation": {"every_steps": 2, "num_samples": 2, "num_inference_steps": 2}},
    })
    trainer = train(cfg, build_accelerator())
    assert list(trainer.method.student.latent_stats.mean or ()) == pytest.approx(LATENTS_MEAN)

    # Validation decodes [48, 2, 2, 4] latents with the pipeline's VAE: 1 + (2-1)·4 = 5 frames of 32×64.
    step = out / "validation" / "step-2"
    index = json.loads((step / "index.json").read_text())
    frames_hw = [(LATENT[1] - 1) * 4 + 1, LATENT[2] * 16, LATENT[3] * 16]
    assert frames_hw == [FRAMES, HEIGHT, WIDTH] and index["frames"] == {"student": frames_hw}
    for name in index["files"]["student"]:
        with av.open(str(step / name)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == FRAMES and decoded[0].shape == (HEIGHT, WIDTH, 3)

    export = tmp_path / "export"
    assert export_checkpoint(out / "checkpoint-2", role="student", output=export, dtype="fp32").is_pipeline
    index = json.loads((export / "model_index.json").read_text())
    base_index = json.loads((world["pipe"] / "model_index.json").read_text())
    assert index == base_index and index["expand_timesteps"] is True
    for file in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "transformer/config.json"):
        assert (export / file).read_bytes() == (world["pipe"] / file).read_bytes(), file
    base = load_file(str(world["pipe"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(export / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert base.keys() == trained.keys() and any(not torch.equal(base[k], trained[k]) for k in base)

    pipe = DiffusionPipeline.from_pretrained(export)
    assert type(pipe).__name__ == "WanPipeline" and pipe.config.expand_timesteps is True
    assert pipe.vae.config.z_dim == Z_DIM and pipe.vae_scale_factor_spatial == 16
    timesteps: list[torch.Tensor] = []
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: timesteps.append(kw["timestep"]),
                                               with_kwargs=True)
    video = pipe(prompt="a cat walks", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
                 guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and bool(np.isfinite(video).all())
    tokens = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)
    assert [tuple(t.shape) for t in timesteps] == [(1, tokens)] * 2  # a timestep per token: expand_timesteps


def test_latents_of_another_vae_are_refused_before_step_1(world: dict[str, Path], toy_root: Path, tmp_path: Path,
                                                          fresh_world: Any) -> None:
    """16-channel latents (the toy world's, as Wan 2.1's VAE writes them) for the 48-channel transformer."""
    from fv_accel.build import build_run
    from fv_accel.errors import ConfigError
    from fv_accel.runtime import build_accelerator

    cfg = resolve_config({
        "models": {"student": {"init_from": str(world["pipe"]), "latent_stats": "auto"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                     "tracker": {"backends": []}, "checkpoint": {"output_dir": str(tmp_path / "run")}},
    })
    with pytest.raises(ConfigError, match=r"^training\.data\.data_path: .* holds 16-channel latents "
                                          r"\[C, T, H, W\] = \[16, 2, 8, 8\], but models\.student .* takes 48 "
                                          r"channels"):
        build_run(cfg, build_accelerator())


def test_a_text_only_latent_shape_of_another_vae_is_refused(world: dict[str, Path], tmp_path: Path,
                                                            fresh_world: Any) -> None:
    from fv_accel.build import build_run
    from fv_accel.data.preprocess import write_text_rows
    from fv_accel.errors import ConfigError
    from fv_accel.runtime import build_accelerator

    write_text_rows(tmp_path / "prompts" / "p.parquet", ["a", "b"], ["a cat", "a dog"],
                    [torch.zeros(3, 32), torch.zeros(4, 32)])
    cfg = resolve_config({
        "models": {"student": {"init_from": str(world["pipe"]), "latent_stats": "auto"}},
        "method": {"name": "finetune"},
        "training": {"data": {"data_path": str(tmp_path / "prompts"), "train_batch_size": 2, "text_len": 8,
                              "latent_shape": [16, 2, 2, 4]},
                     "tracker": {"backends": []}, "checkpoint": {"output_dir": str(tmp_path / "run")}},
    })
    with pytest.raises(ConfigError, match=r"^training\.data\.latent_shape: 16-channel latents .* takes 48 channels"):
        build_run(cfg, build_accelerator())
