"""The code a model card shows: how to load the model (`usage_snippet`, the family's), and how to reproduce its
mask AP with transformers, torch and pycocotools alone (`reproduce_snippet`). Both run as written (tests)."""

from __future__ import annotations

from gd_hf.hub.public import is_hub_id
from gd_hf.models import ModelFamily


def hub_revision(model_id: str) -> tuple[str, str | None]:
    """`owner/name@branch` -> (`owner/name`, `branch`); anything else -> (it, None)."""
    repo, at, revision = model_id.partition("@")
    return (repo, revision) if at and is_hub_id(repo) and revision else (model_id, None)


def load_args(model_id: str) -> str:
    """The arguments that load `model_id` (`"owner/name", revision="teacher"` for a branch)."""
    repo, revision = hub_revision(model_id)
    return f'"{repo}"' + (f', revision="{revision}"' if revision else "")


def example_path_code(model_id: str, example: str | None) -> tuple[str, str]:
    """(import line, expression) of the example image's path in a snippet: downloaded from the repo (and branch)
    for a hub id, inside the folder for a local export."""
    if example is None:
        return "", '"image.jpg"'
    repo, revision = hub_revision(model_id)
    if is_hub_id(repo):
        branch = f', revision="{revision}"' if revision else ""
        return "from huggingface_hub import hf_hub_download\n", f'hf_hub_download("{repo}", "{example}"{branch})'
    return "import os\n", f'os.path.join("{model_id}", "{example}")'


def usage_snippet(model_id: str, family: ModelFamily, example: str | None = None) -> str:
    """Python that loads the model and segments the export's example image `example` (a path inside the export;
    None: `image.jpg` beside the snippet), as the model's `family` writes it. It runs as written."""
    imports, path = example_path_code(model_id, example)
    return family.usage_snippet(load_args(model_id), imports, path)


def reproduce_snippet(model_id: str, top_k: int = 100, max_images: int | None = None) -> str:
    """Python that scores the model as its card's AP was measured, with transformers, torch and pycocotools only:
    the reference post-processing (`gd_hf.evaluation.mask_ap.post_process_instances`) written out.
    transformers' `post_process_instance_segmentation` keeps one class per query and gives each pixel to one
    instance (EoMT's in query order, not by score), which scores lower. tests/test_hub.py runs it as written."""
    load = load_args(model_id)
    first = (
        f"[:{max_images}]  # the first {max_images} by id, as the AP was measured (eval.max_images)"
        if max_images
        else ""
    )
    return f"""```python
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

annotations, images = "instances_val.json", "val"  # your copy of the evaluation images (COCO format)
processor = AutoImageProcessor.from_pretrained({load})
model = AutoModelForUniversalSegmentation.from_pretrained({load}).eval()


def instances(image, top_k={top_k}):
    \"\"\"The {top_k} best (query, class) pairs; each query's mask upsampled to the input, cropped to the image's
    part, resized to the image, thresholded at 0.5 (masks may overlap); score = class probability x the mean
    mask probability inside the mask.\"\"\"
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    probabilities = outputs.class_queries_logits[0].softmax(-1)[:, :-1]  # the last class is "no object"
    scores, best = probabilities.flatten().topk(min(top_k, probabilities.numel()))
    queries, labels = best // probabilities.shape[1], best % probabilities.shape[1]
    height, width = processor(images=image, do_pad=False, return_tensors="pt")["pixel_values"].shape[-2:]
    logits = F.interpolate(outputs.masks_queries_logits, size=inputs["pixel_values"].shape[-2:], mode="bilinear")
    logits = F.interpolate(logits[:, :, :height, :width], size=(image.height, image.width), mode="bilinear")[0]
    masks = logits > 0
    inside = (logits.sigmoid() * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp(min=1)
    return scores * inside[queries], labels, masks[queries]


coco = COCO(annotations)
category = {{c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}}
ids = sorted(coco.getImgIds()){first}
results = []
for info in coco.loadImgs(ids):
    image = Image.open(f"{{images}}/{{info['file_name']}}").convert("RGB")
    for score, label, mask in zip(*instances(image)):
        rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        results.append({{"image_id": info["id"], "category_id": category[model.config.id2label[int(label)]],
                        "segmentation": {{**rle, "counts": rle["counts"].decode()}}, "score": float(score)}})
evaluation = COCOeval(coco, coco.loadRes(results), "segm")
evaluation.params.imgIds = ids
evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
print(f"mask AP {{100 * evaluation.stats[0]:.2f}}")
```"""
