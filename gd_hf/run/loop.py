"""The training loop of one phase, on a page. Per step: the method's start of the step (at burn-in's end the
teacher becomes the student), the batches, one optimizer step (`train_step`: the loss of the method, the update,
non-finite updates taken back), the check of its outcome, the method's end of the step (the EMA teacher follows
the student), then each periodic hook when due (`gd_hf.run.periodic.PERIODIC_WORK`: log line, evaluation,
pictures, curves, best export, checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gd_hf.method.pseudo_labels import PseudoLabels
from gd_hf.run.eval_pictures import keep_pseudo_labels
from gd_hf.run.metrics_log import bar_figures
from gd_hf.run.periodic import PERIODIC_WORK, PeriodicWork, is_due
from gd_hf.run.phase import Phase
from gd_hf.run.step import check_nonfinite_step, train_step


def train_phase(phase: Phase, periodic: list[PeriodicWork] = PERIODIC_WORK) -> None:
    """The phase's steps to `train.max_steps` (from where it resumed), with a progress bar."""
    cfg, state, accelerator = phase.recipe.train, phase.state, phase.accelerator
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=phase.label(state.step), dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    with logging_redirect_tqdm():  # the run's log lines print above the bar, not through it
        phase.model.train()
        while state.step < cfg.max_steps:
            progress.set_description(phase.label(state.step), refresh=False)
            outcome_figures = run_step(phase)
            progress.update(1)
            progress.set_postfix(bar_figures(outcome_figures), refresh=False)
            for hook in periodic:
                if hook.due(phase, state.step):
                    hook.work(phase)
    progress.close()
    phase.batches = None  # ends the loaders' workers


def run_step(phase: Phase) -> dict[str, float]:
    """One step of the method; the figures it logs."""
    cfg, method, state, accelerator = phase.recipe.train, phase.method, phase.state, phase.accelerator
    start = method.start_step(state.step, phase.student)  # at burn-in's end: teacher <- student
    if start.burn_in_ended and accelerator.is_main_process:
        phase.publisher.push_burn_in_student(phase.student, state.step)
    labeled, unlabeled = phase.batches.next_step(cfg.gradient_accumulation_steps)
    # The student's step: labeled images, plus the strong views with the teacher's pseudo labels of the weak.
    uses_pseudo_labels = method.uses_pseudo_labels(state.step)
    observe = None
    if uses_pseudo_labels and phase.recipe.eval.pictures and is_due(cfg.eval_every, state.step + 1, cfg.max_steps):
        observe = keep_for_picture(phase, state.step)  # what the student is taught, for the evaluation's picture
    outcome = train_step(phase.model, labeled, phase.optimizer, phase.scheduler, accelerator, cfg.grad_clip,
                         method, unlabeled if uses_pseudo_labels else None, phase.undo, observe,
                         start.scheduled)  # fmt: skip
    # A non-finite step never reaches the teacher or disk; too many in a row stop the run.
    update_skipped = check_nonfinite_step(outcome, state, cfg, phase.output_dir / "checkpoints")
    method.after_step(state.step, phase.student, update_skipped)  # EMA: the teacher follows the student
    state.step += 1
    phase.skipped_since_checkpoint += sum(b["skipped"] for b in labeled + (unlabeled or []))
    phase.log.add(outcome.logged)
    return outcome.logged


def keep_for_picture(phase: Phase, step: int) -> Callable[[dict[str, Any], PseudoLabels], None]:
    """What `train_step`'s loss calls with the unlabeled batch and its pseudo labels: the first images of them
    kept for the next evaluation's picture."""

    def keep(unlabeled: dict[str, Any], pseudo: PseudoLabels) -> None:
        phase.kept_pseudo_labels = keep_pseudo_labels(step, unlabeled, pseudo, phase.recipe.eval.pictures)

    return keep
