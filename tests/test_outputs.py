"""What people see of a run: trackers (grouped tags, hyperparameters, pictures), the console's bar, the pictures and
curves on disk and in the exports, and exports with no path of this machine in them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from PIL import Image

import gd_hf.run.periodic as periodic_module
from gd_hf.config import RecipeError
from gd_hf.hub.push import record_push
from gd_hf.method import GuidedDistillation
from gd_hf.train import main, train

from .conftest import DEMO_RECIPE, ONE_LAUNCH_SSL, demo_recipe, tiny_overrides

GROUPS = ("train/", "pseudo/", "val/", "teacher_check/", "system/")


class RecordingTracker(GeneralTracker):
    """A stand-in tracker (Accelerate's protocol): what it is given, phase by phase."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.phases: list[dict] = []

    @property
    def tracker(self):
        return self

    def start(self) -> None:
        self.phases.append({"config": None, "logged": [], "images": []})

    def store_init_configuration(self, values: dict) -> None:
        self.phases[-1]["config"] = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.phases[-1]["logged"].append((step, values))

    def log_images(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.phases[-1]["images"].append((step, values))

    def finish(self) -> None:
        pass


@pytest.fixture(scope="module")
def distilled(synthetic_root, tmp_path_factory):
    """A one-launch Guided Distillation run (teacher 2 steps, burn-in 1, EMA 1, evaluated after every step) with
    the stand-in tracker beside TensorBoard, and a spy on the pseudo labels the loss is taught with."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    tracker = RecordingTracker()
    taught, drawn = [], []
    original_pseudo_labels, original_picture = GuidedDistillation.pseudo_labels, periodic_module.pseudo_label_picture

    def spy_pseudo_labels(self, weak_pixel_values):
        pseudo = original_pseudo_labels(self, weak_pixel_values)
        taught.append((weak_pixel_values.clone(), pseudo))
        return pseudo

    def spy_picture(kept, names):
        drawn.append(kept)
        return original_picture(kept, names)

    mp = pytest.MonkeyPatch()
    mp.setattr(GuidedDistillation, "pseudo_labels", spy_pseudo_labels)
    mp.setattr(periodic_module, "pseudo_label_picture", spy_picture)
    AcceleratorState._reset_state(reset_partial_state=True)
    recipe = demo_recipe([*tiny_overrides(synthetic_root, out), *ONE_LAUNCH_SSL, "train.eval_every=1", "eval.pictures=2"])  # fmt: skip
    try:
        train(recipe, trackers=[tracker])
    finally:
        mp.undo()
    return out, tracker, taught, drawn


def test_the_stand_in_tracker_gets_grouped_tags_public_hyperparameters_and_pictures(distilled, synthetic_root):
    out, tracker, _, _ = distilled
    teacher, student = tracker.phases  # each phase starts its trackers
    for phase in (teacher, student):
        config = phase["config"]
        assert config["train.lr"] == 3e-4 and config["model.backbone_depths"] == "[1, 1, 1, 1]"
        assert not any(str(synthetic_root) in str(v) or str(out.parent) in str(v) for v in config.values())
        assert config["data.val_images"] == "{data_root}/val"
        tags = {tag for _, values in phase["logged"] for tag in values}
        assert tags and all(tag.startswith(GROUPS) for tag in tags), tags
        assert {"train/loss", "val/AP", "system/seconds_per_step"} <= tags
    student_tags = {tag for _, values in student["logged"] for tag in values}
    assert {"train/loss_sup", "train/loss_unsup", "pseudo/labels_per_image", "pseudo/recall", "pseudo/score",
            "teacher_check/precision"} <= student_tags  # fmt: skip
    assert config["ssl.train_teacher_first"] is True  # the launch's recipe: it trains its teacher again
    images = {(step, tag) for step, values in student["images"] for tag in values}
    assert images == {(1, "val/predictions"), (1, "pseudo/labels"), (2, "val/predictions"), (2, "pseudo/labels")}
    assert all(isinstance(v[0], Image.Image) for _, values in student["images"] for v in values.values())
    assert {tag for _, values in teacher["images"] for tag in values} == {"val/predictions"}  # no pseudo labels


def test_tensorboard_has_grouped_scalars_images_and_the_recipe_as_hyperparameters(distilled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = distilled[0]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/loss_unsup", "val/AP", "pseudo/labels_per_image"} <= set(tags["scalars"])
    assert not [t for t in tags["scalars"] if not t.startswith(GROUPS)]
    assert {"val/predictions", "pseudo/labels"} <= set(tags["images"])
    assert [e.step for e in events.Scalars("val/AP")] == [1, 2]
    hparams = list((out / "tensorboard").rglob("hparams.yml"))
    assert len(hparams) == 1 and yaml.safe_load(hparams[0].read_text())["ssl.burn_in_steps"] == 1


def test_the_pseudo_label_picture_shows_what_the_student_was_taught(distilled):
    """The picture is drawn from the weak views and pseudo labels of the step before each evaluation, exactly
    as the loss had them (one teacher call per step here: step k is call k)."""
    out, _, taught, drawn = distilled
    assert [kept.step for kept in drawn] == [0, 1]
    for kept in drawn:
        weak, pseudo = taught[kept.step]
        assert len(kept.masks) == 2  # eval.pictures
        assert torch.equal(kept.weak_pixel_values, weak[:2].cpu())
        for i in range(2):
            assert torch.equal(kept.masks[i], pseudo.mask_labels[i].cpu())
            assert torch.equal(kept.classes[i], pseudo.class_labels[i].cpu())
        assert sum(len(c) for c in kept.hidden_classes)  # the synthetic data carry hidden truth: drawn beside
    assert sorted(p.name for p in (out / "pictures").iterdir()) == [
        "pseudo_labels_step_00000000.png", "pseudo_labels_step_00000001.png",
        "val_step_00000001.png", "val_step_00000002.png",
    ]  # fmt: skip
    two_columns = Image.open(out / "pictures" / "pseudo_labels_step_00000001.png")
    assert two_columns.width > two_columns.height / 2  # pseudo labels | hidden truth, 2 rows


def test_exports_carry_examples_pictures_and_no_path_of_this_machine(distilled, synthetic_root):
    out = distilled[0]
    exports = [out / "final", out / "best", out / "teacher" / "final", out / "teacher" / "best"]
    machine = [str(Path.home()), str(out), str(out.parent), str(synthetic_root), "/tmp/"]
    for export in exports:
        names = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
        assert {"README.md", "recipe.yaml", "run_info.json", "predictions.png", "curves.png",
                "examples/val_1000000.jpg", "examples/val_1000001.jpg"} <= names, export  # fmt: skip
        for path in export.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                found = [m for m in machine if m.encode() in content]
                assert not found, f"{path} holds {found}"
    published = yaml.safe_load((out / "final" / "recipe.yaml").read_text())
    assert published["output_dir"] == "./run" and published["ssl"]["teacher"] is None
    assert published["ssl"]["train_teacher_first"] is True  # trains its own teacher again: reproducible
    launches = json.loads((out / "final" / "run_info.json").read_text())["launches"]
    assert launches and not {"command", "platform", "recipe"} & set(launches[0])
    assert (out / "curves.png").is_file() and (out / "teacher" / "curves.png").is_file()
    card = (out / "final" / "README.md").read_text()
    assert "# run\n" in card and "Guided Distillation for 2 steps" in card
    assert "and an unlabeled stream of 24 images (every training image, as the paper)" in card
    teacher_card = (out / "teacher" / "final" / "README.md").read_text()
    assert "# run-teacher\n" in teacher_card


def test_a_local_teacher_is_published_by_its_hub_id_once_pushed(distilled, synthetic_root, tmp_path):
    """`ssl.teacher` given as a local export: the published recipe names it without this machine's folders; once
    that export was pushed, by its hub id, so that the card's recipe trains again from the Hub."""
    out = distilled[0]
    teacher = out / "teacher" / "final"
    overrides = [*tiny_overrides(synthetic_root, tmp_path / "student"), "ssl.enabled=true", f"ssl.teacher={teacher}",
                 "ssl.burn_in_steps=1", "ssl.unlabeled_batch_size=2", "train.max_steps=1"]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe(overrides))
    published = yaml.safe_load((tmp_path / "student" / "final" / "recipe.yaml").read_text())
    assert published["ssl"]["teacher"] == "{local}/final"
    assert "a local export that is not on the Hub" in (tmp_path / "student" / "final" / "README.md").read_text()

    record_push(teacher, "me/gd-teacher", "teacher")  # what a push of it leaves in its run_info.json
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe([*overrides, "train.max_steps=2"]))
    published = yaml.safe_load((tmp_path / "student" / "final" / "recipe.yaml").read_text())
    assert published["ssl"]["teacher"] == "me/gd-teacher@teacher"
    card = (tmp_path / "student" / "final" / "README.md").read_text()
    assert "hf download me/gd-teacher --revision teacher --local-dir teacher" in card


def test_the_bar_names_each_phase_and_shows_the_distillation_figures_without_accelerates_lines(
    synthetic_root, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO)  # whatever the root logger's level: Accelerate's INFO lines would be caught
    overrides = [*tiny_overrides(synthetic_root, tmp_path / "run"), *ONE_LAUNCH_SSL, "train.report_to=none"]
    assert main([DEMO_RECIPE, *overrides]) == 0
    err = capsys.readouterr().err
    assert "teacher: 100%" in err and "burn-in:" in err and "EMA: 100%" in err and "\rtrain:" not in err
    assert "unsup=" in err and "pl/img=" in err
    assert not [r for r in caplog.records if r.name.startswith("accelerate") and r.levelno < logging.WARNING]
    assert any("val mask AP" in r.getMessage() for r in caplog.records)  # the run's own lines still show
    assert not (tmp_path / "run" / "tensorboard").exists()  # report_to=none


def test_a_tracker_that_is_not_installed_stops_the_run_before_anything_is_written(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([DEMO_RECIPE, *tiny_overrides(synthetic_root, out),
                 "train.report_to=[tensorboard, wandb]"])  # fmt: skip
    assert code == 2
    assert "train.report_to=['tensorboard', 'wandb'] needs wandb, which is not installed: pip install wandb" in (
        capsys.readouterr().err
    )
    assert not out.exists()
    with pytest.raises(RecipeError, match="train.report_to 'comet' names no tracker"):
        demo_recipe(["train.report_to=comet"])


def test_an_export_of_a_model_with_a_local_backbone_names_no_path_of_this_machine(synthetic_root, tmp_path):
    """transformers records a local backbone's folder in config.json (`backbone_config._name_or_path`), and the
    recipe's `model.pretrained` is that folder: neither reaches the export, and the model still loads."""
    from transformers import Dinov2Config, Dinov2Model, Mask2FormerForUniversalSegmentation

    from gd_hf.models import build_model, export_image_processor
    from gd_hf.run.publisher import Publisher

    backbone = tmp_path / "my_models" / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(backbone)  # fmt: skip
    overrides = [*tiny_overrides(synthetic_root, tmp_path / "run"), "model.backbone=dinov2",
                 f"model.pretrained={backbone}", "data.crop_size=56", "data.eval_shortest_edge=56",
                 "data.eval_longest_edge=56"]  # fmt: skip
    recipe = demo_recipe(overrides)
    model = build_model(recipe.model, {0: "circle", 1: "square"})
    assert str(backbone) in json.dumps(model.config.to_dict())  # what transformers would write
    publisher = Publisher(recipe, export_image_processor(model, recipe.data, 14), 3, 5, 2, ["circle", "square"])
    folder = publisher.export(model, "final", 1, {"AP": 1.0, "AP50": 2.0, "AP75": 0.5, "APs": -1.0, "APm": 1.0,
                                                  "APl": -1.0})  # fmt: skip
    for path in folder.rglob("*"):
        if path.is_file():
            assert str(tmp_path).encode() not in path.read_bytes(), path
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["model"]["pretrained"] == "./my_models/dino"
    assert "backbone: ./my_models/dino" in (folder / "README.md").read_text()
    loaded = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
    assert loaded.config.backbone_config.model_type == "dinov2"


def test_predict_takes_a_run_folder_and_the_exports_recorded_top_k(distilled, synthetic_root, tmp_path, capsys):
    from gd_hf.predict import main as predict_main

    out = distilled[0]
    image = synthetic_root / "val" / "1000000.png"
    assert predict_main([str(out), str(image), "--out", str(tmp_path / "p"), "--threshold", "-1"]) == 0
    assert f"using its final/ export ({out / 'final'})" in capsys.readouterr().err
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(results) == 10  # the recipe's eval.top_k (8 queries x 4 classes: the old default 100 kept 32)
    assert predict_main([str(out), str(image), "--out", str(tmp_path / "q"), "--threshold", "-1", "--top-k", "3"]) == 0
    assert len(json.loads((tmp_path / "q" / "predictions.json").read_text())) == 3


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (  # data on two disks: no data root (it would be /), nothing of /home/me published
            [
                "output_dir=/home/me/runs/r1",
                "data.train_images=/data/coco/train2017",
                "data.unlabeled_images=/home/me/unl/x",
                "model.pretrained=/home/me/runs/dino",
            ],  # fmt: skip
            {
                "output_dir": "./r1",
                "data.train_images": "{local}/train2017",
                "data.unlabeled_images": "{local}/x",
                "model.pretrained": "./dino",
            },  # fmt: skip
        ),
        (  # an output folder just below / is no root: the data keep their own
            [
                "output_dir=/run1",
                "data.train_images=/home/me/coco/train2017",
                "data.val_images=/home/me/coco/val2017",
                "data.train_annotations=/home/me/coco/a/t.json",
                "data.val_annotations=/home/me/coco/a/v.json",
            ],  # fmt: skip
            {
                "output_dir": "{local}/run1",
                "data.train_images": "{data_root}/train2017",
                "data.val_annotations": "{data_root}/a/v.json",
            },  # fmt: skip
        ),
        (  # Windows paths are cut at backslashes
            ["output_dir=C:\\runs\\r1", "data.train_images=C:\\Users\\me\\coco\\train2017"],
            {"output_dir": "{local}/r1", "data.train_images": "{local}/train2017"},
        ),
        (  # a path climbing out with .. beside an absolute one (commonpath cannot mix them)
            ["data.train_images=../synthetic/train", "data.val_images=/tmp/abs/val"],
            {
                "output_dir": "outputs/demo_synthetic",
                "data.train_images": "{local}/train",
                "data.val_images": "{local}/val",
            },
        ),
    ],
    ids=["two-disks", "output-below-root", "windows", "dotdot"],
)
def test_published_recipes_name_no_folder_of_this_machine(overrides, expected):
    from gd_hf.hub.public import public_recipe

    recipe = demo_recipe(overrides)
    published = public_recipe(recipe)
    for key, value in expected.items():
        node = published
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    text = yaml.safe_dump(published)
    assert "/home/me" not in text and "me\\" not in text and "/data/coco" not in text


def test_a_card_pushed_to_a_branch_loads_that_branch_and_the_base_model_is_kept(distilled, tmp_path):
    """`python -m gd_hf.push RUN REPO --revision B`: the snippet, its example and "train it again" read branch B;
    the card's base_model is what the run decided (a published relative path is never taken for a hub id)."""
    import shutil

    from gd_hf.hub.model_card import card_for_repo, card_metadata

    export = tmp_path / "final"
    shutil.copytree(distilled[0] / "final", export)
    assert card_for_repo(export, "me/gd", "teacher")
    card = (export / "README.md").read_text()
    assert 'from_pretrained("me/gd", revision="teacher")' in card
    assert 'hf_hub_download("me/gd", "examples/val_1000000.jpg", revision="teacher")' in card
    assert "hf download me/gd recipe.yaml --revision teacher --local-dir ." in card
    assert "# gd\n" in card and "base_model" not in card_metadata(export)
    facts = json.loads((export / "run_info.json").read_text())
    facts["card"]["base_model"], published = None, yaml.safe_load((export / "recipe.yaml").read_text())
    published["model"]["pretrained"] = "./my_models/dino"  # as published for a backbone beside the run
    (export / "recipe.yaml").write_text(yaml.safe_dump(published))
    (export / "run_info.json").write_text(json.dumps(facts))
    assert card_for_repo(export, "me/gd")
    assert "base_model" not in card_metadata(export)


def test_eval_max_images_is_said_in_the_card_and_evaluate_reproduces_it(synthetic_root, tmp_path, capsys):
    from gd_hf.evaluate import main as evaluate_main

    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    recipe = demo_recipe([*tiny_overrides(synthetic_root, out), "eval.max_images=3", "train.max_steps=2"])  # fmt: skip
    final = train(recipe)
    assert (
        "evaluated on the first 3 images (by id) of the 8 of custom (validation)"
        in (out / "final" / "README.md").read_text()
    )
    capsys.readouterr()
    common = [recipe.data.val_annotations, recipe.data.val_images, "--num-workers", "0", "--batch-size", "4"]
    assert evaluate_main([str(out), *common, "--out", str(tmp_path / "three.json")]) == 0
    said = capsys.readouterr()
    assert "evaluating the first 3 images by id, as the export's metrics were measured" in said.err
    assert json.loads(said.out) == final
    assert {r["image_id"] for r in json.loads((tmp_path / "three.json").read_text())} == {1000000, 1000001, 1000002}
    assert evaluate_main([str(out), *common, "--max-images", "all", "--out", str(tmp_path / "all.json")]) == 0
    assert len({r["image_id"] for r in json.loads((tmp_path / "all.json").read_text())}) == 8


def test_a_picture_that_cannot_be_drawn_is_a_warning_not_the_runs_end(synthetic_root, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ValueError("a font that cannot be read")

    monkeypatch.setattr(periodic_module, "prediction_picture", broken)
    monkeypatch.setattr(periodic_module, "plot_curves", broken)
    out = tmp_path / "run"
    assert main([DEMO_RECIPE, *tiny_overrides(synthetic_root, out),
                 "train.report_to=none"]) == 0  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pictures were not drawn (ValueError: a font that cannot be read)" in m for m in warned)
    assert any("curves.png was not drawn" in m for m in warned)
    assert (out / "final" / "model.safetensors").is_file() and not (out / "final" / "curves.png").exists()


def test_the_exports_examples_are_the_val_images_the_model_finds_most_in():
    """Of the candidate val images, the export keeps the two with the most instances scoring above 0.5 (a Space
    and the card's snippet show them), in their order on ties; not simply the first two."""
    from types import SimpleNamespace

    from gd_hf.run.periodic import choose_examples

    image = Image.new("RGB", (8, 8))
    phase = SimpleNamespace(picture_examples=[(1, image), (2, image), (3, image), (4, image)],
                            publisher=SimpleNamespace(examples={}))  # fmt: skip
    results = [{"image_id": 3, "score": 0.9}, {"image_id": 3, "score": 0.8}, {"image_id": 4, "score": 0.7},
               {"image_id": 1, "score": 0.4}, {"image_id": 1, "score": 0.45}]  # fmt: skip
    choose_examples(phase, SimpleNamespace(results=results))
    assert list(phase.publisher.examples) == ["val_3.jpg", "val_4.jpg"]
    choose_examples(phase, SimpleNamespace(results=[]))  # nothing found anywhere: the first ones
    assert list(phase.publisher.examples) == ["val_1.jpg", "val_2.jpg"]
