"""Push the model to the Hugging Face Hub while training runs (``hub.repo_id``), never blocking a step.

On rank 0 only. When the loop has written a new complete checkpoint (and ``hub.push_every_checkpoint`` is
set), the hook hard-links that checkpoint into a private staging directory (a handful of files: it survives the
checkpoint's later deletion by ``keep_last``) and hands it to a background thread, which runs
``python -m fv_accel.export ... --push-to-hub`` in a subprocess: export + upload cost the training process
no Python time (no GIL), only a core and the export's memory (about one copy of the model in bf16: the
export reads each tensor straight into its export dtype, see :mod:`fv_accel.export`). At most one push runs
at a time; checkpoints that arrive while one is running collapse into "the newest one", pushed next. At the end of training the final
checkpoint is pushed and the callback waits for it. A failed push is logged with the command that retries it;
it never fails the training run (the checkpoints and the local export are intact).

The pushed role is the EMA of the student when the run keeps one, else the student.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fv_accel.callbacks.base import Callback
from fv_accel.checkpoint import layout, list_checkpoints

if TYPE_CHECKING:
    from fv_accel.config import RunConfig
    from fv_accel.trainer import Trainer

logger = logging.getLogger(__name__)


def _link_checkpoint(src: Path, dst: Path) -> bool:
    """Hard-link a checkpoint's files into ``dst``; False (and nothing left) where the filesystem cannot link:
    copying gigabytes here would stall the training step."""
    dst.mkdir(parents=True)
    try:
        for path in src.iterdir():  # DCP checkpoints are flat: shards, .metadata, metadata.json, RNG files
            if not layout.is_random_state_file(path.name):
                os.link(path, dst / path.name)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        return False
    return True


def ema_started(checkpoint: Path) -> bool:
    """Whether the checkpoint's EMA has had its first update (before that it holds no average to export)."""
    try:
        return layout.read_ema_initialized(checkpoint)  # no collectives: safe off the main thread
    except Exception:
        return False


class HubPushCallback(Callback):
    name = "hub_push"

    def __init__(
        self,
        *,
        repo_id: str,
        private: bool,
        push_every_checkpoint: bool,
        output_dir: str | os.PathLike[str],
        dtype: str = "bf16",
        revision: str | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.private = private
        self.push_every_checkpoint = push_every_checkpoint
        self.output_dir = Path(output_dir)
        self.dtype = dtype
        self.revision = revision
        self.export_dir = self.output_dir / "hub_export"
        self.staging_dir = self.output_dir / "hub_push_staging"
        self.log_path = self.output_dir / "logs" / "hub_push.log"
        self.role = "student"
        self.enabled = False
        self.last_submitted_step = -1
        self.pushed_steps: list[int] = []
        self.failed_steps: list[int] = []
        self._pending: tuple[int, Path] | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    @property
    def queued_step(self) -> int | None:
        """The step of the checkpoint waiting for the push thread (not started yet), else None."""
        with self._cond:
            return self._pending[0] if self._pending is not None else None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> HubPushCallback:
        assert cfg.hub.repo_id
        return cls(repo_id=cfg.hub.repo_id, private=cfg.hub.private,
                   push_every_checkpoint=cfg.hub.push_every_checkpoint,
                   output_dir=cfg.training.checkpoint.output_dir)

    # -- hooks ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self.enabled = bool(trainer.is_main)
        if not self.enabled:
            return
        self.role = "ema" if trainer.callbacks.get("ema") is not None else "student"
        shutil.rmtree(self.staging_dir, ignore_errors=True)  # leftovers of a killed run
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Resuming must not re-push checkpoints that already existed when this run started.
        found = list_checkpoints(self.output_dir)
        self.last_submitted_step = found[-1][0] if found else -1
        self._worker = threading.Thread(target=self._run, name="hub-push", daemon=True)
        self._worker.start()

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.push_every_checkpoint:
            self._maybe_submit_newest()

    def on_validation(self, trainer: Trainer, step: int) -> None:
        # The loop saves a step's checkpoint right before this hook: push it without waiting a step.
        if self.push_every_checkpoint:
            self._maybe_submit_newest()

    def on_train_end(self, trainer: Trainer, step: int) -> None:
        if not self.enabled:
            return
        self._maybe_submit_newest()
        logger.info("waiting for the final Hub push to %s ...", self.repo_id)
        self.wait()
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        if self.failed_steps and (not self.pushed_steps or self.failed_steps[-1] > self.pushed_steps[-1]):
            logger.error("the final Hub push failed; see %s for the command that retries it", self.log_path)
        elif self.pushed_steps:
            logger.info("pushed step %d to https://huggingface.co/%s", self.pushed_steps[-1], self.repo_id)

    # -- background pushes ---------------------------------------------------------------------------------
    def _maybe_submit_newest(self) -> None:
        if not self.enabled:
            return
        found = list_checkpoints(self.output_dir)
        if not found or found[-1][0] <= self.last_submitted_step:
            return
        step, path = found[-1]
        self.last_submitted_step = step
        snapshot = self.staging_dir / layout.checkpoint_dir_name(step)
        try:
            staged = _link_checkpoint(path, snapshot)
        except OSError as exc:
            logger.error("cannot stage %s for the Hub push: %s", path, exc)
            return
        if not staged:
            logger.warning("cannot hard-link %s for the Hub push; pushing from it directly (it must survive "
                           "training.checkpoint.keep_last until the push has read it)", path)
            snapshot = path
        with self._cond:
            if self._pending is not None:  # not started yet: the newer checkpoint replaces it
                self._discard(self._pending[1])
            self._pending = (step, snapshot)
            self._cond.notify_all()

    def _discard(self, snapshot: Path) -> None:
        if snapshot.parent == self.staging_dir:  # never a real checkpoint
            shutil.rmtree(snapshot, ignore_errors=True)

    def wait(self) -> None:
        """Block until no push is pending or running."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and not self._busy)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None)
                assert self._pending is not None  # the wait's predicate, under the same lock
                step, snapshot = self._pending
                self._pending = None
                self._busy = True
            try:
                ok = self.push(step, snapshot)
                (self.pushed_steps if ok else self.failed_steps).append(step)
            except Exception:  # the training run must not die with its pusher
                logger.exception("Hub push of step %d crashed", step)
                self.failed_steps.append(step)
            finally:
                self._discard(snapshot)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def command(self, checkpoint: Path, role: str) -> list[str]:
        cmd = [sys.executable, "-m", "fv_accel.export", "--checkpoint", str(checkpoint), "--role", role,
               "--output", str(self.export_dir), "--dtype", self.dtype, "--push-to-hub", self.repo_id]
        if self.private:
            cmd.append("--private")
        if self.revision:
            cmd += ["--revision", self.revision]
        return cmd

    def push(self, step: int, snapshot: Path) -> bool:
        """Export ``snapshot`` and upload it (a subprocess; runs on the push thread). Returns success."""
        # Until its first update (callbacks.ema.start_step) the EMA is not an average yet: push the student.
        role = "ema" if self.role == "ema" and ema_started(snapshot) else "student"
        cmd = self.command(snapshot, role)
        with open(self.log_path, "a") as log:
            log.write(f"--- step {step}: {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._child_env(), check=False)
        if proc.returncode == 0:
            logger.info("pushed step %d to %s", step, self.repo_id)
            return True
        retry = shlex.join(["python", "recipes/export.py", *cmd[3:]]).replace(
            str(snapshot), str(self.output_dir / layout.checkpoint_dir_name(step)))
        logger.error("Hub push of step %d to %s failed (exit %d; details in %s). The export in %s is intact; "
                     "retry with: %s", step, self.repo_id, proc.returncode, self.log_path, self.export_dir, retry)
        return False

    @staticmethod
    def _child_env() -> dict[str, Any]:
        env = dict(os.environ)
        # The child is a plain single process: never let it think it is a rank of this job.
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK"):
            env.pop(key, None)
        env.setdefault("OMP_NUM_THREADS", "1")  # leave the cores to training
        return env
