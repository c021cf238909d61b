"""Per-rank random-state files (fv_accel/checkpoint/manager.py): tensors and plain data, read without pickle.

The oracle for a round trip is the generators themselves: the draws made right after capturing must be drawn
again after restoring, bit for bit, whatever was drawn in between.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fv_accel.callbacks import CallbackList
from fv_accel.checkpoint.manager import (
    ALLOW_PICKLE_RNG_ENV,
    CheckpointManager,
    capture_rng_state,
    load_rng_file,
    restore_rng_state,
    save_rng_file,
)
from fv_accel.errors import CheckpointError


class GeneratorMethod:
    """The random-state half of a TrainingMethod: two generators, as the real methods keep."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(11)
        self.choice_generator = torch.Generator().manual_seed(12)

    def random_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "choice_generator": self.choice_generator.get_state()}

    def load_random_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.choice_generator.set_state(state["choice_generator"])


def _draws(method: GeneratorMethod) -> list[Any]:
    # gauss draws cover python's gauss_next and numpy's cached gaussian, which a state copy can forget.
    return [random.random(), random.gauss(0.0, 1.0), random.getrandbits(64), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(4).tolist(), torch.randn(2, generator=method.generator).tolist(),
            torch.randint(0, 1 << 30, (3,), generator=method.choice_generator).tolist()]


def _disturb(method: GeneratorMethod) -> None:
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    method.generator.manual_seed(99)
    method.choice_generator.manual_seed(99)


@pytest.fixture
def method() -> GeneratorMethod:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    m = GeneratorMethod()
    # An odd number of gaussians leaves a cached one in python (gauss_next) and numpy (has_gauss = 1).
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    return m


def _manager(out: Path, method: GeneratorMethod) -> CheckpointManager:
    return CheckpointManager(output_dir=out, method=method, data=None,  # type: ignore[arg-type]
                             callbacks=CallbackList(), config_dump={})


def test_round_trip_restores_every_generator_exactly(method: GeneratorMethod, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    save_rng_file(capture_rng_state(method), ckpt / "random_state.rank0.pt")  # type: ignore[arg-type]
    expected = _draws(method)
    _disturb(method)
    assert _draws(method) != expected
    _manager(tmp_path, method).restore_random_state(ckpt)
    assert _draws(method) == expected


def test_file_is_tensors_and_plain_data(method: GeneratorMethod, tmp_path: Path) -> None:
    path = tmp_path / "random_state.rank0.pt"
    save_rng_file(capture_rng_state(method), path)  # type: ignore[arg-type]
    # torch's own restricted loader reads it: nothing in it needs pickle's arbitrary globals.
    state = torch.load(path, weights_only=True)
    words = random.getstate()[1]
    assert state["python"]["words"].tolist() == list(words) and state["python"]["gauss_next"] is not None
    assert state["numpy"]["keys"].tolist() == np.random.get_state()[1].tolist()
    assert torch.equal(state["method"]["generator"], method.generator.get_state())
    assert torch.equal(state["torch"], torch.get_rng_state())


class _Evil:
    """Unpickling this runs os.mkdir(marker): a stand-in for any code a foreign checkpoint could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_is_refused_without_running(method: GeneratorMethod, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_PICKLE_RNG_ENV, raising=False)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    marker = tmp_path / "pwned"
    rng_file = ckpt / "random_state.rank0.pt"
    rng_file.write_bytes(pickle.dumps({"python": _Evil(marker)}))
    with pytest.raises(Exception) as info:  # noqa: B017 - which exception is asserted after the marker
        _manager(tmp_path, method).restore_random_state(ckpt)
    assert not marker.exists()  # the pickle's code did not run
    assert isinstance(info.value, CheckpointError)
    assert str(rng_file) in str(info.value) and f"{ALLOW_PICKLE_RNG_ENV}=1" in str(info.value)
    # The same object inside torch.save's container: refused by weights_only, with or without the opt-in.
    with open(rng_file, "wb") as fh:
        torch.save({"format": 1, "python": _Evil(marker)}, fh)
    monkeypatch.setenv(ALLOW_PICKLE_RNG_ENV, "1")
    with pytest.raises(Exception) as info:  # noqa: B017
        _manager(tmp_path, method).restore_random_state(ckpt)
    assert not marker.exists()
    assert isinstance(info.value, CheckpointError) and "random_state.rank0.pt" in str(info.value)


def _write_old_format(method: GeneratorMethod, path: Path) -> None:
    """What fv_accel wrote before the format: pickle.dump of the raw getstate() objects."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "method": method.random_state()}
    with open(path, "wb") as fh:
        pickle.dump(state, fh)


def test_old_pickle_file_loads_only_with_the_opt_in(method: GeneratorMethod, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    _write_old_format(method, ckpt / "random_state.rank0.pt")
    expected = _draws(method)
    _disturb(method)
    monkeypatch.delenv(ALLOW_PICKLE_RNG_ENV, raising=False)
    with pytest.raises(CheckpointError, match="old pickle format"):
        _manager(tmp_path, method).restore_random_state(ckpt)
    monkeypatch.setenv(ALLOW_PICKLE_RNG_ENV, "1")
    _manager(tmp_path, method).restore_random_state(ckpt)
    assert _draws(method) == expected


def test_capture_restore_in_process_without_a_file(method: GeneratorMethod) -> None:
    state = capture_rng_state(method)  # type: ignore[arg-type]
    expected = _draws(method)
    _disturb(method)
    restore_rng_state(method, state)  # type: ignore[arg-type]
    assert _draws(method) == expected


def test_damaged_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "random_state.rank0.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="random_state.rank0.pt"):
        load_rng_file(path)
