import torch

from gd_hf.pseudo_labels import filter_pseudo_labels, pseudo_label_quality

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
    # query 0 matches object 0; query 1 has the same (top-half) mask but object 1 is the bottom half
    assert quality == {"precision": 0.5, "recall": 0.5}
