"""Train a recipe: `accelerate launch -m gd_hf.train recipes/NAME.yaml [key=value ...]`, or `train(recipe)` from
Python. A launch runs the recipe's phases in order (`gd_hf.run.launch.TrainingRecipe`); the loop of a phase is
`gd_hf.run.loop`, the work done every N steps `gd_hf.run.periodic`, the method `gd_hf.method.GuidedDistillation`.
"""

from __future__ import annotations

import argparse
import errno
import sys

from accelerate import PartialState
from accelerate.tracking import GeneralTracker

from gd_hf.config import Recipe, RecipeError, load_recipe
from gd_hf.data.coco import DataError
from gd_hf.data.prepare import RunData
from gd_hf.hub.push import PushError
from gd_hf.method import PseudoLabelRule
from gd_hf.models import ModelFamily
from gd_hf.run.launch import TrainingRecipe
from gd_hf.run.step import TrainingError
from gd_hf.weights import NonFiniteWeightsError

__all__ = ["EXIT_OUTCOMES", "TrainingRecipe", "main", "run_main", "train"]


def train(
    recipe: Recipe, data: RunData | None = None, pseudo_label_rule: PseudoLabelRule | None = None,
    model_family: ModelFamily | None = None, trackers: list[GeneralTracker] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Run a recipe to its end (resuming where it has checkpoints); the final val metrics. See `TrainingRecipe`;
    `trackers`: Accelerate trackers of your own, beside `train.report_to`'s."""
    return TrainingRecipe(recipe, pseudo_label_rule, model_family, trackers).run(data)


# Exit codes of `python -m gd_hf.train`, and the words of the last console line for each.
EXIT_OUTCOMES = {
    0: "done",
    1: "failed: an unexpected error (the traceback is above; please report it)",
    2: "stopped: a bad recipe, data or output folder, or a full disk (the message above names it)",
    3: "trained and saved, but the Hub push failed (the command above pushes again)",
    4: "stopped: training became non-finite (the message above names the last good checkpoint)",
    130: "interrupted",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gd_hf.train", description="Train a recipe (see recipes/*.yaml).")
    parser.add_argument("recipe", help="path of a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    code = run_main(args.recipe, args.overrides)
    print(f"gd_hf.train: {EXIT_OUTCOMES[code]} (exit code {code})", file=sys.stderr, flush=True)
    return code


def run_main(recipe_path: str, overrides: list[str]) -> int:
    """Load and train a recipe; the exit code of the outcome (see `EXIT_OUTCOMES`)."""
    try:
        recipe = load_recipe(recipe_path, overrides)
        try:
            train(recipe)
        finally:
            PartialState().destroy_process_group()
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, NonFiniteWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except PushError as e:  # training finished and its outputs are saved; only the upload failed
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if out_of_space(e):  # the output folder's problem, not a bug: what was written is intact
            print(f"error: the disk is full or a file-size limit was reached ({type(e).__name__}: {e}). Nothing "
                  "written is half-done (checkpoints and exports are renamed into place whole): free space (or "
                  "raise the limit) and launch again, and the run resumes from its last checkpoint", file=sys.stderr)  # fmt: skip
            return 2
        import traceback

        traceback.print_exc()
        return 1
    return 0


def out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk, quota or file-size limit (libraries wrap
    them: safetensors and torch.save raise their own with the system's message)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(words in str(error) for words in ("No space left on device", "Disk quota exceeded", "File too large")):
            return True
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
