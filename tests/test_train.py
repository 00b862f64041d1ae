"""End-to-end runs of the training recipe on the tiny synthetic set (a few seconds each)."""

import json
import time

import pytest
import torch
from accelerate.utils import DistributedType
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

import gd_hf.run.periodic as periodic_module
from gd_hf.config import RecipeError
from gd_hf.data.coco import DataError
from gd_hf.run.distributed import check_distributed_type
from gd_hf.train import main, train

from .conftest import DEMO_RECIPE, demo_recipe, tiny_overrides


def run(synthetic_root, output_dir, *extra):
    recipe = demo_recipe(tiny_overrides(synthetic_root, output_dir) + list(extra))
    return train(recipe)


def losses(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_run_writes_checkpoints_exports_metrics_and_predictions(synthetic_root, tmp_path):
    out = tmp_path / "run"
    called = time.time()
    metrics = run(synthetic_root, out, "train.eval_every=2", "train.keep_checkpoints=1")
    finished = time.time()
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]  # keep-last-1
    for export in ("final", "best"):
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
            p.name for p in (out / export).iterdir()
        }
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "rectangle", "2": "triangle", "3": "cross"}
    predictions = json.loads((out / "predictions" / "val_step_00000004.json").read_text())
    assert predictions and {"image_id", "category_id", "segmentation", "score"} <= set(predictions[0])
    assert {r["category_id"] for r in predictions} <= {1, 2, 3, 4}  # COCO ids, not contiguous ones
    # What a run at scale needs to be read from its log: start-up, memory, where an evaluation's time goes.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    since_launch = [r["seconds_since_launch"] for r in steps]
    # Seconds since this process started (here: the test session, so no fixed bound holds on a slow machine).
    import psutil

    started = psutil.Process().create_time()
    # Counted from the process's start: later than the call into train() began, earlier than it returned.
    assert since_launch == sorted(since_launch) and called - started < since_launch[0] <= since_launch[-1]
    assert since_launch[-1] < finished - started
    assert 0 < steps[0]["seconds_to_first_step"] < since_launch[0]  # once, in the launch's first log line
    assert not any("seconds_to_first_step" in r for r in steps[1:])
    rss = [r["peak_rss_gb"] for r in steps]
    assert rss == sorted(rss) and 0.1 < rss[0] < 24  # a peak never goes down; this process holds torch at least
    evaluations = [r for r in records if "val/AP" in r]
    assert len(evaluations) == 2
    for stage in ("forward", "postprocess", "encode"):
        assert all(r[f"eval/{stage}_s_per_image"] > 0 for r in evaluations)
    assert all(r["eval/cocoeval_s"] > 0 for r in evaluations)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert json.loads((out / "final_metrics.json").read_text())["final"] == metrics
    assert (out / "recipe.yaml").is_file()


def test_resume_continues_with_identical_state(synthetic_root, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "a"
    run(synthetic_root, uninterrupted)

    # Crash right after the step-2 checkpoint is written, then resume with `resume: auto`.
    interrupted = tmp_path / "b"
    real_save = periodic_module.save_checkpoint

    def save_then_crash(accelerator, directory, step, state, keep, *rest):
        path = real_save(accelerator, directory, step, state, keep, *rest)
        if step == 2:
            # As if the run went on a little past its checkpoint before dying.
            with (interrupted / "metrics.jsonl").open("a") as log:
                log.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(periodic_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(synthetic_root, interrupted)
    monkeypatch.setattr(periodic_module, "save_checkpoint", real_save)
    assert not (interrupted / "final").exists()
    run(synthetic_root, interrupted)

    assert losses(interrupted) == losses(uninterrupted)  # steps 3-4 saw the same data, weights and lr
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 1  # the line logged after the checkpoint was dropped
    a = load_file(uninterrupted / "final" / "model.safetensors")
    b = load_file(interrupted / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_ignores_a_partial_checkpoint(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    run(synthetic_root, out, "train.max_steps=2")
    (out / "checkpoints" / ".tmp_step_00000003").mkdir()  # a write that was killed
    run(synthetic_root, out, "train.max_steps=3")
    assert "ignoring partial checkpoint" in caplog.text
    assert sorted(losses(out)) == [1, 2, 3]


def test_resume_none_refuses_to_overwrite_checkpoints(synthetic_root, tmp_path):
    out = tmp_path / "run"
    run(synthetic_root, out, "train.max_steps=2")
    with pytest.raises(RecipeError, match="resume: none, but .* already holds checkpoints"):
        run(synthetic_root, out, "resume=none")


def test_exported_model_works_in_pipeline_offline(synthetic_root, tmp_path):
    out = tmp_path / "run"
    run(synthetic_root, out, "train.max_steps=2")
    segmenter = pipeline("image-segmentation", model=str(out / "final"))
    image = Image.open(synthetic_root / "val" / "1000000.png")
    segments = segmenter(image, subtask="instance", threshold=0.0)
    assert segments, "an instance pipeline with threshold 0 returns the top queries"
    assert {s["label"] for s in segments} <= {"circle", "rectangle", "triangle", "cross"}
    assert all(s["mask"].size == image.size for s in segments)


def test_bad_input_fails_before_writing_anything(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = [DEMO_RECIPE, *tiny_overrides(synthetic_root, out)]
    assert main([*args, f"data.val_images={tmp_path / 'missing'}"]) == 2
    assert f"image folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "data.labeled_percent=0.01", f"data.split_file={tmp_path / 'nope.json'}"]) == 2
    assert "split file" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "train.max_stepz=3"]) == 2
    assert "did you mean `train.max_steps`" in capsys.readouterr().err
    assert not out.exists()


def test_missing_folder_error_names_it(synthetic_root, tmp_path):
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'missing'} does not exist"):
        run(synthetic_root, tmp_path / "run", f"data.val_images={tmp_path / 'missing'}")
    assert not (tmp_path / "run").exists()


def test_empty_labeled_split_is_an_error(synthetic_root, tmp_path):
    (tmp_path / "split.txt").write_text("# only an image without objects would be empty; here: none at all\n")
    with pytest.raises(DataError, match="labeled split is empty"):
        run(synthetic_root, tmp_path / "run", f"data.split_file={tmp_path / 'split.txt'}")
    assert not (tmp_path / "run").exists()


def test_empty_unlabeled_split_stops_a_one_launch_run_before_its_teacher_trains(synthetic_root, tmp_path):
    # Every image labeled and the unlabeled split kept apart: nothing to distill from. Said at start, not after
    # phase 1 has trained the teacher.
    args = ["ssl.enabled=true", "ssl.train_teacher_first=true", "ssl.unlabeled_includes_labeled=false"]
    with pytest.raises(DataError, match=r"unlabeled split of .* is empty \(data.labeled_percent 100"):
        run(synthetic_root, tmp_path / "run", *args)
    assert not (tmp_path / "run").exists()


def test_corrupt_training_image_names_the_file(tmp_path, synthetic_root):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "train" / "000001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*000001\.png \(image id 1\)"):
        run(root, tmp_path / "run", "train.max_steps=40", "data.on_error=raise")


@pytest.mark.parametrize("streaming", [False, True], ids=["map_style", "streaming"])
def test_corrupt_training_image_is_skipped_and_counted(tmp_path, synthetic_root, streaming):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    (root / "train" / "000001.png").write_bytes(b"not a png")
    # 24 images, batch 2: 13 steps read every image once at least.
    run(root, tmp_path / "run", "train.max_steps=13", "train.log_every=13", f"data.streaming={streaming}")
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["step"] == 13 and last["data_skipped"] >= 1


def test_standalone_evaluation_reproduces_the_training_metrics(synthetic_root, tmp_path, capsys):
    from gd_hf.evaluate import main as evaluate_main

    out = tmp_path / "run"
    metrics = run(synthetic_root, out, "train.max_steps=2", "eval.top_k=100")
    results = tmp_path / "results.json"
    code = evaluate_main(
        [
            str(out / "final"),
            str(synthetic_root / "annotations" / "instances_val.json"),
            str(synthetic_root / "val"),
            "--out",
            str(results),
            "--num-workers",
            "0",
        ]
    )
    assert code == 0
    # What the command prints (its own forward pass, post-processing and COCOeval) equals the training run's figures.
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == pytest.approx(metrics)
    from gd_hf.evaluation.mask_ap import coco_mask_ap

    assert coco_mask_ap(
        synthetic_root / "annotations" / "instances_val.json", json.loads(results.read_text())
    ) == pytest.approx(metrics)


def test_demo_recipe_generates_the_synthetic_set_when_absent(tmp_path):
    root = tmp_path / "synthetic"
    overrides = tiny_overrides(root, tmp_path / "run") + [
        "data.generate_synthetic=true",
        "data.synthetic_train_images=6",
        "data.synthetic_val_images=2",
        "data.synthetic_image_size=64",
        "train.max_steps=1",
    ]
    train(demo_recipe(overrides))
    assert len(list((root / "train").glob("*.png"))) == 6 and len(list((root / "val").glob("*.png"))) == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_bf16_mixed_precision_and_gradient_accumulation_train(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    run(
        synthetic_root,
        out,
        "train.mixed_precision=bf16",
        "train.batch_size=4",
        "train.gradient_accumulation_steps=2",
        "train.max_steps=2",
        "train.warmup_steps=5",
    )
    assert sorted(losses(out)) == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out).values())
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard logging when installed
    # A run that never leaves its warm-up is told at its start, and its card says so.
    said = "train.warmup_steps=5 is not below train.max_steps=2: the learning rate never leaves warm-up"
    assert said in caplog.text
    assert f"A short run: {said}" in (out / "final" / "README.md").read_text()


def test_existing_synthetic_set_of_another_size_is_named(synthetic_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    args = [DEMO_RECIPE, *tiny_overrides(root, tmp_path / "run")]
    assert main([*args, "data.generate_synthetic=true", "data.synthetic_train_images=2400"]) == 2
    assert (
        "holds a synthetic set of 24 training images (squares) but the recipe asks for 2400" in capsys.readouterr().err
    )
    varied = [
        *args,
        "data.generate_synthetic=true",
        "data.synthetic_train_images=24",
        "data.synthetic_varied_sizes=true",
    ]
    assert main(varied) == 2
    assert "24 training images (squares) but the recipe asks for 24 (mixed sizes)" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_parameter_sharding_strategies_stop_with_a_message(strategy):
    with pytest.raises(RecipeError, match="unsharded.*multi_gpu.yaml"):
        check_distributed_type(DistributedType[strategy])


@pytest.mark.parametrize("strategy", ["NO", "MULTI_CPU", "MULTI_GPU"])
def test_replicating_strategies_are_accepted(strategy):
    check_distributed_type(DistributedType[strategy])
