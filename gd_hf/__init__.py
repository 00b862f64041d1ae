"""gd_hf: semi-supervised instance segmentation with Guided Distillation, on Hugging Face transformers.

The package, in the order a run goes through it:

- data: `data/` — the sources (`sources`: what they share, `open_source`; one module per source: `coco_source`
  with its records cache, `shards`, `hub_source`), the readers and converters (`coco`, `mask_images`, `convert`),
  the class list (`categories`), the launch's data (`prepare`), splits, transforms and datasets (`loading`), the
  training batches (`batches`), the synthetic set;
- model: `modeling` (Mask2Former + backbone, loss, finiteness checks), `optim` (AdamW groups, schedule, `UpdateUndo`);
- method: `teacher` (frozen, then EMA), `pseudo_labels` (the rules), `train.train_step` (one distillation step);
- loop: `train` (set-up, the loop, the end), `checkpointing` (state, resume, which checkpoint reads whole),
  `config` (recipes), `run_info` (launch records, the relaunch comparison, the output folder's lock), `files`
  (durable writes);
- outputs: `evaluation` (post-processing, the val ground truth, mask AP), `evaluate` (the command), `coco_metric`
  (`CocoMaskAP`, the metric for the `evaluate` library), `publish` (exports, model cards, pushes: `export`,
  `model_card`, `push`), `predict`.
"""

__version__ = "0.1.0"
