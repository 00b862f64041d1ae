"""`python -m gd_hf.space`: the Space it writes predicts exactly as `gd_hf.predict` (a real `python app.py` server
called with gradio_client; an EoMT in process), its card, requirements and copy of gd_hf are what the Hub and a
Space need (no machine paths), MODEL may be an export, a run folder or a hub id, bad inputs are one-line errors,
and a push creates a gradio Space on the stand-in Hub, retrying transient failures."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import SpaceCard
from PIL import Image
from pycocotools import mask as mask_utils

from gd_hf.hub.export import export_model
from gd_hf.hub.model_card import RunSummary
from gd_hf.hub.push import PushError
from gd_hf.hub.space import main, push_space, write_space
from gd_hf.models import build_model, export_image_processor, load_export
from gd_hf.predict import export_sizes, predict
from tests.conftest import EOMT_TINY, tiny_overrides

from .conftest import demo_recipe

CLASSES = {0: "circle", 1: "rectangle", 2: "triangle", 3: "cross"}
THRESHOLD = 0.05  # a random-init model's scores are low: low enough that several instances are compared
TOP_K = 10  # recorded as `evaluated_with.top_k`: the Space must use it (the default is 100)


def tiny_export(synthetic_root: Path, folder: Path, family: list[str]) -> Path:
    """A random-init ~1 M parameter export as runs write it (weights, image processor, eval_results.json, a card
    whose recipe names this machine's paths) with two val images in `examples/`."""
    recipe = demo_recipe([*tiny_overrides(synthetic_root, folder / "run"), *family])
    model = build_model(recipe.model, CLASSES)
    summary = RunSummary(recipe, "supervised", 0, {"AP": 1.0}, 24, 0, 8, list(CLASSES.values()))
    metrics = {"AP": 1.0, "evaluated_with": {"top_k": TOP_K}}
    export = export_model(model, export_image_processor(model, recipe.data), folder / "export", metrics, summary)
    (export / "examples").mkdir()
    for name in ("1000000.png", "1000001.png"):
        shutil.copyfile(synthetic_root / "val" / name, export / "examples" / name)
    return export


@pytest.fixture(scope="module")
def mask2former_export(synthetic_root, tmp_path_factory) -> Path:
    return tiny_export(synthetic_root, tmp_path_factory.mktemp("mask2former"), [])


@pytest.fixture(scope="module")
def space(mask2former_export, tmp_path_factory) -> Path:
    return write_space(str(mask2former_export), tmp_path_factory.mktemp("space") / "space")


def predict_one(export: Path, image: Path, out: Path) -> tuple[list[dict], Path]:
    """`gd_hf.predict` on one image with the export's settings: (its results, its overlay)."""
    shortest_edge, longest_edge = export_sizes(str(export))
    results, failures = predict(
        load_export(str(export)), [image], out, shortest_edge, longest_edge, THRESHOLD, 1, TOP_K
    )
    assert not failures
    return results, out / f"{image.stem}.png"


def assert_table_is_predicts(rows: list[list], results: list[dict]) -> None:
    """The app's rows (label, score, area) are predict's instances, in its order."""
    assert len(rows) == len(results) > 0  # not vacuous
    assert [row[0] for row in rows] == [r["category_name"] for r in results]
    assert [row[1] for row in rows] == pytest.approx([r["score"] for r in results], abs=1e-5)
    areas = [
        int(mask_utils.area({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})) for r in results
    ]
    assert [row[2] for row in rows] == areas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_running_space_shows_exactly_what_gd_hf_predict_finds(space, mask2former_export, tmp_path):
    """`python app.py` (its own copy of gd_hf, offline) called through gradio_client on an example: the table is
    predict's instances and the overlay is predict's overlay PNG, pixel for pixel."""
    from gradio_client import Client, handle_file

    example = space / "examples" / "1000000.png"
    results, overlay_png = predict_one(mask2former_export, example, tmp_path / "predict")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}  # fmt: skip
    env.pop("PYTHONPATH", None)  # as on the Hub: gd_hf is the copy beside app.py
    where = subprocess.run([sys.executable, "-c", "import gd_hf; print(gd_hf.__file__)"], cwd=space, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where) == space / "gd_hf" / "__init__.py"
    log = tmp_path / "app.log"
    started = time.perf_counter()
    with log.open("w") as log_file:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=log_file, stderr=log_file)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, f"app.py exited: {log.read_text()[-3000:]}"
                assert time.perf_counter() - started < 120, f"app.py did not answer: {log.read_text()[-3000:]}"
                time.sleep(0.25)
        print(f"app.py answered after {time.perf_counter() - started:.1f} s")
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"), analytics_enabled=False)
        overlay, table, found = client.predict(handle_file(str(example)), THRESHOLD, api_name="/segment")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert table["headers"] == ["label", "score", "area (px)"]
    assert_table_is_predicts(table["data"], results)
    assert found == f"{len(results)} instance{'s' if len(results) != 1 else ''} scoring above {THRESHOLD:.2f}."
    assert Path(overlay).suffix == ".png"
    assert np.array_equal(
        np.asarray(Image.open(overlay).convert("RGB")), np.asarray(Image.open(overlay_png).convert("RGB"))
    )


def test_an_eomt_space_segments_as_gd_hf_predict(synthetic_root, tmp_path, monkeypatch):
    """An EoMT export's Space, its app's segment function called in process."""
    export = tiny_export(synthetic_root, tmp_path / "eomt", EOMT_TINY)
    out = write_space(str(export), tmp_path / "space")
    spec = importlib.util.spec_from_file_location("eomt_space_app", out / "app.py")
    app = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, app)  # (its dataclass resolves its annotations there)
    spec.loader.exec_module(app)
    example = out / "examples" / "1000001.png"
    overlay, rows, _ = app.segment(str(example), THRESHOLD)
    assert app.segmenter().model.config.model_type == "eomt" and app.segmenter().top_k == TOP_K
    results, overlay_png = predict_one(export, example, tmp_path / "predict")
    assert_table_is_predicts(rows, results)
    assert np.array_equal(np.asarray(overlay), np.asarray(Image.open(overlay_png).convert("RGB")))


def test_the_space_card_requirements_and_gd_hf_copy_are_what_a_space_needs(space, mask2former_export):
    import gradio

    metadata = SpaceCard.load(space / "README.md").data.to_dict()
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    assert metadata["sdk_version"] == gradio.__version__
    assert metadata["license"] == "apache-2.0"  # from the model's card
    assert {"title", "emoji", "colorFrom", "colorTo", "short_description"} <= set(metadata)
    assert len(metadata["short_description"]) <= 60 and "models" not in metadata  # no hub id: model/ is the model
    assert "`model/`" in (space / "README.md").read_text()
    requirements = (space / "requirements.txt").read_text().split()
    names = {r.split(">")[0].split("=")[0].split("<")[0] for r in requirements}
    assert {"gradio", "torch", "transformers", "huggingface_hub"} <= names and "pytest" not in names
    assert (space / "gd_hf" / "predict.py").is_file() and (space / "gd_hf" / "data" / "__init__.py").is_file()
    copied = [p for p in (space / "gd_hf").rglob("*") if p.is_file()]
    assert all(p.suffix == ".py" for p in copied) and not list(space.rglob("__pycache__"))
    assert not list(space.rglob("tests")) and not list(space.rglob("test_*.py"))
    assert sorted(p.name for p in (space / "examples").iterdir()) == ["1000000.png", "1000001.png"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (space / "model").iterdir()
    }
    config = json.loads((space / "space_config.json").read_text())
    assert config["model"] == "model" and config["examples"] == ["1000000.png", "1000001.png"]
    machine_paths = {
        str(Path.home()),
        str(mask2former_export),
        str(mask2former_export.parent.parent),
        "/work/",
    }
    for path in space.rglob("*"):
        if path.is_file() and path.suffix not in (".png", ".safetensors"):
            text = path.read_text()
            found = [p for p in machine_paths if p in text]
            assert not found, f"{path.relative_to(space)} names {found}"


def test_writing_a_space_does_not_need_gradio(mask2former_export, tmp_path):
    """gd_hf.hub.space only writes files: with gradio unimportable it still writes the Space."""
    code = ("import sys; sys.modules['gradio'] = None; from gd_hf.hub.space import main; "
            f"code = main([{str(mask2former_export)!r}, {str(tmp_path / 'space')!r}]); "
            "assert sys.modules['gradio'] is None; raise SystemExit(code)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "space" / "app.py").is_file()


def test_a_run_folder_gives_its_final_export_as_push_predict_and_evaluate_do(mask2former_export, tmp_path, capsys):
    run = tmp_path / "run"
    for name in ("final", "best"):
        shutil.copytree(mask2former_export, run / name)
    assert main([str(run), str(tmp_path / "space")]) == 0
    assert "final/" in capsys.readouterr().out
    assert main([str(run), str(tmp_path / "space"), "--folder", "best"]) == 0  # ours: rewritten, no --overwrite
    assert "best/" in capsys.readouterr().out
    shutil.rmtree(run / "final")
    assert main([str(run), str(tmp_path / "space")]) == 2  # no final/: named, not another export taken
    assert "final/ export" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["missing/folder/x", "empty", "not a hub id", "me/unreachable-model"])
def test_a_bad_model_is_a_one_line_error_with_exit_2(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty").mkdir()
    assert main([model, "space"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not Path("space").exists()


def test_a_non_empty_folder_that_is_not_our_space_needs_overwrite(mask2former_export, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([str(mask2former_export), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([str(mask2former_export), str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "app.py").is_file()


def test_out_inside_the_export_or_around_it_is_refused(mask2former_export, tmp_path, capsys):
    before = sorted(p.name for p in mask2former_export.iterdir())
    for out in (mask2former_export / "space", mask2former_export, mask2former_export.parent):
        assert main([str(mask2former_export), str(out), "--overwrite"]) == 2
        assert "neither inside the other" in capsys.readouterr().err
    assert sorted(p.name for p in mask2former_export.iterdir()) == before


def test_a_hub_model_is_read_from_its_small_files_and_loaded_by_id(mask2former_export, tmp_path, monkeypatch):
    """MODEL a hub id: only the config, card, results and examples are downloaded (here from a stand-in for the
    hub's snapshot); the Space loads the id, copies no weights and names the model in its card."""
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        snapshot = tmp_path / "snapshot"
        shutil.copytree(mask2former_export, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    out = write_space("me/tiny-gd", tmp_path / "space")
    ((repo_id, patterns),) = asked
    assert repo_id == "me/tiny-gd" and "config.json" in patterns and not any("safetensors" in p for p in patterns)
    assert json.loads((out / "space_config.json").read_text())["model"] == "me/tiny-gd"
    assert SpaceCard.load(out / "README.md").data.models == ["me/tiny-gd"]
    assert "https://huggingface.co/me/tiny-gd" in (out / "README.md").read_text()
    assert not (out / "model").exists() and len(list((out / "examples").iterdir())) == 2
    # A local export with --model-id: the Space loads the id too.
    local = write_space(str(mask2former_export), tmp_path / "space2", model_id="me/tiny-gd")
    assert json.loads((local / "space_config.json").read_text())["model"] == "me/tiny-gd"
    assert not (local / "model").exists()


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The back-off waits a push sleeps, recorded instead of slept."""
    import gd_hf.hub.push

    slept: list[float] = []
    monkeypatch.setattr(gd_hf.hub.push.time, "sleep", slept.append)
    return slept


def test_push_space_creates_a_gradio_space_and_uploads_every_file_retrying_a_transient_failure(space, hub, waits):
    hub.fail(r"/api/repos/create", 503, times=1)
    url = push_space(space, "me/gd-space", private=True)
    assert url.startswith(hub.url + "/me/gd-space/commit/") and waits == [2.0]
    ((repo),) = [r for r in hub.repos]
    assert repo["name"] == "gd-space" and repo["type"] == "space" and repo["sdk"] == "gradio"
    assert repo.get("visibility") == "private" or repo.get("private") is True  # hub 2.x / 1.x
    (commit,) = hub.commits
    assert commit["repo_type"] == "space" and commit["repo"] == "me/gd-space"
    local = {p.relative_to(space).as_posix(): p.read_bytes() for p in space.rglob("*") if p.is_file()}
    assert commit["files"] == local and "app.py" in local and "gd_hf/predict.py" in local
    assert hub.lfs_paths == ["model/model.safetensors"]


def test_a_failed_space_push_keeps_out_and_prints_the_command_that_pushes_again(
    mask2former_export, tmp_path, hub, capsys
):
    out = tmp_path / "space"
    hub.fail(r"/commit/", 403, times=100)  # not transient: no retry
    args = [str(mask2former_export), str(out), "--push", "me/gd-space"]
    assert main(args) == 3
    err = capsys.readouterr().err.splitlines()[-1]  # (after the upload's progress bars)
    assert err.startswith("error: ") and f"python -m gd_hf.space {mask2former_export} {out} --push me/gd-space" in err
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())).hexdigest()
    with pytest.raises(PushError, match="push_space"):
        push_space(out, "me/gd-space")
    assert digest == hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())).hexdigest()


def test_the_space_says_what_it_found_and_why_nothing_shows(mask2former_export, monkeypatch):
    """A threshold above every score shows the image unchanged and an empty table: the line under it names the
    best instance below the threshold and says to lower it."""
    import gd_hf.hub.space_app as app

    monkeypatch.setenv("GD_HF_MODEL", str(mask2former_export))
    app.segmenter.cache_clear()
    try:
        example = str(mask2former_export / "examples" / "1000000.png")
        _, rows, found = app.segment(example, 0.0)
        assert rows and found == f"{len(rows)} instances scoring above 0.00."
        label, best = max(((row[0], row[1]) for row in rows), key=lambda row: row[1])
        assert best < 0.99  # (a random-init model is sure of nothing)
        overlay, rows, found = app.segment(example, 0.99)
        assert rows == []
        assert (
            found == f"No instance scores above 0.99: the best is {label} at {best:.2f}; lower the threshold to see it."
        )
        assert np.array_equal(np.asarray(overlay), np.asarray(Image.open(example).convert("RGB")))
    finally:
        app.segmenter.cache_clear()


def test_a_space_of_a_pushed_export_loads_it_from_the_hub_and_links_it(mask2former_export, tmp_path, capsys):
    """An export `gd_hf.push` recorded as pushed (its run_info.json) gives a Space that loads the repo (no copy
    of the weights), is titled by it and links it in its card; one pushed to a branch gets a copy, as a Space
    cannot name a branch."""
    export = tmp_path / "export"
    shutil.copytree(mask2former_export, export)
    (export / "run_info.json").write_text(json.dumps({"pushed_to": {"repo_id": "me/shapes-seg", "revision": None}}))
    space = write_space(str(export), tmp_path / "space")
    config = json.loads((space / "space_config.json").read_text())
    assert config["model"] == "me/shapes-seg" and config["title"] == "shapes-seg"
    assert not (space / "model").exists()
    assert SpaceCard.load(space / "README.md").data.to_dict()["models"] == ["me/shapes-seg"]
    assert "pushed to me/shapes-seg: the Space loads it from there" in capsys.readouterr().out
    (export / "run_info.json").write_text(json.dumps({"pushed_to": {"repo_id": "me/shapes-seg", "revision": "v2"}}))
    space = write_space(str(export), tmp_path / "space2")
    assert json.loads((space / "space_config.json").read_text())["model"] == "model" and (space / "model").is_dir()


@pytest.mark.parametrize("damage", ["config.json cut", "id2label of words", "eval_results.json cut", "README.md cut"])
def test_a_damaged_export_is_a_one_line_error_and_out_is_untouched(mask2former_export, tmp_path, capsys, damage):
    export = tmp_path / "export"
    shutil.copytree(mask2former_export, export)
    if damage == "config.json cut":
        (export / "config.json").write_text((export / "config.json").read_text()[:40])
    elif damage == "id2label of words":
        config = json.loads((export / "config.json").read_text())
        config["id2label"] = {"circle": "circle", "square": "square"}
        (export / "config.json").write_text(json.dumps(config))
    elif damage == "eval_results.json cut":
        (export / "eval_results.json").write_text('{"AP": ')
    else:
        (export / "README.md").write_text("---\nlicense: [\n---\n")
    assert main([str(export), str(tmp_path / "space")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "export it again" in err
    assert not (tmp_path / "space").exists()


@pytest.mark.parametrize("model_id", ["not an id", "a/b/c", "x/y!"])
def test_an_invalid_model_id_is_refused_before_anything_is_written(mask2former_export, tmp_path, capsys, model_id):
    assert main([str(mask2former_export), str(tmp_path / "space"), "--model-id", model_id]) == 2
    assert "is not a hub model id (owner/name)" in capsys.readouterr().err
    assert not (tmp_path / "space").exists()
