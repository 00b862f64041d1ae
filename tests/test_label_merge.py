"""`python -m gd_hf.labelling.merge`: a labelling tool's COCO export of a label_next job goes back into the training
JSON (masks pixel for pixel, the export's ids and categories mapped to the data set's), with a split file of
exactly the images that came back; anything that does not fit stops it with nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gd_hf.data.coco import load_coco
from gd_hf.data.masks import decode_masks
from gd_hf.data.splits import read_split_file, split_file_provenance, write_split_file
from gd_hf.labelling.job import uncompressed_rle
from gd_hf.labelling.merge import MergeError, main, match_job_image, merge_job

H, W = 12, 20


def polygon(left: int) -> list[list[float]]:
    return [[left, 1, left + 5, 1, left + 5, 6, left, 6]]


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    """A training JSON of 4 images (10 and 11 labeled; 12 and 13 in the job, 12 with an old annotation), its
    images, and a job of 12 and 13 as label_next writes one."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for image_id in (10, 11, 12, 13):
        Image.new("RGB", (W, H)).save(images / f"im{image_id}.png")
        records.append({"id": image_id, "file_name": f"im{image_id}.png", "width": W, "height": H})
    train = {
        "images": records,
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "segmentation": polygon(0), "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 5, "segmentation": polygon(4), "iscrowd": 0},
            {"id": 7, "image_id": 12, "category_id": 3, "segmentation": polygon(8), "iscrowd": 0},  # to be replaced
        ],
    }
    (tmp_path / "train.json").write_text(json.dumps(train))
    job = tmp_path / "job"
    job.mkdir()
    ranking = {"strategy": "entropy", "images": [{"rank": 1, "image_id": 13, "file_name": "im13.png"},
                                                  {"rank": 2, "image_id": 12, "file_name": "im12.png"}]}  # fmt: skip
    (job / "label_next.json").write_text(json.dumps(ranking))
    write_split_file(job / "split.json", [10, 11, 12, 13], added_by="gd_hf.label_next", strategy="entropy",
                     added_image_ids=[12, 13])  # fmt: skip
    rng = np.random.default_rng(0)
    masks = {13: rng.random((2, H, W)) > 0.5, 12: rng.random((1, H, W)) > 0.5}
    masks[13][1, 0, 0] = True  # a run that starts with a set pixel
    return {"root": tmp_path, "images": images, "job": job, "masks": masks}


def tool_export(setup: dict, names: dict[int, str], crowd: int = 0) -> Path:
    """The job's images as a tool exports them: its own image and category ids (dog first), file names with a
    folder, masks as uncompressed RLE, and a score left over from the pre-annotations."""
    images, annotations = [], []
    for export_id, (image_id, name) in enumerate(names.items(), start=1):
        images.append({"id": export_id, "file_name": name, "width": W, "height": H})
        for k, mask in enumerate(setup["masks"][image_id]):
            annotations.append({"id": len(annotations) + 1, "image_id": export_id, "category_id": 1 + k % 2,
                                "segmentation": uncompressed_rle(mask), "iscrowd": crowd, "bbox": [0, 0, 1, 1],
                                "area": int(mask.sum()), "score": 0.8})  # fmt: skip
    categories = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 9, "name": "unused"}]
    path = setup["root"] / "export.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_an_export_goes_back_mask_for_mask_and_the_split_adds_what_came_back(setup):
    root = setup["root"]
    export = tool_export(setup, {13: "images/im13.png", 12: "images\\im12.png"})
    assert main([str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out",
                 str(root / "new.json")]) == 0  # fmt: skip
    source = load_coco(root / "new.json", setup["images"])
    assert source.skipped_annotations == 0
    for image_id in (12, 13):  # the export's masks, in the data set's ids, the old annotation of 12 gone
        read = decode_masks([a["rle"]["counts"] for a in source.annotations[image_id]], H, W)
        assert np.array_equal(read, setup["masks"][image_id])
    merged = json.loads((root / "new.json").read_text())
    of_13 = [a for a in merged["annotations"] if a["image_id"] == 13]
    assert [a["category_id"] for a in of_13] == [5, 3]  # dog, cat in the training JSON's ids
    assert all("score" not in a for a in merged["annotations"])
    ids = [a["id"] for a in merged["annotations"]]
    assert len(set(ids)) == len(ids) and 7 not in ids
    assert [a for a in merged["annotations"] if a["image_id"] in (10, 11)] == json.loads(
        (root / "train.json").read_text()
    )["annotations"][:2]
    assert read_split_file(root / "new.split.json") == [10, 11, 12, 13]
    provenance = split_file_provenance(root / "new.split.json")
    assert provenance["added_image_ids"] == [12, 13] and provenance["strategy"] == "entropy"


def test_a_job_image_left_out_of_the_export_stays_unlabeled(setup, capsys):
    root = setup["root"]
    export = tool_export(setup, {13: "cb0618f6-im13.png"})  # Label Studio's upload prefix
    assert main([str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out",
                 str(root / "new.json")]) == 0  # fmt: skip
    assert "left unlabeled: im12.png" in capsys.readouterr().out
    assert read_split_file(root / "new.split.json") == [10, 11, 13]
    merged = json.loads((root / "new.json").read_text())
    assert [a["id"] for a in merged["annotations"] if a["image_id"] == 12] == [7]  # untouched


def test_crowd_masks_need_a_decision(setup):
    root = setup["root"]
    export = tool_export(setup, {13: "im13.png", 12: "im12.png"}, crowd=1)  # as CVAT exports masks
    with pytest.raises(MergeError, match="3 iscrowd: 1 annotations.*--crowd objects"):
        merge_job(setup["job"], export, root / "train.json", root / "new.json")
    assert not (root / "new.json").exists() and not (root / "new.split.json").exists()
    merge_job(setup["job"], export, root / "train.json", root / "new.json", crowd="objects")
    source = load_coco(root / "new.json", setup["images"])
    assert [a["iscrowd"] for a in source.annotations[13]] == [0, 0]
    merge_job(setup["job"], export, root / "train.json", root / "kept.json", crowd="keep")
    assert [a["iscrowd"] for a in load_coco(root / "kept.json", setup["images"]).annotations[13]] == [1, 1]


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _no_id(d):
    del d["images"][0]["id"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["images"][0].update(file_name="other.png"), r"image 0 \('other.png'\) is not one of the job"),
        (lambda d: d["images"][0].update(width=40), "'im13.png' is 40x12 there, 20x12 in train.json"),
        (lambda d: d["categories"][0].update(name="horse"), "is named 'horse', which train.json does not have"),
        (lambda d: d["categories"].append({"id": 1, "name": "cat"}), "category id 1 is there twice"),
        (lambda d: d["categories"][0].pop("id"), r"`categories`\[0\] has no integer id"),
        (lambda d: d.update(categories={"1": "dog"}), "`categories` is a dict, not a list"),
        (lambda d: d["annotations"][0].update(segmentation=[]), "a bbox alone is not a mask.*not boxes only"),
        (lambda d: d["annotations"][0]["segmentation"].update(size=[24, 40]), r"RLE size \[24, 40\] differs"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts=[5, 5]), "RLE counts cover 10 pixels"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts="garbage!!"), "not in its alphabet"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts=[240]), "empty mask"),
        (lambda d: d["annotations"][0].update(segmentation=[[2, 1, 100, 1, 100, 6, 2, 6]]), "far outside"),
        (lambda d: d["annotations"][0].update(segmentation=[[2, 1, "a", 1, 5, 6, 2, 6]]), "finite numbers"),
        (lambda d: d["annotations"][0].update(iscrowd="0"), "has iscrowd '0': it must be 0 or 1"),
        (lambda d: d["annotations"].append(5), r"`annotations`\[3\] is not an object"),
        (lambda d: d["annotations"][0].update(image_id=99), "image id 99, which the export does not list"),
        (lambda d: d["images"].append(dict(d["images"][0], id=5)), "'im13.png' is there twice"),
        (lambda d: d["images"][1].update(id=1), "image id 1 is there twice"),
        (_no_id, "image 0 has no integer id"),
    ],
)
def test_an_export_that_does_not_fit_is_refused_with_nothing_written(setup, capsys, change, message):
    root = setup["root"]
    export = tool_export(setup, {13: "im13.png", 12: "im12.png"})
    _edit(export, change)
    assert main([str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out",
                 str(root / "new.json")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert str(export) in err and re.search(message, err), err
    assert not (root / "new.json").exists() and not (root / "new.split.json").exists()


def test_nothing_is_overwritten(setup, capsys):
    root = setup["root"]
    export = tool_export(setup, {13: "im13.png"})
    (root / "new.split.json").write_text("mine")
    assert main([str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out",
                 str(root / "new.json")]) == 2  # fmt: skip
    assert "new.split.json exists" in capsys.readouterr().err and (root / "new.split.json").read_text() == "mine"
    assert main([str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out",
                 str(root / "train.json")]) == 2  # fmt: skip
    assert "exists" in capsys.readouterr().err


def test_job_image_names():
    names = {"a.jpg", "b.png"}
    assert match_job_image("a.jpg", names) == "a.jpg"
    assert match_job_image("../../media/upload/4/cb0618f6-a.jpg", names) == "a.jpg"
    assert match_job_image("images\\1/b.png", names) == "b.png"
    assert match_job_image("cb0618f6-c.jpg", names) is None and match_job_image("xa.jpg", names) is None


def test_a_category_name_the_training_json_has_twice_is_ambiguous(setup, capsys):
    root = setup["root"]
    _edit(root / "train.json", lambda d: d["categories"].append({"id": 9, "name": "cat"}))
    export = tool_export(setup, {13: "im13.png"})
    assert main([str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out",
                 str(root / "new.json")]) == 2  # fmt: skip
    assert "is named 'cat', which train.json has 2 times" in capsys.readouterr().err
    assert not (root / "new.json").exists()


def test_outputs_that_collide_or_cannot_be_written_are_refused_first(setup, capsys):
    root = setup["root"]
    export = tool_export(setup, {13: "im13.png"})
    args = [str(setup["job"]), str(export), "--train", str(root / "train.json"), "--out", str(root / "new.json")]
    assert main([*args, "--split-out", str(root / "new.json")]) == 2
    assert "give two files" in capsys.readouterr().err
    assert main([*args, "--split-out", str(root / "train.json" / "s.json")]) == 2
    assert "train.json is a file, not a folder" in capsys.readouterr().err
    assert main([str(setup["job"]), str(root), "--train", str(root / "train.json"), "--out", str(root / "n.json")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main([str(root), str(export), "--train", str(root / "train.json"), "--out", str(root / "n.json")]) == 2
    assert "is not a gd_hf.label_next job folder" in capsys.readouterr().err
    assert not (root / "new.json").exists() and not (root / "n.json").exists() and not (root / "n.split.json").exists()
    assert main([*args, "--split-out", str(root / "splits" / "round1.json")]) == 0  # a new folder is made
    assert read_split_file(root / "splits" / "round1.json") == [10, 11, 13]


def test_null_iscrowd_is_an_object_as_the_reader_reads_it(setup):
    root = setup["root"]
    export = tool_export(setup, {13: "im13.png"})
    _edit(export, lambda d: [a.update(iscrowd=None) for a in d["annotations"]])
    merge_job(setup["job"], export, root / "train.json", root / "new.json", crowd="keep")
    assert [a["iscrowd"] for a in load_coco(root / "new.json", setup["images"]).annotations[13]] == [0, 0]
