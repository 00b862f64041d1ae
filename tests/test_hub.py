"""Model cards, pushes to a stand-in Hub on 127.0.0.1 (requests recorded), the pipeline/widget contract."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import transformers
import yaml
from PIL import Image
from transformers import Mask2FormerForUniversalSegmentation, pipeline

from gd_hf.hub.model_card import card_metadata
from gd_hf.hub.push import PushError, push_export
from gd_hf.train import main
from tests.conftest import EOMT_TINY, ONE_LAUNCH_SSL, tiny_overrides
from tests.hub_standin import DROP, TOKEN

from .conftest import DEMO_RECIPE, demo_recipe


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """A tiny phase-1 run whose exports carry model cards."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("run") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    args = [DEMO_RECIPE, *tiny_overrides(synthetic_root, out), "train.eval_every=2"]
    assert main(args) == 0
    return out


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_model_card_metadata_and_contents(trained_run, tmp_path):
    final = trained_run / "final"
    metadata = card_metadata(final)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-segmentation"
    assert {"mask2former", "instance-segmentation", "semi-supervised", "guided-distillation"} <= set(metadata["tags"])
    assert metadata["license"] == "apache-2.0"
    results = metadata["model-index"][0]["results"]
    values = {r["metrics"][0]["name"]: r["metrics"][0]["value"] for r in results}
    metrics = json.loads((final / "eval_results.json").read_text())
    assert values["mask AP"] == round(metrics["AP"], 2)
    assert {r["task"]["type"] for r in results} == {"image-segmentation"}

    assert metadata["model-index"][0]["name"] == "run"  # the run's name (no hub.repo_id), not the folder's
    assert {r["dataset"]["name"] for r in results} == {"custom (validation)"}  # not the annotation file's name
    text = (final / "README.md").read_text()
    body = text.split("---", 2)[2]
    assert body.lstrip().startswith("# run\n")
    assert f"{metrics['AP']:.2f}" in body  # the metrics table
    # COCOeval's -1 (no large objects in 64 px images) is a dash, and the table says what it means
    assert metrics["APl"] == -1 and "| mask AP (large) | — |" in body and "A dash means" in body
    assert "up to 10 instances per image" in body and metrics["evaluated_with"]["top_k"] == 10
    assert "supervised training (phase 1 of Guided Distillation) for 4 steps" in body
    assert "circle, rectangle, triangle, cross" in body
    assert "24 labeled images (100.0 % of 24 training images" in body and "1 labeled images" not in body
    recipe_yaml = re.search(r"```yaml\n(.*?)```", body, re.S).group(1)
    published = yaml.safe_load((final / "recipe.yaml").read_text())
    # The card shows the keys the run set, not ~150 (the other family's among them); on gd_hf's defaults they
    # are the whole recipe shipped beside it.
    from gd_hf.config import load_recipe, recipe_to_dict
    from gd_hf.hub.model_card import keys_set

    shown = yaml.safe_load(recipe_yaml)
    eomt_keys = tuple(k for k in published["model"] if k.startswith("eomt_"))
    assert shown == keys_set(published, unread=eomt_keys) and len(recipe_yaml.splitlines()) < 60
    assert not [k for k in shown["model"] if k.startswith("eomt_")]
    (tmp_path / "shown.yaml").write_text(recipe_yaml)
    loaded = recipe_to_dict(load_recipe(tmp_path / "shown.yaml"))

    def read_by_mask2former(recipe):
        return {**recipe, "model": {k: v for k, v in recipe["model"].items() if not k.startswith("eomt_")}}

    assert read_by_mask2former(loaded) == read_by_mask2former(published)
    assert "pip install -e .  # in a clone of gd_hf's source (version 0.1.0; it is not on PyPI)" in body
    assert published["output_dir"] == "./run" and published["data"]["val_images"] == "{data_root}/val"
    run_recipe = yaml.safe_load((trained_run / "recipe.yaml").read_text())  # the run's own record keeps its paths
    assert {k: v for k, v in published["train"].items()} == run_recipe["train"]
    assert "## Framework versions" in body and f"- transformers {transformers.__version__}" in body
    assert "![Predictions on validation images](predictions.png)" in body and (final / "predictions.png").is_file()
    assert "![Training curves](curves.png)" in body and (final / "curves.png").is_file()
    assert "Guided Distillation for Semi-Supervised Instance Segmentation" in body and "2308.02668" in body
    assert (trained_run / "best" / "README.md").is_file()


def test_card_usage_snippet_runs_as_written(trained_run, synthetic_root, tmp_path):
    """On the example image shipped in the export; a local card loads the export by its path from the run's
    parent folder (no path of this machine), a pushed one by the repo id."""
    final = trained_run / "final"
    snippet = re.search(r"```python\n(.*?)```", (final / "README.md").read_text(), re.S).group(1)
    assert 'model="./run/final"' in snippet and str(trained_run) not in snippet
    assert 'os.path.join("./run/final", "examples/val_1000000.jpg")' in snippet
    assert (final / "examples" / "val_1000000.jpg").is_file()
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "snippet.py")],
        cwd=trained_run.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_exported_model_is_widget_ready(trained_run, synthetic_root):
    final = trained_run / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Mask2FormerForUniversalSegmentation"]
    assert json.loads((final / "preprocessor_config.json").read_text())["image_processor_type"].startswith(
        "Mask2FormerImageProcessor"
    )
    model = Mask2FormerForUniversalSegmentation.from_pretrained(final)
    assert model.config.id2label == {0: "circle", 1: "rectangle", 2: "triangle", 3: "cross"}  # round trip
    segmenter = pipeline("image-segmentation", model=str(final))
    image = Image.open(synthetic_root / "val" / "1000000.png").convert("RGB")
    segments = segmenter(image, subtask="instance", threshold=0.0)
    assert segments and {s["label"] for s in segments} <= set(model.config.id2label.values())
    assert all(isinstance(s["mask"], Image.Image) and s["mask"].size == image.size for s in segments)
    assert card_metadata(final)["pipeline_tag"] == "image-segmentation"


def test_push_uploads_the_export_to_the_repo_and_revision(trained_run, hub):
    url = push_export(trained_run / "final", "me/gd-model", revision="v1", retries=0)
    assert url.startswith(hub.url + "/me/gd-model/commit/")
    assert [r["name"] for r in hub.repos] == ["gd-model"]
    assert hub.branches == [("me/gd-model", "v1")]
    (commit,) = hub.commits
    assert commit["repo"] == "me/gd-model" and commit["revision"] == "v1"
    final = trained_run / "final"
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert commit["files"] == local  # every file, byte for byte
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "recipe.yaml",
        "run_info.json",
        "examples/val_1000000.jpg",
        "predictions.png",
        "curves.png",
    } <= set(commit["files"])
    assert hub.lfs_paths == ["model.safetensors"]  # the weights went through LFS storage, checked by sha256


def test_a_second_push_to_an_existing_private_repo_succeeds(trained_run, hub):
    """The Hub answers 409 when a repo exists (every push after the first): that is not a failure. `private` is
    what the create request asks for."""
    push_export(trained_run / "final", "me/gd-model", private=True, retries=0)
    push_export(trained_run / "final", "me/gd-model", private=True, retries=0)
    assert [p for m, p, _ in hub.requests].count("/api/repos/create") == 2
    assert len(hub.repos) == 1
    assert hub.repos[0].get("visibility") == "private" or hub.repos[0].get("private") is True  # hub 2.x / 1.x
    assert len(hub.commits) == 2
    writes = [  # to the Hub's API and git endpoints (the LFS storage PUT goes to a presigned URL, without token)
        (m, p, {k.lower(): v for k, v in h.items()})
        for m, p, h in hub.requests
        if m in ("POST", "PUT") and (p.startswith("/api/") or ".git/" in p)
    ]
    assert writes and all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in writes)  # every write signed


def test_a_wrong_token_fails_at_once_without_showing_the_token(trained_run, hub, monkeypatch, waits):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongtoken0000000000000000000")
    with pytest.raises(PushError) as error:
        push_export(trained_run / "final", "me/gd-model", retries=3, backoff_s=0.01)
    assert waits == []  # 401 is not transient: no retry
    assert "401" in str(error.value)
    assert "hf_wrongtoken" not in str(error.value) and TOKEN not in str(error.value)
    assert hub.commits == []


def test_the_cards_model_index_passes_the_hubs_metadata_check_and_a_broken_one_does_not(trained_run, hub, tmp_path):
    """The stand-in refuses a commit whose README metadata the Hub would refuse (tested on a broken copy), and
    gd_hf's card passes it."""
    import shutil

    push_export(trained_run / "final", "me/gd-model", retries=0)
    assert len(hub.commits) == 1
    broken = tmp_path / "broken"
    shutil.copytree(trained_run / "final", broken)
    card = (broken / "README.md").read_text()
    (broken / "README.md").write_text(card.replace("    - type: map", "    - kind: map", 1))  # a metric without a type
    assert card != (broken / "README.md").read_text()
    with pytest.raises(PushError, match="Invalid metadata in README.md"):
        push_export(broken, "me/gd-model", retries=0)


def test_transient_failures_are_retried(trained_run, hub):
    hub.fail(r"/api/repos/create", 503, times=2)
    push_export(trained_run / "final", "me/gd-model", retries=2, backoff_s=0.01)
    assert [p for m, p, _ in hub.requests].count("/api/repos/create") == 3
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "main"


@pytest.fixture
def waits(monkeypatch):
    """The back-off waits a push sleeps, recorded instead of slept."""
    import gd_hf.hub.push

    slept: list[float] = []
    monkeypatch.setattr(gd_hf.hub.push.time, "sleep", slept.append)
    return slept


@pytest.mark.parametrize("failure", [DROP, 429, 503], ids=["dropped_connection", "429", "503"])
def test_transport_and_rate_limit_failures_are_retried_with_the_documented_back_off(trained_run, hub, waits, failure):
    """A connection dropped without a response (an httpx transport error, not an OSError) is retried like a
    429 or 503: N failures, N + 1 attempts, waits b, 2b, 4b, ..., then the push succeeds."""
    hub.fail(r"/api/repos/create", failure, times=3)
    push_export(trained_run / "final", "me/gd-model", retries=4, backoff_s=0.5)
    assert [p for m, p, _ in hub.requests].count("/api/repos/create") == 4
    assert waits == [0.5, 1.0, 2.0]
    assert len(hub.commits) == 1


def test_a_refused_connection_is_retried_then_reported_with_the_command(trained_run, monkeypatch, waits):
    """Nothing listens on the endpoint: every attempt is refused (httpx ConnectError); retries, then a PushError
    that says how to push again."""
    import socket

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there now
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(PushError) as error:
        push_export(trained_run / "final", "me/gd-model", retries=2, backoff_s=0.25)
    assert waits == [0.25, 0.5]
    assert "ConnectError" in str(error.value) and "push it again with: python -m gd_hf.push" in str(error.value)
    assert TOKEN not in str(error.value)


def test_failed_push_keeps_the_outputs_and_says_how_to_push_again(trained_run, hub, capsys):
    before = folder_digest(trained_run)
    hub.fail(r"/commit/", 403, times=100)  # not transient: no retry
    with pytest.raises(PushError) as error:
        push_export(trained_run / "final", "me/gd-model", retries=3, backoff_s=0.01)
    assert f"python -m gd_hf.push {trained_run / 'final'} me/gd-model" in str(error.value)
    assert [p for m, p, _ in hub.requests].count("/api/models/me/gd-model/commit/main") == 1
    assert folder_digest(trained_run) == before

    from gd_hf.hub.push import main as push_main

    assert push_main([str(trained_run), "me/gd-model", "--retries", "0"]) == 3
    assert "push it again with: python -m gd_hf.push" in capsys.readouterr().err
    assert folder_digest(trained_run) == before  # the card written for the repo was put back


@pytest.mark.parametrize("family", [[], EOMT_TINY], ids=["mask2former", "eomt"])
def test_training_run_pushes_teacher_burn_in_and_final(synthetic_root, tmp_path, hub, capsys, family):
    out = tmp_path / "run"
    args = [
        DEMO_RECIPE,
        *tiny_overrides(synthetic_root, out),
        *family,
        *ONE_LAUNCH_SSL,
        "hub.push=true",
        "hub.repo_id=me/gd-run",
        "hub.push_intermediate=true",
        "hub.space_repo=me/gd-run-demo",
    ]
    assert main(args) == 0
    assert [(c["repo"], c["revision"], c["repo_type"]) for c in hub.commits] == [
        ("me/gd-run", "teacher", "model"),
        ("me/gd-run", "burn-in", "model"),
        ("me/gd-run", "main", "model"),
        ("me/gd-run-demo", "main", "space"),  # hub.space_repo: a Space serving the pushed model
    ]
    space = hub.commits.pop()["files"]
    for commit in hub.commits[:2]:  # a card pushed to a branch loads that branch
        assert f'from_pretrained("me/gd-run", revision="{commit["revision"]}")' in commit["files"]["README.md"].decode()
    assert "# gd-run-teacher\n" in hub.commits[0]["files"]["README.md"].decode()
    assert json.loads(space["space_config.json"])["model"] == "me/gd-run" and "app.py" in space
    assert "sdk: gradio" in space["README.md"].decode() and "examples/val_1000000.jpg" in space
    final_card = hub.commits[-1]["files"]["README.md"].decode()
    assert 'model="me/gd-run"' in final_card  # the pushed card's snippet loads the repo
    assert final_card.split("---", 2)[2].lstrip().startswith("# gd-run\n")  # titled by the repo
    assert 'hf_hub_download("me/gd-run", "examples/val_1000000.jpg")' in final_card
    assert "hf download me/gd-run recipe.yaml --local-dir ." in final_card
    if family:  # plain EoMT folders that predict as at inference, whatever step of the annealing they left
        from safetensors.torch import load as load_safetensors

        assert "A plain `EomtForUniversalSegmentation` checkpoint" in final_card and "\n- eomt\n" in final_card
        for commit in hub.commits:
            assert json.loads(commit["files"]["config.json"])["model_type"] == "eomt"
            assert load_safetensors(commit["files"]["model.safetensors"])["attn_mask_probs"].tolist() == [0.0, 0.0]
            assert json.loads(commit["files"]["preprocessor_config.json"])["do_pad"] is True
    assert "Guided Distillation for 2 steps" in final_card and "supervised teacher" in final_card
    for commit in hub.commits:
        assert all(TOKEN.encode() not in content for content in commit["files"].values())
    logged = capsys.readouterr()
    assert TOKEN not in logged.out + logged.err
    assert TOKEN not in "".join(
        p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in {".json", ".jsonl", ".yaml", ".md"}
    )


def test_training_run_with_a_failed_push_exits_3_and_keeps_everything(synthetic_root, tmp_path, hub, capsys):
    hub.fail(r"/api/repos/create", 401, times=100)
    out = tmp_path / "run"
    args = [DEMO_RECIPE, *tiny_overrides(synthetic_root, out)]
    assert main([*args, "hub.push=true", "hub.repo_id=me/gd-run", "hub.retries=0"]) == 3
    err = capsys.readouterr().err
    assert f"python -m gd_hf.push {out / 'final'} me/gd-run" in err
    assert Mask2FormerForUniversalSegmentation.from_pretrained(out / "final") is not None
    assert (out / "final_metrics.json").is_file() and (out / "final" / "README.md").is_file()


def test_push_requires_a_repo_id(synthetic_root, tmp_path):
    from gd_hf.config import RecipeError

    with pytest.raises(RecipeError, match="hub.repo_id is required"):
        demo_recipe(tiny_overrides(synthetic_root, tmp_path) + ["hub.push=true"])


def test_predict_writes_overlays_and_coco_results_and_skips_a_corrupt_image(
    trained_run, synthetic_root, tmp_path, capsys
):
    from gd_hf.predict import main as predict_main

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    names = ["1000000.png", "1000001.png", "1000002.png"]
    for name in names[:2]:
        (images / name).write_bytes((synthetic_root / "val" / name).read_bytes())
    (images / "sub" / names[2]).write_bytes((synthetic_root / "val" / names[2]).read_bytes())
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    assert (
        predict_main(
            [str(trained_run / "final"), str(images), "--out", str(out), "--threshold", "0", "--batch-size", "2"]
        )
        == 0
    )

    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "broken.jpg" in err
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    results = json.loads((out / "predictions.json").read_text())
    assert {Path(r["file_name"]).name for r in results} == set(names)
    assert {r["category_name"] for r in results} <= {"circle", "rectangle", "triangle", "cross"}
    for name in names:
        source = Image.open(next(images.rglob(name))).convert("RGB")
        overlay = Image.open(out / name).convert("RGB")
        assert overlay.size == source.size
        ours = [r for r in results if Path(r["file_name"]).name == name]
        import numpy as np
        from pycocotools import mask as mask_utils

        covered = np.zeros((source.height, source.width), dtype=bool)
        for r in ours:
            covered |= mask_utils.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}).astype(
                bool
            )
        difference = np.abs(np.asarray(overlay, dtype=int) - np.asarray(source, dtype=int)).sum(-1) > 0
        assert covered.any() and difference[covered].mean() > 0.5  # coloured where masks are
        assert not difference[~covered].any() or difference[~covered].mean() < difference[covered].mean()


def test_predict_threshold_filters_instances(trained_run, synthetic_root, tmp_path):
    from gd_hf.predict import main as predict_main

    image = str(synthetic_root / "val" / "1000000.png")
    assert predict_main([str(trained_run / "final"), image, "--out", str(tmp_path / "all"), "--threshold", "0"]) == 0
    assert predict_main([str(trained_run / "final"), image, "--out", str(tmp_path / "none"), "--threshold", "1"]) == 0
    assert json.loads((tmp_path / "all" / "predictions.json").read_text())
    assert json.loads((tmp_path / "none" / "predictions.json").read_text()) == []


def exported_processor_pixels(folder: Path, image_path: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)(
        images=[Image.open(image_path).convert("RGB")], return_tensors="pt"
    )["pixel_values"]


def test_pipeline_and_gd_hf_predict_see_the_same_pixels_and_agree_on_the_top_instances(trained_run, tmp_path):
    """The export's preprocessor_config.json must reproduce gd_hf's evaluation input (resize, rescale, mean/std):
    for an image whose resized sides are multiples of 32 (transformers' processor rounds other sizes up by
    stretching, gd_hf pads: see the README's "Using a trained model") the pixels agree to the resize kernels' rounding, a wrong mean/std or size is caught,
    and `pipeline` and `gd_hf.predict` report the same top instances."""
    import datasets
    import numpy as np
    from transformers import AutoImageProcessor

    from gd_hf.config import DataConfig
    from gd_hf.data.loading import EvalDataset, collate_eval
    from gd_hf.predict import predict

    final = trained_run / "final"
    rng = np.random.default_rng(0)
    pixels = (rng.random((96, 96, 3)) * 60).astype(np.uint8)  # resized to the export's 64 x 64: no rounding
    pixels[10:60, 20:70] = (220, 30, 30)
    image_path = tmp_path / "scene.png"
    Image.fromarray(pixels).save(image_path)
    size = AutoImageProcessor.from_pretrained(final).size
    records = datasets.Dataset.from_dict(
        {
            "image": [str(image_path)],
            "image_id": [1],
            "width": [96],
            "height": [96],
            "objects": [{"category": [], "rle_counts": [], "iscrowd": [], "polygons": []}],
        }  # fmt: skip
    )
    data = DataConfig(eval_shortest_edge=size["shortest_edge"], eval_longest_edge=size["longest_edge"])
    ours = collate_eval([EvalDataset(records, data)[0]], 32)["pixel_values"]
    theirs = exported_processor_pixels(final, image_path)
    assert theirs.shape == ours.shape == (1, 3, 64, 64)
    assert float((theirs - ours).abs().mean()) < 0.01 and float((theirs - ours).abs().max()) < 0.05

    # The comparison catches a wrong normalisation or size in the config.
    for change in (
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        {"size": {"shortest_edge": 96, "longest_edge": 96}},
    ):
        broken = tmp_path / f"broken{len(change)}"
        broken.mkdir()
        config = json.loads((final / "preprocessor_config.json").read_text()) | change
        (broken / "preprocessor_config.json").write_text(json.dumps(config))
        wrong = exported_processor_pixels(broken, image_path)
        assert wrong.shape != ours.shape or float((wrong - ours).abs().mean()) > 0.1

    segments = pipeline("image-segmentation", model=str(final))(
        Image.open(image_path).convert("RGB"), subtask="instance", threshold=0.0
    )
    model = Mask2FormerForUniversalSegmentation.from_pretrained(final)
    results, _ = predict(model, [image_path], tmp_path / "pred", size["shortest_edge"], size["longest_edge"], 0.0)
    top = sorted(segments, key=lambda s: -s["score"])[:3]
    assert top
    for segment in top:
        # The same instance (class and score) in both. Their masks are not compared here: the pipeline gives each
        # pixel to the instance with the highest score x probability (a segmentation map, below 0.5 included),
        # gd_hf thresholds each mask at 0.5 as COCO evaluation does, and this 4-step model is unsure everywhere.
        same = [
            r for r in results if r["category_name"] == segment["label"] and abs(r["score"] - segment["score"]) < 0.02
        ]
        assert same, segment


def test_pipeline_and_gd_hf_predict_give_the_same_masks_for_a_model_that_is_sure(trained_run, tmp_path, monkeypatch):
    """With a model that is sure of what it sees (its forward segments the red square exactly: a stand-in for a
    trained model, which a test cannot afford), `pipeline` and `gd_hf.predict` report the same top instance:
    mask IoU > 0.9, score within 0.02. A wrong normalisation in the export's config loses the square."""
    import numpy as np
    import torch
    from pycocotools import mask as mask_utils
    from transformers import AutoImageProcessor
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

    from gd_hf.predict import predict
    from tests.test_one_frame import perfect_outputs

    def sure_forward(self, pixel_values, **kwargs):
        sure = perfect_outputs(pixel_values, self.config.num_queries, len(self.config.id2label), torch.zeros(()))
        return Mask2FormerForUniversalSegmentationOutput(
            class_queries_logits=sure.class_queries_logits, masks_queries_logits=sure.masks_queries_logits
        )

    monkeypatch.setattr(Mask2FormerForUniversalSegmentation, "forward", sure_forward)
    pixels = np.zeros((96, 96, 3), np.uint8)
    pixels[24:72, 24:72, 0] = 255  # a red square on the model's 1/4-resolution grid, segmented as class 0
    image_path = tmp_path / "square.png"
    Image.fromarray(pixels).save(image_path)
    drawn = torch.from_numpy(pixels[..., 0] > 0)

    def top_instances(folder):
        segments = pipeline("image-segmentation", model=str(folder))(
            Image.open(image_path).convert("RGB"), subtask="instance", threshold=0.5
        )
        model = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
        size = AutoImageProcessor.from_pretrained(folder).size
        results, _ = predict(model, [image_path], tmp_path / "pred", size["shortest_edge"], size["longest_edge"], 0.5)
        return segments, results

    def iou(a, b):
        return float((a & b).sum()) / max(1, float((a | b).sum()))

    segments, results = top_instances(trained_run / "final")
    assert len(segments) == len(results) == 1
    theirs = torch.from_numpy(np.asarray(segments[0]["mask"]) > 0)
    rle = results[0]["segmentation"]
    ours = torch.from_numpy(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}) > 0)
    assert segments[0]["label"] == results[0]["category_name"] == "circle"
    assert abs(segments[0]["score"] - results[0]["score"]) < 0.02
    assert iou(theirs, ours) > 0.9 and iou(ours, drawn) > 0.9
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((trained_run / "final" / name).read_bytes())
    config = json.loads((trained_run / "final" / "preprocessor_config.json").read_text())
    config |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (broken / "preprocessor_config.json").write_text(json.dumps(config))
    segments, _ = top_instances(broken)
    assert segments == [] or iou(torch.from_numpy(np.asarray(segments[0]["mask"]) > 0), drawn) < 0.9


def test_the_push_command_writes_the_repo_id_into_the_card_as_training_does(trained_run, hub, tmp_path, capsys):
    """`python -m gd_hf.push RUN REPO`: the card that reaches the Hub is titled by the repository, its snippet
    loads the repository (and its example from it), and the local export records where it went."""
    import shutil

    from gd_hf.hub.push import main as push_main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", ".gd_hf.lock"))
    before = (run / "final" / "README.md").read_text()
    assert push_main([str(run), "me/shapes-seg", "--retries", "0"]) == 0
    card = hub.commits[-1]["files"]["README.md"].decode()
    assert card.split("---", 2)[2].lstrip().startswith("# shapes-seg\n") and "name: shapes-seg" in card
    assert 'model="me/shapes-seg"' in card and 'hf_hub_download("me/shapes-seg", "examples/val_1000000.jpg")' in card
    assert "./run/final" not in card and "./run/final" in before
    # the rest of the card is the run's: its metrics, its recipe
    assert (
        before.split("## Results", 1)[1].split("## How to use")[0]
        == card.split("## Results", 1)[1].split("## How to use")[0]
    )
    assert (run / "final" / "README.md").read_text() == card  # the local export is the pushed one
    pushed = json.loads((run / "final" / "run_info.json").read_text())["pushed_to"]
    assert pushed == {"repo_id": "me/shapes-seg", "revision": None}
    assert "me/shapes-seg" not in hub.commits[-1]["files"]["run_info.json"].decode()  # recorded after the push


def test_the_push_command_is_quiet_refuses_bad_waits_and_changes_nothing_when_stopped(
    trained_run, hub, tmp_path, capsys, caplog, monkeypatch
):
    """No `HTTP Request: ...` line per request; a negative or NaN back-off is refused before anything is read;
    an error of any kind during the push (here a crash of the upload) leaves the export's card as it was."""
    import logging
    import shutil

    import gd_hf.hub.push as push_module

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", ".gd_hf.lock"))
    before = folder_digest(run)
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as exit_:
            push_module.main([str(run), "me/shapes-seg", "--backoff-s", bad])
        assert exit_.value.code == 2 and "--backoff-s must be in [0, 3600] seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        push_module.main([str(run), "me/shapes-seg", "--retries", "-1"])
    assert "--retries must be >= 0" in capsys.readouterr().err

    def crash(*args, **kwargs):
        raise RuntimeError("the upload crashed")

    with monkeypatch.context() as patched, pytest.raises(RuntimeError, match="the upload crashed"):
        patched.setattr(push_module, "push_export", crash)
        push_module.main([str(run), "me/shapes-seg", "--retries", "0"])
    assert folder_digest(run) == before  # the card written for the repo was put back
    caplog.set_level(logging.INFO)
    assert push_module.main([str(run), "me/shapes-seg", "--retries", "0"]) == 0
    assert hub.commits  # (the requests went through the stand-in Hub's HTTP server)
    assert not [r for r in caplog.records if r.name.startswith("httpx") and r.levelno < logging.WARNING]


@pytest.mark.parametrize("family, data", [([], "synthetic_root"), ([*EOMT_TINY, "eval.max_images=5"], "varied_root")],
                         ids=["mask2former-squares", "eomt-mixed-sizes-first-5"])  # fmt: skip
def test_the_cards_mask_ap_reproduces_with_the_cards_own_code(request, tmp_path, family, data):
    """The card's "with transformers' code" block, run as written (transformers, torch, pycocotools; no gd_hf) on
    the val images, finds the instances gd_hf's evaluation scored (class, score, mask) and so the card's mask AP,
    for both families (EoMT on mixed sizes: its inputs are padded, and the code crops the image's part). A tiny
    model's AP is near 0, so the instances are compared one by one; on demo-size exports the APs agree within 0.5
    (benchmarks/card_ap.py)."""
    from accelerate.state import AcceleratorState
    from pycocotools import mask as mask_utils

    synthetic_root = request.getfixturevalue(data)

    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    steps = ["train.max_steps=20", "train.lr=1e-3", "train.log_every=5", "train.eval_every=0", "eval.top_k=100"]
    assert main([DEMO_RECIPE, *tiny_overrides(synthetic_root, out), *family, *steps]) == 0
    card = (out / "final" / "README.md").read_text()
    card_ap = json.loads((out / "final_metrics.json").read_text())["final"]["AP"]
    block = card.split("### The mask AP above, with transformers' code", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    mine = 'annotations, images = "instances_val.json", "val"'
    assert mine in code and "gd_hf" not in code and "top_k=100" in code
    val = f'"{synthetic_root / "annotations" / "instances_val.json"}", "{synthetic_root / "val"}"'
    code = (
        code.replace(mine, f"annotations, images = {val}")
        + '\nimport json\njson.dump(results, open("card.json", "w"), default=lambda o: o.tolist())\n'
    )
    (tmp_path / "reproduce.py").write_text(code)
    result = subprocess.run([sys.executable, str(tmp_path / "reproduce.py")], cwd=out.parent, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert abs(float(re.search(r"mask AP ([0-9.]+)", result.stdout).group(1)) - card_ap) <= 0.5
    # Instance by instance: the 5 best of each image as gd_hf's evaluation scored them, found by the card's code.
    ours = json.loads((out / "predictions" / "val_step_00000020.json").read_text())
    theirs = json.loads((out.parent / "card.json").read_text())
    assert len(theirs) == len(ours)
    for image_id in {r["image_id"] for r in ours}:
        mine_best = sorted((r for r in ours if r["image_id"] == image_id), key=lambda r: -r["score"])[:5]
        candidates = [r for r in theirs if r["image_id"] == image_id]
        for r in mine_best:
            same = [
                c for c in candidates if c["category_id"] == r["category_id"] and abs(c["score"] - r["score"]) < 0.01
            ]
            assert same, (image_id, r["category_id"], r["score"])
            rle = {**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}
            best_iou = max(mask_utils.iou([{**c["segmentation"], "counts": c["segmentation"]["counts"].encode()}],
                                          [rle], [0])[0][0] for c in same)  # fmt: skip
            # (the processor resizes with PIL, gd_hf with torch: a pixel or two of an edge may differ)
            area = int(mask_utils.area(rle))
            assert best_iou > (0.9 if area >= 100 else 0.5) or not area, (image_id, area, best_iou)


def test_evaluate_and_predict_need_no_more_than_the_run_folder_and_keep_the_data_sets_ids(
    trained_run, synthetic_root, tmp_path, capsys
):
    """`gd_hf.evaluate RUN` scores the run's val set (its AP is the run's); `gd_hf.predict RUN` predicts it into
    RUN/predict/ with the data set's image ids and category ids (COCO's, not the model's 0..C-1), as
    `evaluate --out` does; a folder that is no run says what to give."""
    import shutil

    from gd_hf.evaluate import main as evaluate_main
    from gd_hf.predict import main as predict_main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns(".gd_hf.lock"))
    assert evaluate_main([str(run), "--out", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr()
    assert "evaluating on the run's val set" in out.err
    assert json.loads(out.out)["AP"] == pytest.approx(
        json.loads((run / "final_metrics.json").read_text())["final"]["AP"]
    )
    val = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    image_ids, names = {i["id"] for i in val["images"]}, {c["id"]: c["name"] for c in val["categories"]}
    assert names == {1: "circle", 2: "rectangle", 3: "triangle", 4: "cross"}  # (0..3 would be the model's)
    evaluated = json.loads((tmp_path / "results.json").read_text())
    assert (
        evaluated
        and {r["image_id"] for r in evaluated} <= image_ids
        and {r["category_id"] for r in evaluated} <= set(names)
    )

    # Only the images the val JSON lists (not whatever else is in the folder), with their ids.
    val_copy = tmp_path / "val"
    shutil.copytree(synthetic_root / "val", val_copy)
    shutil.copyfile(val_copy / "1000000.png", val_copy / "0extra.png")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["val_images"] = str(val_copy)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert predict_main([str(run), "--threshold", "0"]) == 0
    predicted = json.loads((run / "predict" / "predictions.json").read_text())
    assert not [r for r in predicted if "0extra" in r["file_name"]]
    assert {r["image_id"] for r in predicted} == {r["image_id"] for r in evaluated} <= image_ids
    assert predicted and all(names[r["category_id"]] == r["category_name"] for r in predicted)
    assert json.loads((run / "final" / "config.json").read_text())["dataset_category_ids"] == [1, 2, 3, 4]

    export = tmp_path / "export"  # an export outside any run
    shutil.copytree(run / "final", export)
    assert evaluate_main([str(export)]) == 2
    assert "give the annotations and the images" in capsys.readouterr().err
    assert predict_main([str(export), str(synthetic_root / "val")]) == 2
    assert "give --out" in capsys.readouterr().err
    assert evaluate_main([str(export), str(synthetic_root / "annotations" / "instances_val.json")]) == 2
    assert "give both ANNOTATIONS and IMAGES, or neither" in capsys.readouterr().err
    # A recipe whose val set is named relative to another folder: the error says where to run from.
    recipe["data"]["val_images"] = "data/elsewhere/val"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert predict_main([str(run)]) == 2
    assert "data.val_images=data/elsewhere/val, which is not there from" in capsys.readouterr().err
    (run / "recipe.yaml").write_text("data: [1, 2]\n")  # a hand-edited record: one line, not a traceback
    assert evaluate_main([str(run)]) == 2 and "give the annotations and the images" in capsys.readouterr().err
