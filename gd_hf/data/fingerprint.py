"""The fingerprint of the files a run reads (`data_fingerprint`): each annotation file's content and each image or
shard folder's listing. Every checkpoint records it; a relaunch whose data changed in place (an annotation edited,
an image replaced at the same path) is a change to what is trained, as a changed recipe key is
(`gd_hf.run.launches.check_relaunch`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gd_hf.config import DataConfig
from gd_hf.data.coco_source import file_digest
from gd_hf.data.convert import IMAGE_SUFFIXES

FILES = ("train_annotations", "val_annotations", "split_file")  # whose content is hashed
DATA_SUFFIXES = {*IMAGE_SUFFIXES, ".parquet", ".arrow", ".json"}  # images, shards and their descriptions
FOLDERS = ("train_images", "val_images", "unlabeled_images", "train_shards", "val_shards")  # whose listing is


def data_fingerprint(data: DataConfig) -> dict[str, str]:
    """`{"data.KEY": digest}` for the files and folders the recipe's data keys name and that exist (a hub data
    set is named by its id and revision, recipe keys already). An annotation file by its content (SHA-256); a
    folder by its image and shard files' relative paths and sizes (not times: a copied or moved data set is the
    same data; an image replaced by another is, but for a byte-identical size, another size)."""
    if data.source == "hub":
        return {}
    fingerprint = {}
    for key in FILES:
        path = getattr(data, key)
        if path and Path(path).is_file():
            fingerprint[f"data.{key}"] = file_digest(Path(path))[:16]
    for key in FOLDERS:
        path = getattr(data, key)
        if path and Path(path).is_dir():
            fingerprint[f"data.{key}"] = folder_digest(Path(path))
    return fingerprint


def folder_digest(folder: Path) -> str:
    """The SHA-256 (16 hex digits) of a folder's files' relative paths and sizes, in order (~0.5 s for COCO's
    118k images)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            # Data files only: a `.DS_Store`, `Thumbs.db` or a note beside the images changes no record.
            if name.startswith(".") or Path(name).suffix.lower() not in DATA_SUFFIXES:
                continue
            path = os.path.join(root, name)
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            # (a name that is not UTF-8 is hashed as the bytes it is)
            digest.update(f"{os.path.relpath(path, folder)}\0{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]
