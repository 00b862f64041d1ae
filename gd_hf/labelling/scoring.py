"""The resumable pass of the teacher over the unlabeled pool: each image read at the evaluation size (as the
export's image processor resizes), batched as evaluation batches, and its signals appended to a JSON-lines file
as each batch ends, so a killed pass goes on from the last batch written."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from gd_hf.config import DataConfig
from gd_hf.data.coco import DataError
from gd_hf.data.images import read_image
from gd_hf.data.loading import collate_eval, resize_for_eval
from gd_hf.data.transforms import REFERENCE_STRONG, strong_photometric
from gd_hf.labelling.signals import ImageSignals, image_signals, thumbnail
from gd_hf.models.protocol import ModelFamily

logger = logging.getLogger(__name__)

SIGNALS_FILE = "signals.jsonl"


def read_signals(path: Path) -> list[ImageSignals]:
    """The signals written so far; a last line cut by a kill is dropped (its batch is scored again)."""
    if not path.is_file():
        return []
    signals = []
    for line in path.read_text().splitlines():
        try:
            signals.append(ImageSignals(**json.loads(line)))
        except (ValueError, TypeError):
            break
    return signals


def undecoded_examples(records: datasets.Dataset | datasets.IterableDataset) -> Iterator[dict[str, Any]]:
    """The records with their image cells as stored ({"bytes", "path"}), map-style or streamed (a stream that was
    filtered decodes again after `cast_column`: `decode(False)` turns every feature's decoding off)."""
    if isinstance(records, datasets.Dataset):
        records = records.cast_column("image", datasets.Image(decode=False))
        for row in range(len(records)):
            yield records[row]
    else:
        yield from records.decode(False)


@dataclass(frozen=True)
class ScoringRules:
    """What the signals are computed with: the run's pseudo-label rules, and whether to run the perturbed view."""

    threshold: float
    min_soft_area: float = 5.0
    mask_threshold: float = 0.5
    disagreement: bool = False
    seed: int = 0  # the perturbed view of image i is drawn from (seed, i): a resumed pass computes the same


def score_pool(
    model: torch.nn.Module,
    family: ModelFamily,
    records: datasets.Dataset | datasets.IterableDataset,
    pool: set[int],
    data: DataConfig,
    folder: Path,
    rules: ScoringRules,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
) -> tuple[list[ImageSignals], int]:
    """The signals of the records of `records` whose image id is in `pool`, and how many of them could not be read
    (skipped under `data.on_error: skip`). Signals already in `folder/signals.jsonl` are not computed again
    (those of ids no longer in the pool are dropped)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SIGNALS_FILE
    done = [s for s in read_signals(path) if s.image_id in pool]
    tmp = path.with_name(path.name + ".tmp")  # rewritten whole (without a cut last line), then appended to
    tmp.write_text("".join(json.dumps(s.as_dict()) + "\n" for s in done))
    os.replace(tmp, path)
    seen = {s.image_id for s in done}
    divisor = family.padding_divisor(model)
    model.eval().to(device)
    unreadable, batch = 0, []
    with path.open("a") as out, tqdm(total=len(pool), initial=len(seen), desc="scoring the unlabeled pool",
                                     unit="img") as progress:  # fmt: skip
        for example in undecoded_examples(records):
            image_id = int(example["image_id"])
            if image_id not in pool or image_id in seen:
                continue
            seen.add(image_id)
            try:
                image = read_image(example)
            except DataError as e:
                if data.on_error != "skip":
                    raise
                unreadable += 1
                progress.update(1)
                logger.warning("skipping an unreadable image (data.on_error: skip): %s", e)
                continue
            batch.append((image_id, image))
            if len(batch) == batch_size:
                done += _score_batch(model, family, batch, data, divisor, rules, device, out)
                progress.update(len(batch))
                batch = []
        if batch:
            done += _score_batch(model, family, batch, data, divisor, rules, device, out)
            progress.update(len(batch))
    return sorted(done, key=lambda s: s.image_id), unreadable


@torch.no_grad()
def _score_batch(model, family, batch, data, divisor, rules: ScoringRules, device, out) -> list[ImageSignals]:
    plain, perturbed, thumbnails = [], [], []
    for image_id, original in batch:
        image = resize_for_eval(original, data.eval_shortest_edge, data.eval_longest_edge)
        plain.append({"image": image, "image_id": image_id, "original_size": tuple(original.shape[-2:])})
        if rules.disagreement:
            generator = torch.Generator().manual_seed(rules.seed * 1_000_003 + image_id % (2**31))
            perturbed.append({**plain[-1], "image": strong_photometric(image, generator, REFERENCE_STRONG)})
        thumbnails.append(thumbnail(image))
    black = family.black_padding
    weak = family.predict(model, collate_eval(plain, divisor, black)["pixel_values"].to(device))
    strong = None
    if rules.disagreement:
        strong = family.predict(model, collate_eval(perturbed, divisor, black)["pixel_values"].to(device))
    signals = image_signals([i for i, _ in batch], weak, strong, rules.threshold, rules.min_soft_area, thumbnails,
                            rules.mask_threshold)  # fmt: skip
    out.writelines(json.dumps(s.as_dict()) + "\n" for s in signals)
    out.flush()
    os.fsync(out.fileno())
    return signals
