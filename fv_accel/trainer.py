"""The recipe loop: the only place that orders accumulate → backward → clip → step.

Per step: fetch micro-batches → forward/backward each (the method's losses) → clip every clip target →
one host sync (rank-mean losses, global grad norms, non-finite and preemption flags) → step the optimizers
and schedulers the method returns → callbacks → log → checkpoint → validate. The loop never knows which
method runs. :meth:`Trainer.train_step` reads as those phases: ``_accumulate`` → ``_clip`` → ``_reduce`` (the
sync) → ``_maybe_skip_nonfinite`` → ``_step_optimizers`` → ``_metrics_row``.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from fv_accel.callbacks import CallbackList
from fv_accel.checkpoint import CheckpointManager
from fv_accel.config import RunConfig
from fv_accel.errors import NonFiniteError, Preempted
from fv_accel.flops import StepFlops, peak_tflops_per_device
from fv_accel.grad_clip import clip_grad_norm_
from fv_accel.methods import TrainingMethod
from fv_accel.runtime import Topology

logger = logging.getLogger(__name__)


class MetricsWriter:
    """``<output_dir>/metrics.jsonl``: one JSON object per optimizer step, main process only."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)  # a Trainer built without fv_accel.run too

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the interrupted run logged after the checkpoint it resumes from."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory of this process since the previous call: CUDA allocator peak (then reset), or on CPU the
    peak resident set size since the process started (the OS keeps no resettable peak)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"peak_mem_gib": peak / 2**30}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


class _StopSignal:
    """Remembers the preemption signals (``training.checkpoint.preempt_signals``); the loop acts on them at the
    next step boundary, on every rank together."""

    def __init__(self, signals: list[str]) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.received: int | None = None
        # Set only from the all-reduced flag of a step's host sync, so every rank sees the same value at the
        # same step. ``received`` is per rank and may flip between the sync and the step boundary on one rank
        # only; acting on it directly would send that rank alone into the collective save (a deadlock).
        self.agreed = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum


@dataclass
class _Accumulated:
    """What the micro-batches of one step left on the device (sums over micro-batches) and the host."""

    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_roles: dict[str, str] = field(default_factory=dict)
    flops: int | None = 0
    """None once a micro-batch reported no passes (no MFU for the step)."""
    data_wait: float = 0.0


@dataclass
class _Synced:
    """The step's host-synced scalars: rank means of losses and metrics, global grad norms, the stop flag."""

    values: dict[str, float]
    grad_norms: dict[str, float]
    preempt: bool


#: metrics shown in the progress bar besides the losses
_PROGRESS_KEYS = ("samples_per_s", "mfu", "tflops_per_device", "peak_mem_gib", "peak_rss_gib")


class Trainer:
    def __init__(
        self,
        *,
        accelerator: Any,
        method: TrainingMethod,
        data: Any,
        cfg: RunConfig,
        callbacks: CallbackList | None = None,
        checkpoints: CheckpointManager | None = None,
        show_progress: bool = True,
        topology: Topology | None = None,
        resume_path: Path | None = None,
    ) -> None:
        """``topology``: the run's (``fv_accel/run.py`` passes the one it built); by default read from the
        process group, so a Trainer built around a stand-in accelerator works too. ``resume_path``: the
        checkpoint :meth:`fit` resumes from unless it is given one."""
        self.accelerator = accelerator
        self.topology = topology or Topology.from_process_group()
        self.method = method
        self.data = data
        self.cfg = cfg
        self.loop_cfg = cfg.training.loop
        self.callbacks = callbacks or CallbackList()
        self.checkpoints = checkpoints
        self.resume_path = resume_path
        self.output_dir = Path(cfg.training.checkpoint.output_dir)
        self.is_main = self.topology.is_main
        self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl", enabled=self.is_main)
        self.show_progress = show_progress and self.is_main
        self.step = 0
        self.num_skipped = 0
        self._consecutive_skips = 0
        self._stop = _StopSignal(cfg.training.checkpoint.preempt_signals)
        # MFU: FLOPs from the passes each method reports (python ints: no extra host sync).
        self._step_flops = StepFlops(method.role_models)
        self._peak_tflops = peak_tflops_per_device(accelerator.device, accelerator.mixed_precision,
                                                   cfg.training.tracker.peak_tflops_per_device)

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    # -- one step -------------------------------------------------------------------------------------------
    def _clip(self, step: int) -> dict[str, torch.Tensor]:
        max_norm = self.loop_cfg.max_grad_norm
        norms = {}
        for role, module in self.method.get_grad_clip_targets(step).items():
            # DTensor-aware global norm over all ranks, computed on local shards (fv_accel/grad_clip.py); never
            # Accelerate's clipping helper, which confuses two prepared models of the same architecture.
            # None when no parameter of the role has a gradient.
            norm = clip_grad_norm_(module.parameters(), max_norm)
            if norm is not None:
                norms[role] = norm
        return norms

    def train_step(self, step: int) -> dict[str, Any] | None:
        """Run one optimizer step. Returns the metrics row, or None when the step was skipped."""
        t_start = time.perf_counter()
        acc = self._accumulate(step)
        grad_norms = self._clip(step)
        self.callbacks.on_before_optimizer_step(self, step)
        synced = self._reduce(acc, grad_norms)
        if self._maybe_skip_nonfinite(step, acc, synced):
            self._maybe_agree_on_stop(synced.preempt)
            return None
        t_opt = time.perf_counter()
        self._step_optimizers(step)
        t_end = time.perf_counter()
        row = self._metrics_row(step, acc, synced, t_start=t_start, t_opt=t_opt, t_end=t_end)
        self._maybe_agree_on_stop(synced.preempt)
        return row

    def _accumulate(self, step: int) -> _Accumulated:
        """Forward and backward every micro-batch; sum the detached losses and metrics on the device."""
        accum = self.loop_cfg.gradient_accumulation_steps
        acc = _Accumulated()
        for _ in range(accum):
            t_fetch = time.perf_counter()
            batch = next(self.data)
            acc.data_wait += time.perf_counter() - t_fetch
            out = self.method.single_train_step(batch, step)
            self.method.backward(out, grad_accum_rounds=accum)
            acc.loss_roles.update(out.loss_roles)
            if acc.flops is not None:
                # Only a method that reports passes needs LatentBatch fields; others may use any batch type.
                micro = (self._step_flops(out.passes, batch.latent_shape, batch.text_embeds_bld.shape[1])
                         if out.passes else None)
                acc.flops = None if micro is None else acc.flops + micro
            for name, value in out.losses.items():
                acc.loss_sums[name] = acc.loss_sums.get(name, 0) + value.detach().float()
            for name, value in out.metrics.items():
                if name in out.losses:
                    raise ValueError(f"metric {name!r} collides with a loss name")
                acc.metric_sums[name] = acc.metric_sums.get(name, 0) + value.detach().float()
        return acc

    def _reduce(self, acc: _Accumulated, grad_norms: dict[str, torch.Tensor]) -> _Synced:
        """The one host sync of the step: one packed all-reduce of the micro-batch-mean losses and metrics,
        the grad norms (already global: identical on every rank) and this rank's stop flag, then rank means."""
        accum = self.loop_cfg.gradient_accumulation_steps
        names = list(acc.loss_sums) + list(acc.metric_sums)
        scalars = [acc.loss_sums[n] / accum for n in acc.loss_sums]
        scalars += [acc.metric_sums[n] / accum for n in acc.metric_sums]
        scalars += list(grad_norms.values())
        scalars.append(torch.tensor(float(self._stop.received is not None)))
        packed = torch.stack([s.reshape(()).float().to(self.accelerator.device) for s in scalars])
        if dist.is_initialized():
            dist.all_reduce(packed)
        values = (packed / self.world_size).tolist()
        return _Synced(
            values=dict(zip(names, values[: len(names)], strict=True)),
            grad_norms=dict(zip(grad_norms, values[len(names): len(names) + len(grad_norms)], strict=True)),
            preempt=values[-1] > 0,
        )

    def _maybe_skip_nonfinite(self, step: int, acc: _Accumulated, synced: _Synced) -> bool:
        """Whether a non-finite loss or grad norm skips this step's update (``training.loop.nonfinite``).
        Raises ``NonFiniteError`` under ``stop`` and after ``max_consecutive_skips`` skips in a row."""
        bad = [(n, acc.loss_roles.get(n, "?")) for n in acc.loss_sums if not math.isfinite(synced.values[n])]
        bad += [(f"grad_norm/{r}", r) for r, v in synced.grad_norms.items() if not math.isfinite(v)]
        if not bad:
            self._consecutive_skips = 0
            return False
        what = ", ".join(f"{n} (role {r})" for n, r in bad)
        if self.loop_cfg.nonfinite == "stop":
            raise NonFiniteError(f"non-finite value at step {step}: {what}; stopping (training.loop.nonfinite=stop)")
        self.num_skipped += 1
        self._consecutive_skips += 1
        logger.warning("step %d: non-finite %s; skipping the update (%d in a row)", step, what,
                       self._consecutive_skips)
        self.method.optimizers_zero_grad(step)
        if self._consecutive_skips >= self.loop_cfg.max_consecutive_skips:
            raise NonFiniteError(f"non-finite values at {self._consecutive_skips} consecutive steps "
                                 f"(last: step {step}, {what})")
        return True

    def _step_optimizers(self, step: int) -> None:
        """Step the optimizers and schedulers of the roles the method says step now, then clear every gradient."""
        method = self.method
        optimizers = list(method.get_optimizers(step))
        stepped_roles = [r for r in method.stepping_roles(step) if method.roles[r].optimizer is not None]
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in method.get_lr_schedulers(step):
            scheduler.step()
        method.optimizers_zero_grad(step)
        self.callbacks.on_after_optimizer_step(self, step, stepped_roles)

    def _metrics_row(self, step: int, acc: _Accumulated, synced: _Synced, *, t_start: float, t_opt: float,
                     t_end: float) -> dict[str, Any]:
        """The step's ``metrics.jsonl`` row (columns in a fixed order: losses and metrics, lr, grad norms,
        timings, throughput)."""
        accum = self.loop_cfg.gradient_accumulation_steps
        # context-parallel peers share their samples (and split each one's FLOPs)
        global_batch = self.cfg.training.data.train_batch_size * accum * self.topology.data_world_size
        row: dict[str, Any] = {"step": step, **synced.values}
        for name, record in self.method.roles.items():
            if record.scheduler is not None:
                row[f"lr/{name}"] = float(record.scheduler.get_last_lr()[0])
        for role, value in synced.grad_norms.items():
            row[f"grad_norm/{role}"] = value
        row["step_time_s"] = t_end - t_start
        row["data_wait_s"] = acc.data_wait
        row["optimizer_s"] = t_end - t_opt
        # forward + backward + clip + the host sync (which waits for the device work queued before it)
        row["compute_s"] = t_opt - t_start - acc.data_wait
        if acc.flops:
            tflops = acc.flops / self.topology.cp_size / max(t_end - t_start, 1e-9) / 1e12
            row["tflops_per_device"] = tflops
            if self._peak_tflops is not None:
                row["mfu"] = tflops / self._peak_tflops
        row.update(peak_memory_metrics(self.accelerator.device))
        row["samples_per_s"] = global_batch / max(t_end - t_start, 1e-9)
        row["nonfinite_skips"] = self.num_skipped
        return row

    def _maybe_agree_on_stop(self, preempt: bool) -> None:
        """Act on a stop signal when any rank received one before the host sync (the reduced flag): every rank
        then stops at the same step boundary."""
        if preempt:
            self._stop.received = self._stop.received or signal.SIGTERM
            self._stop.agreed = True

    # -- the loop -------------------------------------------------------------------------------------------
    def fit(self, *, start_step: int = 0, resume_path: Path | None = None) -> int:
        method = self.method
        max_steps = self.loop_cfg.max_train_steps
        resume_path = resume_path if resume_path is not None else self.resume_path
        method.on_train_start()
        self.callbacks.on_train_start(self)
        if resume_path is not None:
            assert self.checkpoints is not None
            start_step = self.checkpoints.load(resume_path)
            self.metrics.truncate_after(start_step)
            self.checkpoints.restore_random_state(resume_path)  # last: nothing may draw after this
            if self.is_main:
                logger.info("resumed from %s at step %d", resume_path, start_step)
        else:
            # A fresh run into a used output dir (e.g. the toy demo's second run) must not append to the old rows.
            self.metrics.truncate_after(start_step)
        self.step = start_step
        if start_step == 0 and self.cfg.callbacks.validation and self.cfg.callbacks.validation.at_start:
            self.callbacks.on_validation(self, 0)
        save_steps = self.cfg.training.checkpoint.save_steps
        bar = tqdm(total=max_steps, initial=start_step, disable=not self.show_progress, desc="train",
                   dynamic_ncols=True)
        self._stop.install()
        try:
            for step in range(start_step + 1, max_steps + 1):
                row = self.train_step(step)
                self.step = step
                if row is not None:
                    self.callbacks.on_step_end(self, step, row)
                    self.metrics.write(row)
                    if self.is_main:
                        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                                         if k.endswith("loss") or k in _PROGRESS_KEYS}, refresh=False)
                bar.update(1)
                if self.checkpoints is not None:
                    # An async save in flight becomes complete here once every rank's write has finished
                    # (a collective only while one is pending; the loop goes on when it is not finished).
                    self.checkpoints.maybe_finalize()
                if self._stop.agreed:
                    # Blocking, after finishing any save in flight: complete before the exit (143).
                    path = self.checkpoints.save(step, blocking=True) if self.checkpoints else None
                    from fv_accel.checkpoint.manager import resume_command

                    raise Preempted(
                        f"stopped by signal {self._stop.received} after step {step}; checkpoint: {path}. "
                        f"Resume with: {resume_command()}"
                    )
                if self.checkpoints is not None and save_steps > 0 and step % save_steps == 0:
                    self.checkpoints.save(step)
                self.callbacks.on_validation(self, step)
            if self.checkpoints is not None and self.step > start_step:
                self.checkpoints.save(self.step, blocking=True)  # also finishes a save still in flight
            self.callbacks.on_train_end(self, self.step)
        except BaseException:
            if self.checkpoints is not None:
                self.checkpoints.abandon_pending()  # an async save in flight stays a .partial
            raise
        finally:
            self._stop.uninstall()
            bar.close()
        return self.step
