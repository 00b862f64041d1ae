"""gd_hf: semi-supervised instance segmentation with Guided Distillation, on Hugging Face transformers."""

__version__ = "0.1.0"
