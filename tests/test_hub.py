"""Pushing to the Hub through the real huggingface_hub client, against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, run_python
from hub_server import FakeHub
from huggingface_hub import ModelCard

TOKEN = "hf_fvAccelTestToken0123456789abcdef"


def hub_env(hub: FakeHub) -> dict[str, str]:
    # Offline mode off for this process tree only: the sole endpoint is the local fake Hub.
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(Path(hub.home))}


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 2-step run that pushes every checkpoint (save_steps=1) to ``me/live`` on a fake Hub."""
    root = tmp_path_factory.mktemp("hubrun")
    with FakeHub() as hub:
        hub.home = str(root / "hf_home")
        out = root / "run"
        args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
                f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
                "--training.loop.max_train_steps=2", "--training.data.train_batch_size=4",
                "--training.checkpoint.save_steps=1", "--hub.repo_id=me/live", "--hub.push_every_checkpoint=true",
                "--callbacks.ema.decay=0.5"]
        proc = run_python(args, cwd=REPO, **hub_env(hub))
        yield hub, out, proc


def test_training_pushes_checkpoints_in_background_and_final_model(hub_run) -> None:  # type: ignore[no-untyped-def]
    hub, out, proc = hub_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    repo = hub.repos["me/live"]
    assert repo.private  # hub.private defaults to true
    # Step 1's push may still be running when step 2 is saved; the newest waiting checkpoint wins, and the
    # final model is always pushed (and awaited) before the process exits.
    assert 1 <= len(repo.commits) <= 2
    files = repo.branches["main"]
    assert files == tree_bytes(out / "hub_export")
    assert set(files) == {"README.md", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"}
    card = files["README.md"].decode()
    assert "training step **2**" in card and "fv-accel" in card
    assert "the EMA of the student (decay 0.5)" in card  # a run with an EMA pushes the EMA
    log = (out / "logs" / "hub_push.log").read_text()
    assert "--role ema --output" in log and "--push-to-hub me/live --private" in log
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    for text in (proc.stdout, proc.stderr, log, *(p.read_text(errors="replace") for p in out.rglob("*.json*"))):
        assert TOKEN not in text
    assert not (out / "hub_push_staging").exists()


def test_cli_push_retries_transient_failures(hub_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, run, _ = hub_run
    with FakeHub() as hub:
        hub.home = str(tmp_path / "hf_home")
        hub.fail_next("create", 503)  # fv_accel's own retry (create_repo has none)
        hub.fail_next("commit", 500)  # retried inside huggingface_hub
        out = tmp_path / "export"
        proc = run_python(["recipes/export.py", "--checkpoint", str(run), "--role", "student", "--output", str(out),
                           "--push-to-hub", "org/distilled", "--private"], cwd=REPO, **hub_env(hub))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [r.status for r in hub.calls("create")] == [503, 200]
        assert [r.status for r in hub.calls("commit")] == [500, 200]
        assert "retrying in 1.0s" in proc.stderr
        repo = hub.repos["org/distilled"]
        assert repo.private
        assert repo.branches["main"] == tree_bytes(out)
        card = ModelCard(repo.branches["main"]["README.md"].decode())
        assert set(card.data.tags) >= {"fv-accel", "diffusers", "text-to-video", "distillation"}
        assert 'from_pretrained("org/distilled", subfolder="transformer"' in card.text
        assert "pushed to org/distilled@main" in proc.stdout

        # A second push to a branch of a new public repo.
        proc = run_python(["recipes/export.py", "--checkpoint", str(run), "--role", "student", "--output", str(out),
                           "--push-to-hub", "org/public", "--revision", "dev"], cwd=REPO, **hub_env(hub))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not hub.repos["org/public"].private
        assert hub.repos["org/public"].branches["dev"] == tree_bytes(out)
        assert hub.repos["org/public"].branches["main"] == {}
        assert TOKEN not in proc.stdout + proc.stderr


def test_failed_push_keeps_export_and_says_how_to_retry(hub_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, run, _ = hub_run
    with FakeHub() as hub:
        hub.home = str(tmp_path / "hf_home")
        hub.fail_next("create", 403, echo_auth=True)  # not transient; the server's message quotes the token
        out = tmp_path / "export"
        proc = run_python(["recipes/export.py", "--checkpoint", str(run), "--role", "student", "--output", str(out),
                           "--push-to-hub", "org/denied"], cwd=REPO, **hub_env(hub))
    assert proc.returncode == 1
    assert len(hub.calls("create")) == 1  # a 403 is not retried
    assert TOKEN not in proc.stdout + proc.stderr
    err = proc.stderr
    assert "HTTP 403" in err and "org/denied" in err and f"local export at {out} is intact" in err
    expected = (f"Retry with: python recipes/export.py --checkpoint {run / 'checkpoint-2'} --role student "
                f"--output {out} --dtype bf16 --push-to-hub org/denied")
    assert expected in err
    assert (out / "transformer" / "config.json").is_file() and (out / "README.md").is_file()


def _fake_checkpoint(output_dir: Path, step: int) -> None:
    ckpt = output_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"dcp")
    (ckpt / "__0_0.distcp").write_bytes(b"x" * 10)
    (ckpt / "metadata.json").write_text(json.dumps({"step": step}))


def test_push_callback_never_blocks_and_coalesces(tmp_path: Path) -> None:
    from fv_accel.callbacks import CallbackList
    from fv_accel.callbacks.hub_push import HubPushCallback

    out = tmp_path / "run"
    _fake_checkpoint(out, 1)  # existed before this run: a resumed run must not push it again
    cb = HubPushCallback(repo_id="me/x", private=True, push_every_checkpoint=True, output_dir=out)
    release = threading.Event()
    started: list[tuple[int, list[str]]] = []

    def slow_push(step: int, snapshot: Path) -> bool:  # stands in for the export+upload subprocess
        started.append((step, sorted(p.name for p in snapshot.iterdir())))
        release.wait(10)
        return step != 4

    cb.push = slow_push  # type: ignore[method-assign]
    trainer = SimpleNamespace(is_main=True, callbacks=CallbackList([cb]))
    cb.on_train_start(trainer)  # type: ignore[arg-type]
    cb.on_validation(trainer, 1)  # type: ignore[arg-type]
    assert started == [] and cb.queued_step is None
    timings = []
    for step in (2, 3, 4):
        _fake_checkpoint(out, step)
        t0 = time.perf_counter()
        cb.on_validation(trainer, step)  # type: ignore[arg-type]
        timings.append(time.perf_counter() - t0)
        time.sleep(0.05)
    assert max(timings) < 0.5  # staging is a few hard links, the push itself runs elsewhere
    assert [s for s, _ in started] == [2]  # step 2 is being pushed; 3 was superseded by 4 while waiting
    assert cb.queued_step == 4
    assert not (out / "hub_push_staging" / "checkpoint-3").exists()
    # The snapshot is hard links of the checkpoint, so retention may delete the original meanwhile.
    assert (out / "hub_push_staging" / "checkpoint-4" / "__0_0.distcp").stat().st_nlink == 2
    release.set()
    cb.on_train_end(trainer, 4)  # type: ignore[arg-type]
    assert [s for s, _ in started] == [2, 4]
    assert started[1][1] == [".metadata", "__0_0.distcp", "metadata.json"]
    assert cb.pushed_steps == [2] and cb.failed_steps == [4]
    assert not (out / "hub_push_staging").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3",
                                                     "checkpoint-4", "logs"]


class _RecordingApi:
    """Stands in for ``HfApi`` of huggingface_hub 2.x (no ``upload_large_folder``): records the calls."""

    endpoint = "http://hub.test"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs: object) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: object) -> SimpleNamespace:
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url="http://hub.test/commit/1")


def _large_folder_signature(*, repo_id: str, folder_path: str, repo_type: str, revision: str | None = None,
                            private: bool | None = None, allow_patterns: object = None,
                            ignore_patterns: object = None, num_workers: int | None = None,
                            print_report: bool = True, print_report_every: int = 60) -> None:
    """The keyword-only parameters of ``HfApi.upload_large_folder`` in huggingface_hub 0.25–1.x."""


class _RecordingLargeApi(_RecordingApi):
    """``HfApi`` of huggingface_hub 0.25 to 1.x: also has ``upload_large_folder`` (keyword arguments only)."""

    def upload_large_folder(self, **kwargs: object) -> None:
        _large_folder_signature(**kwargs)  # a keyword the real method does not take is a TypeError
        self.calls.append(("upload_large_folder", kwargs))


def test_large_exports_use_upload_large_folder_where_the_client_has_it(tmp_path: Path) -> None:
    from fv_accel.hub import push_folder

    folder = tmp_path / "export"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "README.md").write_bytes(b"r" * 24)  # 1024 bytes in all

    api = _RecordingLargeApi()
    result = push_folder(folder, "me/big", private=True, revision="dev", large_folder_bytes=1024, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_large_folder"]
    assert api.calls[-1][1] == {"repo_id": "me/big", "folder_path": str(folder), "repo_type": "model",
                                "revision": "dev", "private": True}
    assert result.commit_url == "http://hub.test/me/big/tree/dev"

    api = _RecordingLargeApi()  # one byte under the threshold: one commit, as before
    push_folder(folder, "me/big", large_folder_bytes=1025, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]

    api = _RecordingApi()  # a client without upload_large_folder (huggingface_hub 2.x): upload_folder resumes
    push_folder(folder, "me/big", large_folder_bytes=0, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]


def test_large_export_push_with_the_installed_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Threshold 0 (every export is "large") through the installed huggingface_hub against the fake Hub."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    from fv_accel.hub import push_folder

    if hasattr(HfApi, "upload_large_folder"):
        pytest.skip(f"huggingface_hub {huggingface_hub.__version__} has upload_large_folder, whose LFS batch "
                    "endpoints tests/hub_server.py does not implement")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "export"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text('{"a": 1}')
    (folder / "README.md").write_text("card")
    with FakeHub() as hub:
        result = push_folder(folder, "me/large", large_folder_bytes=0, api=HfApi(endpoint=hub.url, token=TOKEN))
        assert hub.repos["me/large"].branches["main"] == tree_bytes(folder)
        assert result.commit_url.startswith(hub.url)
