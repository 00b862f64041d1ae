"""Images as users have them (odd modes, EXIF rotation, truncated, huge) and the run's pre-flight checks."""

from __future__ import annotations

import io
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from gd_hf.config import DataConfig
from gd_hf.data.coco import DataError
from gd_hf.data.images import read_image
from gd_hf.data.loading import labeled_sample
from gd_hf.run.launches import check_output_folder, record_launch
from tests.conftest import ROOT, tiny_overrides

from .conftest import DEMO_RECIPE, demo_recipe


def record(image: Image.Image | bytes, width: int, height: int, fmt: str = "PNG", **save) -> dict:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **save)
        image = buffer.getvalue()
    return {"image": {"bytes": image, "path": f"test.{fmt.lower()}"}, "image_id": 7, "width": width, "height": height}


def test_grayscale_palette_rgba_and_cmyk_images_become_rgb():
    rgb = (200, 40, 90)
    cases = [
        Image.new("L", (6, 4), 120),
        Image.new("RGB", (6, 4), rgb).convert("P"),
        Image.new("RGBA", (6, 4), (*rgb, 30)),  # alpha is dropped, the colour kept
    ]
    for image in cases:
        pixels = read_image(record(image, 6, 4))
        assert pixels.shape == (3, 4, 6) and pixels.dtype == torch.uint8
    assert read_image(record(cases[0], 6, 4))[:, 0, 0].tolist() == [120, 120, 120]
    assert read_image(record(cases[2], 6, 4))[:, 0, 0].tolist() == list(rgb)
    cmyk = read_image(record(Image.new("CMYK", (6, 4), (0, 255, 0, 0)), 6, 4, fmt="JPEG"))
    assert cmyk.shape == (3, 4, 6) and cmyk[1].float().mean() < 60 and cmyk[0].float().mean() > 200  # magenta


def test_16_bit_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 4).reshape(4, 64).astype(np.uint16)
    pixels = read_image(record(Image.fromarray(values), 64, 4))
    assert pixels.shape == (3, 4, 64)
    expected = np.round(values.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.abs(pixels[0].numpy().astype(int) - expected).max() <= 1  # a ramp, not a white image


def test_predict_reads_a_16_bit_tiff_as_training_does(tmp_path):
    """`gd_hf.predict` must give the model the pixels it was trained and evaluated on: PIL's own
    convert("RGB") clips 16-bit values to white."""
    from gd_hf.predict import load_image

    values = np.linspace(0, 65535, 32 * 8).reshape(8, 32).astype(np.uint16)
    path = tmp_path / "scan.tif"
    Image.fromarray(values).save(path)
    trained_on = read_image({"image": {"path": str(path), "bytes": None}, "image_id": 1, "width": 32, "height": 8})
    predicted_on = torch.from_numpy(np.asarray(load_image(path)).copy()).permute(2, 0, 1)
    assert torch.equal(predicted_on, trained_on)
    assert predicted_on.float().std() > 50  # a ramp


def exif_rotated(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    return buffer.getvalue()


def test_exif_rotated_photo_follows_the_size_the_record_states():
    stored = Image.new("RGB", (8, 4), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 4, 4))  # white left half as stored
    data = exif_rotated(stored, 6)  # "rotate 90 CW to display": viewers show it 4 wide, 8 high
    shown = read_image(record(data, 4, 8))  # the annotation tool drew on the displayed image
    assert shown.shape == (3, 8, 4)
    assert shown[:, :4].float().mean() > 200 and shown[:, 4:].float().mean() < 50  # white on top once turned
    as_stored = read_image(record(data, 8, 4))  # the record states the stored size: left as stored
    assert as_stored.shape == (3, 4, 8) and as_stored[:, :, :4].float().mean() > 200
    with pytest.raises(DataError, match="is 8x4 but the annotation file says 5x5"):
        read_image(record(data, 5, 5))
    assert read_image(record(data, 0, 0)).shape == (3, 8, 4)  # no stated size (image folder): as displayed


def test_truncated_jpeg_is_a_data_error_naming_the_file():
    full = record(Image.new("RGB", (64, 64), (10, 20, 30)), 64, 64, fmt="JPEG")
    truncated = {**full, "image": {"bytes": full["image"]["bytes"][:200], "path": "photos/cut.jpg"}}
    with pytest.raises(DataError, match=r"cannot read image photos/cut\.jpg \(image id 7\)"):
        read_image(truncated)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_10k_by_10k_image_is_read_and_trained_on():
    big = Image.new("L", (10_000, 10_000), 0)
    big.paste(255, (2_000, 2_000, 6_000, 6_000))
    example = record(big, 10_000, 10_000)
    rle_counts = _square_rle(10_000, 2_000, 6_000)
    example["objects"] = {"category": [1], "rle_counts": [rle_counts], "iscrowd": [0]}
    sample = labeled_sample(example, DataConfig(crop_size=64, min_scale=1.0, max_scale=1.0, hflip_prob=0.0), seed=0)
    assert sample["image"].shape == (3, 64, 64) and sample["masks"].shape == (1, 64, 64)
    # The object is 40 % of each side: it stays a square of ~26 px at the training size.
    assert abs(int(sample["masks"][0].sum()) - 26 * 26) < 120
    assert bool((sample["image"][0][sample["masks"][0]] > 200).float().mean() > 0.9)


def _square_rle(size: int, start: int, stop: int) -> str:
    from pycocotools import mask as mask_utils

    mask = np.zeros((size, size), dtype=np.uint8)
    mask[start:stop, start:stop] = 1
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode()


def test_image_over_the_decompression_bomb_limit_is_a_data_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x this is PIL's hard limit
    with pytest.raises(DataError, match="cannot read image"):
        read_image(record(Image.new("RGB", (100, 100)), 100, 100))


# --- pre-flight and reproducibility -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "is not writable" in check_output_folder(locked / "run", 1)
    finally:
        locked.chmod(0o700)


def test_output_folder_checks(tmp_path):
    assert check_output_folder(tmp_path / "new" / "run", 1000) is None
    problem = check_output_folder(tmp_path / "run", 10**18)
    assert "GB free but the run needs about" in problem and "keep_checkpoints" in problem
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in check_output_folder(tmp_path / "file" / "run", 1)


def test_a_run_without_space_stops_before_writing(synthetic_root, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module

    from gd_hf.train import main

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "run"
    assert main([DEMO_RECIPE, *tiny_overrides(synthetic_root, out)]) == 2
    assert "GB free but the run needs about" in capsys.readouterr().err
    assert not out.exists()


def test_each_launch_records_versions_commit_and_command(synthetic_root, tmp_path):
    from gd_hf.train import train

    out = tmp_path / "run"
    train(demo_recipe(tiny_overrides(synthetic_root, out)))
    train(demo_recipe(tiny_overrides(synthetic_root, out)))  # resumes
    launches = json.loads((out / "run_info.json").read_text())
    assert len(launches) == 2
    first = launches[0]
    assert first["versions"]["torch"] == torch.__version__.split("+")[0] or first["versions"]["torch"].startswith(
        torch.__version__.split("+")[0]
    )
    assert {"transformers", "accelerate", "datasets", "python", "gd_hf"} <= set(first["versions"])
    assert first["command"] and first["num_processes"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # the suite runs from a git checkout (CI's clone): the run must name its commit
        assert first["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    else:
        assert first["git_commit"] is None
    assert (out / "recipe.yaml").is_file()
    record_launch(out, 2, "bf16")
    assert json.loads((out / "run_info.json").read_text())[-1]["num_processes"] == 2


def test_git_commit_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    from gd_hf.run.launches import git_commit

    assert git_commit(tmp_path) is None  # not a checkout
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run(["git", "add", "a.txt"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "c"], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert git_commit(tmp_path) == head + "-dirty"
