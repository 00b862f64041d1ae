"""gd_hf: semi-supervised instance segmentation with Guided Distillation, on Hugging Face transformers.

The package, in the order a run goes through it (README, "Layout", has the map):

- data: `data/` — the sources (`sources`: what they share, `open_source`; one module per source: `coco_source`
  with its records cache, `shards`, `hub_source`), the readers and converters (`coco`, `masks`, `mask_images`, `convert`),
  the class list (`categories`), the launch's data (`prepare`), images (`images`), splits, transforms and datasets
  (`loading`), the training batches (`batches`), the synthetic set;
- model: `modeling` (`build_model`, `Mask2FormerFamily`), `eomt` (EoMT: `build_eomt`, `EomtFamily`, mask
  annealing), `families` (which family a recipe or an export is), `optim` (AdamW groups, schedule, `train_step`,
  `UpdateUndo`), `weights` (finiteness);
- method: `method` (`GuidedDistillation`: teacher, schedule, loss; `PseudoLabelRules`; the extension points),
  `teacher` (frozen, then EMA), `pseudo_labels` (the rules' filter, quality), `teacher_check`;
- the recipe: `train` (`TrainingRecipe`: set-up, the loop, evaluation, checkpoints, the end), `checkpointing`
  (state, resume, which checkpoint reads whole), `config` / `config_types` / `config_checks` (recipes),
  `run_info` (launch records, the relaunch comparison, the output folder's lock), `run_log` (metrics lines),
  `distributed` (the Accelerator), `files` (durable writes);
- outputs: `evaluation` (post-processing, the val ground truth, COCOeval, the one evaluation driver), `evaluate`
  (the command), `coco_metric` (`CocoMaskAP`, the metric for the `evaluate` library), `publish` (exports, model
  cards, pushes: `export`, `model_card`, `push`; `public`: what they may say of this machine), `predict`,
  `space` (a Gradio Space: `space_app`);
- what people see: `trackers` (`train.report_to`), `pictures` (overlays, grids, curves) and `run_pictures`
  (what each evaluation draws).
"""

__version__ = "0.1.0"
