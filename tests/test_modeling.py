import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Mask2FormerForUniversalSegmentation,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
    SwinForImageClassification,
)

from gd_hf.config import ModelConfig, TrainConfig
from gd_hf.models import build_model
from gd_hf.models.common import ModelLoadError, loss_terms
from gd_hf.models.mask2former import Mask2FormerFamily, dinov2_feature_layers, padding_divisor
from gd_hf.run.optim import build_optimizer, lr_factor, parameter_groups

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
TINY = {
    "swin": dict(backbone_hidden_size=16, backbone_depths=[1, 1, 1, 1], backbone_num_heads=[1, 1, 2, 2]),
    "dinov2": dict(backbone_hidden_size=32, backbone_depths=[1, 1, 1, 1], backbone_num_heads=[2, 2, 2, 2]),
    "resnet": dict(backbone_hidden_size=8, backbone_depths=[1, 1, 1, 1]),
}


def tiny_config(backbone: str, **extra) -> ModelConfig:
    sizes = dict(
        hidden_dim=32, encoder_layers=1, decoder_layers=2, num_queries=6, train_num_points=128, **TINY[backbone]
    )
    return ModelConfig(backbone=backbone, **{**sizes, **extra})


def batch(size: int):
    masks = torch.zeros(2, size, size)
    masks[0, : size // 2] = 1
    masks[1, size // 2 :, : size // 3] = 1
    return (
        torch.randn(2, 3, size, size),
        [masks, torch.zeros(0, size, size)],
        [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)],
    )


@pytest.mark.parametrize("backbone", ["swin", "dinov2", "resnet"])
def test_each_backbone_builds_and_takes_a_training_step(backbone):
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone), ID2LABEL)
    assert model.config.backbone_config.model_type == backbone
    assert model.config.id2label == ID2LABEL and model.class_predictor.out_features == 4
    size = 4 * padding_divisor(model)
    pixel_values, mask_labels, class_labels = batch(size)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.0))
    losses = []
    for _ in range(3):
        predictions = Mask2FormerFamily().forward(model, pixel_values)
        terms = loss_terms(model, predictions, mask_labels, class_labels)
        # auxiliary decoder layers contribute their own terms
        assert {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_cross_entropy_0"} <= set(terms)
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the step moved the model the right way on a fixed batch


def test_dinov2_feature_layers_are_deliberate():
    assert dinov2_feature_layers(12, None) == [3, 6, 9, 12]
    assert dinov2_feature_layers(24, None) == [6, 12, 18, 24]
    with pytest.raises(ModelLoadError, match="1..12"):
        dinov2_feature_layers(12, [0, 13])
    model = build_model(tiny_config("dinov2", dinov2_feature_layers=[2, 4]), ID2LABEL)
    assert model.config.backbone_config.out_indices == [2, 4]
    assert padding_divisor(model) == 14


@pytest.mark.parametrize(
    "backbone, hub_model",
    [
        (
            "swin",
            lambda: SwinForImageClassification(
                SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], num_labels=5)
            ),
        ),
        (
            "dinov2",
            lambda: Dinov2Model(
                Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
            ),
        ),
        (
            "resnet",
            lambda: ResNetForImageClassification(
                ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")
            ),
        ),
    ],
)
def test_pretrained_backbone_weights_are_loaded_from_a_hub_folder(tmp_path, backbone, hub_model):
    # A folder laid out like the hub's microsoft/swin-*, facebook/dinov2-*, microsoft/resnet-50 (loaded offline).
    torch.manual_seed(1)
    reference = hub_model()
    reference.save_pretrained(tmp_path / "hub")
    model = build_model(tiny_config(backbone, pretrained=str(tmp_path / "hub")), ID2LABEL)
    encoder_state = model.model.pixel_level_module.encoder.state_dict()
    reference_state = reference.state_dict()
    prefix = {"swin": "swin.", "dinov2": "", "resnet": "resnet."}[backbone]
    compared = 0
    for key, value in encoder_state.items():
        for source_key in (key, prefix + key):
            if source_key in reference_state:
                assert torch.equal(value, reference_state[source_key]), key
                compared += 1
    assert compared > 10  # the weights came from the folder, not from a random init


def test_wrong_backbone_family_for_the_checkpoint_is_an_error(tmp_path):
    SwinForImageClassification(SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2])).save_pretrained(
        tmp_path / "swin"
    )
    with pytest.raises(ModelLoadError, match="is a 'swin' model but model.backbone is 'resnet'"):
        build_model(tiny_config("resnet", pretrained=str(tmp_path / "swin")), ID2LABEL)
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        build_model(tiny_config("swin", pretrained=str(tmp_path / "nowhere")), ID2LABEL)


def test_whole_mask2former_checkpoint_is_reheaded_for_the_recipe_classes(tmp_path):
    torch.manual_seed(2)
    coco_like = build_model(tiny_config("swin"), {i: f"c{i}" for i in range(4)})
    coco_like.save_pretrained(tmp_path / "m2f")
    new_labels = {0: "a", 1: "b", 2: "c"}
    model = build_model(tiny_config("swin", pretrained=str(tmp_path / "m2f"), train_num_points=64), new_labels)
    assert model.config.id2label == new_labels and model.class_predictor.out_features == 4
    assert model.criterion.num_points == 64  # the recipe's loss settings, not the checkpoint's
    assert torch.equal(
        model.model.pixel_level_module.encoder.state_dict()["swin.embeddings.patch_embeddings.projection.weight"],
        coco_like.model.pixel_level_module.encoder.state_dict()["swin.embeddings.patch_embeddings.projection.weight"],
    )
    # Same class count must still get a fresh classifier: old class 0 means nothing for the new classes.
    same_count = build_model(tiny_config("swin", pretrained=str(tmp_path / "m2f")), {i: f"n{i}" for i in range(4)})
    assert not torch.equal(same_count.class_predictor.weight, coco_like.class_predictor.weight)


def test_saved_model_loads_with_plain_transformers(tmp_path):
    model = build_model(tiny_config("dinov2"), ID2LABEL)
    model.save_pretrained(tmp_path / "out")
    loaded = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "out")
    pixel_values = torch.randn(1, 3, 56, 56)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(pixel_values).class_queries_logits, loaded(pixel_values).class_queries_logits)


def test_no_weight_decay_on_norms_biases_and_embeddings_and_backbone_lr():
    model = build_model(tiny_config("swin"), ID2LABEL)
    cfg = TrainConfig(lr=1e-3, backbone_lr_multiplier=0.1, weight_decay=0.05)
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["heads"]["lr"] == pytest.approx(1e-3)
    decayed = {id(p) for g in groups.values() if g["weight_decay"] > 0 for p in g["params"]}
    modules = dict(model.named_modules())
    for name, parameter in model.named_parameters():
        module = modules[name.rsplit(".", 1)[0]]
        never = (
            isinstance(module, (torch.nn.LayerNorm, torch.nn.Embedding)) or parameter.ndim == 1 or "position" in name
        )
        assert not (never and id(parameter) in decayed), name
    assert decayed  # linear and conv weights do decay
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, schedule="poly", poly_power=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    cosine = TrainConfig(max_steps=100, warmup_steps=0, schedule="cosine")
    assert lr_factor(50, cosine) == pytest.approx(0.5)
