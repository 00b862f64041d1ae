"""Data: COCO-format sources as HF datasets, labeled/unlabeled splits, transforms, the synthetic set."""
