"""Exported models: vanilla transformers folders (safetensors + config with id2label + image processor config)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from gd_hf.families import as_exported
from gd_hf.files import fsync_tree, replace_durably
from gd_hf.model_card import RunSummary, write_model_card
from gd_hf.weights import check_finite


def export_model(
    model: PreTrainedModel,
    image_processor: Any,
    out_dir: str | Path,
    metrics: dict[str, Any] | None = None,
    summary: RunSummary | None = None,
    model_id: str | None = None,
) -> Path:
    """`save_pretrained` the model and its image processor into `out_dir`, replacing it atomically.

    The folder is written under a temporary name and renamed into place, so a crash leaves the previous export
    (or nothing), never a half-written one. `metrics` (if given) go to `eval_results.json`; `summary` (if
    given) becomes the model card `README.md`, whose usage snippet loads `model_id` (default: `out_dir`).
    """
    out_dir = Path(out_dir)
    check_finite(model, f"the model for {out_dir.name}/")  # an export is never NaN
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp.", dir=out_dir.parent))
    try:
        with as_exported(model):  # (EoMT: without masked attention, as at inference)
            model.save_pretrained(tmp, safe_serialization=True)
        image_processor.save_pretrained(tmp)
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
