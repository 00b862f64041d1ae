"""Evaluation post-processing at COCO size: gd_hf's exact resampling (whole masks on an accelerator, within each
mask's reachable box on the CPU) vs the two-pass one it replaced.

    python benchmarks/eval_cost.py [--images 5] [--queries 100] [--classes 80] [--threads 1] [--logits scattered] [--device cuda]
                                   [--export FOLDER --annotations VAL.json --images-dir VAL/]

Part 1 (always): per COCO-sized image (100 queries, 80 classes, an 800 x 1067 resized image padded to
800 x 1088 — mask logits 200 x 272 — and a 480 x 640 original; plus a 640 x 480 portrait one), the seconds of
post-processing and of RLE encoding for both implementations, side by side, their ratio, and how much the
masks agree (pixels that differ / pixels inside either mask, over all kept instances) on random logits with
object-like blobs.

Part 2 (`--export`): the mask AP of a trained export on a COCO-format val set with each implementation
(same forward pass, same images): the AP must agree to 0.01.

"reference" below is the implementation gd_hf had before: upsample each kept query's logits bilinearly to the
whole padded input, crop the image, resize bilinearly to the original size, threshold; on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from gd_hf.evaluation.mask_ap import Instances, coco_mask_ap, post_process_instances, to_coco_results


def reference_post_process(class_logits, mask_logits, image_sizes, original_sizes, padded_size, top_k=100):
    """The previous gd_hf post-processing (two bilinear passes through the padded frame, on the CPU)."""
    class_logits, mask_logits = class_logits.cpu(), mask_logits.cpu()
    results = []
    num_classes = class_logits.shape[-1] - 1
    for i in range(class_logits.shape[0]):
        probs = class_logits[i].float().softmax(-1)[:, :-1]
        k = min(top_k, probs.numel())
        scores, flat = probs.flatten().topk(k)
        labels, queries = flat % num_classes, flat // num_classes
        masks = F.interpolate(
            mask_logits[i, queries][None].float(), size=padded_size, mode="bilinear", align_corners=False
        )
        height, width = image_sizes[i]
        masks = F.interpolate(
            masks[:, :, :height, :width], size=original_sizes[i], mode="bilinear", align_corners=False
        )[0]
        probabilities = masks.sigmoid()
        binary = probabilities > 0.5
        mask_scores = (probabilities * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        results.append(Instances(scores * mask_scores, labels, binary, torch.arange(len(labels))))
    return results


def reference_to_coco_results(image_id, instances, category_ids):
    """The previous RLE encoding (every instance's mask, a permuted copy, then a Fortran copy)."""
    scores, labels, masks = instances.scores, instances.labels, instances.instance_masks()
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    return [
        {"image_id": image_id, "category_id": category_ids[int(label)], "segmentation": rle, "score": float(score)}
        for rle, label, score in zip(rles, labels.tolist(), scores.tolist())
    ]


def blob_logits(
    queries: int, classes: int, h: int, w: int, seed: int, scattered: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits with one smooth blob per query (objects of many sizes) and peaked class logits.
    `scattered`: instead, positives scattered over the whole image (~7 % of the logits), the worst case for
    gd_hf's CPU path (each mask's box is the whole image), as an untrained model's masks are."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.rand(queries, generator=generator) * h, torch.rand(queries, generator=generator) * w
    radius = 2 + torch.rand(queries, generator=generator) * min(h, w) / 4
    distance = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2).sqrt()
    masks = (radius[:, None, None] - distance) / 2 + torch.randn(queries, h, w, generator=generator) * 0.3
    if scattered:
        masks = torch.randn(queries, h, w, generator=generator) - 1.5
    class_logits = torch.randn(queries, classes + 1, generator=generator) * 3
    return class_logits[None], masks[None]


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # kernels run asynchronously: charge them to the call that launched them
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def synthetic_comparison(args: argparse.Namespace) -> None:
    cases = [((800, 1067), (480, 640), (800, 1088)), ((800, 600), (640, 480), (800, 608))]  # landscape, portrait
    rows = {"reference": [[], []], "gd_hf": [[], []]}
    differing = inside = 0
    for n in range(args.images):
        image_size, original_size, padded = cases[n % len(cases)]
        class_logits, mask_logits = blob_logits(
            args.queries, args.classes, padded[0] // 4, padded[1] // 4, n, scattered=args.logits == "scattered"
        )
        category_ids = list(range(1, args.classes + 1))
        if n == 0 and args.device != "cpu":  # warm-up: the first kernels' launch and compilation
            post_process_instances(class_logits.to(args.device), mask_logits.to(args.device), [image_size],
                                   [original_size], padded)  # fmt: skip
        # The reference ran on the CPU; gd_hf's post-processing runs where the model's outputs are.
        ref, ref_post = timed(reference_post_process, class_logits, mask_logits, [image_size], [original_size], padded)
        on_device = class_logits.to(args.device), mask_logits.to(args.device)
        new, new_post = timed(post_process_instances, *on_device, [image_size], [original_size], padded)
        _, ref_encode = timed(reference_to_coco_results, 1, ref[0], category_ids)
        _, new_encode = timed(to_coco_results, 1, new[0], category_ids)
        rows["reference"][0].append(ref_post)
        rows["reference"][1].append(ref_encode)
        rows["gd_hf"][0].append(new_post)
        rows["gd_hf"][1].append(new_encode)
        assert torch.equal(ref[0].labels, new[0].labels)  # same instances, same order
        ref_masks, new_masks = ref[0].instance_masks(), new[0].instance_masks()
        differing += int((ref_masks ^ new_masks).sum())
        inside += int((ref_masks | new_masks).sum())
        score_gap = float((ref[0].scores - new[0].scores).abs().max())
    print(f"{args.images} COCO-sized images ({args.logits} masks), {args.queries} queries, {args.classes} classes, top-k 100, "
          f"{torch.get_num_threads()} thread(s), gd_hf on {args.device}; median seconds per image")  # fmt: skip
    print("| implementation | post-processing | RLE encoding | total |")
    print("|---|---|---|---|")
    totals = {}
    for name, (post, encode) in rows.items():
        totals[name] = statistics.median(post) + statistics.median(encode)
        print(f"| {name} | {statistics.median(post):.3f} | {statistics.median(encode):.3f} | {totals[name]:.3f} |")
    print(f"speed-up (reference / gd_hf): {totals['reference'] / totals['gd_hf']:.1f}x")
    print(f"mask pixels that differ: {differing / max(inside, 1):.2e} of the pixels inside either mask; "
          f"largest score difference (last image) {score_gap:.2e}")  # fmt: skip


@torch.no_grad()
def export_comparison(args: argparse.Namespace) -> None:
    """Mask AP of an export with both post-processings on one forward pass per batch."""
    import datasets
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    from gd_hf.config import DataConfig
    from gd_hf.data.coco import load_coco, to_hf_dataset
    from gd_hf.data.loading import EvalDataset, collate_eval
    from gd_hf.models import family_of

    model = Mask2FormerForUniversalSegmentation.from_pretrained(args.export).eval()
    processor = AutoImageProcessor.from_pretrained(args.export)
    source = load_coco(args.annotations, args.images_dir)
    records = to_hf_dataset(source).cast_column("image", datasets.Image(decode=False))
    data = DataConfig(
        eval_shortest_edge=processor.size["shortest_edge"], eval_longest_edge=processor.size["longest_edge"]
    )
    loader = torch.utils.data.DataLoader(
        EvalDataset(records, data),
        batch_size=4,
        collate_fn=lambda b: collate_eval(b, family_of(model).padding_divisor(model)),
    )
    category_ids = source.category_ids
    results = {"reference": [], "gd_hf": []}
    seconds = {"reference": 0.0, "gd_hf": 0.0}
    for batch in loader:
        outputs = model(pixel_values=batch["pixel_values"])
        call = (outputs.class_queries_logits, outputs.masks_queries_logits, batch["image_sizes"],
                batch["original_sizes"], tuple(batch["pixel_values"].shape[-2:]), args.top_k)  # fmt: skip
        for name, post, encode in (
            ("reference", reference_post_process, reference_to_coco_results),
            ("gd_hf", post_process_instances, to_coco_results),
        ):
            start = time.perf_counter()
            for image_id, instances in zip(batch["image_ids"], post(*call)):
                results[name] += encode(image_id, instances, category_ids)
            seconds[name] += time.perf_counter() - start
    aps = {name: coco_mask_ap(args.annotations, r)["AP"] for name, r in results.items()}
    print(f"{args.export} on {len(records)} images of {args.annotations}:")
    for name in results:
        print(f"  {name}: mask AP {aps[name]:.3f}  (post-processing + encoding {seconds[name]:.2f} s)")
    print(f"  AP difference: {aps['gd_hf'] - aps['reference']:+.4f} (goal: within 0.01)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="synthetic COCO-sized outputs to time")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument(
        "--logits", choices=["blobs", "scattered"], default="blobs", help="object-like masks, or the worst case"
    )
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where gd_hf post-processes the outputs (cuda: the batched path; "
        "the reference always runs on the CPU, as it did)",
    )
    parser.add_argument("--export", help="a trained export to score with both implementations")
    parser.add_argument("--annotations", help="COCO instances JSON of the val set (with --export)")
    parser.add_argument("--images-dir", help="image folder of the val set (with --export)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic_comparison(args)
    if args.export:
        export_comparison(args)


if __name__ == "__main__":
    main()
