"""COCOeval engines side by side on segm: pycocotools (the reference), hotcoco and faster-coco-eval.

    python benchmarks/cocoeval_engines.py [--images 5000] [--detections 100] [--data STAND_IN] [--repeat 3]
                                          [--engines pycocotools hotcoco faster-coco-eval] [--small-only]

Cases, each scored by every engine in this one process, on the same ground truth and results:

* `demo export`: the demo run's last val predictions (`--demo-results`, default the newest
  outputs/demo_synthetic/predictions/val_step_*.json) on its val set (`--demo-annotations`); skipped when absent.
* `small`: 200 images x `--detections` of the COCO-scale stand-in below.
* `COCO scale`: `--images` (5,000) val images x `--detections` (100) detections. The ground truth is the
  val2017 of `benchmarks/coco_scale.py`'s stand-in (`--data`, its folder), or, without it, the same thing written
  here from coco_scale's own drawing functions (COCO's image sizes, ~7.3 star-shaped polygons per image, 1 %
  crowd regions as uncompressed RLE, 80 categories with COCO's sparse ids); read as training reads it
  (`ground_truth_from_json`: compressed RLE, areas from the masks). The detections of an image: each
  ground-truth object moved by up to 8 px (1 in 10 with another class), a third of them again moved by up to
  20 px with a lower score, then other objects' masks (of images of the same size, moved too) up to
  `--detections`, as compressed RLE with string counts, what `to_coco_results` writes. AP is neither 0 nor 100.

Every engine starts from what `coco_mask_ap` gets (a pycocotools COCO and the result dicts) and returns the 12
summary stats; its time counts everything from there (its own ground truth and results objects included).
pycocotools and hotcoco run through `gd_hf.evaluation.mask_ap.coco_segm_stats` (what training runs). Prints, per case
and engine, the seconds (the best of `--repeat` runs; pycocotools once at COCO scale unless `--repeat-reference`),
the ratio to pycocotools, and the largest absolute difference of the 12 stats from pycocotools' (in AP points,
x100; the goal: <= 0.01). hotcoco's thread count follows RAYON_NUM_THREADS (default: every core).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from gd_hf.data.ground_truth import ground_truth_from_json
from gd_hf.evaluation.mask_ap import coco_segm_stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coco_scale import COCO_IDS, crowd_rle, polygon  # noqa: E402 (benchmarks/coco_scale.py: the stand-in's drawing)

ROOT = Path(__file__).resolve().parents[1]
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
SIZES = [(480, 640), (640, 480), (480, 640), (427, 640), (640, 427), (480, 640)]  # coco_scale's image sizes


def write_val_standin(path: Path, images: int, seed: int = 0) -> Path:
    """A val2017 of coco_scale's stand-in (its drawing functions and distributions), annotations only."""
    rng = np.random.Generator(np.random.PCG64(seed))
    records, annotations = [], []
    for k in range(images):
        image_id = 10_000_000 + k
        height, width = SIZES[k % len(SIZES)]
        records.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        for _ in range(int(rng.poisson(7.3))):
            crowd = rng.uniform() < 0.01
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": COCO_IDS[int(rng.integers(0, 80))],
                    "segmentation": crowd_rle(rng, height, width) if crowd else [polygon(rng, height, width)],
                    "area": 1000.0,
                    "bbox": [0.0, 0.0, 10.0, 10.0],
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": i, "name": f"class_{i}", "supercategory": "thing"} for i in COCO_IDS]
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))
    return path


def counts_from_string(s: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (maskApi.c's rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def moved(counts: list[int], height: int, width: int, dy: int, dx: int) -> dict:
    """The mask of `counts` moved by (dy, dx) pixels as a compressed RLE result segmentation. A move of the
    column-major pixel sequence: exact for a mask clear of the top and bottom edges, otherwise its pixels that
    leave a column enter the next; clamped to stay in the image."""
    runs = list(counts) if len(counts) % 2 else [*counts, 0]  # end on background
    shift = min(max(dx * height + dy, -runs[0]), runs[-1])
    runs[0] += shift
    runs[-1] -= shift
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode()}


def detections(ground_truth, per_image: int, seed: int = 1, images: int | None = None) -> list[dict]:
    """`per_image` results per image (see the module's docstring), for the first `images` of the ground truth."""
    rng = np.random.Generator(np.random.PCG64(seed))
    decoded: dict[int, list[int]] = {}

    def runs(annotation: dict) -> list[int]:
        if annotation["id"] not in decoded:
            decoded[annotation["id"]] = counts_from_string(annotation["segmentation"]["counts"])
        return decoded[annotation["id"]]

    same_size = defaultdict(list)
    for annotation in ground_truth.dataset["annotations"]:
        same_size[tuple(annotation["segmentation"]["size"])].append(annotation)
    results = []
    for image in ground_truth.dataset["images"][:images]:
        height, width = image["height"], image["width"]
        own = ground_truth.imgToAnns[image["id"]]
        picks = [(a, 8, rng.uniform(0.3, 1.0), rng.uniform() < 0.1) for a in own]
        picks += [(a, 20, rng.uniform(0.0, 0.6), False) for a in own if rng.uniform() < 1 / 3]
        pool = same_size[(height, width)]
        while len(picks) < per_image and pool:
            picks.append((pool[int(rng.integers(0, len(pool)))], 20, rng.uniform(0.0, 0.5), False))
        for annotation, reach, score, other_class in picks[:per_image]:
            dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2))
            category = COCO_IDS[int(rng.integers(0, 80))] if other_class else annotation["category_id"]
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": category,
                    "segmentation": moved(runs(annotation), height, width, dy, dx),
                    "score": float(score),
                }
            )
    return results


def faster_coco_eval_stats(ground_truth, results, image_ids=None) -> np.ndarray:
    """faster-coco-eval's COCOeval_faster (C++), from what `coco_mask_ap` gets."""
    import faster_coco_eval

    quiet = lambda *args, **kwargs: None  # noqa: E731
    dataset = dict(ground_truth.dataset)
    # It writes `ignore` / RLE fields into the annotation dicts it evaluates: its own (shallow) copies.
    dataset["annotations"] = [dict(a) for a in dataset["annotations"]]
    gt = faster_coco_eval.COCO(dataset)
    gt.print_function = quiet
    coco_eval = faster_coco_eval.COCOeval_faster(
        gt, gt.loadRes([dict(r) for r in results]), "segm", print_function=quiet
    )
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return np.asarray(coco_eval.stats, dtype=np.float64)[:12]


ENGINES = {
    "pycocotools": lambda gt, results, ids=None: coco_segm_stats(gt, results, ids, engine="pycocotools"),
    "hotcoco": lambda gt, results, ids=None: coco_segm_stats(gt, results, ids, engine="hotcoco"),
    "faster-coco-eval": faster_coco_eval_stats,
}


def compare(name: str, ground_truth, results, image_ids, engines: list[str], repeat: int, reference_repeat: int):
    """Rows of (case, engine, seconds, ratio, max |diff| x100, AP) for one case."""
    print(f"{name}: {len(image_ids or ground_truth.imgs)} images, {len(results)} results", flush=True)
    rows, reference = [], None
    for engine in engines:
        times = []
        for _ in range(reference_repeat if engine == "pycocotools" else repeat):
            start = time.perf_counter()
            stats = ENGINES[engine](ground_truth, results, image_ids)
            times.append(time.perf_counter() - start)
        if engine == "pycocotools":
            reference = (min(times), stats)
        row = {"case": name, "engine": engine, "seconds": min(times), "all_seconds": times, "stats": stats}
        if reference is not None:
            row["ratio"] = reference[0] / min(times)
            row["max_diff"] = float(np.abs(stats - reference[1]).max() * 100)
            row["worst_stat"] = STAT_NAMES[int(np.abs(stats - reference[1]).argmax())]
        print(f"  {engine}: {', '.join(f'{t:.2f}' for t in times)} s; stats x100 {np.round(stats * 100, 3).tolist()}",
              flush=True)  # fmt: skip
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| case | engine | seconds | pycocotools / engine | max abs diff of the 12 stats (x100) | AP |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.1f}x" if "ratio" in r else "—"
        diff = (
            "—"
            if "max_diff" not in r
            else "0 (identical)"
            if r["max_diff"] == 0
            else f"{r['max_diff']:.1e} ({r['worst_stat']})"
        )
        lines.append(
            f"| {r['case']} | {r['engine']} | {r['seconds']:.2f} | {ratio} | {diff} | {r['stats'][0] * 100:.2f} |"
        )
    return "\n".join(lines)


def newest(pattern: str) -> Path | None:
    found = sorted(ROOT.glob(pattern))
    return found[-1] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--data", help="coco_scale.py's stand-in folder (its annotations/instances_val2017.json)")
    installed = [e for e in ENGINES if importlib.util.find_spec(e.replace("-", "_"))]
    parser.add_argument("--engines", nargs="+", default=installed, choices=list(ENGINES), help="default: installed")
    parser.add_argument("--repeat", type=int, default=3, help="runs per engine (the best counts)")
    parser.add_argument("--repeat-reference", type=int, default=1, help="pycocotools' runs at COCO scale")
    parser.add_argument(
        "--demo-results", type=Path, default=newest("outputs/demo_synthetic/predictions/val_step_*.json")
    )
    parser.add_argument("--demo-annotations", type=Path, default=ROOT / "data/synthetic/annotations/instances_val.json")
    parser.add_argument("--small-only", action="store_true", help="the small cases only")
    args = parser.parse_args()
    if "pycocotools" in args.engines:
        args.engines = ["pycocotools", *(e for e in args.engines if e != "pycocotools")]  # the reference first

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}, RAYON_NUM_THREADS="
          f"{os.environ.get('RAYON_NUM_THREADS', '(unset: every core)')}", flush=True)  # fmt: skip
    rows = []
    if args.demo_results and args.demo_results.is_file() and args.demo_annotations.is_file():
        ground_truth = ground_truth_from_json(args.demo_annotations)
        results = json.loads(args.demo_results.read_text())
        name = f"demo export ({args.demo_results.name})"
        rows += compare(name, ground_truth, results, None, args.engines, args.repeat, args.repeat)
    else:
        print(f"demo export case skipped: {args.demo_results} / {args.demo_annotations} not found")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            annotations = Path(args.data) / "annotations" / "instances_val2017.json"
        else:
            annotations = write_val_standin(Path(tmp) / "instances_val2017.json", args.images)
        ground_truth = ground_truth_from_json(annotations)
    small_ids = [image["id"] for image in ground_truth.dataset["images"][:200]]
    small = detections(ground_truth, args.detections, images=200)
    rows += compare("small (200 images)", ground_truth, small, small_ids, args.engines, args.repeat, args.repeat)
    if not args.small_only:
        results = detections(ground_truth, args.detections)
        print(f"COCO-scale case built in {time.perf_counter() - start:.0f} s", flush=True)
        image_ids = [image["id"] for image in ground_truth.dataset["images"]]
        name = f"COCO scale ({len(image_ids)} images x {args.detections})"
        rows += compare(name, ground_truth, results, image_ids, args.engines, args.repeat, args.repeat_reference)
    print(f"load average after: {os.getloadavg()}")
    print(table(rows))
    failed = [r for r in rows if r.get("max_diff", 0) > 0.01]
    for r in failed:
        print(f"{r['engine']} differs from pycocotools on {r['case']} by {r['max_diff']:.3g} ({r['worst_stat']})")
    if not math.isfinite(sum(r["seconds"] for r in rows)) or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
