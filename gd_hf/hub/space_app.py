"""The Gradio app of a Space that `python -m gd_hf.space` writes (this file becomes its `app.py`).

    python app.py    (host and port: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; no share link, no analytics)

The model is $GD_HF_MODEL if set, else the one `space_config.json` names: a hub id, or `model/` beside this file.
Predictions are gd_hf's own (`gd_hf.predict.segment_images`, from the copy of gd_hf beside this file): the same
resize, padding, post-processing and top-k as `python -m gd_hf.predict`, so the instances shown are the ones
that command finds for the image. The API endpoint `/segment` takes (image, threshold) and returns the overlay
and the table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedModel

from gd_hf.models import input_size_problem, load_export
from gd_hf.predict import draw_overlay, export_sizes, export_top_k, load_image, segment_images

HERE = Path(__file__).resolve().parent
TABLE_HEADERS = ["label", "score", "area (px)"]


def space_config() -> dict:
    """What `gd_hf.hub.space` wrote: the model, the title and description, the example images."""
    return json.loads((HERE / "space_config.json").read_text())


def model_reference() -> str:
    """$GD_HF_MODEL, else the config's model: a hub id, or a folder relative to this file."""
    name = os.environ.get("GD_HF_MODEL") or space_config()["model"]
    local = HERE / name
    return str(local) if local.is_dir() else name


@dataclass
class Segmenter:
    model: PreTrainedModel
    shortest_edge: int
    longest_edge: int
    top_k: int
    device: str


@cache
def segmenter() -> Segmenter:
    """The model and the settings `python -m gd_hf.predict` would use with it (loaded once)."""
    name = model_reference()
    model = load_export(name)
    shortest_edge, longest_edge = export_sizes(name)
    problem = input_size_problem(model, shortest_edge, longest_edge)
    if problem:  # as gd_hf.predict refuses it
        raise ValueError(f"{name}: {problem} (the size in its preprocessor_config.json)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Segmenter(model, shortest_edge, longest_edge, export_top_k(name), device)


def segment(image_path: str | None, threshold: float = 0.5) -> tuple[Image.Image, list[list], str]:
    """An image file -> (the instance overlay, rows of [label, score, area in pixels] for scores > threshold,
    one line saying what was found, or why nothing is shown)."""
    if image_path is None:
        raise ValueError("no image: upload one or click an example")
    s = segmenter()
    image = load_image(Path(image_path))
    (candidates,) = segment_images(s.model, [image], s.shortest_edge, s.longest_edge, 0.0, s.top_k, s.device)
    instances = candidates.select(candidates.scores > float(threshold))  # as gd_hf.predict selects
    masks = instances.instance_masks()
    labels = [s.model.config.id2label[int(label)] for label in instances.labels]
    scores = instances.scores.tolist()
    overlay = draw_overlay(image, masks, labels, scores)
    areas = masks.flatten(1).sum(1).tolist() if len(labels) else []
    # 5 decimals: readable, and within 1e-5 of gd_hf.predict's predictions.json.
    rows = [[label, round(score, 5), int(area)] for label, score, area in zip(labels, scores, areas)]
    return overlay, rows, found_line(s.model, candidates, float(threshold), len(rows))


def found_line(model: PreTrainedModel, candidates, threshold: float, shown: int) -> str:
    """What the table shows, in words; with nothing above the threshold, the best instance below it."""
    if shown:
        return f"{shown} instance{'s' if shown != 1 else ''} scoring above {threshold:.2f}."
    if len(candidates.scores) == 0:
        return "The model finds no instance in this image."
    best = int(candidates.scores.argmax())
    label = model.config.id2label[int(candidates.labels[best])]
    return (f"No instance scores above {threshold:.2f}: the best is {label} at {float(candidates.scores[best]):.2f}; "
            "lower the threshold to see it.")  # fmt: skip


def build_demo():
    """The Blocks app: image + threshold in, overlay + table out; examples run when clicked."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported: no phoning home
    import gradio as gr

    config = space_config()

    def segment_or_explain(image_path, threshold):
        try:
            return segment(image_path, threshold)
        except ValueError as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title=config["title"], analytics_enabled=False) as demo:
        gr.Markdown(f"# {config['title']}\n\n{config['description']}")
        with gr.Row():
            with gr.Column():
                # The file as uploaded (image_mode None: not converted to 8-bit RGB and saved again by gradio), read
                # as gd_hf reads it: a 16-bit PNG is scaled, not clipped, exactly as `gd_hf.predict` does.
                image = gr.Image(type="filepath", image_mode=None, label="image")
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.01, label="score threshold")
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="instances")  # png: the exact pixels
                found = gr.Markdown()
                table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "number", "number"], label="instances")
        outputs = [overlay, table, found]
        button.click(segment_or_explain, [image, threshold], outputs, api_name="segment")
        examples = [[str(HERE / "examples" / name), 0.5] for name in config.get("examples", [])]
        if examples:
            gr.Examples(
                examples, [image, threshold], outputs, segment_or_explain, run_on_click=True, cache_examples=False,
            )  # fmt: skip
    return demo


if __name__ == "__main__":
    segmenter()  # load before serving: a broken model fails at start, not at the first visitor
    build_demo().launch(share=False)
