"""One launch of a recipe, `TrainingRecipe`, in the manner of torchtune's recipes: `run` prepares the data once
and runs the phases in order on one Accelerator — phase 1, the supervised teacher (into `output_dir/teacher`, with
`ssl.train_teacher_first`), then phases 2-3, guided burn-in and EMA distillation. Each phase is
`set_up_phase` (which returns the `Phase`: everything it trains with), `train_phase` (the loop, `gd_hf.run.loop`),
`finish_phase` (the final export and push), and `end_phase` (what is left of it on the Accelerator goes). The
method itself (its teacher, pseudo labels, schedule and loss) is `gd_hf.method.GuidedDistillation`."""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from accelerate.tracking import GeneralTracker

from gd_hf.config import Recipe, RecipeError, names_a_checkpoint, teacher_recipe_of
from gd_hf.data.prepare import RunData, prepare_data
from gd_hf.hub.push import PushError, quiet_http_requests
from gd_hf.method import PseudoLabelRule, PseudoLabelRules, check_extension_points, describe_extension
from gd_hf.models import ModelFamily, check_recipe
from gd_hf.run.checkpointing import list_checkpoints
from gd_hf.run.distributed import build_accelerator
from gd_hf.run.launches import release_output_locks
from gd_hf.run.loop import train_phase
from gd_hf.run.periodic import finish_phase
from gd_hf.run.set_up import LaunchOptions, set_up_phase
from gd_hf.run.trackers import chosen_trackers

logger = logging.getLogger("gd_hf.train")


class TrainingRecipe:
    """One launch of a recipe. `pseudo_label_rule` and `model_family` are the method's extension points (None:
    the recipe's `PseudoLabelRules`, and its `model.family`); `trackers`: Accelerate trackers beside
    `train.report_to`'s."""

    def __init__(
        self, recipe: Recipe, pseudo_label_rule: PseudoLabelRule | None = None,
        model_family: ModelFamily | None = None, trackers: list[GeneralTracker] | None = None,
    ) -> None:  # fmt: skip
        self.launch_recipe = recipe  # what the user asked for: what a relaunch is compared with
        check_extension_points(pseudo_label_rule, model_family, recipe.ssl)  # before any work
        check_recipe(recipe, model_family)  # the model family's keys
        if type(pseudo_label_rule) is PseudoLabelRules and pseudo_label_rule != PseudoLabelRules.from_recipe(
            recipe.ssl
        ):
            raise RecipeError(
                f"pseudo_label_rule={pseudo_label_rule} differs from the recipe's ssl.pseudo_label_* keys: set those "
                "keys instead (the recipe, the checkpoints and the model card then say what was used)"
            )
        unresolved = isinstance(pseudo_label_rule, PseudoLabelRules) and pseudo_label_rule.score_threshold is None
        if (pseudo_label_rule is not None and not unresolved and recipe.ssl.enabled
                and recipe.ssl.pseudo_label_score_threshold == "auto"):  # fmt: skip
            raise RecipeError(
                "ssl.pseudo_label_score_threshold is `auto`, which the teacher check chooses for the recipe's "
                f"pseudo-label rules; the pseudo_label_rule {describe_extension(pseudo_label_rule)} has no score "
                "threshold for it to choose (or a fixed one): give the recipe a number"
            )
        self.options = LaunchOptions(
            pseudo_label_rule, model_family,
            chosen_trackers(recipe.train.report_to),  # a missing package stops before any work
            list(trackers or []),
            "teacher" if recipe.ssl.enabled else "supervised",  # what the bar calls a supervised phase
        )  # fmt: skip

    def run(self, data: RunData | None = None) -> dict[str, float]:
        """Every phase of the recipe in order (resuming where checkpoints are); the final val metrics. `data`:
        already prepared for this recipe's `data` settings (else prepared here: every check happens before
        anything is written)."""
        recipe = self.launch_recipe
        self.accelerator = build_accelerator(recipe)
        # Each phase starts with a fresh fp16 loss scale, as it would on an Accelerator of its own.
        scaler = self.accelerator.scaler
        self.fresh_scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        logging.basicConfig(
            level=logging.INFO if self.accelerator.is_main_process else logging.WARNING,
            format="%(asctime)s %(name)s: %(message)s",
        )
        # Accelerate's INFO lines (a few per checkpoint: "Saving current state to ...") would break the progress
        # bar every checkpoint_every steps; its warnings still show.
        logging.getLogger("accelerate").setLevel(logging.WARNING)
        quiet_http_requests()  # (a push's requests, one INFO line each)
        try:
            # (its val images are checked while the first phase builds its model: `set_up_phase` waits for it)
            data = data if data is not None else prepare_data(recipe, self.accelerator, check_later=True)
            lock_also: tuple[str, ...] = ()
            if recipe.ssl.enabled and recipe.ssl.train_teacher_first:
                recipe = self.train_teacher_first(data)  # phase 1, into output_dir/teacher
                lock_also = (str(Path(recipe.ssl.teacher).parent),)  # the teacher's folder stays as it is
            metrics = self.run_phase(recipe, data, self.launch_recipe, lock_also)
            self.accelerator.end_training()  # the trackers, and the process group
            return metrics
        finally:
            if data is not None:  # a launch that stopped before it waited for the check: the rest is not read
                data.cancel_val_check()
            release_output_locks()

    def run_phase(
        self, recipe: Recipe, data: RunData, launch_recipe: Recipe, lock_also: tuple[str, ...] = ()
    ) -> dict[str, float]:
        """One phase: set up (or resume), train to `train.max_steps`, finish. `launch_recipe`: what its
        checkpoints record; `lock_also`: output folders it locks beside its own. The phase is this call's only:
        it is gone when the call returns."""
        phase = set_up_phase(self.accelerator, recipe, data, launch_recipe, lock_also, self.options)
        train_phase(phase)
        return finish_phase(phase)

    def train_teacher_first(self, data: RunData) -> Recipe:
        """Phase 1 in this launch: the supervised teacher into output_dir/teacher (unless phases 2-3 have begun);
        returns the recipe of phases 2-3, whose `ssl.teacher` is its export."""
        recipe = self.launch_recipe
        teacher_recipe = teacher_recipe_of(recipe)
        if names_a_checkpoint(recipe) or list_checkpoints(Path(recipe.output_dir) / "checkpoints"):
            # Phases 2-3 have begun (their checkpoints hold the teacher they started from): phase 1 is not run
            # again, so a relaunch that extends the run, or of a moved folder, leaves the teacher as it was, and a
            # relaunch that changes what is trained is stopped by the student's comparison before anything is
            # written.
            logger.info("phases 2-3 have begun: phase 1 is done (the teacher: %s)", teacher_recipe.output_dir)
        else:
            try:
                # The launch's own folder is locked from its first write (one launch per folder, phase 1 included).
                self.run_phase(teacher_recipe, data, teacher_recipe, lock_also=(recipe.output_dir,))
            except PushError as e:  # the teacher is trained and saved; only its upload failed: distillation goes on
                logger.error("%s", e)
            self.end_phase()
        best = Path(teacher_recipe.output_dir) / "best"
        teacher = best if best.is_dir() else Path(teacher_recipe.output_dir) / "final"
        return dataclasses.replace(
            recipe, ssl=dataclasses.replace(recipe.ssl, teacher=str(teacher), train_teacher_first=False)
        )

    def end_phase(self) -> None:
        """Phase 1's objects go before phase 2 builds its own (weights, optimizer state, the undo copy: about 6x the
        parameters): its model and optimizer leave the Accelerator (not part of phase 2's checkpoints), and the
        fp16 loss scale starts afresh."""
        self.accelerator.free_memory()  # (and the garbage collector, and the CUDA cache)
        if self.fresh_scaler_state is not None:
            self.accelerator.scaler.load_state_dict(self.fresh_scaler_state)
