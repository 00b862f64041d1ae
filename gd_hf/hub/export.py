"""Exported models: vanilla transformers folders (safetensors + config with id2label + image processor config)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from gd_hf.files import fsync_tree, replace_durably
from gd_hf.hub.model_card import RunSummary, write_model_card
from gd_hf.hub.public import names_this_machine
from gd_hf.models import ModelFamily, family_of
from gd_hf.weights import check_finite


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bar, which would break the training's bar at every export."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def drop_machine_paths(config_file: Path) -> None:
    """transformers records where a config was loaded from (`_name_or_path`, also inside `backbone_config`): a
    backbone from a local folder would publish this machine's path. Such a record is emptied (transformers'
    "unknown"); hub ids stay."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("" if k == "_name_or_path" and isinstance(v, str) and names_this_machine(v) else clean(v))
                    for k, v in node.items()}  # fmt: skip
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    config = json.loads(config_file.read_text())
    cleaned = clean(config)
    if cleaned != config:
        config_file.write_text(json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def export_model(
    model: PreTrainedModel,
    image_processor: Any,
    out_dir: str | Path,
    metrics: dict[str, Any] | None = None,
    summary: RunSummary | None = None,
    model_id: str | None = None,
    files: dict[str, bytes] | None = None,
    family: ModelFamily | None = None,
) -> Path:
    """`save_pretrained` the model and its image processor into `out_dir`, replacing it atomically.

    The folder is written under a temporary name and renamed into place, so a crash leaves the previous export
    (or nothing), never a half-written one. `metrics` (if given) go to `eval_results.json`; `summary` (if
    given) becomes the model card `README.md`, whose usage snippet loads `model_id` (default: `out_dir`). `files`
    (relative path -> content) are written beside: the published recipe and launch record, examples, pictures.
    `family` saves the model in the state its exports hold (`ModelFamily.exported`; None: the built-in family of
    the model's `model_type`).
    """
    out_dir = Path(out_dir)
    check_finite(model, f"the model for {out_dir.name}/")  # an export is never NaN
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    try:
        family = family if family is not None else family_of(model)
        with family.exported(model), no_progress_bars():  # (e.g. EoMT: without masked attention)
            model.save_pretrained(tmp, safe_serialization=True)
        drop_machine_paths(tmp / "config.json")
        image_processor.save_pretrained(tmp)
        for relative, content in (files or {}).items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp / relative).write_bytes(content)
        if metrics is not None:
            (tmp / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        if summary is not None:
            write_model_card(tmp, summary, model_id or str(out_dir))
        fsync_tree(tmp)  # on disk before it takes the place of the previous export
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            replace_durably(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            replace_durably(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
