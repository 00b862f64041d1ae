"""The model card (`README.md`) written next to every exported model: Hub metadata + what was trained + metrics.

Metadata: `library_name: transformers`, `pipeline_tag: image-segmentation` (so the Hub widget runs the model),
tags, `base_model` (the pretrained backbone or checkpoint, when it is a hub id), datasets, license, and a
`model-index` with the run's mask AP. Body: what was trained, the metrics table, a usage snippet that runs as
written, the recipe, the citation of the method. Built with huggingface_hub's `ModelCard` / `ModelCardData`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from gd_hf.config import Recipe, recipe_to_dict

TAGS = ["mask2former", "instance-segmentation", "semi-supervised", "guided-distillation", "gd_hf"]
METRIC_NAMES = {"AP": "mask AP", "AP50": "mask AP50", "AP75": "mask AP75", "APs": "mask AP (small)",
                "APm": "mask AP (medium)", "APl": "mask AP (large)"}  # fmt: skip
CITATION = """@inproceedings{berrada2024guided,
  title     = {Guided Distillation for Semi-Supervised Instance Segmentation},
  author    = {Berrada, Tariq and Couprie, Camille and Alahari, Karteek and Verbeek, Jakob},
  booktitle = {Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  year      = {2024},
  eprint    = {2308.02668},
  archivePrefix = {arXiv}
}"""


@dataclass
class RunSummary:
    """What a card says about the run that produced a model."""

    recipe: Recipe
    stage: str  # "supervised" (phase 1) or "guided distillation" (phases 2-3)
    step: int
    metrics: dict[str, float]  # val mask AP etc. (x100)
    num_labeled: int
    num_unlabeled: int
    num_val: int
    class_names: list[str]
    teacher_metrics: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/"))


def _dataset_names(recipe: Recipe) -> tuple[list[str], str]:
    """Hub data set ids for the metadata, and a name for the evaluation data."""
    d = recipe.data
    if d.source == "hub" and d.hub_dataset:
        ids = [d.hub_dataset] if _is_hub_id(d.hub_dataset) else []
        return ids, f"{d.hub_dataset} ({d.hub_val_split})"
    if d.source == "shards":
        return [], f"{d.val_shards}"
    if d.generate_synthetic:
        return [], "gd_hf synthetic shapes (val)"
    return [], Path(d.val_annotations).name


def usage_snippet(model_id: str, family: str = "mask2former") -> str:
    """Python that loads the model two ways and segments `image.jpg` (runs as written next to such a file)."""
    if family == "eomt":
        return _eomt_usage_snippet(model_id)
    return f'''```python
from PIL import Image
from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation, pipeline

# 1. pipeline: one dict per instance (label, score, PIL mask of the image's size)
segmenter = pipeline("image-segmentation", model="{model_id}")
instances = segmenter("image.jpg", subtask="instance", threshold=0.5)
print([(i["label"], round(i["score"], 3)) for i in instances])

# 2. model + image processor
processor = AutoImageProcessor.from_pretrained("{model_id}")
model = Mask2FormerForUniversalSegmentation.from_pretrained("{model_id}")
image = Image.open("image.jpg").convert("RGB")
outputs = model(**processor(images=image, return_tensors="pt"))
result = processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=[image.size[::-1]])[0]
print(result["segmentation"].shape, [model.config.id2label[s["label_id"]] for s in result["segments_info"]])
```'''


def _eomt_usage_snippet(model_id: str) -> str:
    # transformers <= 5.24 (the newest checked): pipeline(subtask="instance") passes `mask_threshold`, which the PIL
    # backend's EomtImageProcessorPil.post_process_instance_segmentation does not take (a TypeError; the
    # torchvision backend drops it); the pipeline's default subtask runs the panoptic post-processing.
    return f'''```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

# 1. model + image processor: instances (overlapping masks allowed), as the model was evaluated
processor = AutoImageProcessor.from_pretrained("{model_id}")
model = AutoModelForUniversalSegmentation.from_pretrained("{model_id}")  # an EomtForUniversalSegmentation
image = Image.open("image.jpg").convert("RGB")
outputs = model(**processor(images=image, return_tensors="pt"))
result = processor.post_process_instance_segmentation(outputs, threshold=0.5, target_sizes=[image.size[::-1]])[0]
print(result["segmentation"].shape, [model.config.id2label[s["label_id"]] for s in result["segments_info"]])

# 2. pipeline, default subtask: one dict per segment (label, score, PIL mask), from EoMT's panoptic post-processing
# (segments do not overlap). subtask="instance" needs torchvision installed with transformers <= 5.24.
segmenter = pipeline("image-segmentation", model="{model_id}")
print([(s["label"], round(s["score"], 3)) for s in segmenter("image.jpg", threshold=0.5)])
```'''


def _training_phases(summary: RunSummary) -> str:
    ssl = summary.recipe.ssl
    if summary.stage == "supervised":
        return f"supervised training (phase 1 of Guided Distillation) for {summary.step} steps"
    return (
        f"Guided Distillation for {summary.step} steps: guided burn-in with a frozen supervised teacher for "
        f"{ssl.burn_in_steps} steps, then distillation from an EMA teacher (decay {ssl.ema_decay}); "
        f"unsupervised loss weight {ssl.unsup_loss_weight}, pseudo-label score threshold "
        f"{ssl.pseudo_label_score_threshold}"
    )


def _metric_rows(summary: RunSummary) -> list[str]:
    """The results table (beside the supervised teacher's figures after distillation)."""
    if summary.teacher_metrics:
        return ["| metric | supervised teacher | this model |", "|---|---|---|"] + [
            f"| {METRIC_NAMES[k]} | {summary.teacher_metrics.get(k, float('nan')):.2f} | {v:.2f} |"
            for k, v in summary.metrics.items()
            if k in METRIC_NAMES
        ]
    return ["| metric | value |", "|---|---|"] + [
        f"| {METRIC_NAMES[k]} | {v:.2f} |" for k, v in summary.metrics.items() if k in METRIC_NAMES
    ]


def build_model_card(summary: RunSummary, model_id: str) -> ModelCard:
    """The card of a model exported by a run; `model_id` is what users pass to `from_pretrained` (repo id or
    folder)."""
    recipe, m = summary.recipe, recipe_to_dict(summary.recipe)
    datasets, eval_name = _dataset_names(recipe)
    name = model_id.rstrip("/").split("/")[-1]
    eval_results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Instance segmentation",
            dataset_type=datasets[0] if datasets else "custom",
            dataset_name=eval_name,
            metric_type="map",
            metric_name=METRIC_NAMES[k],
            metric_value=round(float(v), 2),
        )
        for k, v in summary.metrics.items()
        if k in METRIC_NAMES and v >= 0
    ]
    card_data = ModelCardData(
        model_name=name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=[recipe.model.family, *TAGS[1:]],
        license=recipe.hub.license,
        base_model=recipe.model.pretrained if _is_hub_id(recipe.model.pretrained) else None,
        datasets=datasets or None,
        eval_results=eval_results or None,
    )
    model = recipe.model
    backbone = model.pretrained or (
        f"{model.backbone} from scratch (hidden {model.backbone_hidden_size}, depths {model.backbone_depths})"
    )
    if model.family == "eomt":
        family_name, family_class = "EoMT", "EomtForUniversalSegmentation"
        architecture = (f"EoMT ({model.num_queries} queries in the last {model.eomt_query_blocks} ViT blocks, "
                        f"{model.eomt_image_size} px square inputs, patch {model.eomt_patch_size}), ViT: "
                        + (model.pretrained or f"from scratch (hidden {model.eomt_hidden_size}, "
                           f"{model.eomt_layers} layers)"))  # fmt: skip
    else:
        family_name, family_class = "Mask2Former", "Mask2FormerForUniversalSegmentation"
        architecture = (f"Mask2Former ({model.num_queries} queries, {model.decoder_layers} decoder layers, hidden "
                        f"size {model.hidden_dim}), backbone: {backbone}")  # fmt: skip
    total = summary.num_labeled + summary.num_unlabeled
    labeled = f"{summary.num_labeled} labeled images"
    if summary.stage != "supervised":
        labeled += f" + {summary.num_unlabeled} unlabeled images (pseudo-labelled by the teacher)"
    phases, rows = _training_phases(summary), _metric_rows(summary)
    body = f"""
# {name}

{family_name} instance-segmentation model trained with gd_hf —
semi-supervised instance segmentation with Guided Distillation (Berrada et al., WACV 2024) on Hugging Face
transformers. A plain `{family_class}` checkpoint: no custom code is needed to use it.

## What was trained

- **Model**: {architecture}
- **Classes** ({len(summary.class_names)}): {", ".join(summary.class_names)}
- **Data**: {labeled}, {summary.num_labeled / max(total, 1) * 100:.1f} % of the {total} training images labeled
  ({recipe.data.labeled_percent:g} % requested); evaluated on {summary.num_val} images of {eval_name}
- **Training**: {phases}; batch {recipe.train.batch_size} labeled images per process, AdamW lr {recipe.train.lr:g}

## Results

COCO-protocol mask AP (pycocotools) on {eval_name}, at step {summary.step}:

{chr(10).join(rows)}
{"".join(chr(10) + "- " + n for n in summary.notes)}

## How to use

{usage_snippet(model_id, model.family)}

## Recipe

```yaml
{yaml.safe_dump(m, sort_keys=False).strip()}
```

Train it again: `accelerate launch -m gd_hf.train recipe.yaml` with the recipe above.

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(folder: str | Path, summary: RunSummary, model_id: str | None = None) -> Path:
    """Write `folder/README.md`; `model_id` defaults to the folder's path."""
    folder = Path(folder)
    path = folder / "README.md"
    build_model_card(summary, model_id or str(folder)).save(path)
    return path


def card_metadata(folder: str | Path) -> dict[str, Any]:
    """The parsed metadata of a folder's card (what the Hub reads)."""
    return ModelCard.load(Path(folder) / "README.md").data.to_dict()
