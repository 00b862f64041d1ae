"""The synthetic set: square by default, mixed sizes and aspect ratios on request (the paper's data path)."""

import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.data.synthetic import generate


def read(root):
    return json.loads((root / "annotations" / "instances_train.json").read_text())


def test_varied_sizes_mix_landscape_portrait_and_square_images_with_exact_masks(varied_root):
    coco = read(varied_root)
    sizes = [(image["height"], image["width"]) for image in coco["images"]]
    assert any(h > w for h, w in sizes) and any(h < w for h, w in sizes)  # portrait and landscape
    assert len(set(sizes)) > len(sizes) // 2  # sizes vary, not a handful of fixed ones
    assert all(48 <= max(h, w) <= 80 for h, w in sizes)  # longer side in [0.75, 1.25] x 64
    by_id = {image["id"]: image for image in coco["images"]}
    for image in coco["images"]:
        with Image.open(varied_root / "train" / image["file_name"]) as pixels:
            assert pixels.size == (image["width"], image["height"])
    for annotation in coco["annotations"]:
        image = by_id[annotation["image_id"]]
        assert annotation["segmentation"]["size"] == [image["height"], image["width"]]
        rle = {"size": annotation["segmentation"]["size"], "counts": annotation["segmentation"]["counts"].encode()}
        assert mask_utils.decode(rle).sum() == annotation["area"] > 0


def test_square_sets_are_squares_and_a_seed_gives_the_same_set(tmp_path):
    a = generate(tmp_path / "a", train=6, val=2, size=32, seed=5)
    b = generate(tmp_path / "b", train=6, val=2, size=32, seed=5)
    assert {(i["height"], i["width"]) for i in read(a)["images"]} == {(32, 32)}
    assert read(a) == read(b)
    for image in read(a)["images"]:
        pixels_a = np.asarray(Image.open(a / "train" / image["file_name"]))
        assert np.array_equal(pixels_a, np.asarray(Image.open(b / "train" / image["file_name"])))
