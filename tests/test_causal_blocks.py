"""Block partition of causal video models: the remainder-first rule."""

import pytest

from fv_accel.causal_blocks import block_sizes, block_starts, frame_block_index
from fv_accel.config import CausalConfig, ModelConfig


@pytest.mark.parametrize(("frames", "per_block", "expected"), [
    (21, 3, [3] * 7), (8, 3, [2, 3, 3]), (2, 3, [2]), (3, 3, [3]), (7, 2, [1, 2, 2, 2]), (5, 1, [1] * 5)])
def test_block_sizes_remainder_first(frames: int, per_block: int, expected: list[int]) -> None:
    assert block_sizes(frames, per_block) == expected


def test_starts_and_frame_index_follow_the_sizes() -> None:
    assert block_starts(8, 3) == [0, 2, 5]
    assert frame_block_index(8, 3) == [0, 0, 1, 1, 1, 2, 2, 2]


def test_causal_config_rules() -> None:
    with pytest.raises(ValueError, match="applies to family 'wan_causal'"):
        ModelConfig(init_from="x", causal=CausalConfig())
    with pytest.raises(ValueError, match="sink_frames needs local_attn_frames"):
        CausalConfig(sink_frames=1)
    with pytest.raises(ValueError, match="must hold one block"):
        CausalConfig(num_frames_per_block=3, local_attn_frames=4, sink_frames=2)
    cfg = ModelConfig(init_from="x", family="wan_causal")
    assert cfg.causal_or_default.num_frames_per_block == 3
