"""gd_hf: semi-supervised instance segmentation with Guided Distillation, on Hugging Face transformers.

The package, in the order a run goes through it (docs/layout.md has the map, module by module):

- the recipe: `config/` (the dataclasses of every key, their checks, loading with overrides);
- data: `data/` — the sources (`sources`: `open_source`; one module per source: `coco_source` with its records
  cache, `shards`, `hub_source`; what they share: `records`), the readers and converters (`coco`, `masks`,
  `mask_images`, `convert`), the class list (`categories`), the launch's data (`prepare`), the val ground truth
  (`ground_truth`), the fingerprint of its files (`fingerprint`), images (`images`), splits, transforms and
  datasets (`loading`), the training batches (`batches`), the synthetic set;
- models: `models/` — one module per family (`mask2former`, `eomt`), what they share (`common`), the protocol a
  family follows (`protocol.ModelFamily`) and the one list of built-in families (`models.BUILT_IN_FAMILIES`);
- method: `method/` — `distillation` (`GuidedDistillation`: teacher, schedule, loss; `PseudoLabelRules`; the
  extension points), `teacher` (frozen, then EMA), `pseudo_labels` (the rules' filter, quality), `teacher_check`;
- evaluation: `evaluation/` — `mask_ap` (post-processing, COCOeval, the one evaluation driver), `coco_metric`
  (`CocoMaskAP`, the metric for the `evaluate` library);
- outputs for others: `hub/` — `export`, `model_card` (with `snippets`: the code a card shows), `push`, `space` (a
  Gradio Space; `space_app` is its app), `run_folder` (what the commands take from a run's folder), `public` (what
  they may say of this machine);
- a run: `run/` — `launch` (`TrainingRecipe`: the phases of a launch), `set_up` (`set_up_phase`), `phase`
  (`Phase`: what one phase trains with), `loop` (the loop on a page), `periodic` (the hooks after a step: log line,
  evaluation, pictures, curves, best export, checkpoint; the phase's end), `step` (one optimizer step), `optim`,
  `checkpointing`, `launches` (launch records, the relaunch comparison, locks), `metrics_log`, `trackers`,
  `eval_pictures` (what each evaluation draws), `publisher` (a run's exports and pushes), `distributed`;
- the leaves: `files` (durable writes), `weights` (finiteness), `pictures` (overlays, grids), `curves`;
- the commands: `train`, `evaluate`, `predict`, `push` and `space` (`python -m gd_hf.NAME`).
"""

__version__ = "0.1.0"
