"""gd_hf at COCO's size: start-up, memory, step time and evaluation cost of the paper recipe on a stand-in.

    python benchmarks/coco_scale.py [--data outputs/coco_scale/data] [--out outputs/coco_scale]
                                    [--processes 1 2] [--steps 2] [--eval-images 8] [key=value ...]

1. Writes (once; reused while OUT/data exists) a COCO-sized stand-in: 118,287 train + 5,000 val image records at
   COCO's sizes (640x480 and 480x640 mixed), ~7.3 objects per image as polygons (1 % crowd regions as
   uncompressed RLE, as COCO), 80 categories with COCO's sparse ids, and image files that are hard links to a
   few JPEGs (the content is not COCO's: timings only, no accuracy).
2. Runs the unmodified `recipes/coco_1pct.yaml` on it through `accelerate launch` with the data paths,
   `model.pretrained=null` with Swin-T sizes, `--steps` steps of every phase (teacher, guided burn-in, EMA), an
   evaluation of `--eval-images` val images at the end of each phase, with 1 and 2 processes: a first launch
   (no records cache) and a relaunch (the cache that the first one wrote).
3. Times COCOeval (pycocotools, segm) on the 5,000 val images x 100 detections (each a ground-truth mask
   moved a little or a random other object's mask), and the post-processing + encoding of COCO-sized outputs.

`--startup-only` runs one supervised step per launch instead (no evaluation, no phases 2-3): the start-up
figures alone, in minutes rather than the hour a full run takes on 2 cores.

Prints, per launch: seconds from launch to the first step of phase 1 and of phase 2, peak RSS per process at
the end of each phase, s/step per phase, evaluation seconds per image split into forward / post-processing /
encoding, and COCOeval seconds. Extra key=value overrides go to every launch (e.g. `data.crop_size=512` where
1,024-px crops do not fit in memory twice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# COCO's 80 category ids (1..90 with gaps).
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
SWIN_T = [
    "model.backbone=swin",
    "model.pretrained=null",
    "model.backbone_hidden_size=96",
    "model.backbone_depths=[2, 2, 6, 2]",
    "model.backbone_num_heads=[3, 6, 12, 24]",
]


def polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
    """A star-shaped polygon of 6-24 vertices inside the image, coordinates to 2 decimals (as COCO's)."""
    vertices = int(rng.integers(6, 25))
    radius = rng.uniform(8, min(height, width) / 3)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    angles = np.sort(rng.uniform(0, 2 * math.pi, vertices))
    radii = radius * rng.uniform(0.5, 1.0, vertices)
    xs, ys = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    return [round(float(v), 2) for pair in zip(xs, ys) for v in pair]


def crowd_rle(rng: np.random.Generator, height: int, width: int) -> dict:
    """An uncompressed (list) RLE of a rectangle, column-major as COCO's crowd regions."""
    y0, x0 = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    y1, x1 = int(rng.integers(y0 + 4, height)), int(rng.integers(x0 + 4, width))
    counts, zeros = [], x0 * height + y0
    for _ in range(x0, x1):
        counts += [zeros, y1 - y0]
        zeros = height - y1 + y0
    counts.append(height * width - sum(counts))
    return {"size": [height, width], "counts": counts}


def write_split(root: Path, split: str, count: int, first_id: int, rng: np.random.Generator, jpegs: list) -> None:
    from tqdm.auto import tqdm

    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    for k in tqdm(range(count), desc=f"stand-in {split}", unit="img", mininterval=2.0):
        image_id = first_id + k
        source, (height, width) = jpegs[k % len(jpegs)]
        file_name = f"{image_id:012d}.jpg"
        os.link(source, folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for _ in range(int(rng.poisson(7.3))):
            crowd = rng.uniform() < 0.01
            segmentation = crowd_rle(rng, height, width) if crowd else [polygon(rng, height, width)]
            annotations.append(
                {
                    "id": len(annotations) + first_id * 10,
                    "image_id": image_id,
                    "category_id": COCO_IDS[int(rng.integers(0, 80))],
                    "segmentation": segmentation,
                    "area": 1000.0,  # as in COCO, not used by gd_hf (areas are computed from the masks)
                    "bbox": [0.0, 0.0, 10.0, 10.0],
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": i, "name": f"class_{i}", "supercategory": "thing"} for i in COCO_IDS]
    coco = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def write_standin(root: Path, train: int, val: int, seed: int = 0) -> Path:
    """The stand-in folder (atomically: written under a temporary name)."""
    from PIL import Image

    from gd_hf.data.synthetic import make_image

    if root.exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    (tmp / "sources").mkdir()
    rng = np.random.Generator(np.random.PCG64(seed))
    jpegs = []
    for k, (height, width) in enumerate([(480, 640), (640, 480), (480, 640), (427, 640), (640, 427), (480, 640)]):
        pixels, _ = make_image(rng, height, width)
        path = tmp / "sources" / f"{k}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        jpegs.append((path, (height, width)))
    write_split(tmp, "train2017", train, 1, rng, jpegs)
    write_split(tmp, "val2017", val, 10_000_000, rng, jpegs)
    os.replace(tmp, root)
    return root


def standin_overrides(out: Path, data: Path, cache: Path) -> list[str]:
    """The recipe pointed at the stand-in, with a random-init Swin-T and its own records cache."""
    return [
        f"output_dir={out}",
        f"data.train_images={data / 'train2017'}",
        f"data.train_annotations={data / 'annotations' / 'instances_train2017.json'}",
        f"data.val_images={data / 'val2017'}",
        f"data.val_annotations={data / 'annotations' / 'instances_val2017.json'}",
        f"data.records_cache={cache}",
        *SWIN_T,
    ]


def launch(name: str, processes: int, data: Path, args: argparse.Namespace, cache: Path) -> dict:
    """One `accelerate launch` of the recipe; returns its timings from the metrics logs."""
    out = Path(args.out) / f"{name.split(',')[0].replace(' ', '_')}_{processes}p"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        *standin_overrides(out, data, cache),
        # The 2-step random-init teacher could not pass the teacher check (and on this CPU its 200 val images
        # would take an hour): timings only.
        "ssl.teacher_check=off",
        f"ssl.teacher_max_steps={args.steps}",
        f"ssl.burn_in_steps={args.steps}",
        f"train.max_steps={2 * args.steps}",
        f"train.eval_every={args.steps}",
        f"train.checkpoint_every={2 * args.steps}",
        "train.log_every=1",
        f"eval.max_images={args.eval_images}",
        f"data.num_workers={min(2, os.cpu_count() or 1)}",
        *args.overrides,
    ]
    start = time.time()
    subprocess.run(accelerate_command(processes, overrides), check=True, env=launch_env(processes))
    return read_launch(out, name, processes, time.time() - start)


def accelerate_command(processes: int, overrides: list[str]) -> list[str]:
    if processes == 1:
        accelerate = ["--num_processes", "1"]
    else:  # real gloo DDP on a CPU machine (hf-notes), one thread per process on these 2 cores
        accelerate = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *accelerate, "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "gd_hf.train", str(ROOT / "recipes" / "coco_1pct.yaml"), *overrides,
    ]  # fmt: skip
    print("+", " ".join(command), flush=True)
    return command


def launch_env(processes: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))


def launch_to_first_step(name: str, processes: int, data: Path, args: argparse.Namespace, cache: Path) -> dict:
    """`--startup-only`: one supervised step of the recipe (no evaluation), timed from launch to that step."""
    out = Path(args.out) / f"{name.split(',')[0].replace(' ', '_')}_{processes}p"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        *standin_overrides(out, data, cache),
        "ssl.enabled=false",
        "ssl.train_teacher_first=false",
        "train.max_steps=1",
        "train.eval_every=0",
        "train.log_every=1",
        "eval.max_images=1",  # the end-of-run evaluation: one image, not val2017's 5,000
        f"data.num_workers={min(2, os.cpu_count() or 1)}",
        *args.overrides,
    ]
    subprocess.run(accelerate_command(processes, overrides), check=True, env=launch_env(processes))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "seconds_to_first_step" in r)
    return {"name": name, "processes": processes, "to_first_step_s": first["seconds_to_first_step"],
            "peak_rss_gb": first["peak_rss_gb"]}  # fmt: skip


def read_launch(out: Path, name: str, processes: int, wall: float | None = None) -> dict:
    """A launch's figures from its metrics logs (phase 1 in OUT/teacher, phases 2-3 in OUT)."""
    phases = {"phase 1": out / "teacher" / "metrics.jsonl", "phases 2-3": out / "metrics.jsonl"}
    result = {"name": name, "processes": processes, "wall_s": wall}
    for phase, log in phases.items():
        records = [json.loads(line) for line in log.read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval/forward_s_per_image" in r]
        result[phase] = {
            # (the first line of a launch has it, also when its step was skipped as non-finite and has no loss)
            "to_first_step_s": next(r["seconds_to_first_step"] for r in records if "seconds_to_first_step" in r),
            "s_per_step": float(np.median([r["seconds_per_step"] for r in steps[1:] or steps])),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in records if "peak_rss_gb" in r),
            "eval": {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")}
            if evals
            else {},
        }
    return result


def time_cocoeval(data: Path, cache: Path) -> dict:
    """COCOeval (segm) on the 5,000 val images with 100 detections each, from the run's cleaned ground truth."""
    from gd_hf.config import DataConfig
    from gd_hf.data.coco_source import open_coco
    from gd_hf.evaluation.mask_ap import coco_mask_ap

    d = DataConfig(
        train_images=str(data / "val2017"),  # the ground truth of val is all this needs: open val twice
        train_annotations=str(data / "annotations" / "instances_val2017.json"),
        val_images=str(data / "val2017"),
        val_annotations=str(data / "annotations" / "instances_val2017.json"),
        records_cache=str(cache),
    )
    ground_truth = open_coco(d).val_ground_truth
    annotations = ground_truth.dataset["annotations"]
    rng = np.random.Generator(np.random.PCG64(0))
    results = []
    for image in ground_truth.dataset["images"]:
        own = ground_truth.imgToAnns[image["id"]]
        for k in range(100):
            source = own[k] if k < len(own) else annotations[int(rng.integers(0, len(annotations)))]
            if source["segmentation"]["size"] != [image["height"], image["width"]]:
                source = own[0] if own else None
            if source is None:
                break
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": source["category_id"],
                    "segmentation": source["segmentation"],
                    "score": float(rng.uniform()),
                }
            )
    start = time.perf_counter()
    metrics = coco_mask_ap(ground_truth, results)
    return {"images": len(ground_truth.dataset["images"]), "detections": len(results),
            "seconds": time.perf_counter() - start, "AP": metrics["AP"]}  # fmt: skip


def report(launches: list[dict], cocoeval: dict | None) -> str:
    lines = [
        "| launch | processes | phase | launch -> first step (s) | s/step | peak RSS per process (GB) "
        "| eval s/image: forward / post-processing / encoding |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in launches:
        for phase in ("phase 1", "phases 2-3"):
            p = r[phase]
            e = p["eval"]
            split = (
                f"{e['forward_s_per_image']:.2f} / {e['postprocess_s_per_image']:.3f} / {e['encode_s_per_image']:.3f}"
                if e
                else "—"
            )
            lines.append(
                f"| {r['name']} | {r['processes']} | {phase} | {p['to_first_step_s']:.0f} | {p['s_per_step']:.1f} "
                f"| {p['peak_rss_gb']:.2f} | {split} |"
            )
    if cocoeval:
        lines += [
            "",
            f"COCOeval (pycocotools, segm): {cocoeval['images']} images x {cocoeval['detections']} detections in "
            f"{cocoeval['seconds']:.0f} s",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="outputs/coco_scale/data", help="the stand-in (written if absent)")
    parser.add_argument("--out", default="outputs/coco_scale")
    parser.add_argument("--train-images", type=int, default=118_287)
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2, help="steps of each phase")
    parser.add_argument("--eval-images", type=int, default=8, help="val images per evaluation")
    parser.add_argument("--skip-cocoeval", action="store_true")
    parser.add_argument(
        "--startup-only", action="store_true", help="time launch -> first step only (one supervised step, no eval)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every launch")
    args = parser.parse_intermixed_args()

    start = time.time()
    data = write_standin(Path(args.data), args.train_images, args.val_images)
    print(f"stand-in ready in {time.time() - start:.0f} s: {data}", flush=True)
    if args.startup_only:
        startups = []
        for processes in args.processes:
            cache = Path(args.out) / f"records_cache_{processes}p"
            shutil.rmtree(cache, ignore_errors=True)
            startups.append(launch_to_first_step(f"first launch, {processes}p", processes, data, args, cache))
            startups.append(launch_to_first_step(f"relaunch, {processes}p", processes, data, args, cache))
        text = "\n".join(
            ["| launch | processes | launch -> first step (s) | peak RSS (GB) |", "|---|---|---|---|"]
            + [
                f"| {r['name']} | {r['processes']} | {r['to_first_step_s']:.1f} | {r['peak_rss_gb']:.2f} |"
                for r in startups
            ]
        )
        print(text)
        (Path(args.out) / "startup.md").write_text(text + "\n")
        return
    launches = []
    for processes in args.processes:
        cache = Path(args.out) / f"records_cache_{processes}p"
        shutil.rmtree(cache, ignore_errors=True)  # the first launch parses; the relaunch reads its cache
        launches.append(launch(f"first launch, {processes}p", processes, data, args, cache))
        launches.append(launch(f"relaunch, {processes}p", processes, data, args, cache))
    cocoeval = None if args.skip_cocoeval else time_cocoeval(data, Path(args.out) / "records_cache_1p")
    text = report(launches, cocoeval)
    print(text)
    (Path(args.out) / "results.md").write_text(text + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps({"launches": launches, "cocoeval": cocoeval}, indent=1))


if __name__ == "__main__":
    main()
