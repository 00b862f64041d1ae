"""gd_hf: semi-supervised instance segmentation with Guided Distillation, on Hugging Face transformers.

The package, in the order a run goes through it (docs/layout.md has the map, module by module):

- the recipe: `config/` (the dataclasses of every key, their checks, loading with overrides);
- data: `data/` — the sources (`sources`: `open_source`; one module per source: `coco_source` with its records
  cache, `shards`, `hub_source`; what they share: `records`), the readers and converters (`coco`, `masks`,
  `mask_images`, `convert`), the class list (`categories`), the launch's data (`prepare`), the val ground truth
  (`ground_truth`), images (`images`), splits, transforms and datasets (`loading`), the training batches
  (`batches`), the synthetic set;
- models: `models/` — one module per family (`mask2former`, `eomt`), what they share (`common`), the protocol a
  family follows (`protocol.ModelFamily`) and the one list of built-in families (`models.BUILT_IN_FAMILIES`);
- method: `method/` — `distillation` (`GuidedDistillation`: teacher, schedule, loss; `PseudoLabelRules`; the
  extension points), `teacher` (frozen, then EMA), `pseudo_labels` (the rules' filter, quality), `teacher_check`;
- a run: `train` (`TrainingRecipe`: the launch, the loop, the periodic work, the command), `phase` (`Phase`:
  what one phase trains with), `step` (one optimizer step), `optim` (AdamW groups, the schedule),
  `checkpointing` (state, resume, which checkpoint reads whole), `run_info` (launch records, the relaunch
  comparison, the output folder's lock), `run_log` (metrics lines), `distributed` (the Accelerator), `weights`
  (finiteness), `files` (durable writes);
- outputs: `evaluation` (post-processing, COCOeval, the one evaluation driver), `evaluate` (the command),
  `coco_metric` (`CocoMaskAP`, the metric for the `evaluate` library), `publish` (exports, model cards, pushes:
  `export`, `model_card`, `push`; `public`: what they may say of this machine), `predict`, `space` (a Gradio
  Space: `space_app`);
- what people see: `trackers` (`train.report_to`), `pictures` (overlays, grids), `curves` (`curves.png`) and
  `run_pictures` (what each evaluation draws).
"""

__version__ = "0.1.0"
