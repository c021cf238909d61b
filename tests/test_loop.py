"""The loop's order and gating (fv_accel/trainer.py) with a fake method over nn.Linear roles.

World size 1 in process (``single_process_dist``): the loop's all-reduce is real, models are plain modules, so
every expected number can be recomputed here with bare PyTorch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import REPO, run_recipe_captured, run_torchrun
from torch import nn

from fv_accel.build import build_lr_scheduler, build_optimizer
from fv_accel.callbacks import Callback, CallbackList
from fv_accel.config import RunConfig
from fv_accel.errors import EXIT_NONFINITE, NonFiniteError
from fv_accel.methods import StepOutput, TrainingMethod
from fv_accel.models import ModelBase
from fv_accel.trainer import Trainer


class LinearModel(ModelBase):
    """A role whose transformer is one nn.Linear (no latent normalisation)."""

    def normalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def denormalize_latents(self, latents_bcthw: torch.Tensor) -> torch.Tensor:
        return latents_bcthw

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, text_embeds_bld: torch.Tensor) -> torch.Tensor:
        return self.transformer(x_t).float()


def student_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((student(x) - y) ** 2).mean()


def critic_loss(critic: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = teacher(x)
    return ((critic(x) - 3.0 * target) ** 2).mean()


class FakeMethod(TrainingMethod):
    """student and critic trainable, teacher frozen. Gating and non-finite injection are set per test."""

    name: ClassVar[str] = "fake"
    required_roles: ClassVar[tuple[str, ...]] = ("student", "critic", "teacher")
    trainable_roles: ClassVar[tuple[str, ...]] = ("student", "critic")

    def __init__(self, *, cfg: RunConfig, role_models: dict[str, ModelBase], events: list[str]) -> None:
        super().__init__(cfg=cfg, role_models=role_models)
        self.events = events
        self.step_roles: dict[int, list[str]] = {}  # step → roles whose optimizers step (default: all)
        self.clip_roles: list[str] = ["student", "critic"]
        self.nan_at: dict[int, str] = {}  # step → loss name made NaN
        self.inf_grad_at: set[int] = set()

    def optimizer_configs(self) -> dict[str, Any]:
        return {"student": self.training_config.optimizer, "critic": self.training_config.optimizer}

    def single_train_step(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> StepOutput:
        self.events.append("forward")
        x, y = batch
        student = self.role_models["student"].transformer
        losses = {
            "student_loss": student_loss(student, x, y),
            "critic_loss": critic_loss(self.role_models["critic"].transformer,
                                       self.role_models["teacher"].transformer, x),
        }
        if self.nan_at.get(step):
            losses[self.nan_at[step]] = losses[self.nan_at[step]] * float("nan")
        if step in self.inf_grad_at:
            # Finite loss, infinite gradient: only the grad-norm check can catch it.
            student.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return StepOutput(losses=losses, loss_roles={"student_loss": "student", "critic_loss": "critic"},
                          metrics={"x_mean": x.mean()})

    def backward(self, output: StepOutput, *, grad_accum_rounds: int = 1) -> None:
        self.events.append("backward")
        super().backward(output, grad_accum_rounds=grad_accum_rounds)

    def stepping_roles(self, step: int) -> list[str]:
        return self.step_roles.get(step, ["student", "critic"])

    def get_grad_clip_targets(self, iteration: int) -> dict[str, nn.Module]:
        return {r: self.role_models[r].transformer for r in self.clip_roles}


class Recorder(Callback):
    name = "recorder"

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.grads: list[dict[str, torch.Tensor | None]] = []
        self.stepped: list[list[str]] = []

    def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
        self.events.append("before_optimizer_step")
        self.grads.append({r: None if m.transformer.weight.grad is None else m.transformer.weight.grad.clone()
                           for r, m in trainer.method.role_models.items()})

    def on_after_optimizer_step(self, trainer: Trainer, step: int, stepped_roles: list[str]) -> None:
        self.events.append("after_optimizer_step")
        self.stepped.append(list(stepped_roles))

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.events.append("step_end")


def _batches(seed: int = 0, n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(n)]


def _cfg(tmp_path: Path, **loop: Any) -> RunConfig:
    fake = {"init_from": "unused"}  # validated by model_validate only: no directory is checked or read
    return RunConfig.model_validate({
        "models": {"student": fake, "critic": fake, "teacher": {**fake, "trainable": False}},
        "method": {"name": "finetune"},
        "training": {"loop": {"max_train_steps": 3, **loop},
                     "optimizer": {"learning_rate": 0.1, "lr_scheduler": "linear", "lr_warmup_steps": 0},
                     "checkpoint": {"output_dir": str(tmp_path / "out")}, "tracker": {"backends": []}},
    })


class Harness:
    def __init__(self, accelerator: Any, tmp_path: Path, **loop: Any) -> None:
        torch.manual_seed(0)
        self.cfg = _cfg(tmp_path, **loop)
        self.events: list[str] = []
        models = {}
        for role in ("student", "critic", "teacher"):
            linear = nn.Linear(3, 2)
            linear.requires_grad_(self.cfg.models[role].trainable)
            models[role] = LinearModel(role=role, transformer=linear, config=self.cfg.models[role])
        self.initial = {r: copy.deepcopy(m.transformer) for r, m in models.items()}
        self.method = FakeMethod(cfg=self.cfg, role_models=models, events=self.events)
        for role, opt_cfg in self.method.optimizer_configs().items():
            module = models[role].transformer
            optimizer = build_optimizer(list(module.parameters()), opt_cfg)
            optimizer.register_step_pre_hook(lambda opt, args, kwargs, role=role:
                                             self.events.append(f"optimizer.step:{role}"))
            scheduler = build_lr_scheduler(optimizer, opt_cfg, self.cfg.training.loop.max_train_steps)
            self._record_calls(scheduler, "step", f"scheduler.step:{role}")
            self.method.attach_prepared(role, {"transformer": module}, optimizer, scheduler)
        self.batches = _batches()
        self.recorder = Recorder(self.events)
        self.trainer = Trainer(accelerator=accelerator, method=self.method, data=iter(self.batches), cfg=self.cfg,
                               callbacks=CallbackList([self.recorder]), show_progress=False)
        self.method.on_train_start()

    def _record_calls(self, obj: Any, attr: str, label: str) -> None:
        original = getattr(obj, attr)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.events.append(label)
            return original(*args, **kwargs)

        setattr(obj, attr, wrapped)

    def weights(self, role: str) -> torch.Tensor:
        return self.method.role_models[role].transformer.weight.detach().clone()


@pytest.fixture
def harness(single_process_dist: Any, tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(**loop: Any) -> Harness:
        return Harness(single_process_dist, tmp_path, **loop)

    return make


def test_order_of_one_step(harness: Any) -> None:
    h = harness(gradient_accumulation_steps=2)
    h.method.step_roles[1] = ["critic", "student"]
    h.trainer.train_step(1)
    assert h.events == [
        "forward", "backward", "forward", "backward",
        "before_optimizer_step",  # after clipping, before any update
        "optimizer.step:critic", "optimizer.step:student",  # in the order the method returns them
        "scheduler.step:critic", "scheduler.step:student",
        "after_optimizer_step",
    ]
    # Gradients are cleared after the step, for every optimizer.
    assert all(m.transformer.weight.grad is None for m in h.method.role_models.values())


def test_gradient_accumulation_is_the_mean_over_micro_batches(harness: Any) -> None:
    accum = 3
    h = harness(gradient_accumulation_steps=accum, max_grad_norm=0.0)  # no clipping: raw grads
    student = copy.deepcopy(h.method.role_models["student"].transformer)
    row = h.trainer.train_step(1)
    assert row is not None
    per_batch = [torch.autograd.grad(student_loss(student, x, y), [student.weight, student.bias])
                 for x, y in h.batches[:accum]]
    ref_weight = torch.stack([g[0] for g in per_batch]).mean(0)
    ref_bias = torch.stack([g[1] for g in per_batch]).mean(0)
    torch.testing.assert_close(h.recorder.grads[0]["student"], ref_weight, rtol=1e-6, atol=1e-7)
    # The logged loss is the mean over the micro-batches, and so is every extra metric.
    with torch.no_grad():
        losses = [student_loss(student, x, y).item() for x, y in h.batches[:accum]]
    assert row["student_loss"] == pytest.approx(sum(losses) / accum, rel=1e-6)
    assert row["x_mean"] == pytest.approx(sum(x.mean().item() for x, _ in h.batches[:accum]) / accum, rel=1e-5)
    # max_grad_norm <= 0 disables clipping but the norm is still logged.
    assert row["grad_norm/student"] == pytest.approx(torch.cat([ref_weight.flatten(), ref_bias]).norm().item(),
                                                     rel=1e-5)
    # The frozen teacher never gets a gradient.
    assert h.recorder.grads[0]["teacher"] is None


def test_clip_only_the_targets(harness: Any) -> None:
    max_norm = 1e-3
    h = harness(max_grad_norm=max_norm)
    h.method.clip_roles = ["student"]
    ref = {r: copy.deepcopy(h.method.role_models[r].transformer) for r in ("student", "critic", "teacher")}
    x, y = h.batches[0]
    student_grads = torch.autograd.grad(student_loss(ref["student"], x, y), list(ref["student"].parameters()))
    critic_grads = torch.autograd.grad(critic_loss(ref["critic"], ref["teacher"], x),
                                       list(ref["critic"].parameters()))
    student_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in student_grads])).item()
    critic_weight_grad = critic_grads[0]
    assert student_norm > 100 * max_norm  # so the clip is visible

    row = h.trainer.train_step(1)
    assert row is not None
    grads = h.recorder.grads[0]
    # The student is clipped to max_norm (weight + bias together): its weight grad is the scaled raw grad.
    torch.testing.assert_close(grads["student"], student_grads[0] * (max_norm / (student_norm + 1e-6)))
    # The critic is not a clip target: untouched, and no grad_norm is logged for it.
    torch.testing.assert_close(grads["critic"], critic_weight_grad)
    assert row["grad_norm/student"] == pytest.approx(student_norm, rel=1e-5)  # logged before clipping
    assert "grad_norm/critic" not in row


def test_every_clip_target_is_clipped_to_its_own_norm(harness: Any) -> None:
    """Both trainable roles are clip targets and both gradients are far above max_grad_norm: each role's SGD
    update must be -lr · min(1, max_norm / (norm + 1e-6)) · grad, from plain autograd on a copy."""
    max_norm, lr = 0.05, 1.0
    h = harness(max_grad_norm=max_norm)
    assert h.method.clip_roles == ["student", "critic"]
    # SGD: the update is the clipped gradient itself (AdamW's first update is ~lr·sign(grad), blind to scale).
    for role in ("student", "critic"):
        module = h.method.role_models[role].transformer
        sgd = torch.optim.SGD(module.parameters(), lr=lr)
        h.method.attach_prepared(role, {"transformer": module}, sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0))
    ref = {r: copy.deepcopy(h.method.role_models[r].transformer) for r in ("student", "critic", "teacher")}
    x, y = h.batches[0]
    raw = {"student": torch.autograd.grad(student_loss(ref["student"], x, y), list(ref["student"].parameters())),
           "critic": torch.autograd.grad(critic_loss(ref["critic"], ref["teacher"], x),
                                         list(ref["critic"].parameters()))}

    row = h.trainer.train_step(1)
    assert row is not None
    for role, grads in raw.items():
        norm = torch.cat([g.flatten() for g in grads]).double().norm().item()
        assert norm > 20 * max_norm, role  # so an unclipped update would be far off
        coef = min(1.0, max_norm / (norm + 1e-6))
        assert row[f"grad_norm/{role}"] == pytest.approx(norm, rel=1e-5)  # logged before clipping
        for after, before, g in zip(h.method.role_models[role].transformer.parameters(), ref[role].parameters(),
                                    grads, strict=True):
            torch.testing.assert_close(after.detach() - before.detach(), -lr * coef * g, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, role=role: f"{role}: {m}")
        torch.testing.assert_close(h.recorder.grads[0][role], grads[0] * coef, rtol=1e-5, atol=1e-8)


def test_dmd2_clips_the_critic_at_critic_and_generator_steps(toy_root: Path, tmp_path: Path,
                                                              single_process_dist: Any) -> None:
    """Real DMD2 on the tiny Wan (FSDP2, one rank), generator_update_interval 2: step 1 steps only the critic,
    step 2 both. Every stepping role's gradients, read right before the optimizer step, must have the global
    norm min(norm, max_norm · norm / (norm + 1e-6)), computed here from the full tensors."""
    from fv_accel.build import build_run
    from fv_accel.config import resolve_config

    max_norm = 1e-6  # far below any gradient norm of the random tiny Wan (the student's is ~5e-4)
    init = str(toy_root / "init")
    cfg = resolve_config({
        "models": {"student": {"init_from": init, "latent_stats": "identity"},
                   "teacher": {"init_from": init, "trainable": False, "latent_stats": "identity"}},
        "method": {"name": "dmd2", "generator_update_interval": 2, "dmd_denoising_steps": [1000, 500],
                   "real_score_guidance_scale": 1.0},
        "training": {"data": {"data_path": str(toy_root / "data"), "train_batch_size": 2, "text_len": 8},
                     "loop": {"max_train_steps": 2, "max_grad_norm": max_norm},
                     "tracker": {"backends": []}, "checkpoint": {"output_dir": str(tmp_path / "out")}},
    })
    built = build_run(cfg, single_process_dist)
    method = built.method
    assert set(method.get_grad_clip_targets(1)) == {"critic"}
    assert set(method.get_grad_clip_targets(2)) == {"student", "critic"}

    clipped: list[dict[str, float]] = []

    class ClippedNorms(Callback):
        name = "clipped_norms"

        def on_before_optimizer_step(self, trainer: Trainer, step: int) -> None:
            norms = {}
            for role in ("student", "critic"):
                grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                         for p in method.role_models[role].transformer.parameters() if p.grad is not None]
                if grads:
                    norms[role] = torch.cat([g.double().flatten() for g in grads]).norm().item()
            clipped.append(norms)

    rows: list[dict[str, float]] = []

    class Rows(Callback):
        name = "rows"

        def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
            rows.append(metrics)

    trainer = Trainer(accelerator=single_process_dist, method=method, data=built.data, cfg=cfg,
                      callbacks=CallbackList([ClippedNorms(), Rows()]), show_progress=False)
    trainer.fit()
    assert [set(c) for c in clipped] == [{"critic"}, {"student", "critic"}]  # the student has no grad at step 1
    for step, (norms, row) in enumerate(zip(clipped, rows, strict=True), start=1):
        for role, after in norms.items():
            before = row[f"grad_norm/{role}"]
            assert before > 100 * max_norm, (step, role)
            assert after == pytest.approx(before * max_norm / (before + 1e-6), rel=1e-4), (step, role)


def test_step_only_the_returned_optimizers_and_schedulers(harness: Any) -> None:
    h = harness(max_train_steps=4)
    h.method.step_roles = {1: ["critic"], 2: ["critic", "student"], 3: ["critic"]}
    student0, critic0 = h.weights("student"), h.weights("critic")
    row1 = h.trainer.train_step(1)
    assert torch.equal(h.weights("student"), student0), "the student's optimizer must not step at step 1"
    assert not torch.equal(h.weights("critic"), critic0)
    assert h.recorder.stepped[-1] == ["critic"]
    # Linear schedule over 4 steps, no warmup: the critic's lr moved to 3/4, the student's is still 1.
    assert row1 is not None
    assert row1["lr/critic"] == pytest.approx(0.1 * 3 / 4)
    assert row1["lr/student"] == pytest.approx(0.1)
    h.trainer.train_step(2)
    assert not torch.equal(h.weights("student"), student0)
    assert h.recorder.stepped[-1] == ["student", "critic"] or h.recorder.stepped[-1] == ["critic", "student"]
    row3 = h.trainer.train_step(3)
    assert row3 is not None
    assert row3["lr/critic"] == pytest.approx(0.1 * 1 / 4)
    assert row3["lr/student"] == pytest.approx(0.1 * 3 / 4)  # stepped once, at step 2
    assert h.events.count("optimizer.step:student") == 1 and h.events.count("scheduler.step:student") == 1
    assert h.events.count("optimizer.step:critic") == 3 and h.events.count("scheduler.step:critic") == 3
    # The frozen teacher never changes and never has a gradient.
    assert torch.equal(h.weights("teacher"), h.initial["teacher"].weight)
    assert all(g["teacher"] is None for g in h.recorder.grads)


def test_nonfinite_stop_names_step_and_role(harness: Any) -> None:
    h = harness(nonfinite="stop")
    h.method.nan_at[2] = "critic_loss"
    h.trainer.train_step(1)
    before = {r: h.weights(r) for r in ("student", "critic")}
    with pytest.raises(NonFiniteError) as info:
        h.trainer.train_step(2)
    assert info.value.exit_code == EXIT_NONFINITE == 3
    msg = str(info.value)
    assert "step 2" in msg and "critic_loss (role critic)" in msg and "student" not in msg
    # Detected before any optimizer step: no weight moved.
    for role, weight in before.items():
        assert torch.equal(h.weights(role), weight)
    assert h.events.count("before_optimizer_step") == 2
    assert h.events.count("optimizer.step:critic") == 1


def test_nonfinite_gradient_norm_is_caught(harness: Any) -> None:
    h = harness(nonfinite="stop")
    h.method.inf_grad_at.add(1)
    with pytest.raises(NonFiniteError, match=r"step 1: grad_norm/student \(role student\)"):
        h.trainer.train_step(1)


def test_nonfinite_skip_leaves_weights_and_counts(harness: Any) -> None:
    h = harness(nonfinite="skip", max_consecutive_skips=2, max_train_steps=5)
    h.method.nan_at.update({2: "student_loss", 4: "critic_loss", 5: "critic_loss"})
    assert h.trainer.train_step(1) is not None
    before = {r: h.weights(r) for r in ("student", "critic")}
    lr_before = h.method.roles["student"].scheduler.get_last_lr()[0]
    assert h.trainer.train_step(2) is None
    for role, weight in before.items():
        assert torch.equal(h.weights(role), weight), f"{role} moved on a skipped step"
    assert h.method.roles["student"].scheduler.get_last_lr()[0] == lr_before
    # Gradients of the skipped step are dropped, not carried into the next one.
    assert all(m.transformer.weight.grad is None for m in h.method.role_models.values())
    row = h.trainer.train_step(3)
    assert row is not None and row["nonfinite_skips"] == 1
    assert h.trainer.train_step(4) is None  # one in a row
    with pytest.raises(NonFiniteError, match="2 consecutive steps.*step 5.*critic_loss") as info:
        h.trainer.train_step(5)  # two in a row = max_consecutive_skips
    assert info.value.exit_code == 3
    assert h.trainer.num_skipped == 3


def test_fit_writes_one_metrics_row_per_step(harness: Any, tmp_path: Path) -> None:
    h = harness(max_train_steps=3, gradient_accumulation_steps=2)
    h.method.nan_at[2] = "student_loss"
    h.cfg.training.loop.nonfinite = "skip"
    assert h.trainer.fit() == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 3]  # the skipped step logs no row
    assert rows[1]["nonfinite_skips"] == 1
    for row in rows:
        assert {"student_loss", "critic_loss", "lr/student", "lr/critic", "grad_norm/student", "grad_norm/critic",
                "step_time_s", "samples_per_s"} <= set(row)
        assert row["samples_per_s"] == pytest.approx(1 * 2 / row["step_time_s"], rel=1e-6)  # batch 1 × accum 2
    assert h.events.count("forward") == 6


def test_recipe_exits_3_on_divergence(toy_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    """A learning rate of 1e30 blows the weights up after one step; step 2's loss is not finite."""
    out = tmp_path / "run"
    args = ["recipes/finetune.py", f"--models.student.init_from={toy_root / 'init'}",
            f"--training.data.data_path={toy_root / 'data'}", f"--training.checkpoint.output_dir={out}",
            "--training.loop.max_train_steps=3", "--training.optimizer.learning_rate=1e30",
            "--training.optimizer.lr_warmup_steps=0", "--training.data.train_batch_size=4",
            "--training.tracker.backends=[]"]
    proc = run_recipe_captured("finetune", args[1:], capsys, caplog)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "non-finite value at step 2" in proc.stderr and "role student" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert not list(out.glob("checkpoint-*")), "a diverged run must not save a checkpoint of NaN weights"


@pytest.mark.distributed
def test_nonfinite_on_one_rank_is_decided_on_the_reduced_losses(tmp_path: Path) -> None:
    """2 ranks (gloo), identical data; at step 2 only rank 0's loss is NaN (its gradient finite). skip: both
    ranks skip step 2 (weights unchanged, still equal across ranks, one skip each); stop: both ranks stop at
    step 2 with the non-finite error. A rank deciding on its own losses would step (skip) or run on into the
    next collective alone (stop)."""
    proc = run_torchrun("tests/dist_scripts/nonfinite_one_rank.py", str(tmp_path), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        skip = r["skip"]
        weights = [torch.tensor(w) for w in skip["weights"]]  # before step 1, after steps 1, 2, 3
        assert skip["no_row"] == [2] and skip["num_skipped"] == 1, r["rank"]
        assert torch.equal(weights[2], weights[1]), f"rank {r['rank']} updated at the skipped step"
        assert not torch.equal(weights[1], weights[0]) and not torch.equal(weights[3], weights[2])
    assert ranks[0]["skip"]["weights"] == ranks[1]["skip"]["weights"]
    for r in ranks:
        stop = r["stop"]
        assert stop["outcome"] == "nonfinite" and stop["step"] == 2, (r["rank"], stop)
        assert "non-finite value at step 2: loss (role student)" in stop["message"]


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path: Path) -> None:
    """A resume from step 3 drops the rows the interrupted run logged after it (steps 4, 5), keeps the others
    as they were, and appends after them (found by mutation testing: nothing in the fast tier read the rows)."""
    from fv_accel.trainer import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": s / 10} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a blank line, as a crash may leave
    writer = MetricsWriter(path, enabled=True)
    writer.truncate_after(3)
    writer.write({"step": 4, "loss": 0.44})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [*rows[:3], {"step": 4, "loss": 0.44}]
    MetricsWriter(tmp_path / "other.jsonl", enabled=False).truncate_after(0)  # disabled rank: nothing to do
    assert not (tmp_path / "other.jsonl").exists()
