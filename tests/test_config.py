from pathlib import Path

import pytest

from gd_hf.config import Recipe, RecipeError, all_keys, load_recipe

from .conftest import ROOT, demo_recipe


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_yaml_values_land_in_typed_fields(tmp_path):
    recipe = load_recipe(write(tmp_path, "seed: 3\ntrain:\n  lr: 1\n  max_steps: 10\nmodel:\n  backbone: dinov2\n"))
    assert recipe.seed == 3
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 10
    assert recipe.model.backbone == "dinov2"
    assert recipe.train.batch_size == Recipe().train.batch_size  # untouched keys keep their defaults


def test_dotted_overrides_win_over_yaml_and_parse_yaml_values(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n")
    recipe = load_recipe(
        path, ["train.max_steps=200", "train.lr=1e-3", "model.backbone_depths=[1, 2, 3, 4]", "model.pretrained=null"]
    )
    assert recipe.train.max_steps == 200
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.model.backbone_depths == [1, 2, 3, 4]
    assert recipe.model.pretrained is None


def test_unknown_key_suggests_the_nearest_valid_key(tmp_path):
    with pytest.raises(RecipeError, match="`train.max_step`.*did you mean `train.max_steps`"):
        load_recipe(write(tmp_path, "train:\n  max_step: 10\n"))
    with pytest.raises(RecipeError, match="did you mean `train.batch_size`"):
        load_recipe(write(tmp_path, "{}"), ["train.batchsize=4"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match="train.max_steps: expected an integer"):
        load_recipe(write(tmp_path, "train:\n  max_steps: ten\n"))
    with pytest.raises(RecipeError, match="data.generate_synthetic: expected true/false"):
        load_recipe(write(tmp_path, "{}"), ["data.generate_synthetic=5"])


def test_wrong_value_names_the_key(tmp_path):
    with pytest.raises(RecipeError, match="model.backbone: 'vit' is not one of"):
        load_recipe(write(tmp_path, "model:\n  backbone: vit\n"))
    with pytest.raises(RecipeError, match="data.labeled_percent"):
        load_recipe(write(tmp_path, "{}"), ["data.labeled_percent=0"])
    with pytest.raises(RecipeError, match="train.batch_size must be divisible"):
        load_recipe(write(tmp_path, "{}"), ["train.batch_size=3", "train.gradient_accumulation_steps=2"])


def test_repeat_factor_sampling_of_a_stream_is_refused_with_the_fix(tmp_path):
    streamed_ssl = ["data.streaming=true", "ssl.enabled=true", "ssl.burn_in_pseudo_labels=false"]
    with pytest.raises(RecipeError, match="ssl.labeled_repeat_threshold needs an indexed.*=null"):
        load_recipe(write(tmp_path, "{}"), streamed_ssl)
    assert load_recipe(write(tmp_path, "{}"), [*streamed_ssl, "ssl.labeled_repeat_threshold=null"]).data.streaming
    # Phase 1 never resamples, so a supervised streamed run does not care.
    assert load_recipe(write(tmp_path, "{}"), ["data.streaming=true"]).ssl.labeled_repeat_threshold == 10.0
    with pytest.raises(RecipeError, match="ssl.labeled_repeat_threshold must be null"):
        load_recipe(write(tmp_path, "{}"), ["ssl.labeled_repeat_threshold=0"])


def test_missing_recipe_file_and_bad_override_form(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(write(tmp_path, "{}"), ["train.max_steps"])


def test_every_key_is_documented():
    # One documented field per key: the docstring below each field is what users read.
    source = (ROOT / "gd_hf" / "config" / "schema.py").read_text()
    for key in all_keys():
        name = key.rsplit(".", 1)[-1]
        after = source.split(f"    {name}:", 1)[1].split("\n", 2)
        assert after[1].strip().startswith('"""'), f"{key} has no docstring"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    load_recipe(path)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "recipes").glob("*.yaml") if p.name.startswith(("coco_", "cityscapes_"))),
    ids=lambda p: p.name,
)
def test_paper_recipes_say_clearly_when_the_data_set_is_absent(path, tmp_path, monkeypatch, capsys):
    from gd_hf.train import main

    monkeypatch.chdir(tmp_path)  # no data/ here
    assert main([str(path)]) == 2
    error = capsys.readouterr().err
    assert "annotation file data/" in error and "does not exist" in error
    assert not (tmp_path / "outputs").exists()  # nothing written


def test_paper_recipes_carry_the_reference_settings():
    for name, percent in [("coco_0.4pct", 0.4), ("coco_1pct", 1), ("coco_10pct", 10)]:
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert recipe.data.labeled_percent == percent
        assert recipe.train.max_steps == 368750 and recipe.train.lr == 1e-4 and recipe.train.grad_clip == 0.01
        assert recipe.ssl.enabled and recipe.ssl.unsup_loss_weight == 2.0 and recipe.ssl.ema_decay == 0.9996
        assert recipe.ssl.pseudo_label_score_threshold == 0.7 and recipe.ssl.pseudo_label_min_area == 5.0
    assert load_recipe(ROOT / "recipes" / "coco_0.4pct.yaml").model.backbone == "dinov2"
    assert load_recipe(ROOT / "recipes" / "cityscapes_10pct.yaml").train.max_steps == 90000


def test_the_eomt_recipe_carries_the_eomt_references_settings_and_gds_ssl_ones():
    """tue-mps/eomt's COCO instance ViT-L 640 (its annealing steps exactly, from the recipe's span of its 12 x 7,391
    steps) with Guided Distillation's SSL settings."""
    from gd_hf.models import family_for

    recipe = load_recipe(ROOT / "recipes" / "coco_1pct_eomt.yaml")
    m, t, s = recipe.model, recipe.train, recipe.ssl
    assert (m.family, m.eomt_image_size, m.eomt_patch_size, m.eomt_query_blocks, m.num_queries) == (
        "eomt",
        640,
        16,
        4,
        200,
    )
    assert m.pretrained == "facebook/dinov2-with-registers-large" and m.train_num_points == 12544
    assert (t.max_steps, t.lr, t.layer_lr_decay, t.backbone_lr_multiplier, t.weight_decay) == (
        88692,
        1e-4,
        0.8,
        1.0,
        0.05,
    )
    assert (t.poly_power, t.grad_clip, recipe.eval.top_k) == (0.9, 0.01, 100)
    assert (recipe.data.crop_size, recipe.data.min_scale, recipe.data.max_scale) == (640, 0.1, 2.0)
    annealing = family_for(recipe).annealing
    assert annealing.starts == [14782, 29564, 44346, 59128] and annealing.ends == [29564, 44346, 59128, 73910]
    assert s.enabled and s.unsup_loss_weight == 2.0 and s.ema_decay == 0.9996 and s.pseudo_label_score_threshold == 0.7


def test_a_short_run_is_told_why_it_learns_little():
    """The demo at 60 steps never leaves its 100-step warm-up and logs twice: both are named with a value that
    fits; so is a run that ends in burn-in. The demo itself, and its phase 1, are long enough."""
    from gd_hf.config import short_run_warnings, teacher_recipe_of

    warmup, log_lines, burn_in = short_run_warnings(demo_recipe(["train.max_steps=60"]))
    assert warmup.startswith("train.warmup_steps=100 is not below train.max_steps=60: the learning rate never")
    assert "at the last step it is 60 % of train.lr" in warmup and warmup.endswith("(6)")
    assert log_lines.startswith("train.log_every=50 gives 2 metrics lines over train.max_steps=60")
    assert log_lines.endswith("set train.log_every to 3 or less for a readable curve")
    assert burn_in.startswith("ssl.burn_in_steps=700 is not below train.max_steps=60")
    half = short_run_warnings(demo_recipe(["train.max_steps=150", "train.log_every=10", "ssl.burn_in_steps=100"]))
    assert half == ["train.warmup_steps=100 is over half of train.max_steps=150: most of the run trains below "
                    "train.lr; set train.warmup_steps to about a tenth of the run (15)"]  # fmt: skip
    demo = demo_recipe()
    assert short_run_warnings(demo) == []
    assert short_run_warnings(teacher_recipe_of(demo), "ssl.teacher_max_steps") == []
    phase_1 = short_run_warnings(teacher_recipe_of(demo_recipe(["ssl.teacher_max_steps=80"])), "ssl.teacher_max_steps")
    assert [w.split(":")[0] for w in phase_1] == [
        "train.warmup_steps=100 is not below ssl.teacher_max_steps=80",
        "train.log_every=50 gives 2 metrics lines over ssl.teacher_max_steps=80",
    ]
