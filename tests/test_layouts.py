"""Layouts beyond one flat FSDP group, run for real on CPU processes over gloo: a two-node HSDP launch on
loopback (two ``accelerate launch`` of 2 processes each), context parallel 2 × dp_shard 2 on 4 processes, and a
checkpoint resumed across layouts (cp = 2 ↔ cp = 1).

Every rank dumps its local parameter shards and the dataset rows it drew (``tests/dist_scripts/layout_spy.py``).
The oracles are independent of the layout code: full tensors are rebuilt here by concatenating the shards by
hand (FSDP2 shards dim 0 as ``torch.chunk`` does) and compared with the ``init_from`` safetensors file read
with safetensors, or with the full tensors the saving run held; replicas are compared shard by shard; rows are
compared as sets."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from conftest import ACCELERATE, CPU_2PROC, CPU_CP2_2PROC, REPO, free_port, subprocess_env
from safetensors.torch import load_file
from test_dmd2_distributed import write_recipe
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

CPU_HSDP_2NODE = str(REPO / "accelerate_configs" / "cpu_hsdp_2node.yaml")
SPY = "tests/dist_scripts/layout_spy.py"


def _launch(launcher_args: list[str], script_args: list[str], *, spy: Path, log: Path,
            config: str) -> subprocess.Popen[str]:
    spy.mkdir(parents=True, exist_ok=True)
    cmd = [ACCELERATE, "launch", "--config_file", config, *launcher_args, SPY, *script_args]
    with log.open("w") as out:  # a file, not a pipe: two launchers must not block on a full pipe
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(FVR_SPY_DIR=str(spy)), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen[str]], logs: list[Path], timeout: float = 300) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log.read_text()[-4000:]


def run_two_nodes(script_args: list[str], *, spy: Path, logs: Path) -> None:
    """The HSDP config launched twice, as machine 0 and machine 1, on one rendezvous at 127.0.0.1."""
    port = str(free_port())
    logs.mkdir(parents=True, exist_ok=True)
    files = [logs / f"node{m}.log" for m in (0, 1)]
    procs = [_launch(["--machine_rank", str(m), "--main_process_ip", "127.0.0.1", "--main_process_port", port],
                     script_args, spy=spy, log=files[m], config=CPU_HSDP_2NODE) for m in (0, 1)]
    _wait(procs, files)


def run_one_node(script_args: list[str], *, spy: Path, log: Path, config: str,
                 launcher_args: tuple[str, ...] = ()) -> str:
    proc = _launch([*launcher_args, "--main_process_port", str(free_port())], script_args, spy=spy, log=log,
                   config=config)
    _wait([proc], [log])
    return log.read_text()


def _dumps(spy: Path, when: str) -> list[dict[str, Any]]:
    return [torch.load(path, weights_only=True) for path in sorted(spy.glob(f"rank*_{when}.pt"),
                                                                        key=lambda p: int(p.name[4:].split("_")[0]))]


def full_tensors(dumps: list[dict[str, Any]], *, replica: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Each role's full parameters from the ranks of one replica: their shards concatenated along dim 0 in the
    order of their coordinate on the sharding dimension (the mesh's last)."""
    if "dp_replicate" in dumps[0]["mesh_dim_names"]:
        dumps = [d for d in dumps if d["coordinate"][0] == replica]
    dumps = sorted(dumps, key=lambda d: d["coordinate"][-1])
    return {role: {name: torch.cat([d["params"][role][name] for d in dumps]) for name in params}
            for role, params in dumps[0]["params"].items()}


def _rows(spy: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(spy.glob("rank*_rows.json"),
                                                       key=lambda p: int(p.name[4:].split("_")[0]))]


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_equal_weights(got: dict[str, dict[str, torch.Tensor]], want: dict[str, torch.Tensor], role: str,
                          *, prefix: str = "transformer.") -> None:
    assert set(got[role]) == {prefix + k for k in want}, role
    for name, tensor in want.items():
        assert torch.equal(got[role][prefix + name], tensor.to(got[role][prefix + name].dtype)), f"{role}.{name}"


def _dmd2_recipe(tmp_path: Path, toy_root: Path, steps: int) -> Path:
    recipe = write_recipe(tmp_path / "dmd2.yaml", toy_root, tmp_path / "unused", generator_update_interval=1)
    cfg = yaml.safe_load(recipe.read_text())
    cfg["training"]["loop"]["max_train_steps"] = steps
    recipe.write_text(yaml.safe_dump(cfg))
    return recipe


@pytest.mark.distributed
@pytest.mark.slow
def test_two_node_hsdp_trains_checkpoints_and_resumes(toy_root: Path, tmp_path: Path) -> None:
    """dp_replicate 2 (across the two launches) × dp_shard 2 (within each): the roles filled on meta hold the
    ``init_from`` file's weights (``sharded_load.local_index`` on (Replicate, Shard) placements); the replicas
    hold identical shards after training and after a second two-node launch resumed from ``latest``; the 4
    data ranks draw disjoint rows, and the resumed launch goes on with rows not drawn before."""
    out = tmp_path / "run"
    recipe = _dmd2_recipe(tmp_path, toy_root, steps=2)
    args = ["distill", "--config", str(recipe), f"--training.checkpoint.output_dir={out}"]
    run_two_nodes(args, spy=tmp_path / "spy1", logs=tmp_path / "logs1")
    assert "layout: 4 data rank(s) x context parallel 1" in (tmp_path / "logs1" / "node0.log").read_text()

    start = _dumps(tmp_path / "spy1", "start")
    assert [d["mesh_dim_names"] for d in start] == [("dp_replicate", "dp_shard_cp")] * 4
    # machine 0 runs ranks 0, 1 and machine 1 ranks 2, 3: replicate across machines, shard within
    assert [d["coordinate"] for d in start] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    init = load_file(toy_root / "init" / "transformer" / "diffusion_pytorch_model.safetensors")
    for replica in (0, 1):
        loaded = full_tensors(start, replica=replica)
        for role in ("student", "teacher", "critic"):  # the critic starts from the teacher's init_from
            _assert_equal_weights(loaded, init, role)

    def assert_replicas_identical(dumps: list[dict[str, Any]]) -> None:
        for a, b in ((0, 2), (1, 3)):
            for role, params in dumps[a]["params"].items():
                for name, shard in params.items():
                    assert torch.equal(shard, dumps[b]["params"][role][name]), f"ranks {a}/{b}: {role}.{name}"

    end = _dumps(tmp_path / "spy1", "end")
    assert_replicas_identical(end)
    assert not torch.equal(end[0]["params"]["student"]["transformer.proj_out.weight"],
                           start[0]["params"]["student"]["transformer.proj_out.weight"])  # it did train
    ckpt = out / "checkpoint-2"
    assert (ckpt / ".metadata").is_file() and (ckpt / "metadata.json").is_file()
    assert sorted(p.name for p in ckpt.glob("random_state.rank*.pt")) == [f"random_state.rank{r}.pt"
                                                                          for r in range(4)]
    rows1 = _rows(tmp_path / "spy1")
    assert [r["data_rank"] for r in rows1] == [0, 1, 2, 3]

    run_two_nodes([*args, "--training.loop.max_train_steps=4", "--training.checkpoint.resume_from_checkpoint=latest"],
                  spy=tmp_path / "spy2", logs=tmp_path / "logs2")
    assert "resumed from" in (tmp_path / "logs2" / "node0.log").read_text()
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / ".metadata").is_file()
    # the resumed launch loaded what the first one ended with, on every rank
    loaded = _dumps(tmp_path / "spy2", "loaded")
    for got, saved in zip(loaded, end, strict=True):
        for role in ("student", "critic"):
            for name, shard in saved["params"][role].items():
                assert torch.equal(got["params"][role][name], shard), f"{role}.{name}"
    assert_replicas_identical(_dumps(tmp_path / "spy2", "end"))
    rows2 = _rows(tmp_path / "spy2")
    every_row = [i for r in (*rows1, *rows2) for batch in r["rows"] for i in batch]
    assert len(every_row) == 4 * 4 * 2 and len(set(every_row)) == len(every_row)  # one epoch: no row twice


def _finetune_args(toy_root: Path, out: Path, steps: int) -> list[str]:
    return ["finetune", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.data.train_batch_size=2", f"--training.loop.max_train_steps={steps}",
            "--training.tracker.backends=[]"]


def _assert_cp_rows(rows: list[dict[str, Any]], *, cp: int) -> None:
    """CP peers (consecutive ranks) drew identical rows at every step; the data ranks drew disjoint rows."""
    per_data_rank: dict[int, list[list[int]]] = {}
    for r in rows:
        seen = per_data_rank.setdefault(r["data_rank"], r["rows"])
        assert seen == r["rows"], f"data rank {r['data_rank']}: CP peers drew different rows"
    assert len(per_data_rank) == len(rows) // cp
    drawn = [i for batches in per_data_rank.values() for batch in batches for i in batch]
    assert len(set(drawn)) == len(drawn), "two data ranks drew the same row"


@dataclass(frozen=True)
class Stage:
    """One launch of the context-parallel chain: its spy dumps, log, the metrics file and the step it ended at."""

    spy: Path
    log: str
    metrics: list[dict[str, Any]]
    step: int


CP_CHAIN = (("cp2", 2), ("cp1", 4), ("cp2", 6), ("cp2x4", 8))
"""The chain's launches as (layout, steps at its end): each after the first resumes from ``latest``, so every
launch but the first is the second half of a test and the middle ones the first half of the next as well."""


@pytest.fixture(scope="module")
def cp_chain(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One finetune output dir written by four launches in turn: cp = 2 (1 data rank) → cp = 1 (2 data ranks)
    → cp = 2 → cp 2 × dp_shard 2 on 4 processes. Each resume reads the checkpoint the launch before wrote, so
    four launches give the two cross-layout directions and the 4-process layout (instead of eight)."""
    tmp = tmp_path_factory.mktemp("cp_chain")
    out = tmp / "run"
    stages: list[Stage] = []
    for i, (layout, steps) in enumerate(CP_CHAIN):
        spy = tmp / f"spy{i}"
        config, launcher = CPU_2PROC if layout == "cp1" else CPU_CP2_2PROC, ()
        if layout == "cp2x4":
            launcher = ("--num_processes", "4", "--parallelism_config_dp_shard_size", "2")
        args = [*_finetune_args(toy_root, out, steps), "--training.checkpoint.keep_last=0"]  # keep each saver's
        if i:
            args.append("--training.checkpoint.resume_from_checkpoint=latest")
        log = run_one_node(args, spy=spy, log=tmp / f"run{i}.log", config=config, launcher_args=launcher)
        stages.append(Stage(spy=spy, log=log, metrics=_metrics(out), step=steps))
    return {"out": out, "stages": stages}


def _drawn(rows: list[dict[str, Any]]) -> list[int]:
    """The rows every data rank drew (one CP peer's list per data rank)."""
    return [i for d in {x["data_rank"]: x["rows"] for x in rows}.values() for batch in d for i in batch]


@pytest.mark.distributed
@pytest.mark.slow
def test_cp2_dp_shard2_four_processes_checkpoints_and_resumes(toy_root: Path, cp_chain: dict[str, Any]) -> None:
    """cp 2 × dp_shard 2 on 4 processes (the cp = 2 config with 4 processes and dp_shard 2 on the command line),
    the chain's last launch: 2 data ranks of 2 CP peers each; the student filled from ``init_from`` on this mesh
    holds the init file's weights; it resumes the cp = 2 launch's checkpoint (weights equal the saver's, new
    rows) and its own checkpoint holds the weights it ended with."""
    out, saver, stage = cp_chain["out"], cp_chain["stages"][-2], cp_chain["stages"][-1]
    assert "layout: 2 data rank(s) x context parallel 2" in stage.log
    rows = _rows(stage.spy)
    assert [(r["data_rank"], r["cp_rank"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _assert_cp_rows(rows, cp=2)
    init = load_file(toy_root / "init" / "transformer" / "diffusion_pytorch_model.safetensors")
    _assert_equal_weights(full_tensors(_dumps(stage.spy, "start")), init, "student")
    saved = full_tensors(_dumps(saver.spy, "end"))
    _assert_equal_weights(full_tensors(_dumps(stage.spy, "loaded")),
                          {k.removeprefix("transformer."): v for k, v in saved["student"].items()}, "student")
    assert [r["step"] for r in stage.metrics] == list(range(1, stage.step + 1))
    earlier = {i for s in cp_chain["stages"][:-1] for i in _drawn(_rows(s.spy))}
    assert len(_drawn(rows)) == 2 * 2 * 2 and not set(_drawn(rows)) & earlier, "rows of the epoch drawn again"

    # its own checkpoint, read back in this process by DCP: the full weights the 4 ranks ended with
    ckpt = out / f"checkpoint-{stage.step}"
    assert sorted(p.name for p in ckpt.glob("random_state.rank*.pt")) == [f"random_state.rank{r}.pt"
                                                                          for r in range(4)]
    entries = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    flat = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in entries.items()
            if k.startswith("roles.student.") and isinstance(v, TensorStorageMetadata)}
    dcp.load(flat, checkpoint_id=str(ckpt), no_dist=True)
    end = full_tensors(_dumps(stage.spy, "end"))["student"]
    assert {k.removeprefix("roles.student.") for k in flat} == set(end)
    for name, tensor in end.items():
        assert torch.equal(flat["roles.student." + name], tensor), name


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("first,second", [("cp2", "cp1"), ("cp1", "cp2")])
def test_resume_across_context_parallel_layouts(first: str, second: str, cp_chain: dict[str, Any]) -> None:
    """A checkpoint written with cp = 2 (1 data rank) resumes with cp = 1 (2 data ranks, plain FSDP) and the
    other way (the chain's launches 1 → 2 and 2 → 3): every role's full weights after the load equal the
    saver's, the data position carries over (the epoch goes on with rows not drawn before, however many data
    ranks draw them), and each rank restores the random stream of its data rank: CP peers one and the same,
    two data ranks never the same one."""
    i = 0 if first == "cp2" else 1
    out, saver, stage = cp_chain["out"], cp_chain["stages"][i], cp_chain["stages"][i + 1]
    assert [CP_CHAIN[i][0], CP_CHAIN[i + 1][0]] == [first, second]
    assert ("layout: 1 data rank(s) x context parallel 2" in stage.log) == (second == "cp2")
    assert [r["step"] for r in stage.metrics] == list(range(1, stage.step + 1))
    end = full_tensors(_dumps(saver.spy, "end"))
    _assert_equal_weights(full_tensors(_dumps(stage.spy, "loaded")),
                          {k.removeprefix("transformer."): v for k, v in end["student"].items()}, "student")
    rows = [_rows(s.spy) for s in (saver, stage)]
    for r, cp in zip(rows, (2 if first == "cp2" else 1, 2 if second == "cp2" else 1), strict=True):
        _assert_cp_rows(r, cp=cp)
    drawn = [_drawn(r) for r in rows]
    assert len(drawn[1]) == 2 * 2 * (2 if second == "cp1" else 1)
    assert not set(drawn[0]) & set(drawn[1]), "the resumed run drew rows of the epoch again"

    # random streams: the saver's data rank of rank r was 0 under cp = 2 and r under cp = 1
    saved = {r: torch.load(out / f"checkpoint-{saver.step}" / f"random_state.rank{r}.pt",
                           weights_only=True)["method"] for r in range(2)}
    restored = [torch.load(stage.spy / f"rank{r}_rng.pt", weights_only=True) for r in range(2)]

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(restored[0], saved[0])
    if second == "cp2":  # both ranks are data rank 0: the saver's rank 0 stream, not rank 1's (data rank 1)
        assert same(restored[1], saved[0]), "CP peers restored different random streams"
    else:  # data rank 1 had no stream of its own under cp = 2; it must not take data rank 0's
        assert not same(restored[1], restored[0]), "two data ranks restored the same random stream"
