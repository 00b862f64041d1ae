"""Sources (COCO folder, Parquet shards, hub layout, image folder), streaming vs map-style, sharding over
processes, stream resume, bad records in a stream, the split tool and the Cityscapes conversion."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchdata.stateful_dataloader import StatefulDataLoader

from gd_hf.config import DataConfig, HubColumns
from gd_hf.data.coco import FEATURES, DataError, load_coco
from gd_hf.data.convert import coco_to_shards, convert_cityscapes
from gd_hf.data.loading import StreamedTrainDataset, labeled_sample
from gd_hf.data.records import check_record, image_folder_records
from gd_hf.data.shards import read_shards
from gd_hf.data.sources import open_source
from gd_hf.data.splits import CITYSCAPES_COUNTS, draw_labeled_ids, make_split, read_split_file, write_paper_splits

from .conftest import ROOT, demo_recipe


def coco_config(root: Path, **changes) -> DataConfig:
    return dataclasses.replace(
        DataConfig(
            train_images=str(root / "train"),
            train_annotations=str(root / "annotations" / "instances_train.json"),
            val_images=str(root / "val"),
            val_annotations=str(root / "annotations" / "instances_val.json"),
            crop_size=64,
            num_workers=0,
        ),
        **changes,
    )


def comparable(record: dict) -> tuple:
    """A record's content, images as bytes (from the file or the embedded bytes)."""
    image = record["image"]
    data = image["bytes"] if image.get("bytes") is not None else Path(image["path"]).read_bytes()
    o = record["objects"]
    return (
        record["image_id"],
        record["width"],
        record["height"],
        data,
        tuple(o["category"]),
        tuple(o["rle_counts"]),
        tuple(o["iscrowd"]),
    )


def all_records(records) -> dict[int, tuple]:
    return {r["image_id"]: comparable(r) for r in records}


@pytest.fixture(scope="module")
def shards(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    coco_to_shards(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train", out / "train", 4)
    coco_to_shards(synthetic_root / "annotations" / "instances_val.json", synthetic_root / "val", out / "val", 2)
    return out


def test_streaming_reads_the_same_records_as_map_style(synthetic_root):
    mapped = open_source(coco_config(synthetic_root)).train
    streamed = open_source(coco_config(synthetic_root, streaming=True)).train
    assert isinstance(mapped, datasets.Dataset) and isinstance(streamed, datasets.IterableDataset)
    assert all_records(streamed) == all_records(mapped)
    assert len(all_records(mapped)) == 24


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_hold_the_coco_folder(synthetic_root, shards, streaming):
    from_coco = open_source(coco_config(synthetic_root))
    config = coco_config(
        synthetic_root,
        source="shards",
        train_shards=str(shards / "train"),
        val_shards=str(shards / "val"),
        streaming=streaming,
    )
    from_shards = open_source(config)
    assert sorted(p.name for p in (shards / "train").glob("*.parquet")) == [
        f"data-0000{k}-of-00004.parquet" for k in range(4)
    ]
    assert all_records(from_shards.train) == all_records(from_coco.train)
    assert from_shards.categories.names == from_coco.categories.names
    # The val ground truth built from the shards equals the annotation file's (ids, classes, masks, areas).
    truth_file = load_coco(config.val_annotations, config.val_images)
    built = from_shards.val_ground_truth
    assert sorted(built.getImgIds()) == sorted(truth_file.images)
    n_file = sum(len(a) for a in truth_file.annotations.values())
    assert len(built.getAnnIds()) == n_file
    raw = json.loads(Path(config.val_annotations).read_text())
    by_image: dict[int, list] = {}
    for annotation in raw["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image_id in built.getImgIds():
        info = built.imgs[image_id]
        ours = built.imgToAnns[image_id]
        theirs = by_image.get(image_id, [])
        assert [a["category_id"] for a in ours] == [a["category_id"] for a in theirs]  # COCO ids, file order
        assert [a["iscrowd"] for a in ours] == [a.get("iscrowd", 0) for a in theirs]
        for mine, original in zip(ours, theirs):
            # The mask the file describes (polygons rasterised by pycocotools itself), pixel for pixel ...
            segmentation, height, width = original["segmentation"], info["height"], info["width"]
            if isinstance(segmentation, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation["counts"], str):  # compressed RLE
                rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
            else:  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, height, width)
            expected = mask_utils.decode(rle)
            assert np.array_equal(built.annToMask(mine), expected)
            # ... and the area COCOeval's size ranges use: the mask's pixel count.
            assert mine["area"] == float(expected.sum())


def test_shards_with_other_columns_fail_at_start_naming_them(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    datasets.Dataset.from_dict({"image_id": [1], "picture": ["x.png"]}).to_parquet(str(folder / "a.parquet"))
    config = DataConfig(source="shards", train_shards=str(folder), val_shards=str(folder))
    with pytest.raises(DataError) as error:
        open_source(config)
    message = str(error.value)
    assert "missing ['height', 'image', 'objects', 'width']" in message and "extra ['picture']" in message


def test_a_shards_info_listing_a_category_id_twice_fails_naming_the_file(shards, tmp_path):
    import json
    import shutil

    folder = tmp_path / "train"
    shutil.copytree(shards / "train", folder)
    info_file = folder / "gd_hf_dataset.json"
    info = json.loads(info_file.read_text())
    info["category_ids"][1] = info["category_ids"][0]  # edited by hand, say
    info_file.write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"{info_file}: class list: an id appears twice"):
        read_shards(folder, streaming=False)


def hub_like_folder(synthetic_root: Path, out: Path, with_ids: bool = True) -> Path:
    """The synthetic set as a hub data set would lay it out: Parquet per split, other column names, polygons
    replaced by RLE dicts, class names in a ClassLabel."""
    source = load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    names = source.category_names
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            **({"uid": datasets.Value("int64")} if with_ids else {}),
            "instances": datasets.List(
                {
                    "label": datasets.ClassLabel(names=names),
                    "mask": {"size": datasets.List(datasets.Value("int32")), "counts": datasets.Value("string")},
                }
            ),
        }
    )
    for split, ids in (("train", sorted(source.images)[:16]), ("validation", sorted(source.images)[16:])):
        rows = []
        for image_id in ids:
            anns = [a for a in source.annotations[image_id] if not a["iscrowd"]]
            rows.append(
                {
                    "picture": str(source.image_path(image_id)),
                    **({"uid": image_id} if with_ids else {}),
                    "instances": [{"label": a["category"], "mask": a["rle"]} for a in anns],
                }
            )
        (out / "data").mkdir(parents=True, exist_ok=True)
        dataset = datasets.Dataset.from_list(rows, features=features)
        dataset = dataset.cast_column("picture", datasets.Image())
        dataset.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_layout_is_mapped_by_columns(synthetic_root, tmp_path, streaming):
    folder = hub_like_folder(synthetic_root, tmp_path / "hub")
    columns = HubColumns(image="picture", image_id="uid", objects="instances", category="label", segmentation="mask")
    config = DataConfig(source="hub", hub_dataset=str(folder), hub_columns=columns, streaming=streaming)
    opened = open_source(config)
    coco = load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    assert opened.categories.names == coco.category_names
    records = {r["image_id"]: r for r in opened.train}
    assert sorted(records) == sorted(coco.images)[:16]
    for image_id, record in records.items():
        expected = [a for a in coco.annotations[image_id] if not a["iscrowd"]]
        assert record["objects"]["category"] == [a["category"] for a in expected]
        assert record["objects"]["rle_counts"] == [a["rle"]["counts"] for a in expected]
        assert (record["width"], record["height"]) == (coco.images[image_id]["width"], coco.images[image_id]["height"])
    assert sorted(opened.val["image_id"]) == sorted(coco.images)[16:]


def test_hub_layout_with_a_missing_column_names_it(synthetic_root, tmp_path):
    folder = hub_like_folder(synthetic_root, tmp_path / "hub")
    config = DataConfig(source="hub", hub_dataset=str(folder), hub_columns=HubColumns(image="img"))
    with pytest.raises(DataError, match=r"no column\(s\) \['img', 'objects'\].*'instances', 'picture', 'uid'"):
        open_source(config)


def test_streaming_a_hub_set_without_image_ids_is_refused(synthetic_root, tmp_path):
    folder = hub_like_folder(synthetic_root, tmp_path / "hub", with_ids=False)
    columns = HubColumns(image="picture", objects="instances", category="label", segmentation="mask")
    with pytest.raises(DataError, match="streaming needs one"):
        open_source(DataConfig(source="hub", hub_dataset=str(folder), hub_columns=columns, streaming=True))
    opened = open_source(DataConfig(source="hub", hub_dataset=str(folder), hub_columns=columns))
    assert list(opened.train["image_id"]) == list(range(16))  # row index as id


def test_image_folder_is_an_unlabeled_source(synthetic_root, tmp_path):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    records = image_folder_records(tmp_path / "photos")
    assert list(records["image_id"]) == [-1, -2] and len(records) == 2
    from gd_hf.data.loading import unlabeled_sample

    sample = unlabeled_sample(
        records.cast_column("image", datasets.Image(decode=False))[0], DataConfig(crop_size=32), 0
    )
    assert sample["weak"].shape[0] == 3 and max(sample["weak"].shape[1:]) <= 32
    assert sample["hidden_masks"].shape[0] == 0  # no labels, hidden or not


# --- streams: sharding, resume, bad records -----------------------------------------------------------------


def id_stream(n: int, num_shards: int) -> datasets.IterableDataset:
    return datasets.Dataset.from_dict({"image_id": list(range(n))}).to_iterable_dataset(num_shards=num_shards)


def ids_only(example, seed):
    return {"image_id": example["image_id"], "seed": seed}


def take(loader_iter, n: int) -> list[int]:
    return [i for _ in range(n) for i in next(loader_iter)["image_id"].tolist()]


@pytest.mark.parametrize("num_shards", [4, 3])  # 3 shards over 2 ranks: datasets then splits by example
def test_ranks_get_disjoint_shares_whose_union_is_the_data(num_shards):
    data = DataConfig(shuffle_buffer=8)
    shares = []
    for rank in range(2):
        stream = StreamedTrainDataset(id_stream(40, num_shards), ids_only, data, seed=3, rank=rank, world_size=2)
        shares.append([s["image_id"] for s, _ in zip(iter(stream), range(20))])
    assert set(shares[0]).isdisjoint(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(40))


def test_two_launched_processes_read_disjoint_shares(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(
        "import json, sys\n"
        "from accelerate import PartialState\n"
        "import datasets\n"
        "from gd_hf.config import DataConfig\n"
        "from gd_hf.data.loading import StreamedTrainDataset\n"
        "state = PartialState(cpu=True)\n"
        "stream = datasets.Dataset.from_dict({'image_id': list(range(40))}).to_iterable_dataset(num_shards=4)\n"
        "ds = StreamedTrainDataset(stream, lambda e, seed: e, DataConfig(shuffle_buffer=4), 0,"
        " state.process_index, state.num_processes)\n"
        "ids = [s['image_id'] for s, _ in zip(iter(ds), range(20))]\n"
        "json.dump({'rank': state.process_index, 'world': state.num_processes, 'ids': ids},"
        " open(sys.argv[1] + f'/rank{state.process_index}.json', 'w'))\n"
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["world"] for s in shares] == [2, 2]
    assert set(shares[0]["ids"]).isdisjoint(shares[1]["ids"])
    assert sorted(shares[0]["ids"] + shares[1]["ids"]) == list(range(40))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_exactly_where_it_stopped(num_workers):
    def loader() -> StatefulDataLoader:
        stream = StreamedTrainDataset(id_stream(64, 4), ids_only, DataConfig(shuffle_buffer=16), seed=5)
        return StatefulDataLoader(stream, batch_size=4, num_workers=num_workers)

    def take_with_seeds(batches, n: int) -> list[tuple[int, int]]:
        pairs = []
        for _ in range(n):
            batch = next(batches)
            pairs += zip(batch["image_id"].tolist(), batch["seed"].tolist())
        return pairs

    # 64 records = 16 batches: 24 batches cross into the second epoch.
    expected = take_with_seeds(iter(loader()), 24)
    first = loader()
    before = take_with_seeds(iter(first), 10)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    after = take_with_seeds(iter(resumed), 14)
    assert before + after == expected  # same records, same order, same augmentation seeds
    epoch_one = [image_id for image_id, _ in expected[:64]]
    assert sorted(epoch_one) == list(range(64))  # an epoch is every record once


def test_bad_records_in_a_stream_are_skipped_and_counted_or_raise(synthetic_root):
    good = open_source(coco_config(synthetic_root)).train.cast_column("image", datasets.Image(decode=False))
    rows = [good[i] for i in range(6)]
    rows[1] = {**rows[1], "image": {"bytes": b"not an image", "path": "broken.png"}}
    rows[3] = {k: v for k, v in rows[3].items() if k != "objects"}  # a record missing a column
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    data = DataConfig(crop_size=32, shuffle_buffer=1)
    make = lambda example, seed: labeled_sample(example, data, seed)  # noqa: E731

    skipping = StreamedTrainDataset(stream, make, data, seed=0, check=check_record)
    samples = [s for s, _ in zip(iter(skipping), range(4))]
    assert [s["image_id"] for s in samples] == [rows[i]["image_id"] for i in (0, 2, 4, 5)]
    assert sum(s["skipped"] for s in samples) == 2 and skipping.skips.total == 2

    raising = StreamedTrainDataset(
        stream, make, dataclasses.replace(data, on_error="raise"), seed=0, check=check_record
    )
    with pytest.raises(DataError, match=r"cannot read image broken\.png"):
        list(zip(iter(raising), range(4)))


# --- split tool and Cityscapes --------------------------------------------------------------------------------


def test_paper_split_files_are_deterministic_and_what_recipes_draw(synthetic_root, tmp_path):
    annotations = synthetic_root / "annotations" / "instances_train.json"
    first = write_paper_splits(annotations, tmp_path / "a", [5, 10], seed=7, preset="coco")
    second = write_paper_splits(annotations, tmp_path / "b", [5, 10], seed=7, preset="coco")
    assert [p.name for p in first] == ["coco_5pct_seed7.json", "coco_10pct_seed7.json"]
    assert [p.read_text() for p in first] == [p.read_text() for p in second]
    source = load_coco(annotations, synthetic_root / "train")
    assert read_split_file(first[1]) == draw_labeled_ids(list(source.images), 10, 7)
    from_file = make_split(source, split_file=str(first[1]))
    from_recipe = make_split(source, 10, 7)
    assert from_file == from_recipe
    other_seed = write_paper_splits(annotations, tmp_path / "c", [10], seed=8, preset="coco")
    assert read_split_file(other_seed[0]) != read_split_file(first[1])


def test_cityscapes_preset_draws_the_reference_counts(tmp_path):
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 4, "height": 4} for i in range(1, 2976)],
        "annotations": [],
        "categories": [{"id": 26, "name": "car"}],
    }
    annotations = tmp_path / "instances_train.json"
    annotations.write_text(json.dumps(coco))
    files = write_paper_splits(annotations, tmp_path / "splits", [5, 10, 20, 30], seed=0, preset="cityscapes")
    assert [len(read_split_file(f)) for f in files] == [144, 296, 592, 888] == list(CITYSCAPES_COUNTS.values())
    with pytest.raises(DataError, match="cityscapes preset"):
        write_paper_splits(annotations, tmp_path / "splits", [7], seed=0, preset="cityscapes")


def write_cityscapes(root: Path) -> dict:
    """Two frames in the Cityscapes layout; returns what each instance should become."""
    expected = {}
    for city, frame in (("aachen", "000000_000019"), ("bochum", "000001_000019")):
        height, width = 32, 64
        ids = np.full((height, width), 7, dtype=np.int32)  # road: no instances, dropped
        ids[2:10, 2:12] = 26001  # car 1
        ids[12:20, 2:12] = 26002  # car 2
        ids[2:20, 30:40] = 24000  # person 0
        ids[22:30, 40:60] = 26  # a group of cars -> crowd
        ids[22:30, 2:10] = 4000 + 3  # class 4 (not an instance class) -> dropped
        (root / "leftImg8bit" / "train" / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / "train" / city).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (90, 90, 90)).save(
            root / "leftImg8bit" / "train" / city / f"{city}_{frame}_leftImg8bit.png"
        )
        label_file = root / "gtFine" / "train" / city / f"{city}_{frame}_gtFine_instanceIds.png"
        Image.fromarray(ids.astype(np.uint16)).save(label_file)  # 16-bit PNGs, as the official files
        expected[f"{city}/{city}_{frame}_leftImg8bit.png"] = {(26, 0, 80), (26, 0, 80), (24, 0, 180), (26, 1, 160)}
    return expected


def test_cityscapes_conversion(tmp_path):
    root = tmp_path / "cityscapes"
    expected = write_cityscapes(root)
    (written,) = convert_cityscapes(root, ["train"])
    assert written == root / "annotations" / "instances_train.json"
    coco = json.loads(written.read_text())
    assert [c["name"] for c in coco["categories"]] == [
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    assert [c["id"] for c in coco["categories"]] == [24, 25, 26, 27, 28, 31, 32, 33]
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert {(a["category_id"], a["iscrowd"], int(a["area"])) for a in anns} == expected[image["file_name"]]
        assert len(anns) == 4
    # The result is a COCO folder gd_hf reads: 2 cars + 1 person as targets, the group as crowd.
    source = load_coco(written, root / "leftImg8bit" / "train")
    first = source.annotations[1]
    assert sorted(source.category_names[a["category"]] for a in first if not a["iscrowd"]) == ["car", "car", "person"]
    car = next(a for a in coco["annotations"] if a["image_id"] == 1 and a["category_id"] == 26 and not a["iscrowd"])
    assert car["bbox"] == [2.0, 2.0, 10.0, 8.0]


def test_cityscapes_conversion_names_a_missing_label_file(tmp_path):
    root = tmp_path / "cityscapes"
    write_cityscapes(root)
    next((root / "gtFine" / "train" / "bochum").glob("*.png")).unlink()
    with pytest.raises(DataError, match=r"bochum_000001_000019_gtFine_instanceIds\.png .* does not exist"):
        convert_cityscapes(root, ["train"])


def test_record_schema_is_the_features():
    assert set(FEATURES) == {"image", "image_id", "width", "height", "objects"}


def test_a_save_to_disk_folder_is_a_shards_source(synthetic_root, tmp_path):
    from_coco = open_source(coco_config(synthetic_root))
    for split, records in (("train", from_coco.train), ("val", open_source(coco_config(synthetic_root)).val)):
        records.save_to_disk(str(tmp_path / split))
    config = coco_config(
        synthetic_root,
        source="shards",
        train_shards=str(tmp_path / "train"),
        val_shards=str(tmp_path / "val"),
        category_names=from_coco.categories.names,  # no gd_hf_dataset.json in a save_to_disk folder
    )
    for streaming in (False, True):
        opened = open_source(dataclasses.replace(config, streaming=streaming))
        assert all_records(opened.train) == all_records(from_coco.train)
        assert opened.categories.names == from_coco.categories.names


@pytest.mark.parametrize("kind", ["shards_streamed", "hub"])
def test_training_runs_on_shards_and_hub_sources(synthetic_root, shards, tmp_path, kind):
    from gd_hf.train import train
    from tests.conftest import tiny_overrides

    if kind == "hub":
        folder = hub_like_folder(synthetic_root, tmp_path / "hub")
        source = [
            "data.source=hub",
            f"data.hub_dataset={folder}",
            "data.hub_columns.image=picture",
            "data.hub_columns.image_id=uid",
            "data.hub_columns.objects=instances",
            "data.hub_columns.category=label",
            "data.hub_columns.segmentation=mask",
        ]
    else:
        source = [
            "data.source=shards",
            f"data.train_shards={shards / 'train'}",
            f"data.val_shards={shards / 'val'}",
            "data.streaming=true",
        ]
    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_root, out) + source + ["train.max_steps=2"]
    metrics = train(demo_recipe(overrides))
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (out / "final" / "config.json").is_file()
    labels = json.loads((out / "final" / "config.json").read_text())["id2label"]
    assert list(labels.values()) == ["circle", "rectangle", "triangle", "cross"]


def test_object_counts_leave_out_crowd_regions_and_follow_a_row_selection(synthetic_root, tmp_path):
    """Counted in Arrow (no object built in Python): the same as counting the records' flags one by one."""
    import json

    from gd_hf.data.coco import load_coco, to_hf_dataset
    from gd_hf.data.records import image_ids_and_object_counts

    coco = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    for k, annotation in enumerate(coco["annotations"]):
        annotation["iscrowd"] = int(k % 3 == 0)
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(coco))
    records = to_hf_dataset(load_coco(annotations, synthetic_root / "train"))
    selection = records.select([5, 0, 17, 3, 3])
    for dataset in (records, selection):
        ids, counts = image_ids_and_object_counts(dataset)
        assert ids == list(dataset["image_id"])
        assert counts == [sum(1 for c in o["iscrowd"] if not c) for o in dataset["objects"]]
    assert any(0 < c < len(o["iscrowd"]) for c, o in zip(counts, selection["objects"]))  # crowd flags were mixed in


def test_the_same_data_through_coco_and_shards_trains_to_the_same_ap(synthetic_root, shards, tmp_path):
    """A COCO folder and its shards are the same records in the same order: the same run on each ends with the
    same weights and the same mask AP (a source that dropped, reordered or mangled objects would not)."""
    from gd_hf.train import train
    from tests.conftest import tiny_overrides

    def run(name, *source):
        overrides = tiny_overrides(synthetic_root, tmp_path / name) + ["train.max_steps=2", *source]
        return train(demo_recipe(overrides))

    from_coco = run("coco")
    from_shards = run("shards", "data.source=shards", f"data.train_shards={shards / 'train'}",
                      f"data.val_shards={shards / 'val'}")  # fmt: skip
    assert from_shards == from_coco
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("coco", "shards"))
    assert all(torch.equal(a[k], b[k]) for k in a)
