"""The `shards` source: folders of Parquet files in gd_hf's record schema (`python -m gd_hf.data.convert shards`,
or any `Dataset.to_parquet` / `push_to_hub` of such records) with `gd_hf_dataset.json` naming the categories,
or `Dataset.save_to_disk` folders of them."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from gd_hf.config import DataConfig
from gd_hf.data.categories import Categories, named_categories
from gd_hf.data.coco import FEATURES, DataError
from gd_hf.data.convert import SHARDS_INFO_FILE
from gd_hf.data.ground_truth import coco_ground_truth
from gd_hf.data.records import Records, TrainVal, check_columns


def _shard_files(folder: Path) -> list[str]:
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    if not files:
        raise DataError(f"{folder} holds no *.parquet shards (write some with `python -m gd_hf.data.convert shards`)")
    return files


def read_shards(folder: str | Path, streaming: bool) -> tuple[Records, Categories | None]:
    """Records of a shards folder (Parquet files or a save_to_disk folder) and the categories it names."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"shards folder {folder} does not exist: check data.train_shards / data.val_shards")
    categories = None
    info_file = folder / SHARDS_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        try:
            categories = Categories([int(i) for i in info["category_ids"]], [str(n) for n in info["category_names"]])
        except DataError as e:
            raise DataError(f"{info_file}: {e}") from e
    if (folder / "state.json").is_file():  # Dataset.save_to_disk
        records: Records = datasets.load_from_disk(str(folder))
        check_columns(records.features, str(folder))
        if streaming:
            records = records.to_iterable_dataset(num_shards=min(64, max(1, len(records))))
        return records, categories
    files = _shard_files(folder)
    schema = datasets.load_dataset("parquet", data_files=files[:1], split="train", streaming=True).features
    check_columns(schema, files[0])
    records = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming, features=FEATURES)
    return records, categories


def open_shards(d: DataConfig) -> TrainVal:
    if not d.train_shards or not d.val_shards:
        raise DataError("data.source: shards needs data.train_shards and data.val_shards (folders)")
    train, train_categories = read_shards(d.train_shards, d.streaming)
    val, val_categories = read_shards(d.val_shards, streaming=False)
    categories = train_categories or named_categories(d, f"{d.train_shards}/{SHARDS_INFO_FILE}")
    if val_categories is not None and val_categories != categories:
        raise DataError(f"{d.train_shards} and {d.val_shards} name different categories")
    return TrainVal(
        train=train,
        val=val.cast_column("image", datasets.Image(decode=False)),
        categories=categories,
        val_ground_truth=coco_ground_truth(val, categories),
        description=str(d.train_shards),
    )
