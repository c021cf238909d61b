"""Validation CFG pushes away from the same unconditional embedding that training batches carry: the
negative-prompt file's embedding (zero-padded to ``text_len``) when ``training.data.negative_prompt_path`` is
set, zeros otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TEXT_LEN = 8


def _write_negative_prompt(path: Path) -> np.ndarray:
    """A text-only parquet whose first row is a [5, 32] embedding (shorter than text_len: padding matters)."""
    emb = np.random.default_rng(11).normal(size=(5, 32)).astype(np.float32)
    pq.write_table(pa.table({
        "id": ["negative"], "caption": ["blurry, low quality"],
        "text_embedding_bytes": [emb.tobytes()], "text_embedding_shape": [list(emb.shape)],
        "text_embedding_dtype": ["float32"],
    }), path)
    return emb


def _file_embedding_padded(path: Path) -> torch.Tensor:
    """The oracle: row 0 read with pyarrow alone, zero-padded to TEXT_LEN tokens."""
    row = pq.read_table(path).to_pylist()[0]
    emb = np.frombuffer(row["text_embedding_bytes"], dtype=np.float32).reshape(row["text_embedding_shape"])
    out = np.zeros((TEXT_LEN, emb.shape[1]), dtype=np.float32)
    out[: emb.shape[0]] = emb
    return torch.from_numpy(out)


def _run(toy_root: Path, tmp_path: Path, accelerator: object, negative: Path | None) -> tuple:
    from fv_accel.build import build_run
    from fv_accel.callbacks import CallbackList
    from fv_accel.callbacks.validation import ValidationCallback
    from fv_accel.config import resolve_config
    from fv_accel.trainer import Trainer

    data = {"data_path": str(toy_root / "data"), "text_len": TEXT_LEN, "train_batch_size": 2}
    if negative is not None:
        data["negative_prompt_path"] = str(negative)
    cfg = resolve_config({
        "models": {"student": {"init_from": str(toy_root / "init"), "latent_stats": "identity"}},
        "method": {"name": "finetune"},
        "training": {"data": data, "checkpoint": {"output_dir": str(tmp_path / "out")},
                     "tracker": {"backends": []}},
        "callbacks": {"validation": {"every_steps": 1, "num_samples": 3, "num_inference_steps": 2,
                                     "guidance_scale": 3.0}},
    })
    built = build_run(cfg, accelerator)  # type: ignore[arg-type]
    method = built.method
    callback = ValidationCallback(cfg.callbacks.validation, cfg)
    trainer = Trainer(accelerator=accelerator, method=method, data=built.data, cfg=cfg,  # type: ignore[arg-type]
                      callbacks=CallbackList([callback]), show_progress=False)
    method.on_train_start()

    seen: list[torch.Tensor] = []
    real_sampler = method.validation_sampler()

    def spy(model, text, uncond, latent_shape, generator):  # type: ignore[no-untyped-def]
        seen.append(uncond.detach().cpu().clone())
        return real_sampler(model, text, uncond, latent_shape, generator)

    method.validation_sampler = lambda: spy  # type: ignore[method-assign]
    callback.sample(trainer)
    training_batch = method.student.prepare_batch(next(built.data), method.student.device)  # type: ignore[arg-type]
    return torch.cat(seen), training_batch.uncond_embeds_bld.cpu()


def test_validation_uses_the_negative_prompt_of_training(toy_root, tmp_path, single_process_dist) -> None:
    negative = tmp_path / "_negative_prompt.parquet"
    _write_negative_prompt(negative)
    expected = _file_embedding_padded(negative)

    val_uncond, train_uncond = _run(toy_root, tmp_path, single_process_dist, negative)

    assert val_uncond.shape == (3, TEXT_LEN, 32)  # every validation prompt reached the sampler
    for row in val_uncond:
        assert torch.equal(row, expected)
    for row in train_uncond:
        assert torch.equal(row, expected)


def test_validation_uses_zeros_without_a_negative_prompt(toy_root, tmp_path, single_process_dist) -> None:
    val_uncond, train_uncond = _run(toy_root, tmp_path, single_process_dist, None)
    assert val_uncond.shape == (3, TEXT_LEN, 32)
    assert torch.count_nonzero(val_uncond) == 0 and torch.count_nonzero(train_uncond) == 0
