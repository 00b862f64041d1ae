"""One evaluation driver: the AP training prints and the AP of `python -m gd_hf.evaluate` on its export are the
same numbers from the same predictions."""

from __future__ import annotations

import json

import pytest
from accelerate.state import AcceleratorState

from gd_hf.evaluate import main as evaluate_main
from gd_hf.train import train

from .conftest import EOMT_TINY, demo_recipe, tiny_overrides


@pytest.mark.parametrize("family", [[], EOMT_TINY], ids=["mask2former", "eomt"])
def test_training_and_the_evaluate_command_give_the_same_ap_and_predictions(varied_root, tmp_path, capsys, family):
    """Mixed-size val images (padding differs per batch; EoMT: each padded to its square), the run's final export
    scored by both paths (the export as users load it: EoMT without masked attention)."""
    out = tmp_path / "run"
    overrides = tiny_overrides(varied_root, out) + family + ["train.max_steps=4", "train.eval_every=4", "eval.top_k=20"]
    AcceleratorState._reset_state(reset_partial_state=True)
    final = train(demo_recipe(overrides))
    recipe = demo_recipe(overrides)
    during_training = json.loads((out / "predictions" / "val_step_00000004.json").read_text())
    assert during_training  # the model predicts something: the comparison is not of two empty lists
    capsys.readouterr()
    # The run's folder, with no --top-k: the command takes the final export and the instances per image its
    # metrics were measured with (20 of 8 queries x 4 classes: the default 100 would keep all 32 and differ).
    code = evaluate_main([str(out), recipe.data.val_annotations, recipe.data.val_images,
                          "--batch-size", str(recipe.eval.batch_size), "--num-workers", "0",
                          "--out", str(tmp_path / "cli.json")])  # fmt: skip
    assert code == 0
    said = capsys.readouterr()
    assert f"using its final/ export ({out / 'final'})" in said.err
    printed = json.loads(said.out)
    by_command = json.loads((tmp_path / "cli.json").read_text())

    def key(result):
        return result["image_id"], result["category_id"], result["score"], result["segmentation"]["counts"]

    assert sorted(by_command, key=key) == sorted(during_training, key=key)
    assert printed == final == json.loads((out / "final_metrics.json").read_text())["final"]
    assert max(sum(r["image_id"] == i for r in by_command) for i in {r["image_id"] for r in by_command}) == 20
