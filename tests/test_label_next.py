"""`gd_hf.label_next`: the signals and the ranking on hand-built teacher outputs where the answer is known, the
job's files (pre-annotations that read back as COCO pixel for pixel), a killed pass that resumes, bad arguments
refused with nothing written, and the loop back (the job's split file, a recorded change on relaunch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from gd_hf.data.coco import load_coco
from gd_hf.data.masks import decode_masks
from gd_hf.label_next import LabelNextError, label_next, main
from gd_hf.labelling import scoring
from gd_hf.labelling.job import PickedImage, pre_annotations, uncompressed_rle
from gd_hf.labelling.merge import merge_job
from gd_hf.labelling.ranking import Pick, rank_images
from gd_hf.labelling.signals import ImageSignals, image_signals
from gd_hf.models.protocol import Predictions
from gd_hf.train import train

from .conftest import demo_recipe, tiny_overrides

CLASSES = 3  # + "no object"


def query(probabilities: list[float], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One query's class logits (log of the given class probabilities, "no object" last) and mask logits."""
    return torch.tensor(probabilities).log(), torch.where(mask, 6.0, -6.0)


def predictions(images: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> Predictions:
    return Predictions(torch.stack([torch.stack([q[0] for q in image]) for image in images]),
                       torch.stack([torch.stack([q[1] for q in image]) for image in images]))  # fmt: skip


def box(top: int, left: int, size: int = 6) -> torch.Tensor:
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


NOTHING = ([0.01, 0.01, 0.01, 0.97], box(0, 0, 0))  # "no object"
JUNK = ([0.26, 0.25, 0.25, 0.24], box(0, 0, 12))  # near-uniform: every image has such queries
SURE = ([0.96, 0.02, 0.01, 0.01], box(2, 2))  # class 0 at 0.96
HALF_SEEN = ([0.5, 0.3, 0.1, 0.1], box(8, 8))  # class 0 at 0.5: under the 0.7 threshold, above its half


def test_the_image_the_teacher_half_sees_is_ranked_first_by_each_uncertainty_signal():
    plain = predictions([
        [query(*SURE), query(*JUNK)],  # 10: a confident object (and a junk query, whose entropy is no signal)
        [query(*HALF_SEEN), query(*NOTHING)],  # 11: an object the teacher half sees
        [query(*NOTHING), query(*NOTHING)],  # 12: background
    ])  # fmt: skip
    moved = predictions([
        [query(SURE[0], box(2, 2)), query(*JUNK)],  # the same under the perturbation
        [query(*HALF_SEEN), query(*NOTHING)],
        [query(SURE[0], box(9, 9)), query(*NOTHING)],  # 12: an object appears only in the perturbed view
    ])  # fmt: skip
    thumbnails = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    signals = image_signals([10, 11, 12], plain, moved, threshold=0.7, min_soft_area=5.0, thumbnails=thumbnails)
    assert [s.near_threshold for s in signals] == pytest.approx([0.0, 0.5, 0.0])
    assert signals[1].entropy > signals[0].entropy > 0 and signals[2].entropy == 0.0  # 10: SURE's, not JUNK's
    assert [s.disagreement for s in signals] == [0.0, 0.0, 1.0]  # 11's half-seen object is no pseudo label
    assert signals[0].classes == [0] and signals[1].classes == [0] and signals[2].classes == []
    for strategy, first in (("near_threshold", 11), ("entropy", 11), ("disagreement", 12)):
        assert rank_images(signals, strategy, 1)[0].image_id == first, strategy
    drawn = [p.image_id for p in rank_images(signals, "random", 3, seed=4)]
    assert sorted(drawn) == [10, 11, 12] and drawn == [p.image_id for p in rank_images(signals, "random", 3, seed=4)]


def test_a_pseudo_label_with_an_empty_hard_mask_is_no_disagreement():
    """A query that passes the soft-area rule with every pixel just under the mask threshold is no pseudo label
    (its hard mask is empty): the same on both views is agreement, not disagreement 1."""
    faint = ([0.96, 0.02, 0.01, 0.01], torch.full((16, 16), -0.2))  # sigmoid 0.45 everywhere: area 115, hard empty
    faint_query = (torch.tensor(faint[0]).log(), faint[1])
    views = predictions([[faint_query, query(*NOTHING)]])
    (signal,) = image_signals([1], views, views, threshold=0.7, min_soft_area=5.0, thumbnails=[[0.0]])
    assert signal.disagreement == 0.0


def _signals(image_id: int, score: float, classes: list[int], thumbnail: list[float]) -> ImageSignals:
    return ImageSignals(image_id, score, 0.0, None, classes, thumbnail)


def test_class_balance_lifts_an_image_of_a_rare_class_and_diversity_passes_over_near_duplicates():
    signals = [
        _signals(1, 0.50, [0], [0.0, 0.0]),  # a black frame
        _signals(2, 0.49, [0], [0.02, 0.01]),  # a near-black one: a near-duplicate of 1
        _signals(3, 0.30, [2], [0.9, 0.1]),  # class 2: in 1 labeled image of 100
        _signals(4, 0.40, [0], [0.5, 0.5]),
    ]
    plain = rank_images(signals, "near_threshold", 4)
    assert [p.image_id for p in plain] == [1, 2, 4, 3]
    balanced = rank_images(signals, "near_threshold", 4, {0: 100, 2: 1}, labeled_images=100, balance=1.0)
    assert balanced[0].image_id == 3 and balanced[0].balance_factor == pytest.approx(10.0)
    diverse = rank_images(signals, "near_threshold", 4, duplicate_similarity=0.95)
    assert [p.image_id for p in diverse] == [1, 4, 3, 2]  # 2 comes last: only when nothing else is left
    assert [p.image_id for p in rank_images(signals, "near_threshold", 2, duplicate_similarity=0.95)] == [1, 4]
    with pytest.raises(ValueError, match="disagreement signal was not computed"):
        rank_images(signals, "disagreement", 1)


def test_pre_annotations_read_back_as_coco_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((3, 21, 34)) > 0.6
    masks[2] = False  # an empty mask is no annotation
    masks[1, 0, 0] = True  # a run that starts with a set pixel
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (34, 21)).save(tmp_path / "images" / "a.png")
    picked = [PickedImage(Pick(1, 40, 0.3, 1.0), Image.new("RGB", (34, 21)), tmp_path / "images" / "a.png", "a.png",
                          masks, [0, 1, 1], [0.9, 0.6, 0.8])]  # fmt: skip
    coco = pre_annotations(picked, ["a.png"], [7, 9], ["cat", "dog"], threshold=0.5)
    assert [a["category_id"] for a in coco["annotations"]] == [7, 9]
    runs = coco["annotations"][1]["segmentation"]["counts"]
    assert runs[0] == 0 and sum(runs) == 21 * 34  # a mask starting with a set pixel: an empty first run
    (tmp_path / "pre.json").write_text(json.dumps(coco))
    source = load_coco(tmp_path / "pre.json", tmp_path / "images")
    assert source.skipped_annotations == 0 and source.category_names == ["cat", "dog"]
    read = decode_masks([a["rle"]["counts"] for a in source.annotations[40]], 21, 34)
    assert np.array_equal(read, masks[:2])
    low = pre_annotations(picked, ["a.png"], [7, 9], ["cat", "dog"], threshold=0.7)
    assert len(low["annotations"]) == 1  # the 0.6 instance is below this threshold


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory):
    """A 20-step supervised run on 25 % of the tiny synthetic set (6 labeled, 18 unlabeled images)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    run = tmp_path_factory.mktemp("label_next") / "run"
    overrides = tiny_overrides(synthetic_root, run) + ["data.labeled_percent=25", "train.max_steps=20",
                                                       "train.checkpoint_every=10"]  # fmt: skip
    train(demo_recipe(overrides))
    AcceleratorState._reset_state(reset_partial_state=True)
    return run


def test_a_job_from_a_run_names_its_images_and_a_killed_pass_resumes(tiny_run, tmp_path, monkeypatch):
    real, calls = scoring._score_batch, []

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill between two batches
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "_score_batch", dies_on_the_third_batch)
    out = tmp_path / "job"
    with pytest.raises(KeyboardInterrupt):
        label_next(tiny_run, 4, out, strategy="disagreement", batch_size=4)
    assert not out.exists() and len(scoring.read_signals(tmp_path / "job.partial" / "signals.jsonl")) == 8
    monkeypatch.setattr(scoring, "_score_batch", real)
    scored = []
    monkeypatch.setattr(scoring, "_score_batch", lambda *a, **k: scored.extend(a[2]) or real(*a, **k))
    label_next(tiny_run, 4, out, strategy="disagreement", batch_size=4)
    assert len(scored) == 10  # the 18 unlabeled images less the 8 scored before the kill
    job = json.loads((out / "label_next.json").read_text())
    assert job["pool_images"] == 18 and job["labeled_images"] == 6 and len(job["images"]) == 4
    assert [i["rank"] for i in job["images"]] == [1, 2, 3, 4]
    ids = [i["image_id"] for i in job["images"]]
    split = json.loads((out / "split.json").read_text())
    assert set(ids) <= set(split["labeled_image_ids"]) and split["num_labeled"] == 10
    assert split["added_image_ids"] == sorted(ids) and split["strategy"] == "disagreement"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(i["file_name"] for i in job["images"])
    assert all((out / "images" / i["file_name"]).resolve().is_file() for i in job["images"])
    assert (out / "label_next.png").is_file() and not (tmp_path / "job.partial").exists()
    for name in ("label_next.json", "arguments.json", "split.json", "pre_annotations.json"):  # may be shared
        assert str(tiny_run.parent) not in (out / name).read_text() and "/tmp/" not in (out / name).read_text()
    pre = load_coco(out / "pre_annotations.json", out / "images")
    assert sorted(pre.images) == sorted(ids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--count", "0"], "--count 0: give how many"),
        (["--count", "-3"], "--count -3"),
        (["--count", "19"], "--count 19 is more than the 18 unlabeled images"),
        (["--count", "2", "--strategy", "random", "--duplicate-similarity", "2"], "--duplicate-similarity 2"),
    ],
)
def test_bad_arguments_are_refused_with_nothing_written(tiny_run, tmp_path, capsys, args, message):
    out = tmp_path / "job"
    assert main([str(tiny_run), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "job.partial").exists()


def test_a_bad_run_or_an_existing_folder_is_refused_with_nothing_written(tiny_run, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep")
    assert main([str(tiny_run), "--count", "2", "--out", str(existing)]) == 2
    assert "exists: give a new folder" in capsys.readouterr().err and list(existing.iterdir()) == [
        existing / "mine.txt"
    ]
    assert main([str(tmp_path), "--count", "2", "--out", str(tmp_path / "job")]) == 2
    assert "is not a run's output folder" in capsys.readouterr().err
    with pytest.raises(LabelNextError, match="--export nope"):
        label_next(tiny_run, 2, tmp_path / "job", export="nope")
    import shutil

    broken = tmp_path / "broken_run"
    shutil.copytree(tiny_run, broken)
    (broken / "final" / "model.safetensors").write_bytes(b"x")  # truncated weights
    assert main([str(broken), "--count", "2", "--out", str(tmp_path / "job")]) == 2
    assert "cannot load the model" in capsys.readouterr().err
    assert not (tmp_path / "job").exists() and not (tmp_path / "job.partial").exists()


def test_the_loop_back_a_relaunch_with_the_jobs_split_is_a_recorded_change_and_the_card_says_so(
    tiny_run, synthetic_root, tmp_path
):
    """After labelling (here the labels are in the JSON already, as in the benchmark), the job's split file adds
    the picked images to the labeled split: relaunching the run with it stops unless `resume=force`, which records
    the change in run_info.json; the model card says how many labels were picked this way."""
    import shutil

    from accelerate.state import AcceleratorState

    from gd_hf.config import RecipeError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    job = label_next(run, 3, tmp_path / "job", strategy="entropy")
    more = tiny_overrides(synthetic_root, run) + ["data.labeled_percent=25", "train.max_steps=24",
                                                  "train.checkpoint_every=10", f"data.split_file={job / 'split.json'}"]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RecipeError, match="data.split_file"):
        train(demo_recipe(more))
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe(more + ["resume=force"]))
    launches = json.loads((run / "run_info.json").read_text())
    assert launches[-1]["recipe_changes"]["data.split_file"] == [None, str(job / "split.json")]
    card = (run / "final" / "README.md").read_text()
    assert "9 labeled images" in card and "3 images were picked for labelling by `gd_hf.label_next` (entropy" in card


def test_a_stream_and_images_held_as_bytes_are_scored_and_written(synthetic_root, tmp_path):
    """A streamed pool (filtered, as a stream's split is) and records whose images are bytes without a file (hub
    and shards data sets): scored, and their picked images written into images/ as PNGs of their pixels."""
    import io

    import datasets
    from PIL import Image

    from gd_hf.config import DataConfig
    from gd_hf.data.coco import to_hf_dataset
    from gd_hf.data.records import select_ids
    from gd_hf.label_next import _picked_images
    from gd_hf.labelling.job import write_job
    from gd_hf.labelling.scoring import ScoringRules, score_pool
    from gd_hf.models import build_model, family_of

    records = to_hf_dataset(
        load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    )
    rows = records.cast_column("image", datasets.Image(decode=False)).to_list()[:6]
    for row in rows:  # bytes, no file
        row["image"] = {"bytes": open(row["image"]["path"], "rb").read(), "path": None}
    as_bytes = datasets.Dataset.from_list(rows, features=records.features)
    undecoded = as_bytes.to_iterable_dataset().cast_column("image", datasets.Image(decode=False))  # as sources.py
    stream = select_ids(undecoded, [r["image_id"] for r in rows[1:]])
    recipe = demo_recipe(tiny_overrides(synthetic_root, tmp_path / "unused"))
    model = build_model(recipe.model, {i: f"c{i}" for i in range(4)})
    pool = {r["image_id"] for r in rows[1:]}
    data = DataConfig(eval_shortest_edge=64, eval_longest_edge=64)
    signals, unreadable = score_pool(model, family_of(model), stream, pool, data, tmp_path / "scores",
                                     ScoringRules(0.7, disagreement=True), batch_size=2)  # fmt: skip
    assert sorted(s.image_id for s in signals) == sorted(pool) and unreadable == 0
    picks = rank_images(signals, "disagreement", 2)
    model.save_pretrained(tmp_path / "export")
    from gd_hf.models import export_image_processor

    export_image_processor(model, recipe.data).save_pretrained(tmp_path / "export")
    picked = _picked_images(model, str(tmp_path / "export"), picks, stream, tmp_path, 0.5, "cpu")
    assert [p.source for p in picked] == [None, None]
    write_job(tmp_path / "job", picked, {s.image_id: s for s in signals}, {"strategy": "disagreement",
              "pre_annotation_threshold": 0.5}, [1, 2, 3, 4], ["a", "b", "c", "d"], [rows[0]["image_id"]])  # fmt: skip
    written = sorted((tmp_path / "job" / "images").iterdir())
    assert [p.suffix for p in written] == [".png", ".png"]
    for p in picked:
        with Image.open(tmp_path / "job" / "images" / f"{Path(p.data_set_file).stem}.png") as image:
            original = Image.open(
                io.BytesIO(next(r for r in rows if r["image_id"] == p.pick.image_id)["image"]["bytes"])
            )
            assert np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))


def test_a_line_cut_by_a_kill_is_scored_again_and_an_export_given_as_run_is_the_teacher(tiny_run, tmp_path):
    out = tmp_path / "job"
    label_next(tiny_run / "best", 2, out, strategy="near_threshold")  # the best/ export, whatever --export says
    job = json.loads((out / "label_next.json").read_text())
    assert job["export"] == "best"
    arguments = (out / "arguments.json").read_text()
    assert str(tiny_run.parent) not in arguments and "/" not in json.loads(arguments)["run"]  # no machine path
    lines = (out / "signals.jsonl").read_text().splitlines()
    partial = tmp_path / "again.partial"
    partial.mkdir()
    (partial / "arguments.json").write_text(arguments)
    (partial / "signals.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])
    label_next(tiny_run / "best", 2, tmp_path / "again", strategy="near_threshold")
    again = (tmp_path / "again" / "signals.jsonl").read_text().splitlines()
    assert sorted(again) == sorted(lines)  # the cut line scored again, whole; nothing twice
    assert json.loads((tmp_path / "again" / "label_next.json").read_text())["images"] == job["images"]


def test_the_whole_loop_job_tool_export_merge_and_a_run_on_the_merged_labels(tiny_run, synthetic_root, tmp_path):
    """The job's own pre-annotations, as CVAT gives them back (every mask `iscrowd: 1`), merged into a copy of the
    training JSON: a new run on it and the merge's split file trains on 6 + 3 labeled images and its card says
    which 3 were picked; the picked images' labels are the export's masks (they had the generator's before)."""
    from accelerate.state import AcceleratorState

    job = label_next(tiny_run, 3, tmp_path / "job", strategy="random", pre_annotation_threshold=0.0)
    export = json.loads((job / "pre_annotations.json").read_text())
    for image in export["images"]:  # the labeller keeps the teacher's masks and draws one more on each image
        drawn = np.zeros((image["height"], image["width"]), bool)
        drawn[5:20, 8:30] = True
        export["annotations"].append({"id": 1000 + image["id"], "image_id": image["id"], "category_id": 1,
                                      "segmentation": uncompressed_rle(drawn), "iscrowd": 0})  # fmt: skip
    for annotation in export["annotations"]:
        annotation["iscrowd"] = 1
    (tmp_path / "export.json").write_text(json.dumps(export))
    train_json = synthetic_root / "annotations" / "instances_train.json"
    merged = tmp_path / "train_round1.json"
    report = merge_job(job, tmp_path / "export.json", train_json, merged, crowd="objects")
    assert report.annotations == len(export["annotations"]) and not report.missing_images
    picked = sorted(i["image_id"] for i in json.loads((job / "label_next.json").read_text())["images"])
    assert report.merged_images == picked
    source = load_coco(merged, synthetic_root / "train")
    for image_id in picked:
        expected = [a["segmentation"] for a in export["annotations"] if a["image_id"] == image_id]
        read = decode_masks([a["rle"]["counts"] for a in source.annotations[image_id]], *expected[0]["size"])
        wanted = np.stack([mask_utils.decode(mask_utils.frPyObjects(e, *e["size"])) for e in expected]).astype(bool)
        assert np.array_equal(read, wanted)
    run = tmp_path / "run2"
    overrides = tiny_overrides(synthetic_root, run) + [
        "train.max_steps=2", f"data.train_annotations={merged}", f"data.split_file={merged.with_suffix('.split.json')}"
    ]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    train(demo_recipe(overrides))
    AcceleratorState._reset_state(reset_partial_state=True)
    card = (run / "final" / "README.md").read_text()
    assert "9 labeled images" in card and "3 images were picked for labelling by `gd_hf.label_next` (random" in card
