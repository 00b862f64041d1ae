"""A model family of one's own, from a test file and no edit under `gd_hf/`: the example of docs/models.md, "A model family of your own".

`ToySegFamily` is a complete `gd_hf.models.protocol.ModelFamily` around a ~20 k-parameter query model (a strided
conv stem, learned queries whose dot product with the features gives the masks; Mask2Former's Hungarian
criterion as its loss). It trains the whole method in one launch (supervised teacher, guided burn-in, EMA),
evaluates, exports a vanilla transformers folder that `from_pretrained` loads back, and its card and recipe
checks are its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForUniversalSegmentation, PretrainedConfig, PreTrainedModel
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
from transformers.utils import ModelOutput

from gd_hf.config import RecipeError
from gd_hf.models import common
from gd_hf.models.protocol import FamilyCard, Predictions

from .conftest import ONE_LAUNCH_SSL, ROOT, demo_recipe, tiny_overrides


class ToySegConfig(PretrainedConfig):
    model_type = "toyseg"

    def __init__(self, hidden_dim: int = 16, num_queries: int = 8, train_num_points: int = 256,
                 no_object_weight: float = 0.1, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, **kwargs):  # fmt: skip
        self.hidden_dim, self.num_queries, self.train_num_points = hidden_dim, num_queries, train_num_points
        self.no_object_weight, self.class_weight = no_object_weight, class_weight
        self.mask_weight, self.dice_weight = mask_weight, dice_weight
        self.oversample_ratio, self.importance_sample_ratio = 3.0, 0.75  # (Mask2FormerLoss reads them)
        super().__init__(**kwargs)


@dataclass
class ToySegOutput(ModelOutput):
    class_queries_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None


class ToySegModel(PreTrainedModel):
    config_class = ToySegConfig
    main_input_name = "pixel_values"

    def __init__(self, config: ToySegConfig):
        super().__init__(config)
        d = config.hidden_dim
        self.stem = nn.Sequential(nn.Conv2d(3, d, 4, stride=4), nn.GELU(), nn.Conv2d(d, d, 2, stride=2))  # stride 8
        self.queries = nn.Embedding(config.num_queries, d)
        self.class_predictor = nn.Linear(d, config.num_labels + 1)
        self.weight_dict = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
                            "loss_dice": config.dice_weight}  # fmt: skip
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weight_dict)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> ToySegOutput:
        features = self.stem(pixel_values)  # (B, D, h, w)
        queries = self.queries.weight[None] + features.mean((2, 3))[:, None]  # (B, Q, D)
        masks = torch.einsum("bqd,bdhw->bqhw", queries, features)
        return ToySegOutput(class_queries_logits=self.class_predictor(queries), masks_queries_logits=masks)

    def get_loss_dict(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                      auxiliary_predictions) -> dict[str, torch.Tensor]:  # fmt: skip
        terms = self.criterion(masks_queries_logits=masks_queries_logits, class_queries_logits=class_queries_logits,
                               mask_labels=mask_labels, class_labels=class_labels,
                               auxiliary_predictions=auxiliary_predictions)  # fmt: skip
        return {k: v * self.weight_dict.get(k, 1.0) for k, v in terms.items()}


# transformers' own extension mechanism, so that `AutoModelForUniversalSegmentation.from_pretrained` loads an export.
AutoConfig.register("toyseg", ToySegConfig)
AutoModelForUniversalSegmentation.register(ToySegConfig, ToySegModel)


class ToySegFamily:
    """The whole `ModelFamily` protocol: what the method calls, and what the run calls around it."""

    name = "toyseg"
    display_name = "ToySeg"
    black_padding = False
    scheduled_buffers: tuple[str, ...] = ()

    def __init__(self, refuse_queries_above: int | None = None):
        self.refuse_queries_above = refuse_queries_above
        self.phases: set[str] = set()  # the method's phases this family trained in
        self.losses = 0

    def forward(self, model, pixel_values):
        outputs = model(pixel_values=pixel_values)
        return Predictions(outputs.class_queries_logits, outputs.masks_queries_logits)

    def loss(self, model, predictions, mask_labels, class_labels, *, no_object_weight=None):
        self.losses += 1
        return common.loss_terms(model, predictions, mask_labels, class_labels, no_object_weight)

    def padding_divisor(self, model):
        return 8

    def predict(self, model, pixel_values):
        return self.forward(model, pixel_values)

    def teacher_predict(self, model, pixel_values):
        return self.forward(model, pixel_values)

    def start_step(self, step, phase, student, teacher):
        self.phases.add(phase)
        return {}

    def load_pretrained(self, path):
        return ToySegModel.from_pretrained(path)

    def recipe_problems(self, recipe):
        limit = self.refuse_queries_above
        return [(limit is None or recipe.model.num_queries <= limit, "model.num_queries", f"must be <= {limit}")]

    def build_model(self, cfg, id2label):
        if cfg.pretrained is not None:  # a whole checkpoint (`ssl.student_init: teacher`), re-headed
            with common.loading_named(cfg.pretrained):
                model = ToySegModel.from_pretrained(cfg.pretrained, **common.labels(id2label),
                                                    ignore_mismatched_sizes=True)  # fmt: skip
            common.rehead(model, cfg)
            return model
        return ToySegModel(ToySegConfig(hidden_dim=cfg.hidden_dim, num_queries=cfg.num_queries,
                                        train_num_points=cfg.train_num_points, **common.labels(id2label)))  # fmt: skip

    def image_processor(self, model, data, padding_divisor):
        return Mask2FormerImageProcessorPil(
            size={"shortest_edge": data.eval_shortest_edge, "longest_edge": data.eval_longest_edge},
            size_divisor=padding_divisor, ignore_index=255, do_reduce_labels=False,
        )  # fmt: skip

    def lr_scale(self, model, name, layer_lr_decay):
        return 1.0 if name.startswith("stem.") else None

    def exported(self, model):
        return contextlib.nullcontext()

    def input_size_problem(self, model, shortest_edge, longest_edge):
        return None

    def card(self, cfg, pretrained):
        return FamilyCard("ToySegModel", f"ToySeg ({cfg.num_queries} queries, width {cfg.hidden_dim})")

    def usage_snippet(self, load, imports, image_path):
        return f"```python\n{imports}# register ToySegConfig / ToySegModel, then\nmodel = ToySegModel.from_pretrained({load})\n```"


def toy_recipe(root, out, *extra):
    return demo_recipe(tiny_overrides(root, out) + ONE_LAUNCH_SSL + ["model.family=toyseg", "model.hidden_dim=16",
                                                                     "ssl.student_init=teacher", *extra])  # fmt: skip


def test_a_family_from_a_test_file_trains_the_whole_method_evaluates_and_exports(tmp_path, synthetic_root):
    from gd_hf.data.coco import load_coco
    from gd_hf.evaluate import evaluate_model
    from gd_hf.train import train

    recipe = toy_recipe(synthetic_root, tmp_path / "run")
    family = ToySegFamily()
    metrics = train(recipe, model_family=family)
    # Every phase of the method trained through the family (burn-in and EMA with the unlabeled loss too).
    assert family.phases == {"supervised", "burn_in", "ema"} and family.losses >= 2 + 2 * 2, family.losses
    final = tmp_path / "run" / "final"
    assert json.loads((final / "eval_results.json").read_text())["AP"] == metrics["AP"]
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "toyseg" and config["architectures"] == ["ToySegModel"]
    assert (tmp_path / "run" / "teacher" / "final" / "model.safetensors").is_file()  # phase 1 exported too
    # The student started from the teacher (re-headed), then trained: its stem moved away from the teacher's.
    teacher = ToySegModel.from_pretrained(tmp_path / "run" / "teacher" / "final")
    student = AutoModelForUniversalSegmentation.from_pretrained(final)  # plain transformers loads the export
    assert isinstance(student, ToySegModel)
    assert not torch.equal(teacher.stem[0].weight, student.stem[0].weight)
    # The card is the family's own.
    card = (final / "README.md").read_text()
    assert "ToySeg instance-segmentation model" in card and "ToySeg (8 queries, width 16)" in card
    assert "- toyseg" in card  # its tag
    # The run's final AP is what the export scores, evaluated in-process with the family.
    source = load_coco(synthetic_root / "annotations" / "instances_val.json", synthetic_root / "val")
    again, results = evaluate_model(student.eval(), source, recipe.data, top_k=recipe.eval.top_k,
                                    family=ToySegFamily())  # fmt: skip
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    logged = json.loads(sorted((tmp_path / "run" / "predictions").glob("val_step_*.json"))[-1].read_text())
    assert len(results) == len(logged) > 0 and [r["score"] for r in results] == pytest.approx(
        [r["score"] for r in logged]
    )
    # `python -m gd_hf.push` cannot write a family of your own's card anew for a repository: it keeps the card.
    from gd_hf.hub.model_card import card_for_repo

    assert card_for_repo(final, "me/toyseg") is False and (final / "README.md").read_text() == card

    # A relaunch with another family class is a change to what the run trained: refused, naming it.
    class OtherToySegFamily(ToySegFamily):
        pass

    longer = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=3))
    with pytest.raises(RecipeError, match="model_family"):
        train(longer, model_family=OtherToySegFamily())


def test_a_familys_own_recipe_checks_and_its_name_are_enforced_before_any_work(tmp_path, synthetic_root):
    from gd_hf.train import train

    recipe = toy_recipe(synthetic_root, tmp_path / "run")
    with pytest.raises(RecipeError, match="model.num_queries must be <= 4"):
        train(recipe, model_family=ToySegFamily(refuse_queries_above=4))
    wrong = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, family="mask2former"))
    with pytest.raises(RecipeError, match="model.family: 'mask2former', but the model_family passed is ToySegFamily"):
        train(wrong, model_family=ToySegFamily())
    with pytest.raises(RecipeError, match="model.family: 'toyseg' is not one of 'mask2former', 'eomt'"):
        train(recipe)  # without the family object: no registry to find it in
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_family_missing_part_of_the_protocol_is_refused_naming_what_is_missing(tmp_path, synthetic_root):
    from gd_hf.train import train

    class HalfFamily(ToySegFamily):
        card = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match="lacks the ModelFamily method\\(s\\) card"):
        train(toy_recipe(synthetic_root, tmp_path / "run"), model_family=HalfFamily())


def test_the_docs_family_example_is_a_complete_family_that_builds_and_predicts(tmp_path, synthetic_root):
    """docs/models.md's shortened `ToySegFamily`, executed: the whole protocol, a model built and predicting."""
    import re

    from gd_hf.method import check_extension_points

    page = (ROOT / "docs" / "models.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", page, re.S | re.M)  # (fences at a line's start only)
    code = next(block for block in blocks if "class ToySegFamily" in block)
    namespace = {"ToySegConfig": ToySegConfig, "ToySegModel": ToySegModel}
    exec(compile(code, "docs/models.md", "exec"), namespace)
    family = namespace["ToySegFamily"]()
    recipe = toy_recipe(synthetic_root, tmp_path / "run")
    check_extension_points(None, family, recipe.ssl)
    model = family.build_model(recipe.model, {0: "a", 1: "b"})
    predictions = family.predict(model.eval(), torch.zeros(1, 3, 64, 64))
    assert predictions.class_logits.shape == (1, 8, 3) and predictions.mask_logits.shape == (1, 8, 8, 8)
    assert all(ok for ok, _, _ in family.recipe_problems(recipe))
    many = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, num_queries=100))
    assert [key for ok, key, _ in family.recipe_problems(many) if not ok] == ["model.num_queries"]
