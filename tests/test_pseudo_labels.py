import pytest
import torch

from gd_hf.method.pseudo_labels import PseudoLabels, filter_pseudo_labels, pseudo_label_quality

from .conftest import DEMO_RECIPE, ROOT

NO_OBJECT = 3  # 3 classes + "no object"


def logits_for(classes_probabilities: list[list[float]]) -> torch.Tensor:
    """(1, Q, 4) logits whose softmax is (close to) the given probabilities."""
    return torch.tensor(classes_probabilities).clamp(min=1e-6).log()[None]


def mask_logits(areas: list[int], size: int = 8) -> torch.Tensor:
    """(1, Q, size, size): query q is confident-foreground on its first `areas[q]` pixels."""
    masks = torch.full((len(areas), size * size), -20.0)
    for q, area in enumerate(areas):
        masks[q, :area] = 20.0
    return masks.view(1, len(areas), size, size)


def test_no_object_argmax_is_dropped():
    classes = logits_for([[0.05, 0.05, 0.05, 0.85], [0.9, 0.05, 0.03, 0.02]])
    pseudo = filter_pseudo_labels(classes, mask_logits([20, 20]))
    assert pseudo.class_labels[0].tolist() == [0]


def test_score_threshold_is_strict_and_configurable():
    classes = logits_for([[0.69, 0.11, 0.1, 0.1], [0.1, 0.71, 0.1, 0.09], [0.1, 0.1, 0.75, 0.05]])
    assert filter_pseudo_labels(classes, mask_logits([20, 20, 20])).class_labels[0].tolist() == [1, 2]
    assert filter_pseudo_labels(classes, mask_logits([20, 20, 20]), score_threshold=0.72).class_labels[0].tolist() == [
        2
    ]


def test_soft_area_must_exceed_min_area():
    classes = logits_for([[0.9, 0.05, 0.03, 0.02]] * 3)
    pseudo = filter_pseudo_labels(classes, mask_logits([5, 6, 0]))  # soft areas ~5, ~6, ~0 pixels
    assert len(pseudo.class_labels[0]) == 1
    assert pseudo.mask_labels[0].sum() == 6
    # A faint mask: sigmoid 0.4 everywhere = area 25.6 > 5, but no pixel passes 0.5: kept, empty hard mask.
    faint = torch.full((1, 1, 8, 8), torch.logit(torch.tensor(0.4)).item())
    kept = filter_pseudo_labels(logits_for([[0.9, 0.05, 0.03, 0.02]]), faint)
    assert len(kept.class_labels[0]) == 1 and kept.mask_labels[0].sum() == 0


def test_targets_are_argmax_class_and_hard_thresholded_mask():
    classes = logits_for([[0.05, 0.05, 0.88, 0.02]])
    masks = torch.full((1, 1, 4, 4), -1.0)
    masks[0, 0, 0, :3] = 0.1  # sigmoid 0.525 > 0.5
    masks[0, 0, 1, :] = 5.0
    pseudo = filter_pseudo_labels(classes, masks)
    assert pseudo.class_labels[0].tolist() == [2]
    expected = torch.zeros(4, 4)
    expected[0, :3] = 1
    expected[1, :] = 1
    assert torch.equal(pseudo.mask_labels[0][0], expected)
    assert pseudo.mask_labels[0].dtype == torch.float32
    assert abs(pseudo.scores[0].item() - 0.88) < 1e-4


def test_image_can_end_with_zero_pseudo_labels():
    classes = logits_for([[0.3, 0.3, 0.3, 0.1]] * 2)
    pseudo = filter_pseudo_labels(torch.cat([classes, classes]), torch.cat([mask_logits([10, 10])] * 2))
    assert pseudo.counts() == [0, 0]
    assert pseudo.mask_labels[0].shape == (0, 8, 8) and pseudo.class_labels[0].dtype == torch.long


def test_quality_against_hidden_labels():
    classes = logits_for([[0.9, 0.05, 0.03, 0.02], [0.05, 0.9, 0.03, 0.02]])
    pseudo = filter_pseudo_labels(classes, mask_logits([32, 32]))
    truth = torch.zeros(2, 16, 16)
    truth[0, :8] = 1  # = query 0's mask (first 32 of 64 pixels at 8x8 = top half), class 0
    truth[1, 8:] = 1
    quality = pseudo_label_quality(pseudo, [truth], [torch.tensor([0, 1])])
    # query 0 matches object 0; query 1 has the same (top-half) mask but object 1 is the bottom half: query 1
    # sits on object 0 with class 1, a wrong-class pseudo label
    assert quality == {
        "precision": 0.5,
        "recall": 0.5,
        "fp_duplicate": 0.0,
        "fp_wrong_class": 0.5,
        "fp_mislocated": 0.0,
        "fp_background": 0.0,
    }


def test_quality_sorts_every_wrong_pseudo_label_into_one_kind():
    def box(rows: slice, cols: slice) -> torch.Tensor:
        mask = torch.zeros(8, 8)
        mask[rows, cols] = 1
        return mask

    a, b = box(slice(0, 4), slice(0, 4)), box(slice(4, 8), slice(4, 8))
    truth, truth_classes = torch.stack([a, b]), torch.tensor([0, 1])
    pseudo = PseudoLabels(
        mask_labels=[
            torch.stack([a, a, b, box(slice(4, 8), slice(4, 5)), box(slice(0, 4), slice(6, 8))]),
            torch.stack([a]),  # an image with no true objects
        ],
        class_labels=[torch.tensor([0, 0, 2, 1, 0]), torch.tensor([1])],
        scores=[torch.tensor([0.90, 0.95, 0.85, 0.80, 0.75]), torch.tensor([0.9])],
    )
    quality = pseudo_label_quality(pseudo, [truth, torch.zeros(0, 8, 8)], [truth_classes, torch.tensor([])])
    # 6 pseudo labels: the hit on a; a again (duplicate); b with the wrong class; a quarter of b with b's class
    # (IoU 0.25: mislocated); one on nothing, plus the one in the empty image (background).
    assert quality == pytest.approx(
        {
            "precision": 1 / 6,
            "recall": 1 / 2,
            "fp_duplicate": 1 / 6,
            "fp_wrong_class": 1 / 6,
            "fp_mislocated": 1 / 6,
            "fp_background": 2 / 6,
        }
    )


def test_optional_overlap_rule_drops_lower_scoring_duplicates():
    classes = logits_for([[0.80, 0.1, 0.05, 0.05], [0.1, 0.85, 0.03, 0.02], [0.9, 0.05, 0.03, 0.02]])
    masks = mask_logits([32, 24, 32])  # queries 0 and 2: the same top half; query 1: IoU 24/32 = 0.75 with both
    assert filter_pseudo_labels(classes, masks).counts() == [3]  # the paper's rules keep duplicates
    pseudo = filter_pseudo_labels(classes, masks, max_overlap=0.5)
    # by score: query 2 (0.9) kept; query 1 (0.85) overlaps it by 0.75 (another class: still dropped); query 0 too
    assert pseudo.class_labels[0].tolist() == [0] and pseudo.scores[0].tolist() == pytest.approx([0.9])
    assert pseudo.mask_labels[0].sum() == 32
    # a looser limit keeps query 1 (IoU 0.75 <= 0.8) but not query 0 (IoU 1 with query 2)
    assert filter_pseudo_labels(classes, masks, max_overlap=0.8).class_labels[0].tolist() == [0, 1]


def test_overlap_rule_is_a_recipe_setting():
    from gd_hf.config import RecipeError, SslConfig, load_recipe

    recipes = ROOT / "recipes"
    assert SslConfig().pseudo_label_max_overlap is None  # the paper: off, unless a recipe turns it on
    assert load_recipe(recipes / "coco_1pct.yaml").ssl.pseudo_label_max_overlap is None  # paper recipes: as the paper
    recipe = DEMO_RECIPE
    assert load_recipe(recipe).ssl.pseudo_label_max_overlap == 0.5
    assert load_recipe(recipe, ["ssl.pseudo_label_max_overlap=null"]).ssl.pseudo_label_max_overlap is None
    with pytest.raises(RecipeError, match="ssl.pseudo_label_max_overlap"):
        load_recipe(recipe, ["ssl.pseudo_label_max_overlap=1.5"])


def soft_but_empty(size: int = 8) -> torch.Tensor:
    """(size, size) mask logits at sigmoid 0.4 everywhere: soft area 0.4 * 64 = 25.6 pixels (the soft-area rule
    passes it), hard mask (> 0.5) empty."""
    return torch.full((size, size), torch.logit(torch.tensor(0.4)).item())


def test_an_empty_hard_mask_passes_the_papers_rules_is_counted_and_dropped_on_request():
    classes = logits_for([[0.9, 0.05, 0.03, 0.02]] * 3)
    masks = mask_logits([20, 0, 0])
    masks[0, 1] = soft_but_empty()
    masks[0, 1].view(-1)[:2] = 20.0  # query 1: a hard mask of 2 pixels
    masks[0, 2] = soft_but_empty()  # query 2: what an EoMT run's picture counted but drew no pixel of
    paper = filter_pseudo_labels(classes, masks)
    assert paper.counts() == [3] and paper.mask_labels[0][2].sum() == 0  # "this class, no pixels" as a target
    assert paper.small_masks == [1]  # counted: the empty one (off: below 1 pixel)
    dropped = filter_pseudo_labels(classes, masks, min_mask_pixels=1)
    assert dropped.counts() == [2] and dropped.small_masks == [1]
    assert [int(m.sum()) for m in dropped.mask_labels[0]] == [20, 2]
    tiny = filter_pseudo_labels(classes, masks, min_mask_pixels=4)  # query 1's 2 pixels go too
    assert tiny.counts() == [1] and tiny.small_masks == [2] and tiny.mask_labels[0][0].sum() == 20


def test_small_masks_reach_the_log_and_the_rule_is_a_recipe_setting():
    from gd_hf.config import RecipeError, load_recipe
    from gd_hf.method import PseudoLabelRules, pseudo_label_figures

    classes = logits_for([[0.9, 0.05, 0.03, 0.02]] * 2)
    masks = mask_logits([20, 0])
    masks[0, 1] = soft_but_empty()
    recipe = DEMO_RECIPE
    rules = PseudoLabelRules.from_recipe(load_recipe(recipe, ["ssl.pseudo_label_min_mask_pixels=1"]).ssl)
    assert rules.min_mask_pixels == 1 and rules(classes, masks).counts() == [1]
    pseudo = PseudoLabelRules.from_recipe(load_recipe(recipe).ssl)(classes, masks)
    figures = pseudo_label_figures(pseudo, {"hidden_classes": [torch.zeros(0, dtype=torch.long)]})
    assert figures["pseudo_labels_small_mask_per_image"] == 1.0 and figures["pseudo_labels_per_image"] == 2.0
    custom = PseudoLabels(pseudo.mask_labels, pseudo.class_labels, pseudo.scores)  # a rule that does not count
    assert "pseudo_labels_small_mask_per_image" not in pseudo_label_figures(custom, {"hidden_classes": [[]]})
    with pytest.raises(RecipeError, match="ssl.pseudo_label_min_mask_pixels"):
        load_recipe(recipe, ["ssl.pseudo_label_min_mask_pixels=-1"])
