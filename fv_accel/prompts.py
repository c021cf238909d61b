"""Text prompts → the embeddings a transformer is conditioned on, and the noise seed of each prompt.

Shared by the validation callback (``callbacks.validation.prompts``, ``fv_accel/callbacks/validation.py``) and
``recipes/sample.py``, so both encode a caption exactly as preprocessing does (the family's
:meth:`~fv_accel.models.base.ModelBase.load_encoders`) and draw a prompt's noise from the same seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fv_accel.errors import ConfigError, FvAccelError

if TYPE_CHECKING:
    from fv_accel.models.base import ModelBase

#: Seeds of different prompts are this far apart, so (seed, prompt) pairs never share a generator state.
PROMPT_SEED_STRIDE = 2**32


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s noise: a function of (``seed``, ``index``) only, so a prompt's sample does
    not depend on the batch or the rank it is drawn in."""
    return (seed * PROMPT_SEED_STRIDE + index) % 2**64


def encode_prompts(family: type[ModelBase], source: str, prompts: list[str], *, key: str, what: str,
                   device: torch.device, text_len: int) -> list[torch.Tensor]:
    """Each prompt → ``[L_i, D]`` float32 on the host (L_i ≤ ``text_len``), by the text encoder of the pipeline
    ``source`` (named ``key`` in errors) as ``family`` loads it. The encoder is loaded for this call and freed
    before returning: the transformer that samples next needs the memory. A pipeline whose text encoder cannot
    be loaded is a configuration error (exit 2) prefixed with ``what``."""
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        encoders = family.load_encoders(source, key=key, device=device, text_len=text_len, text_dtype=text_dtype)
    except FvAccelError:
        raise  # already one line naming the culprit (e.g. a missing tokenizer/)
    except Exception as exc:
        raise ConfigError(f"{what}: cannot load the tokenizer and text encoder of {key} {source!r} "
                          f"({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]})") from None
    embeddings = encoders.encode_text(list(prompts))
    del encoders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return embeddings


def pad_embeddings(embeddings: list[torch.Tensor], text_len: int) -> torch.Tensor:
    """``[L_i, D]`` per prompt → ``[B, text_len, D]`` float32, zero-padded (and cut at ``text_len``) as the
    dataset pads stored embeddings (``fv_accel.data.dataset.collate_latents``)."""
    dim = embeddings[0].shape[1]
    out = torch.zeros(len(embeddings), text_len, dim)
    for i, emb in enumerate(embeddings):
        n = min(text_len, emb.shape[0])
        out[i, :n] = emb[:n].float()
    return out
