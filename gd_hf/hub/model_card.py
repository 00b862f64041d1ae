"""The model card (`README.md`) written next to every exported model: Hub metadata + what was trained + metrics.

Metadata: `library_name: transformers`, `pipeline_tag: image-segmentation` (so the Hub widget runs the model),
tags, `base_model` (the pretrained backbone or checkpoint, when it is a hub id), datasets, license, and a
`model-index` with the run's mask AP. Body: what was trained, the metrics table, a usage snippet that runs as
written, the recipe, the citation of the method. Built with huggingface_hub's `ModelCard` / `ModelCardData`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from gd_hf.config import Recipe, recipe_to_dict
from gd_hf.data.splits import split_file_provenance
from gd_hf.files import write_text_atomic
from gd_hf.hub.public import is_hub_id
from gd_hf.hub.snippets import hub_revision, reproduce_snippet, usage_snippet
from gd_hf.models import BUILT_IN_FAMILIES, ModelFamily, built_in_family

TAGS = ["instance-segmentation", "semi-supervised", "guided-distillation", "gd_hf"]
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

    recipe: Recipe  # the phase's recipe (what was trained)
    stage: str  # "supervised" (phase 1) or "guided distillation" (phases 2-3)
    step: int
    metrics: dict[str, float]  # val mask AP etc. (x100)
    num_labeled: int
    num_unlabeled: int
    num_val: int
    class_names: list[str]
    teacher_metrics: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    name: str | None = None  # the card's title and model-index name (default: the run's name)
    published_recipe: dict[str, Any] | None = None  # the launch's recipe without machine paths (`recipe.yaml`)
    evaluated_with: dict[str, Any] = field(default_factory=dict)  # top_k, images, shortest_edge, longest_edge
    examples: list[str] = field(default_factory=list)  # example images shipped in the export (`examples/...`)
    pictures: list[str] = field(default_factory=list)  # pictures shipped in the export (predictions.png, ...)
    versions: dict[str, str | None] = field(default_factory=dict)  # framework versions
    base_model: str | None = None  # the hub id the model started from (decided where its folder can be seen)
    family: ModelFamily | None = None  # None: the built-in family `recipe.model.family` names


def dataset_name(recipe: Recipe) -> str:
    """What the card calls the data set: `data.dataset_name`, else the hub data set's id, else the synthetic
    set's name, else `custom`."""
    d = recipe.data
    if d.dataset_name:
        return d.dataset_name
    if d.source == "hub" and d.hub_dataset and is_hub_id(d.hub_dataset):
        return d.hub_dataset
    if d.generate_synthetic:
        return "gd_hf synthetic shapes"
    return "custom"


def _dataset_names(recipe: Recipe) -> tuple[list[str], str]:
    """Hub data set ids for the metadata, and a name for the evaluation data."""
    d = recipe.data
    name = dataset_name(recipe)
    ids = [d.hub_dataset] if d.source == "hub" and d.hub_dataset and is_hub_id(d.hub_dataset) else []
    return ids, f"{name} ({d.hub_val_split})" if ids and name == d.hub_dataset else f"{name} (validation)"


def counted(count: int, noun: str) -> str:
    """`1 labeled image`, `2,400 labeled images`."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _training_phases(summary: RunSummary) -> str:
    ssl = summary.recipe.ssl
    if summary.stage == "supervised":
        return f"supervised training (phase 1 of Guided Distillation) for {summary.step} steps"
    return (
        f"Guided Distillation for {summary.step} steps"
        + (
            " from the supervised teacher's weights (a fresh class head; not in the paper)"
            if ssl.student_init == "teacher" and ssl.burn_in_pseudo_labels
            else ""
        )
        + f": guided burn-in with a frozen supervised teacher for {ssl.burn_in_steps} steps, then distillation "
        f"from an EMA teacher (decay {ssl.ema_decay}); unsupervised loss weight {ssl.unsup_loss_weight}, "
        "pseudo-label score threshold "
        + (
            "chosen by the teacher check (`auto`, see below)"
            if ssl.pseudo_label_score_threshold == "auto"
            else f"{ssl.pseudo_label_score_threshold}"
        )
        + (
            ""
            if ssl.unsup_no_object_weight is None
            else f', "no object" weight {ssl.unsup_no_object_weight} in the unsupervised loss'
        )
    )


def _ap(value: float | None) -> str:
    """An AP cell: COCOeval's -1 (no object of that size in the evaluation images) shows as a dash."""
    if value is None or value != value:
        return "n/a"
    return "—" if value < 0 else f"{value:.2f}"


def _metric_rows(summary: RunSummary) -> list[str]:
    """The results table (beside the supervised teacher's figures after distillation)."""
    shown = [k for k in METRIC_NAMES if k in summary.metrics]
    if summary.teacher_metrics:
        return ["| metric | supervised teacher | this model |", "|---|---|---|"] + [
            f"| {METRIC_NAMES[k]} | {_ap(summary.teacher_metrics.get(k))} | {_ap(summary.metrics[k])} |" for k in shown
        ]
    return ["| metric | value |", "|---|---|"] + [f"| {METRIC_NAMES[k]} | {_ap(summary.metrics[k])} |" for k in shown]


def _metrics_explained(summary: RunSummary) -> str:
    how = summary.evaluated_with
    size = ""
    if how.get("shortest_edge"):
        size = f", images resized to a shorter side of {how['shortest_edge']} px (longer side at most "
        size += f"{how.get('longest_edge')} px)"
    top_k = f"up to {how['top_k']} instances per image" if how.get("top_k") else "the model's instances"
    return (
        "Mask AP is COCO's instance-segmentation metric (pycocotools' protocol), in percent: the mean average "
        "precision over mask IoU thresholds 0.50, 0.55, ..., 0.95; AP50 and AP75 at IoU 0.50 and 0.75 alone; APs, "
        "APm and APl for small (< 32² px), medium and large (> 96² px) objects. A dash means the evaluation "
        f"images hold no object of that size. Scored with {top_k}{size}; `python -m gd_hf.evaluate` uses the same "
        "settings (recorded in `eval_results.json`) by default."
    )


def _data_line(summary: RunSummary, eval_name: str) -> str:
    total = summary.num_labeled + summary.num_unlabeled
    labeled_percent = summary.recipe.data.labeled_percent
    line = (f"{counted(summary.num_labeled, 'labeled image')} ({summary.num_labeled / max(total, 1) * 100:.1f} % of "
            f"{counted(total, 'training image')}; {labeled_percent:g} % requested)")  # fmt: skip
    picked = split_file_provenance(summary.recipe.data.split_file)
    if picked.get("added_by") == "gd_hf.label_next" and isinstance(picked.get("added_image_ids"), list):
        line += (f", of which {counted(len(picked['added_image_ids']), 'image')} were picked for labelling by "
                 f"`gd_hf.label_next` ({picked.get('strategy')} strategy) from a teacher's ranking of the unlabeled "
                 "ones")  # fmt: skip
    if summary.stage != "supervised":
        if summary.recipe.ssl.unlabeled_includes_labeled:  # as the paper: every training image is also unlabeled
            line += f" and an unlabeled stream of {counted(total, 'image')} (every training image, as the paper)"
        else:
            line += f" and {counted(summary.num_unlabeled, 'unlabeled image')}"
        line += ", pseudo-labelled by the teacher"
    evaluated = summary.evaluated_with.get("images", summary.num_val)
    if evaluated < summary.num_val:  # eval.max_images
        return f"{line}; evaluated on the first {counted(evaluated, 'image')} (by id) of the {summary.num_val:,} of {eval_name}"
    return f"{line}; evaluated on {counted(summary.num_val, 'image')} of {eval_name}"


def _train_again(summary: RunSummary, model_id: str) -> str:
    """How a reader trains the model again from the published recipe."""
    recipe = summary.published_recipe or {}
    lines = [install_line()]
    repo, revision = hub_revision(model_id)
    if is_hub_id(repo):
        lines.append(f"hf download {repo} recipe.yaml{f' --revision {revision}' if revision else ''} --local-dir .")
    lines.append("accelerate launch -m gd_hf.train recipe.yaml")
    text = "With this repository's `recipe.yaml`:\n\n```bash\n" + "\n".join(lines) + "\n```\n"
    flat = yaml.safe_dump(recipe)
    if "{data_root}" in flat or "{local}" in flat:
        text += ("\nPaths of the author's machine are written as `{data_root}/...` (the data set's folder) or "
                 "`{local}/...`: set them to your copies, e.g. `data.train_images=/data/coco/train2017`.\n")  # fmt: skip
    teacher = (recipe.get("ssl") or {}).get("teacher")
    if isinstance(teacher, str) and "@" in teacher and is_hub_id(teacher.split("@")[0]):
        repo, branch = teacher.split("@", 1)
        text += (f"\nThe supervised teacher is on the Hub at branch `{branch}` of `{repo}`: `hf download {repo} "
                 f"--revision {branch} --local-dir teacher`, then `ssl.teacher=teacher`.\n")  # fmt: skip
    elif isinstance(teacher, str) and not is_hub_id(teacher):
        text += ("\nThe supervised teacher was a local export that is not on the Hub: train one with "
                 "`ssl.train_teacher_first=true ssl.teacher=null` (the recipe's phase 1) or point `ssl.teacher` at "
                 "yours.\n")  # fmt: skip
    return text


def keys_set(
    recipe: dict[str, Any], defaults: dict[str, Any] | None = None, unread: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The keys of a recipe (as plain data) whose values differ from gd_hf's defaults, sections kept, without the
    `model.*` keys its family never reads (`unread`): what a reader needs of a ~150-key recipe."""
    defaults = recipe_to_dict(Recipe()) if defaults is None else defaults
    differing = {}
    for key, value in recipe.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            inner = keys_set(value, default)
            if key == "model":
                inner = {k: v for k, v in inner.items() if k not in unread}
            if inner:
                differing[key] = inner
        elif key not in defaults or value != default:
            differing[key] = value
    return differing


def install_line() -> str:
    """How a reader installs gd_hf (it is not on PyPI): from its source repository when the package names one
    (`Project-URL`), else from a clone of its source; the version that trained the model is in the card's
    "Framework versions"."""
    from importlib import metadata

    try:
        meta = metadata.metadata("gd_hf")
    except metadata.PackageNotFoundError:
        return "pip install -e .  # in a clone of gd_hf's source"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [] if ", " in u)
    source = next((urls[k] for k in ("Source", "Repository", "Homepage") if k in urls), None)
    if source:
        return f'pip install "gd_hf @ git+{source}"'
    return f"pip install -e .  # in a clone of gd_hf's source (version {meta['Version']}; it is not on PyPI)"


def _versions(summary: RunSummary) -> str:
    return "\n".join(f"- {name} {version}" for name, version in summary.versions.items() if version)


def _card_data(summary: RunSummary, name: str, datasets: list[str], eval_name: str) -> ModelCardData:
    """The card's Hub metadata: library, pipeline, tags, license, base model, data sets, the model-index."""
    recipe = summary.recipe
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
    return ModelCardData(
        model_name=name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        tags=[recipe.model.family, *TAGS],
        license=recipe.hub.license,
        base_model=summary.base_model,
        datasets=datasets or None,
        eval_results=eval_results or None,
    )


def _picture_paragraphs(summary: RunSummary) -> tuple[str, str]:
    """The card's predictions and curves pictures with their captions ("" for a picture the export lacks)."""
    predictions = ""
    if "predictions.png" in summary.pictures:
        predictions = ("\n![Predictions on validation images](predictions.png)\n\n*This model's instances on "
                       "validation images (score > 0.5), each beside its ground truth.*\n")  # fmt: skip
    curves = ""
    if "curves.png" in summary.pictures:
        curves = ("\n![Training curves](curves.png)\n\n*Validation mask AP, the losses and the pseudo labels "
                  "(per image; precision and recall where the data carry hidden labels) over the training steps; "
                  "dashed lines mark the phases.*\n")  # fmt: skip
    return predictions, curves


def build_model_card(summary: RunSummary, model_id: str) -> ModelCard:
    """The card of a model exported by a run; `model_id` is what users pass to `from_pretrained` (repo id, or the
    export's public path)."""
    recipe = summary.recipe
    published = summary.published_recipe if summary.published_recipe is not None else recipe_to_dict(recipe)
    datasets, eval_name = _dataset_names(recipe)
    name = summary.name or hub_revision(model_id)[0].rstrip("/").split("/")[-1]
    card_data = _card_data(summary, name, datasets, eval_name)
    family = summary.family if summary.family is not None else built_in_family(recipe.model.family)()
    pretrained = (published.get("model") or {}).get("pretrained", recipe.model.pretrained)  # (public: no local path)
    family_card = family.card(recipe.model, pretrained)
    phases, rows = _training_phases(summary), _metric_rows(summary)
    example = summary.examples[0] if summary.examples else None
    predictions, curves = _picture_paragraphs(summary)
    versions = _versions(summary)
    top_k = int(summary.evaluated_with.get("top_k") or 100)
    how_k = f"{top_k:,}"
    body = f"""
# {name}

{family.display_name} instance-segmentation model trained with gd_hf —
semi-supervised instance segmentation with Guided Distillation (Berrada et al., WACV 2024) on Hugging Face
transformers. A plain `{family_card.model_class}` checkpoint: no custom code is needed to use it.
{predictions}
## What was trained

- **Model**: {family_card.architecture}
- **Classes** ({len(summary.class_names)}): {", ".join(summary.class_names)}
- **Data**: {_data_line(summary, eval_name)}
- **Training**: {phases}; batch {recipe.train.batch_size} labeled images per process, AdamW lr {recipe.train.lr:g}

## Results

Mask AP on {eval_name}, at step {summary.step}:

{chr(10).join(rows)}

{_metrics_explained(summary)}
{"".join(chr(10) + "- " + n for n in summary.notes)}
{curves}
## How to use

{usage_snippet(model_id, family, example)}

### The mask AP above, with transformers' code

The AP above counts the {how_k} best (query, class) pairs of each image with overlapping masks, as Mask2Former's
reference evaluates; transformers' `post_process_instance_segmentation` keeps one class per query and gives each
pixel to one instance, which scores lower. This reproduces the card's figure (`python -m gd_hf.evaluate` does the
same):

{reproduce_snippet(model_id, top_k, summary.evaluated_with.get("max_images"))}

## Train it again

{_train_again(summary, model_id)}
The keys this run set (every other key is gd_hf's default or one its model family does not read; `recipe.yaml` here
has them all):

```yaml
{yaml.safe_dump(keys_set(published, unread=family_card.unread_model_keys), sort_keys=False, default_flow_style=None).strip()}
```
{(chr(10) + "## Framework versions" + chr(10) + chr(10) + versions + chr(10)) if versions else ""}
## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def write_model_card(folder: str | Path, summary: RunSummary, model_id: str | None = None) -> Path:
    """Write `folder/README.md`; `model_id` defaults to the folder's path (give a public one: see `export`)."""
    folder = Path(folder)
    path = folder / "README.md"
    build_model_card(summary, model_id or str(folder)).save(path)
    return path


def card_metadata(folder: str | Path) -> dict[str, Any]:
    """The parsed metadata of a folder's card (what the Hub reads)."""
    return ModelCard.load(Path(folder) / "README.md").data.to_dict()


# What an export's `run_info.json` keeps of its card's facts, so that a later push can write the card anew for
# the repository it goes to (`card_for_repo`).
CARD_FACTS = ("stage", "step", "metrics", "num_labeled", "num_unlabeled", "num_val", "class_names", "teacher_metrics",
              "notes", "evaluated_with", "examples", "pictures", "versions", "base_model")  # fmt: skip


def card_facts(summary: RunSummary) -> dict[str, Any]:
    """The card's facts beside the recipe, as plain data."""
    return {name: getattr(summary, name) for name in CARD_FACTS}


def card_for_repo(folder: str | Path, repo_id: str, revision: str | None = None) -> bool:
    """Write `folder/README.md` anew for the Hub repository `repo_id` (its title, model-index name and snippet
    name the repository, and `revision`, a branch, when given), from the facts the export keeps (`run_info.json`,
    `recipe.yaml`). False, leaving the card as it is, for an export without them (written before gd_hf kept them,
    or not by gd_hf)."""
    from gd_hf.config.types import build_dataclass

    folder = Path(folder)
    try:
        facts = json.loads((folder / "run_info.json").read_text())["card"]
        published = yaml.safe_load((folder / "recipe.yaml").read_text())
        recipe = build_dataclass(Recipe, published, "")
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return False
    if recipe.model.family not in BUILT_IN_FAMILIES:  # a family passed from Python: its card text is not here
        return False
    name = repo_id.rstrip("/").split("/")[-1]
    summary = RunSummary(recipe=recipe, name=name, published_recipe=published,
                         **{k: facts[k] for k in CARD_FACTS if k in facts})  # fmt: skip
    card = build_model_card(summary, f"{repo_id}@{revision}" if revision else repo_id)
    write_text_atomic(folder / "README.md", str(card))  # (as ModelCard.save writes it: UTF-8, newlines kept)
    return True
