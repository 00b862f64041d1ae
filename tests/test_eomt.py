"""`gd_hf.models.eomt`, the EoMT model family (`model.family: eomt`): the family's forward gives every masked block's
predictions, its loss is EoMT's own, the teacher's predictions are deterministic, mask annealing is a pure
function of the step that the EMA never averages, mixed-size batches become one square frame with every target on
its object, DINOv2 and EoMT checkpoints load, and exports are plain transformers folders that predict as at
inference. (Real runs: tests/test_processes.py and tests/test_evaluation_driver.py run EoMT too.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import EomtConfig, EomtForUniversalSegmentation
from transformers.models.eomt import modeling_eomt

from gd_hf.config import SslConfig
from gd_hf.method import GuidedDistillation, Predictions, one_frame
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models.eomt import EomtFamily, MaskAnnealing, mask_probabilities, set_mask_probabilities

from .conftest import demo_recipe
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
    student, teacher = tiny_eomt(0).train(), EmaTeacher(tiny_eomt(1), EomtFamily.scheduled_buffers)
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

    from gd_hf.models.vit_weights import load_dinov2_weights

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

    from gd_hf.models.vit_weights import load_dinov2_weights

    wider = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                     patch_size=16))  # fmt: skip
    with pytest.raises(ValueError, match="do not fit this EoMT: .*other shapes"):
        load_dinov2_weights(tiny_eomt(registers=0), wider)
    same_size = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                         patch_size=16))  # fmt: skip
    with pytest.raises(ValueError, match="no weights for EoMT's \\['embeddings.register_tokens'\\]"):
        load_dinov2_weights(tiny_eomt(registers=1), same_size)  # EoMT with a register token, DINOv2 without


def test_an_export_loads_and_predicts_with_plain_transformers(tmp_path):
    """A mid-annealing model exported as runs export: the live model keeps its annealing, the export has none; the
    Auto classes load it, a non-square image is padded to the model's square, two predictions agree, instance
    post-processing works. `pipeline("image-segmentation")` works with its default subtask (EoMT's panoptic
    post-processing); with `subtask="instance"` transformers 5.24's PIL backend (no torchvision, as here) gets
    `mask_threshold`, which `EomtImageProcessorPil.post_process_instance_segmentation` does not take (when this
    test fails, transformers has fixed it: say so in the README and the card's snippet)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

    from gd_hf.hub.export import export_model
    from gd_hf.models.eomt import eomt_image_processor

    model = tiny_eomt()
    set_mask_probabilities(model, [0.3, 1.0])
    export_model(model, eomt_image_processor(64), tmp_path / "export")
    assert model.attn_mask_probs.tolist() == pytest.approx([0.3, 1.0])  # training goes on as it was
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


def test_the_cards_eomt_snippet_runs_as_written(tmp_path, monkeypatch):
    """The usage snippet of an EoMT card, run as written next to an image (plain transformers, no gd_hf)."""
    import numpy as np
    from PIL import Image

    from gd_hf.hub.export import export_model
    from gd_hf.hub.snippets import usage_snippet
    from gd_hf.models.eomt import eomt_image_processor

    export_model(tiny_eomt(), eomt_image_processor(64), tmp_path / "export")
    Image.fromarray((np.random.default_rng(0).random((40, 72, 3)) * 255).astype("uint8")).save(tmp_path / "image.jpg")
    snippet = usage_snippet(str(tmp_path / "export"), EomtFamily())
    code = snippet.split("```python\n", 1)[1].rsplit("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "snippet", "exec"), namespace)  # noqa: S102 - the card's own code
    assert namespace["result"]["segmentation"].shape == (40, 72)
    assert type(namespace["model"]).__name__ == "EomtForUniversalSegmentation"


def test_the_demo_recipe_trains_eomt_with_one_override():
    """`recipes/demo_synthetic.yaml model.family=eomt`: a ViT of about the demo Mask2Former's parameter count, and a
    family whose annealing spans the phase's steps (the student's max_steps; the teacher's in phase 1)."""
    from gd_hf.config import teacher_recipe_of
    from gd_hf.models import build_model, family_for

    recipe = demo_recipe(["model.family=eomt"])
    id2label = {i: name for i, name in enumerate("abcd")}
    eomt, mask2former = build_model(recipe.model, id2label), build_model(dataclasses.replace(recipe.model,
                                                                                              family="mask2former"), id2label)  # fmt: skip
    assert type(eomt).__name__ == "EomtForUniversalSegmentation" and eomt.config.image_size == 256
    count = sum(p.numel() for p in eomt.parameters()) / sum(p.numel() for p in mask2former.parameters())
    assert 0.9 < count < 1.2
    student, teacher = family_for(recipe), family_for(teacher_recipe_of(recipe))
    assert (student.annealing.starts, student.annealing.ends) == ([167, 500], [500, 833])  # of 1000 steps
    assert (teacher.annealing.starts, teacher.annealing.ends) == ([100, 300], [300, 500])  # of 600 steps


def test_the_default_span_is_the_references_schedule_at_its_step_count():
    """[1/6, 5/6] of the reference's 12 epochs x 7,391 steps, over 4 blocks: its start and end steps exactly."""
    annealing = MaskAnnealing.from_recipe(load_recipe_model(), 12 * 7391, 4)
    assert (annealing.starts, annealing.ends) == (STARTS, ENDS)
    assert annealing.probabilities(22173) == pytest.approx([0.5**0.9, 1.0, 1.0, 1.0])


def load_recipe_model():
    from gd_hf.config import ModelConfig

    return ModelConfig(family="eomt")


def test_a_layer_lr_decay_for_mask2former_is_refused(tmp_path):
    from gd_hf.config import RecipeError
    from gd_hf.models import check_recipe

    from .conftest import tiny_overrides

    recipe = demo_recipe(tiny_overrides(tmp_path, tmp_path / "o")
                         + ["train.layer_lr_decay=0.8"])  # fmt: skip
    with pytest.raises(RecipeError, match="train.layer_lr_decay applies to EoMT's ViT only"):
        check_recipe(recipe)  # the family's check (training runs it first, before any work)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop_size=128", "data.crop_size must be <= model.eomt_image_size 64"),
        ("data.eval_longest_edge=80", "data.eval_shortest_edge and data.eval_longest_edge must both be"),
        ("model.eomt_mask_annealing=[0.5, 0.5]", "model.eomt_mask_annealing must be \\[from, to\\]"),
        ("model.eomt_mask_annealing=[0.5]", "model.eomt_mask_annealing must be \\[from, to\\]"),
        ("model.eomt_query_blocks=4", "model.eomt_query_blocks must be at most model.eomt_layers 3"),
        ("model.eomt_heads=3", "model.eomt_heads must be > 0 and divide model.eomt_hidden_size 32"),
        ("model.eomt_image_size=72", "model.eomt_image_size must be a positive multiple of model.eomt_patch_size"),
        ("train.layer_lr_decay=0", "train.layer_lr_decay must lie in \\(0, 1\\]"),
    ],
)
def test_recipe_values_eomt_cannot_take_are_refused_naming_the_key(tmp_path, override, message):
    from gd_hf.config import RecipeError
    from gd_hf.models import check_recipe

    from .conftest import EOMT_TINY, tiny_overrides

    with pytest.raises(RecipeError, match=message):  # the recipe's own range checks, then the family's
        check_recipe(demo_recipe(tiny_overrides(tmp_path, tmp_path / "o")
                                 + EOMT_TINY + [override]))  # fmt: skip


def test_the_teacher_masks_as_the_phase_and_the_student_say_and_the_ema_never_averages_them():
    """Burn-in: the fixed teacher (annealed to its end in phase 1) predicts without masks; EMA with `follow`: in the
    blocks where the student's probability is >= 0.5; with `none`: never. The EMA copy and update leave the
    teacher's buffer alone (an average would be a value strictly between 0 and 1: random un-masking)."""
    student, teacher = tiny_eomt(0), EmaTeacher(tiny_eomt(1), EomtFamily.scheduled_buffers)
    annealing = MaskAnnealing([10, 20], [20, 30])
    follow, none = EomtFamily(annealing, "follow"), EomtFamily(annealing, "none")
    for family, step, phase, student_expected, teacher_expected in [
        (follow, 5, "burn_in", [1.0, 1.0], [0.0, 0.0]),
        (follow, 5, "ema", [1.0, 1.0], [1.0, 1.0]),
        (follow, 15, "ema", [0.5**0.9, 1.0], [1.0, 1.0]),  # 0.536: still mostly masked
        (follow, 18, "ema", [0.2**0.9, 1.0], [0.0, 1.0]),
        (follow, 25, "ema", [0.0, 0.5**0.9], [0.0, 1.0]),
        (follow, 30, "ema", [0.0, 0.0], [0.0, 0.0]),
        (none, 15, "ema", [0.5**0.9, 1.0], [0.0, 0.0]),
    ]:
        figures = family.start_step(step, phase, student, teacher.model)
        assert student.attn_mask_probs.tolist() == pytest.approx(student_expected), (step, phase)
        assert teacher.model.attn_mask_probs.tolist() == teacher_expected, (family.teacher_masks, step, phase)
        assert figures["mask_prob/block_0"] == pytest.approx(student_expected[0])
        assert figures["teacher_masked_blocks"] == sum(teacher_expected)
    assert follow.teacher_probabilities("ema", [0.5, 0.49]) == [1.0, 0.0]  # the boundary: masked at exactly 0.5
    follow.start_step(15, "ema", student, teacher.model)
    teacher.copy_from(student)
    teacher.update(student, 0.5)
    assert teacher.model.attn_mask_probs.tolist() == [1.0, 1.0]  # as start_step set it, not the student's 0.536
    assert torch.equal(teacher.model.query.weight, student.query.weight)  # (the weights themselves were copied)


def test_the_teacher_in_training_predicts_the_same_twice_and_refuses_a_random_masking():
    model = tiny_eomt().eval()
    family = EomtFamily(MaskAnnealing([0, 10], [10, 20]))
    set_mask_probabilities(model, [0.0, 1.0])  # what start_step writes: 0 or 1
    pixel_values = torch.randn(2, 3, 64, 64)
    a, b = family.teacher_predict(model, pixel_values), family.teacher_predict(model, pixel_values)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.class_logits, b.class_logits)
    assert not torch.equal(a.mask_logits, family.predict(model, pixel_values).mask_logits)  # the masks tell
    set_mask_probabilities(model, [0.5, 1.0])
    with pytest.raises(ValueError, match="would un-mask random queries"):
        family.teacher_predict(model, pixel_values)


def test_layer_wise_lr_decay_gives_each_vit_block_the_references_factor():
    """Block i of L at lr x multiplier x decay^(L-1-i), the embeddings as block 0, the final norm and the heads
    at their full rates (the EoMT reference's llrd); Mask2Former's groups are the four they were."""
    from gd_hf.config import TrainConfig
    from gd_hf.run.optim import parameter_groups

    model = tiny_eomt()  # 4 layers
    cfg = TrainConfig(lr=1e-3, backbone_lr_multiplier=0.5, layer_lr_decay=0.8)
    lr_of = {id(p): group["lr"] for group in parameter_groups(model, cfg) for p in group["params"]}
    named = dict(model.named_parameters())
    for name, parameter in named.items():
        if name.startswith("layers."):  # every parameter of every block, attention, norms and layer scales included
            i = int(name.split(".")[1])
            assert lr_of[id(parameter)] == pytest.approx(1e-3 * 0.5 * 0.8 ** (3 - i)), name
    assert lr_of[id(named["embeddings.patch_embeddings.projection.weight"])] == pytest.approx(1e-3 * 0.5 * 0.8**3)
    assert lr_of[id(named["embeddings.cls_token"])] == pytest.approx(1e-3 * 0.5 * 0.8**3)
    assert lr_of[id(named["layernorm.weight"])] == pytest.approx(1e-3 * 0.5)
    for name in (
        "query.weight",
        "class_predictor.weight",
        "mask_head.fc1.weight",
        "upscale_block.block.0.conv1.weight",
    ):
        assert lr_of[id(named[name])] == pytest.approx(1e-3), name
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def square_sample(height: int, width: int, box: tuple[int, int, int, int], unlabeled: bool) -> dict:
    top, left, bottom, right = box
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0, top:bottom, left:right] = 255
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[0, top:bottom, left:right] = True
    if unlabeled:
        return {
            "weak": image,
            "strong": image,
            "hidden_masks": mask,
            "hidden_classes": torch.tensor([0]),
            "image_id": 2,
        }
    return {"image": image, "masks": mask, "classes": torch.tensor([0]), "image_id": 1}


class PerfectTeacherFamily(EomtFamily):
    """EoMT, but the teacher segments the bright square of its input exactly, at EoMT's mask resolution (1/4):
    its pseudo labels are right only if the teacher's frame and the student's are one."""

    def teacher_predict(self, model, pixel_values):
        square = (pixel_values[:, 0] > 1.0).float()[:, None]
        coarse = F.avg_pool2d(square, 4)[:, 0] > 0.5
        masks = torch.full((len(pixel_values), 8, *coarse.shape[-2:]), -12.0)
        masks[:, 0] = torch.where(coarse, 12.0, -12.0)
        classes = torch.full((len(pixel_values), 8, 5), -12.0)
        classes[:, 0, 0], classes[:, 1:, -1] = 12.0, 12.0
        return Predictions(classes, masks)


@pytest.mark.parametrize(
    ("labeled_size", "unlabeled_size", "labeled_box", "unlabeled_box"),
    [((32, 48), (64, 40), (4, 8, 20, 24), (36, 12, 60, 36)), ((64, 24), (40, 64), (40, 4, 60, 20), (8, 36, 24, 60))],
)
def test_a_gd_step_on_eomt_with_mixed_sizes_keeps_every_target_on_its_object(
    monkeypatch, labeled_size, unlabeled_size, labeled_box, unlabeled_box
):
    """Non-square crops smaller than the square, labeled and unlabeled of other sizes: the real EoMT student and
    the teacher see one `image_size` square frame, padded black (as EoMT's processor pads), and every target (labels and pseudo labels alike) scored
    against the student's masks covers its object's pixels in that frame."""
    from gd_hf.data.loading import collate_train, collate_unlabeled

    labeled = collate_train([square_sample(*labeled_size, labeled_box, False)] * 2, 64, EomtFamily.black_padding)
    unlabeled = collate_unlabeled([square_sample(*unlabeled_size, unlabeled_box, True)] * 2, 64, True)
    student, teacher = tiny_eomt(0).train(), EmaTeacher(tiny_eomt(1), EomtFamily.scheduled_buffers)
    seen, targets = [], []
    student.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    family = PerfectTeacherFamily(MaskAnnealing([0, 1], [1, 2]))
    real_loss = EomtFamily.loss

    def loss_spy(self, model, predictions, mask_labels, class_labels):
        targets.append((mask_labels, class_labels, predictions.mask_logits.shape[-2:]))
        return real_loss(self, model, predictions, mask_labels, class_labels)

    monkeypatch.setattr(EomtFamily, "loss", loss_spy)
    ssl = dataclasses.replace(SslConfig(), enabled=True, pseudo_label_min_area=1)
    method = GuidedDistillation(ssl, family, teacher)
    scheduled = method.start_step(0, student).scheduled
    loss, logged = method.loss(student, student, labeled, unlabeled, scheduled=scheduled)
    assert torch.isfinite(loss) and logged["pseudo_labels_per_image"] == 1 and logged["pseudo_precision"] == 1.0
    (student_input,) = seen
    assert student_input.shape == (4, 3, 64, 64)  # 2 labeled + 2 strong views, one square frame
    from gd_hf.data.transforms import BLACK

    for image, (h, w) in zip(student_input, [labeled_size] * 2 + [unlabeled_size] * 2):
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[:h, :w] = False
        assert torch.equal(image[:, outside], BLACK[:, None].expand(3, int(outside.sum())))  # as EoMT's processor
    (labeled_masks, labeled_classes, frame), (pseudo_masks, pseudo_classes, _) = targets
    assert tuple(frame) == (16, 16)  # EoMT's masks: 1/4 of the input
    for masks, classes, rows, box in ((labeled_masks, labeled_classes, slice(0, 2), labeled_box),
                                      (pseudo_masks, pseudo_classes, slice(2, 4), unlabeled_box)):  # fmt: skip
        for mask, image in zip(masks, student_input[rows]):
            on_input = F.interpolate(mask[None].float(), size=(64, 64), mode="nearest")[0, 0] > 0.5
            rows_, cols = on_input.any(1).nonzero()[:, 0], on_input.any(0).nonzero()[:, 0]
            assert (int(rows_[0]), int(cols[0]), int(rows_[-1]) + 1, int(cols[-1]) + 1) == box
            bright = image[0] > 1.0
            assert bool(bright[on_input].all()) and int(bright.sum()) == int(on_input.sum())  # the object, all of it
        assert [c.tolist() for c in classes] == [[0], [0]]


def test_a_dinov2_checkpoint_of_patch_14_becomes_the_recipes_patch_16_eomt(tmp_path):
    """`model.pretrained` = a DINOv2 (with registers) folder written by save_pretrained, patch 14 -> EoMT patch 16
    (the reference's resampling): every layer's weights arrive as they are, the patch embedding computes on a
    16-px resize of a patch what DINOv2's computed on the 14-px patch, the heads start fresh."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from gd_hf.config import ModelConfig
    from gd_hf.models import build_model

    torch.manual_seed(5)
    dinov2 = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, image_size=56, patch_size=14, num_register_tokens=4))  # fmt: skip
    with torch.no_grad():
        for tensor in dinov2.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.1)
    dinov2.save_pretrained(tmp_path / "dinov2")
    cfg = ModelConfig(family="eomt", pretrained=str(tmp_path / "dinov2"), eomt_image_size=64, eomt_query_blocks=2,
                      num_queries=8, train_num_points=256)  # fmt: skip
    model = build_model(cfg, {0: "a", 1: "b"})
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_register_tokens) == (4, 64, 4)
    state, source = model.state_dict(), dinov2.state_dict()
    for name, tensor in source.items():
        if name.startswith("encoder.layer."):
            assert torch.equal(state["layers." + name.removeprefix("encoder.layer.").replace("o_proj", "out_proj")],
                               tensor), name  # fmt: skip
    assert torch.equal(state["embeddings.register_tokens"], source["embeddings.register_tokens"])
    patch = torch.randn(1, 3, 14, 14)
    old = F.conv2d(patch, source["embeddings.patch_embeddings.projection.weight"])
    resized = F.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    new = F.conv2d(resized, state["embeddings.patch_embeddings.projection.weight"])
    assert torch.allclose(new, old, atol=1e-4)
    assert model.config.id2label == {0: "a", 1: "b"} and model.class_predictor.out_features == 3


def test_a_whole_eomt_checkpoint_is_re_headed_for_the_recipes_classes(tmp_path):
    from gd_hf.config import ModelConfig
    from gd_hf.models import build_model
    from gd_hf.models.common import ModelLoadError

    source = tiny_eomt(seed=6)
    set_mask_probabilities(source, [0.0, 0.0])  # an export
    source.save_pretrained(tmp_path / "eomt")
    cfg = ModelConfig(family="eomt", pretrained=str(tmp_path / "eomt"), eomt_image_size=64, eomt_query_blocks=2,
                      num_queries=8, train_num_points=512, class_weight=3.0)  # fmt: skip
    model = build_model(cfg, {0: "x", 1: "y", 2: "z"})
    assert model.config.id2label == {0: "x", 1: "y", 2: "z"} and model.class_predictor.out_features == 4
    state, before = model.state_dict(), source.state_dict()
    assert all(
        torch.equal(state[k], before[k])
        for k in before
        if not k.startswith(("class_predictor", "attn_mask", "criterion."))
    )
    assert model.attn_mask_probs.tolist() == [1.0, 1.0]  # a new training starts masked
    assert model.config.train_num_points == 512 and model.weight_dict["loss_cross_entropy"] == 3.0
    assert model.criterion.num_points == 512
    with pytest.raises(ModelLoadError, match="model.eomt_image_size=128 \\(the checkpoint: 64\\)"):
        build_model(dataclasses.replace(cfg, eomt_image_size=128), {0: "x"})


def test_gd_hf_predict_takes_an_eomt_export_and_predicts_the_same_twice(tmp_path, capsys):
    """`python -m gd_hf.predict` on an EoMT export (saved mid-annealing): images of other sizes and aspect ratios
    are padded to its square, every result has its image's size, and a second run predicts the same."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    from gd_hf.hub.export import export_model
    from gd_hf.models.eomt import eomt_image_processor
    from gd_hf.predict import main as predict_main

    model = tiny_eomt()
    set_mask_probabilities(model, [0.4, 1.0])
    export_model(model, eomt_image_processor(64), tmp_path / "export")
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"wide.png": (40, 72), "tall.png": (80, 48)}
    for name, (h, w) in sizes.items():
        Image.fromarray((np.random.default_rng(h).random((h, w, 3)) * 255).astype("uint8")).save(images / name)
    outputs = []
    for run in ("a", "b"):
        args = [str(tmp_path / "export"), str(images), "--out", str(tmp_path / run), "--threshold", "0"]
        assert predict_main(args) == 0
        outputs.append(json.loads((tmp_path / run / "predictions.json").read_text()))
    assert outputs[0] == outputs[1] and outputs[0]
    for record in outputs[0]:
        mask = mask_utils.decode({**record["segmentation"], "counts": record["segmentation"]["counts"].encode()})
        assert mask.shape == sizes[Path(record["file_name"]).name]


def test_the_evaluate_command_refuses_a_test_size_an_eomt_export_cannot_take(tmp_path, capsys):
    from gd_hf.data.synthetic import generate
    from gd_hf.evaluate import main as evaluate_main
    from gd_hf.hub.export import export_model
    from gd_hf.models.eomt import eomt_image_processor

    export_model(tiny_eomt(), eomt_image_processor(64), tmp_path / "export")
    root = generate(tmp_path / "data", train=0, val=2, size=64, seed=1)
    args = [str(tmp_path / "export"), str(root / "annotations" / "instances_val.json"), str(root / "val"),
            "--shortest-edge", "96", "--num-workers", "0"]  # fmt: skip
    assert evaluate_main(args) == 2
    assert "takes 64 x 64 inputs" in capsys.readouterr().err


@pytest.mark.parametrize("size", [(48, 80), (37, 101), (64, 64)])
def test_evaluation_feeds_eomt_the_pixels_its_exported_processor_feeds_it(size):
    """The export's processor (longer side resized to the square, padded black before normalising) and gd_hf's
    evaluation batch of the same image: the same frame, the same padded region, exactly, and the same image
    inside it up to the two resizers' rounding."""
    import numpy as np
    from PIL import Image

    from gd_hf.config import DataConfig
    from gd_hf.data.loading import collate_eval
    from gd_hf.data.transforms import eval_size, resize
    from gd_hf.models.eomt import eomt_image_processor

    image = Image.fromarray((np.random.default_rng(size[0]).random((*size, 3)) * 255).astype("uint8"))
    expected = eomt_image_processor(64)(images=image, return_tensors="pt")["pixel_values"][0]
    data = DataConfig(eval_shortest_edge=64, eval_longest_edge=64)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    h, w = eval_size(*size, data.eval_shortest_edge, data.eval_longest_edge)
    resized, _ = resize(pixels, torch.zeros(0, *size, dtype=torch.bool), h, w)
    sample = {"image": resized, "image_id": 1, "original_size": size}
    ours = collate_eval([sample], padding_divisor=64, black_padding=EomtFamily.black_padding)["pixel_values"][0]
    assert ours.shape == expected.shape == (3, 64, 64)
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[:h, :w] = True
    assert torch.equal(ours[:, ~inside], expected[:, ~inside])  # the padding: black, as the processor's
    assert (ours[:, inside] - expected[:, inside]).abs().mean() < 0.02  # (bilinear resizes, rounded apart)


def test_a_black_padded_batch_padded_further_stays_black():
    from gd_hf.data.loading import collate_train, pad_batch
    from gd_hf.data.transforms import BLACK

    batch = collate_train([square_sample(32, 48, (4, 8, 20, 24), False)], 16, black_padding=True)
    padded = pad_batch(batch, 64, 64)
    assert padded["pixel_values"].shape[-2:] == (64, 64)
    assert torch.equal(padded["pixel_values"][0, :, 40:, :], BLACK.view(3, 1, 1).expand(3, 24, 64))
    assert torch.equal(padded["pixel_values"][0, :, :32, :48], batch["pixel_values"][0])
    assert padded["mask_labels"][0].shape[-2:] == (64, 64) and padded["mask_labels"][0][:, 32:].sum() == 0


def test_a_checkpoint_with_as_many_classes_still_gets_a_new_classifier(tmp_path):
    from gd_hf.config import ModelConfig
    from gd_hf.models import build_model

    source = tiny_eomt(seed=7)  # 4 classes
    source.save_pretrained(tmp_path / "eomt")
    cfg = ModelConfig(family="eomt", pretrained=str(tmp_path / "eomt"), eomt_image_size=64, eomt_query_blocks=2,
                      num_queries=8, train_num_points=256)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, {0: "w", 1: "x", 2: "y", 3: "z"})  # other classes, as many
    assert not torch.equal(model.class_predictor.weight, source.class_predictor.weight)
    assert torch.equal(model.query.weight, source.query.weight)


def test_a_dinov2_position_table_of_another_grid_is_resampled_as_dinov2_itself_interpolates(tmp_path):
    """DINOv2 trained at 64 px (4 x 4 patches) into an EoMT of 96 px (6 x 6): the ViT's hidden states before the
    queries join are DINOv2's own on a 96-px input (which interpolates its table on the fly)."""
    from transformers import Dinov2Config, Dinov2Model

    from gd_hf.models.vit_weights import load_dinov2_weights

    torch.manual_seed(8)
    dinov2 = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64,
                                      patch_size=16)).eval()  # fmt: skip
    with torch.no_grad():
        for tensor in dinov2.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.1)
    torch.manual_seed(9)
    config = EomtConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=96, patch_size=16,
                        num_queries=8, num_blocks=2, num_register_tokens=0)  # fmt: skip
    model = EomtForUniversalSegmentation(config).eval()
    load_dinov2_weights(model, dinov2)
    pixel_values = torch.randn(1, 3, 96, 96)
    hidden = {}
    model.layers[1].register_forward_hook(lambda _m, _a, out: hidden.update(eomt=out))
    with torch.no_grad():
        model(pixel_values=pixel_values)
        expected = dinov2(pixel_values=pixel_values, output_hidden_states=True).hidden_states[2]
    assert torch.allclose(hidden["eomt"], expected, atol=1e-4)


def test_evaluation_mid_annealing_predicts_as_the_export_does(tmp_path):
    """A model evaluated while its blocks are half-way through annealing (probabilities 0.5): the same
    predictions twice, and those of its export (no masked attention) evaluated by the command's driver."""
    from gd_hf.config import DataConfig
    from gd_hf.data.coco import load_coco
    from gd_hf.data.synthetic import generate
    from gd_hf.evaluate import evaluate_model
    from gd_hf.hub.export import export_model
    from gd_hf.models import load_export
    from gd_hf.models.eomt import eomt_image_processor

    root = generate(tmp_path / "data", train=0, val=4, size=64, seed=3, varied_sizes=True)
    source = load_coco(root / "annotations" / "instances_val.json", root / "val")
    model = tiny_eomt(seed=2)
    model.config.id2label = dict(enumerate(source.category_names))
    set_mask_probabilities(model, [0.5, 0.5])
    data = DataConfig(eval_shortest_edge=64, eval_longest_edge=64, num_workers=0)
    torch.manual_seed(0)
    first = evaluate_model(model.eval(), source, data, top_k=20)[1]
    second = evaluate_model(model, source, data, top_k=20)[1]
    assert first and first == second and model.attn_mask_probs.tolist() == [0.5, 0.5]
    export_model(model, eomt_image_processor(64), tmp_path / "export")
    assert evaluate_model(load_export(str(tmp_path / "export")).eval(), source, data, top_k=20)[1] == first


def test_a_teacher_or_checkpoint_of_the_other_family_is_refused_naming_the_key(tmp_path, synthetic_root):
    """`ssl.teacher` a Mask2Former export for an EoMT student (and the reverse), `model.pretrained` an EoMT
    checkpoint for a Mask2Former: a recipe error that says what to set, before any training."""
    from gd_hf.config import RecipeError
    from gd_hf.method.teacher import build_teacher
    from gd_hf.models import build_model
    from gd_hf.models.common import ModelLoadError
    from gd_hf.models.mask2former import Mask2FormerFamily

    from .conftest import EOMT_TINY, tiny_overrides

    base = tiny_overrides(synthetic_root, tmp_path / "run") + ["ssl.enabled=true", "ssl.burn_in_pseudo_labels=false",
                                                                "ssl.student_init=pretrained"]  # fmt: skip
    m2f_recipe = demo_recipe(base)
    eomt_recipe = demo_recipe(base + EOMT_TINY)
    id2label = {i: name for i, name in enumerate(["circle", "rectangle", "triangle", "cross"])}
    m2f, eomt = build_model(m2f_recipe.model, id2label), build_model(eomt_recipe.model, id2label)
    m2f.save_pretrained(tmp_path / "m2f")
    eomt.save_pretrained(tmp_path / "eomt")
    for recipe, student, teacher, kinds in [(eomt_recipe, eomt, "m2f", "a 'mask2former' model, but the recipe trains a 'eomt' one"),
                                            (m2f_recipe, m2f, "eomt", "a 'eomt' model, but the recipe trains a 'mask2former' one")]:  # fmt: skip
        recipe = dataclasses.replace(recipe, ssl=dataclasses.replace(recipe.ssl, teacher=str(tmp_path / teacher)))
        with pytest.raises(RecipeError, match=kinds):
            build_teacher(recipe, student, id2label, EomtFamily())
    cfg = dataclasses.replace(m2f_recipe.model, pretrained=str(tmp_path / "eomt"))
    with pytest.raises(ModelLoadError, match="is an EoMT checkpoint: set model.family=eomt"):
        build_model(cfg, id2label)
    cfg = dataclasses.replace(eomt_recipe.model, pretrained=str(tmp_path / "m2f"))
    with pytest.raises(ModelLoadError, match="is a Mask2Former checkpoint: set model.family=mask2former"):
        build_model(cfg, id2label)
    # The EMA teacher an EoMT run builds never averages the buffer the family writes from the step.
    teacher_recipe = dataclasses.replace(eomt_recipe, ssl=dataclasses.replace(eomt_recipe.ssl, teacher=None))
    assert build_teacher(teacher_recipe, eomt, id2label, EomtFamily()).scheduled_buffers == ("attn_mask_probs",)
    assert build_teacher(m2f_recipe, m2f, id2label, Mask2FormerFamily()).scheduled_buffers == ()


def test_gd_hf_predict_refuses_an_eomt_export_whose_processor_asks_for_a_larger_size(tmp_path, capsys):
    from gd_hf.hub.export import export_model
    from gd_hf.models.eomt import eomt_image_processor
    from gd_hf.predict import main as predict_main

    export_model(tiny_eomt(), eomt_image_processor(96), tmp_path / "export")  # a 64-px model, a 96-px processor
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "a.png")
    assert predict_main([str(tmp_path / "export"), str(tmp_path / "images"), "--out", str(tmp_path / "out")]) == 2
    assert "takes 64 x 64 inputs" in capsys.readouterr().err
