"""`gd_hf.eomt` (groundwork of the EoMT family, issue 27): the family's forward gives every masked block's
predictions, its loss is EoMT's own, the teacher's predictions are deterministic, and mask annealing is a pure
function of the step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import EomtConfig, EomtForUniversalSegmentation
from transformers.models.eomt import modeling_eomt

from gd_hf.config import SslConfig
from gd_hf.eomt import EomtFamily, mask_probabilities, set_mask_probabilities
from gd_hf.method import GuidedDistillation, one_frame
from gd_hf.teacher import EmaTeacher

from .test_ddp_units import _fixed_points, _same_draw_for_the_same_shape
from .test_method_flow import batches, rectangles


def tiny_eomt(seed: int = 0, registers: int = 1) -> EomtForUniversalSegmentation:
    """A 4-layer ViT whose last 2 blocks take the queries, 64 px inputs (4 x 4 patches of 16 px)."""
    torch.manual_seed(seed)
    config = EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=16,
                        num_queries=8, num_blocks=2, num_register_tokens=registers, train_num_points=256,
                        id2label={i: name for i, name in enumerate("abcd")})  # fmt: skip
    return EomtForUniversalSegmentation(config)


def test_the_forward_pass_gives_every_masked_blocks_predictions_and_the_last():
    model = tiny_eomt().eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    predictions = EomtFamily().forward(model, pixel_values)
    outputs = model(pixel_values=pixel_values)
    assert torch.equal(predictions.class_logits, outputs.class_queries_logits)
    assert torch.equal(predictions.mask_logits, outputs.masks_queries_logits)
    assert len(predictions.auxiliary) == model.config.num_blocks  # one per masked block, before the last
    for classes, masks in predictions.auxiliary:
        assert classes.shape == (2, 8, 5) and masks.shape == (2, 8, 16, 16)  # masks at stride 4
    assert "predict" not in vars(model)  # the recording was for that one pass


def test_the_familys_loss_is_eomts_own_loss(monkeypatch):
    """EoMT's forward with labels sums the matched loss of every block's predictions; the family computes it from
    the recorded predictions (what Guided Distillation needs: two target sets from one forward pass)."""
    monkeypatch.setattr(modeling_eomt.EomtLoss, "sample_points_using_uncertainty", _fixed_points)
    monkeypatch.setattr(torch, "rand", _same_draw_for_the_same_shape)
    model = tiny_eomt().train()  # masked attention with probability 1: no random un-masking
    samples = [rectangles(seed, count, 64, 64) for seed, count in ((0, 2), (1, 3))]
    pixel_values = torch.stack([image.float() / 255 for image, _, _ in samples])
    mask_labels = [masks.float() for _, masks, _ in samples]
    class_labels = [classes for _, _, classes in samples]
    own = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels).loss
    family = EomtFamily()
    terms = family.loss(model, family.forward(model, pixel_values), mask_labels, class_labels)
    assert len(terms) == 3 * (model.config.num_blocks + 1)  # class, mask, dice for every block and the last
    assert torch.allclose(sum(terms.values()), own, rtol=1e-5)


def test_the_teacher_predicts_deterministically_and_leaves_the_annealing_buffer_as_it_was():
    model = tiny_eomt().eval()
    set_mask_probabilities(model, [0.5, 0.5])  # mid-annealing: eval-mode EoMT un-masks random queries
    pixel_values = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    first, second = model(pixel_values=pixel_values), model(pixel_values=pixel_values)
    assert not torch.equal(first.masks_queries_logits, second.masks_queries_logits)  # the randomness is real
    family = EomtFamily()
    a, b = family.predict(model, pixel_values), family.predict(model, pixel_values)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.class_logits, b.class_logits)
    assert model.attn_mask_probs.tolist() == [0.5, 0.5]
    set_mask_probabilities(model, [0.0, 0.0])  # = inference: the predictions are those
    assert torch.equal(model(pixel_values=pixel_values).masks_queries_logits, a.mask_logits)


# The reference's COCO instance schedule (tue-mps/eomt, coco_instance_eomt_large_640.yaml): block k anneals over
# 2 epochs of 7,391 steps, one after another from epoch 2.
STARTS, ENDS = [14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, [1.0, 1.0, 1.0, 1.0]),
        (14781, [1.0, 1.0, 1.0, 1.0]),
        (14782, [1.0, 1.0, 1.0, 1.0]),  # progress 0
        (22173, [0.5**0.9, 1.0, 1.0, 1.0]),  # half-way through block 0
        (29564, [0.0, 1.0, 1.0, 1.0]),
        (66519, [0.0, 0.0, 0.0, (1 - 7391 / 14782) ** 0.9]),
        (73910, [0.0, 0.0, 0.0, 0.0]),
        (10**6, [0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_mask_annealing_is_the_references_schedule_as_a_function_of_the_step(step, expected):
    assert mask_probabilities(step, STARTS, ENDS) == pytest.approx(expected)


def test_mask_annealing_refuses_a_schedule_without_one_interval_per_block():
    with pytest.raises(ValueError, match="one \\(start < end\\) pair per block"):
        mask_probabilities(0, [10, 20], [20])
    with pytest.raises(ValueError, match="one \\(start < end\\) pair per block"):
        mask_probabilities(0, [10], [10])
    with pytest.raises(ValueError, match="2 masked blocks, the schedule 3"):
        set_mask_probabilities(tiny_eomt(), [1.0, 1.0, 1.0])


def test_a_guided_distillation_step_on_eomt_scores_targets_in_one_square_frame():
    """Labeled (48x64) and unlabeled (64x40) batches padded to one frame of `image_size` (64) square: the teacher
    sees the weak view there, its pseudo labels are at the student's mask resolution, and the loss has both terms."""
    student, teacher = tiny_eomt(0).train(), EmaTeacher(tiny_eomt(1))
    frames = []
    student.register_forward_pre_hook(lambda _m, _a, kwargs: frames.append(kwargs["pixel_values"].shape),
                                      with_kwargs=True)  # fmt: skip
    ssl = dataclasses.replace(SslConfig(), enabled=True, pseudo_label_score_threshold=0.0, pseudo_label_min_area=1)
    method = GuidedDistillation(ssl, EomtFamily(), teacher)
    labeled, unlabeled = batches()
    pseudo = method.pseudo_labels(one_frame(labeled, unlabeled)[1]["weak_pixel_values"])
    assert sum(pseudo.counts()) > 0 and all(m.shape[-2:] == (16, 16) for m in pseudo.mask_labels if len(m))
    loss, logged = method.loss(student, student, labeled, unlabeled)
    assert frames == [torch.Size([4, 3, 64, 64])]  # 2 labeled + 2 strong views, one 64 x 64 frame
    assert torch.isfinite(loss) and logged["loss_unsup"] > 0 and logged["loss_sup"] > 0
    loss.backward()
    assert student.query.weight.grad is not None  # the queries learn from both terms


def test_a_dinov2_checkpoint_saved_with_save_pretrained_loads_into_the_eomt_vit(tmp_path):
    """Every ViT weight arrives (o_proj -> out_proj), and the ViT computes what DINOv2 computes: the hidden states
    before the queries join are DINOv2's, token for token ([CLS] with its position embedding folded in)."""
    from transformers import Dinov2Config, Dinov2Model

    from gd_hf.eomt import load_dinov2_weights

    torch.manual_seed(3)
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                      patch_size=16))  # fmt: skip
    with torch.no_grad():  # transformers starts some of these at 0 or 1: make every weight tell
        for tensor in dinov2.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.1)
    dinov2.save_pretrained(tmp_path / "dinov2")
    loaded = Dinov2Model.from_pretrained(tmp_path / "dinov2").eval()
    model = tiny_eomt(seed=4, registers=0).eval()  # plain DINOv2 has no register tokens
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_dinov2_weights(model, loaded)
    state, source = model.state_dict(), loaded.state_dict()
    for name, tensor in source.items():
        if name.startswith("encoder.layer."):
            eomt_name = "layers." + name.removeprefix("encoder.layer.").replace("o_proj", "out_proj")
            assert torch.equal(state[eomt_name], tensor), name
    assert torch.equal(state["layernorm.weight"], source["layernorm.weight"])
    assert torch.equal(state["embeddings.patch_embeddings.projection.weight"],
                       source["embeddings.patch_embeddings.projection.weight"])  # fmt: skip
    for name in ("query.weight", "class_predictor.weight", "mask_head.fc1.weight"):  # the heads start fresh
        assert torch.equal(state[name], fresh[name])
    pixel_values = torch.randn(2, 3, 64, 64)
    hidden = {}
    first_query_layer = model.config.num_hidden_layers - model.config.num_blocks
    model.layers[first_query_layer - 1].register_forward_hook(lambda _m, _a, out: hidden.update(eomt=out))
    model(pixel_values=pixel_values)
    expected = loaded(pixel_values=pixel_values, output_hidden_states=True).hidden_states[first_query_layer]
    assert torch.allclose(hidden["eomt"], expected, atol=1e-5)


def test_dinov2_weights_of_another_size_are_refused_naming_the_mismatch():
    from transformers import Dinov2Config, Dinov2Model

    from gd_hf.eomt import load_dinov2_weights

    wider = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                     patch_size=16))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit this EoMT: .*other shapes"):
        load_dinov2_weights(tiny_eomt(registers=0), wider)
    same_size = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                         patch_size=16))  # fmt: skip
    with pytest.raises(ValueError, match="no weights for EoMT's \\['embeddings.register_tokens'\\]"):
        load_dinov2_weights(tiny_eomt(registers=1), same_size)  # EoMT with a register token, DINOv2 without


def test_an_export_loads_and_predicts_with_plain_transformers(tmp_path):
    """A mid-annealing model, prepared for export and saved with its processor: the Auto classes load it, a
    non-square image is padded to the model's square, two predictions agree, and instance post-processing works.
    `pipeline("image-segmentation")` works with its default subtask; with `subtask="instance"` transformers 5.24
    passes `mask_threshold`, which EoMT's post-processing does not take (when this test fails, transformers has
    fixed it: say so in the README)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

    from gd_hf.eomt import eomt_image_processor, prepare_for_export

    model = tiny_eomt()
    set_mask_probabilities(model, [0.3, 1.0])
    prepare_for_export(model)
    model.save_pretrained(tmp_path / "export")
    eomt_image_processor(64).save_pretrained(tmp_path / "export")
    loaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "export").eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "export")
    assert type(loaded).__name__ == "EomtForUniversalSegmentation" and loaded.attn_mask_probs.tolist() == [0.0, 0.0]
    image = Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype("uint8"))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    with torch.no_grad():
        first, second = loaded(pixel_values=pixel_values), loaded(pixel_values=pixel_values)
    assert torch.equal(first.masks_queries_logits, second.masks_queries_logits)
    instances = processor.post_process_instance_segmentation(first, target_sizes=[(48, 80)], threshold=0.0)[0]
    assert instances["segmentation"].shape == (48, 80) and instances["segments_info"]
    segmenter = pipeline("image-segmentation", model=str(tmp_path / "export"))
    assert isinstance(segmenter(image), list)
    with pytest.raises(TypeError, match="mask_threshold"):
        segmenter(image, subtask="instance")
