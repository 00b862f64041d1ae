"""Run a trained model on images: an overlay PNG per image and one COCO-format results JSON.

    python -m gd_hf.predict MODEL [IMAGES...] [--out DIR] [--threshold 0.5] [--batch-size 4] [--top-k 100]

MODEL: a run's output folder (its `final/` export), an exported folder or a hub id. IMAGES: files, folders
(searched recursively) or glob patterns; default, for a run's folder (or an export in one), the val images its
recipe names, into `RUN/predict/` unless `--out` says otherwise. Writes `DIR/<image name>.png` (instances coloured
one by one, class name and score drawn at each instance) and `DIR/predictions.json` (COCO results: image_id,
category_id, category_name, file_name, RLE segmentation, score). `category_id` is the training data set's id of the
class (the export records them), and `image_id` the data set's id of an image of the run's val set; other images
are numbered in the sorted input list's order. Images are resized as
the model's image processor says and batched; the GPU is used when there is one. An unreadable image is
reported and skipped; the exit code is 1 if no image could be read.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, PreTrainedModel

from gd_hf.data.convert import IMAGE_SUFFIXES
from gd_hf.data.images import to_rgb
from gd_hf.data.loading import resize_for_eval
from gd_hf.data.transforms import BLACK, normalize, pad_to, padded_size
from gd_hf.evaluation.mask_ap import Instances, post_process_instances, to_coco_results
from gd_hf.files import output_problem
from gd_hf.hub.run_folder import RunFolderError, chosen_export, run_of, run_val_set
from gd_hf.models import family_of, input_size_problem, load_export
from gd_hf.pictures import draw_overlay, instance_colors  # noqa: F401 (re-exported)


def coco_image_ids(annotations: Path, images: Path) -> dict[Path, int]:
    """The id of each image of a COCO instances JSON, by its path under `images` (as `find_images` finds it)."""
    try:
        listed = json.loads(Path(annotations).read_text()).get("images") or []
        return {Path(images) / str(image["file_name"]): int(image["id"]) for image in listed}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise RunFolderError(f"{annotations}: cannot read its image ids ({type(e).__name__}: {e})") from e


def find_images(inputs: list[str]) -> list[Path]:
    """Files, folders (recursive) and glob patterns -> sorted unique image paths."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found |= {p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}  # (no FIFOs)
        elif path.is_file():
            found.add(path)
        else:
            found |= {Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()}
    return sorted(found)


def load_image(path: Path) -> Image.Image:
    """The image as training and evaluation read it (`to_rgb`: a 16-bit TIFF is scaled, not clipped to white)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # photos as they are shown, not as they are stored
        return to_rgb(image)


def dataset_category_ids(model: PreTrainedModel) -> list[int]:
    """The training data set's category id of each class of `model` (what its export records as
    `dataset_category_ids`), else the class ids themselves (a model not trained by gd_hf)."""
    recorded = getattr(model.config, "dataset_category_ids", None)
    count = len(model.config.id2label)
    if isinstance(recorded, list) and len(recorded) == count and all(isinstance(i, int) for i in recorded):
        return recorded
    return list(range(count))


def export_sizes(model: str) -> tuple[int, int]:
    """The test-time (shortest edge, longest edge) of an export folder or hub id: its image processor's resize
    (800 / 1333, transformers' defaults, where it records none)."""
    size = AutoImageProcessor.from_pretrained(model).size
    return size.get("shortest_edge") or 800, size.get("longest_edge") or 1333


def recorded_evaluation(model: str | Path) -> dict[str, Any]:
    """How an export's metrics were measured (`evaluated_with` in its eval_results.json: top_k, max_images, ...),
    or {} (no such record: a hub model not written by gd_hf, an older export)."""
    path = Path(model) / "eval_results.json"
    if not path.is_file() and not Path(model).is_dir():  # a hub id: the file if the repo has one
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model), "eval_results.json"))
        except Exception:  # noqa: BLE001 - absent from the repo, not cached offline, not a repo id: no record
            return {}
    try:
        recorded = json.loads(path.read_text()).get("evaluated_with")
    except (OSError, ValueError, AttributeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def export_top_k(model: str | Path, default: int = 100) -> int:
    """The instances per image an export's metrics were measured with, else `default`."""
    return _positive_int(recorded_evaluation(model).get("top_k")) or default


def export_max_images(model: str | Path) -> int | None:
    """How many val images (the first, by id) an export's metrics were measured on, or None: all of them."""
    return _positive_int(recorded_evaluation(model).get("max_images"))


@torch.no_grad()
def segment_images(
    model: PreTrainedModel,
    images: list[Image.Image],
    shortest_edge: int,
    longest_edge: int,
    threshold: float = 0.5,
    top_k: int = 100,
    device: str | torch.device = "cpu",
) -> list[Instances]:
    """Each RGB image's instances scoring above `threshold`, masks at the image's size: resized as evaluation,
    padded together into one frame (so a batch predicts as `predict` with the same batch), post-processed as the
    reference. What `predict` and the Space (`gd_hf.hub.space`) both run."""
    model.to(device).eval()
    family = family_of(model)  # its built-in family, predicting as at inference
    resized = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        resized.append(resize_for_eval(pixels, shortest_edge, longest_edge))
    sizes = [tuple(p.shape[-2:]) for p in resized]
    height, width = padded_size(sizes, family.padding_divisor(model))
    fill = BLACK if family.black_padding else None  # as the exported processor pads
    pixel_values = torch.stack([pad_to(normalize(p), height, width, fill) for p in resized]).to(device)
    outputs = family.predict(model, pixel_values)
    processed = post_process_instances(
        outputs.class_logits,
        outputs.mask_logits,
        sizes,
        [(image.height, image.width) for image in images],
        (height, width),
        top_k,
    )
    return [instances.select(instances.scores > threshold) for instances in processed]


def predict(
    model: PreTrainedModel,
    images: list[Path],
    out: Path,
    shortest_edge: int,
    longest_edge: int,
    threshold: float = 0.5,
    batch_size: int = 4,
    top_k: int = 100,
    device: str | torch.device = "cpu",
    image_ids: dict[Path, int] | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """Overlays into `out` and COCO results for `images` (`image_ids`: the data set's id of an image, by path;
    the others are numbered by their place in `images`); returns (results, [(unreadable image, why)])."""
    out.mkdir(parents=True, exist_ok=True)
    id2label = model.config.id2label
    category_ids = dataset_category_ids(model)
    name_of = {category_ids[label]: name for label, name in id2label.items()}
    results, failures, used_names = [], [], set()
    progress = tqdm(total=len(images), desc="predict", unit="img")
    for start in range(0, len(images), batch_size):
        batch: list[tuple[int, Path, Image.Image]] = []
        for number, path in enumerate(images[start : start + batch_size], start + 1):
            try:
                batch.append(((image_ids or {}).get(path, number), path, load_image(path)))
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                failures.append((path, str(e)))
        progress.update(min(batch_size, len(images) - start))
        if not batch:
            continue
        segmented = segment_images(
            model, [image for *_, image in batch], shortest_edge, longest_edge, threshold, top_k, device
        )
        for (image_id, path, image), instances in zip(batch, segmented):
            scores, masks = instances.scores, instances.instance_masks()
            names = [id2label[int(label)] for label in instances.labels]
            for record in to_coco_results(image_id, instances, category_ids):
                record.update(category_name=name_of[record["category_id"]], file_name=str(path))
                results.append(record)
            name = path.stem
            while name in used_names:  # two inputs with one name (other folders): keep both
                name += "_"
            used_names.add(name)
            draw_overlay(image, masks, names, scores.tolist()).save(out / f"{name}.png")
    progress.close()
    (out / "predictions.json").write_text(json.dumps(results))
    return results, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gd_hf.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="exported model folder, a run's output folder (its final/ export) or hub id")
    parser.add_argument("images", nargs="*", help="image files, folders or glob patterns (default: the run's val set)")
    parser.add_argument(
        "--out", help="output folder for overlays and predictions.json (default, for a run: RUN/predict)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum instance score (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-k", type=int, help="instances considered per image (default: what the export was "
                        "evaluated with, else 100)")  # fmt: skip
    parser.add_argument("--folder", default="final", help="which export of a run folder (default: final, as push)")
    args = parser.parse_args(argv)
    if not args.threshold <= 1 or not math.isfinite(args.threshold):  # (NaN fails; below 0 keeps every instance)
        parser.error(f"--threshold must be a number <= 1 (scores lie in [0, 1]; got {args.threshold})")
    image_ids = None
    try:
        if not args.images:  # the run's val set, with its image ids
            val = run_val_set(args.model)
            image_ids = coco_image_ids(val.annotations, val.images)
            args.images = [str(path) for path in image_ids]  # the images it lists, not whatever else is there
            print(f"predicting the run's val images: {val.images}", file=sys.stderr)
        if args.out is None:
            run = run_of(args.model)
            if run is None:
                raise RunFolderError("give --out (MODEL is not a run's output folder, whose predict/ it would be)")
            args.out = str(run / "predict")
        if problem := output_problem(args.out, folder=True, writable=True):
            raise RunFolderError(f"--out: {problem}")
        args.model = chosen_export(args.model, args.folder)
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = find_images(args.images)
    if not images:
        print(f"error: no images found in {args.images}", file=sys.stderr)
        return 1
    try:
        model = load_export(args.model)
        shortest_edge, longest_edge = export_sizes(args.model)
    except Exception as e:  # noqa: BLE001 - truncated weights (safetensors' own error), a broken config: one line
        print(f"error: cannot load the model {args.model}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    problem = input_size_problem(model, shortest_edge, longest_edge)
    if problem:
        print(f"error: {problem} (the size in its preprocessor_config.json)", file=sys.stderr)
        return 2
    if args.top_k is None:
        args.top_k = export_top_k(args.model)
    if args.batch_size < 1 or args.top_k < 1:
        print("error: --batch-size and --top-k must be >= 1", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results, failures = predict(
        model,
        images,
        Path(args.out),
        shortest_edge,
        longest_edge,
        args.threshold,
        args.batch_size,
        args.top_k,
        device,
        image_ids,
    )
    for path, why in failures:
        print(f"skipped unreadable image {path}: {why}", file=sys.stderr)
    done = len(images) - len(failures)
    print(f"{done} images, {len(results)} instances -> {args.out} ({len(failures)} unreadable)")
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
