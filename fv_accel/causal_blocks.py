"""How a causal video model groups latent frames into blocks (shared by the ``wan_causal`` family and the
causal methods: ODE-init, diffusion forcing, self-forcing)."""

from __future__ import annotations


def block_sizes(num_frames: int, frames_per_block: int) -> list[int]:
    """Frames per block, in order. The FIRST block takes the remainder, as the published causal Wan models do
    (its first latent frame is the lone first video frame): 21 frames, blocks of 3 → 7 × 3; 8 → [2, 3, 3];
    2 → [2]."""
    if num_frames < 1 or frames_per_block < 1:
        raise ValueError(f"block_sizes: need num_frames ≥ 1 and frames_per_block ≥ 1, got {num_frames}, "
                         f"{frames_per_block}")
    full, rest = divmod(num_frames, frames_per_block)
    return ([rest] if rest else []) + [frames_per_block] * full


def block_starts(num_frames: int, frames_per_block: int) -> list[int]:
    """First frame of each block (same partition as :func:`block_sizes`)."""
    starts, start = [], 0
    for size in block_sizes(num_frames, frames_per_block):
        starts.append(start)
        start += size
    return starts


def frame_block_index(num_frames: int, frames_per_block: int) -> list[int]:
    """Block index of every frame: 8 frames in blocks of 3 → [0, 0, 1, 1, 1, 2, 2, 2]."""
    return [b for b, size in enumerate(block_sizes(num_frames, frames_per_block)) for _ in range(size)]
