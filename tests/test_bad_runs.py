"""Output folders and relaunches off the happy path: unwritable, full, locked or in use by another launch;
damaged checkpoints (`DAMAGES`: resume falls back, bitwise the same), unreadable or malicious ones; torn or junk
metrics lines; relaunches that change what is trained, extend it, or name the same folders another way; one-launch
runs relaunched; what each launch records; an unexpected error's exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gd_hf.run.launches import check_output_folder, record_launch
from gd_hf.train import main

from .conftest import (
    DEMO_RECIPE,
    ROOT,
    demo_recipe,
    final_weights,
    launch,
    main_outcome,
    run_tiny,
    same_weights,
    tiny_overrides,
)


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


DAMAGES = [
    "truncated weights",
    "empty trainer state",
    "truncated optimizer",
    "unreadable RNG state",
    "missing optimizer",
    "missing schedule",
    "missing RNG state",
    "schedule holding code",
    "negative step",
    "optimizer holding code",
    "NaN in the weights",  # a valid file: resumed, the run turned NaN, and so did every relaunch
    "NaN in the optimizer's moments",
    "another model's optimizer",  # same groups and counts: loaded, then the first step crashed, every relaunch
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_ends_bitwise_the_same(
    synthetic_root, tmp_path, caplog, damage
):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.checkpoint_every=1", "train.keep_checkpoints=3") == 0
    uninterrupted = final_weights(out)
    newest = out / "checkpoints" / "step_00000004"
    if damage == "truncated weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty trainer state":
        (newest / "trainer_state.json").write_text("")
    elif damage == "truncated optimizer":
        optimizer = newest / "optimizer.bin"
        optimizer.write_bytes(optimizer.read_bytes()[:-100])
    elif damage == "unreadable RNG state":
        (newest / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    elif damage.startswith("missing"):
        name = {"missing optimizer": "optimizer.bin", "missing schedule": "gd_hf_state_0.pt"}.get(damage)
        (newest / (name or "random_states_0.pkl")).unlink()
    elif damage == "schedule holding code":
        torch.save({"lr_lambdas": [Payload(tmp_path / "pwned")]}, newest / "gd_hf_state_0.pt")
    elif damage == "optimizer holding code":
        torch.save({"state": {}, "param_groups": [Payload(tmp_path / "pwned")]}, newest / "optimizer.bin")
    elif damage == "NaN in the weights":
        from safetensors.torch import load_file, save_file

        weights = load_file(newest / "model.safetensors")
        name = next(n for n, t in weights.items() if t.is_floating_point())
        weights[name].view(-1)[0] = float("nan")
        save_file(weights, newest / "model.safetensors", metadata={"format": "pt"})
    elif damage in ("NaN in the optimizer's moments", "another model's optimizer"):
        optimizer = torch.load(newest / "optimizer.bin", weights_only=True)
        first = next(iter(optimizer["state"].values()))
        if damage.startswith("NaN"):
            first["exp_avg"].view(-1)[0] = float("nan")
        else:  # every moment of another shape: the optimizer of a model with other sizes
            for moments in optimizer["state"].values():
                moments["exp_avg"] = torch.zeros(*moments["exp_avg"].shape, 7)
                moments["exp_avg_sq"] = torch.zeros(*moments["exp_avg_sq"].shape, 7)
        torch.save(optimizer, newest / "optimizer.bin")
    else:
        state = json.loads((newest / "trainer_state.json").read_text())
        (newest / "trainer_state.json").write_text(json.dumps({**state, "step": -3}))
    caplog.set_level("WARNING")
    # The relaunch passes over step 4, resumes from step 3 and trains step 4 again: to the same weights.
    assert run_tiny(synthetic_root, out, "train.checkpoint_every=1", "train.keep_checkpoints=3") == 0
    assert "step_00000004 cannot be resumed from" in caplog.text
    assert "resuming from" in caplog.text and "step_00000003, the newest checkpoint that reads whole" in caplog.text
    assert same_weights(final_weights(out), uninterrupted)
    assert all(t.isfinite().all() for t in uninterrupted.values())
    assert not (tmp_path / "pwned").exists()


class Payload:
    """A pickle that runs code when loaded without `weights_only`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.checkpoint_every=1") == 0
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "trainer_state.json").write_text("{")
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 2
    assert "can be resumed from" in capsys.readouterr().err


def test_a_torn_last_log_line_is_dropped_at_relaunch(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 1.2')  # a kill (or a full disk) in the middle of an append
    caplog.set_level("WARNING")
    assert run_tiny(synthetic_root, out, "train.max_steps=4") == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert "which is not whole" in caplog.text


def test_a_malicious_pickle_in_a_checkpoint_is_not_run(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.checkpoint_every=1") == 0
    marker = tmp_path / "pwned"
    for checkpoint in (out / "checkpoints").iterdir():
        torch.save({"lr_lambdas": [Payload(marker)]}, checkpoint / "gd_hf_state_0.pt")  # the schedule's file
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 2
    err = capsys.readouterr().err
    assert "gd_hf_state_0.pt cannot be read (UnpicklingError" in err and "no checkpoint" in err
    assert not marker.exists()


def test_a_relaunch_that_changes_what_is_trained_stops_naming_each_key(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.lr=1e-3") == 0
    recipe_before = (out / "recipe.yaml").read_text()
    card_before = (out / "final" / "README.md").read_text()
    assert run_tiny(synthetic_root, out, "train.max_steps=3", "train.lr=5e-4", "data.labeled_percent=50") == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.0005" in err and "data.labeled_percent: 100.0 -> 50.0" in err
    assert "resume=force" in err and "another output_dir" in err
    assert (out / "recipe.yaml").read_text() == recipe_before  # the record is as it was
    assert (out / "final" / "README.md").read_text() == card_before
    assert len(json.loads((out / "run_info.json").read_text())) == 1


def test_a_relaunch_may_extend_the_run_and_force_records_a_change(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2", "train.lr=1e-3") == 0
    caplog.set_level("INFO")
    assert run_tiny(synthetic_root, out, "train.max_steps=3", "train.lr=1e-3", "train.log_every=2") == 0
    assert "relaunch: train.log_every: 1 -> 2, train.max_steps: 2 -> 3" in caplog.text
    assert run_tiny(synthetic_root, out, "train.max_steps=4", "train.lr=5e-4", "resume=force") == 0
    launches = json.loads((out / "run_info.json").read_text())
    assert [launch["resumed_at_step"] for launch in launches] == [None, 2, 3]
    assert launches[2]["recipe_changes"]["train.lr"] == [0.001, 0.0005]
    assert launches[2]["recipe"]["train"]["lr"] == 0.0005 and launches[0]["recipe"]["train"]["lr"] == 0.001
    card = (out / "final" / "README.md").read_text()
    assert "Trained in 3 launches" in card and "resumed at step 3 with" in card and "train.lr: 0.001 -> 0.0005" in card


def test_a_second_launch_on_a_folder_in_use_stops_naming_the_holder_and_a_dead_holder_is_taken_over(
    synthetic_root, tmp_path, capsys
):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=1") == 0
    hold = (
        "import sys, time; from gd_hf.run.launches import lock_output_folder; "
        f"assert lock_output_folder({str(out)!r}) is None; print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_tiny(synthetic_root, out, "train.max_steps=2") == 2
        err = capsys.readouterr().err
        assert f"is in use by another launch (pid {holder.pid} on" in err
        assert len(json.loads((out / "run_info.json").read_text())) == 1  # nothing written by the second
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0  # the dead holder's lock is free


def test_the_free_space_check_counts_a_resumed_runs_own_checkpoints_as_its_own(tmp_path, monkeypatch):
    import shutil as shutil_module

    from gd_hf.run.launches import check_output_folder

    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000001").mkdir(parents=True)
    (out / "checkpoints" / "step_00000001" / "model.safetensors").write_bytes(b"\0" * 100_000)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=50_000))
    assert check_output_folder(out, 120_000) is None  # 100 kB of it is the run's, replaced as it goes
    assert "GB free but the run needs" in check_output_folder(out, 200_000)


def test_an_unexpected_error_exits_1_with_the_traceback_and_a_last_line_naming_it(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    import gd_hf.run.phase as phase_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(phase_module, "build_teacher", broken)
    assert launch(synthetic_root, tmp_path / "run") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert any("ZeroDivisionError: a bug" in line for line in lines)
    assert lines[-1] == "gd_hf.train: " + main_outcome(1)


def test_checkpoints_are_flushed_to_disk_before_they_are_renamed_into_place(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.files as files

    flushed, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: (renamed.append((str(a), len(flushed))), real_replace(a, b))[1]
    )
    assert launch(synthetic_root, tmp_path / "run", "train.max_steps=2", "train.checkpoint_every=1") == 0
    checkpoint_renames = [(a, n) for a, n in renamed if ".tmp_step_" in a]
    assert len(checkpoint_renames) == 2
    for tmp, flushed_before in checkpoint_renames:
        files_flushed = [f for f in flushed[:flushed_before] if f.startswith(tmp + "/")]
        assert {Path(f).name for f in files_flushed} >= {"model.safetensors", "optimizer.bin", "trainer_state.json"}


def test_a_relaunch_naming_the_same_folders_another_way_is_not_a_change(synthetic_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    monkeypatch.chdir(synthetic_root.parent)
    relative = [o.replace(f"{synthetic_root}/", f"{synthetic_root.name}/") for o in tiny_overrides(synthetic_root, out)]
    assert relative != tiny_overrides(synthetic_root, out)
    assert main([DEMO_RECIPE, *relative, "train.max_steps=3"]) == 0
    assert json.loads((out / "run_info.json").read_text())[-1]["recipe_changes"] == {"train.max_steps": [2, 3]}


ONE_LAUNCH = ["ssl.enabled=true", "ssl.train_teacher_first=true", "ssl.teacher_max_steps=2", "ssl.burn_in_steps=1",
              "ssl.unlabeled_batch_size=2", "train.max_steps=2"]  # fmt: skip


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_one_launch_run_locks_its_folder_before_phase_1(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    hold = f"from gd_hf.run.launches import lock_output_folder; import time; lock_output_folder({str(out)!r}); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run_tiny(synthetic_root, out, *ONE_LAUNCH) == 2
        assert "is in use by another launch" in capsys.readouterr().err
        assert not (out / "teacher").exists()  # phase 1 did not start
    finally:
        holder.kill()
        holder.wait()


def test_a_one_launch_relaunch_on_a_folder_of_another_run_stops_before_phase_1(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0  # a supervised run
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH) == 2
    assert "ssl.enabled: False -> True" in capsys.readouterr().err
    assert not (out / "teacher").exists()


def test_a_one_launch_relaunch_leaves_the_teacher_and_compares_the_launched_recipe(synthetic_root, tmp_path, capsys):
    import shutil

    first = tmp_path / "first"
    assert run_tiny(synthetic_root, first, *ONE_LAUNCH) == 0
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    teacher_final = sha(moved / "teacher" / "final" / "model.safetensors")
    # Extended (an allowed change), in a moved folder: phase 1 is not run again, the teacher stays as it was.
    assert run_tiny(synthetic_root, moved, *ONE_LAUNCH, "train.max_steps=3") == 0
    assert sha(moved / "teacher" / "final" / "model.safetensors") == teacher_final
    card = (moved / "final" / "README.md").read_text()
    note = next(line for line in card.splitlines() if "Trained in 2 launches" in line)
    assert "output_dir: '.../first' -> '.../moved'" in note and str(tmp_path) not in note  # no machine path
    assert len(json.loads((moved / "teacher" / "run_info.json").read_text())) == 1
    assert json.loads((moved / "run_info.json").read_text())[-1]["recipe_changes"] == {
        "output_dir": [str(first), str(moved)],
        "train.max_steps": [2, 3],
    }
    capsys.readouterr()
    # A key of phases 2-3 is named as a change of the student's run, not of the teacher's.
    assert run_tiny(synthetic_root, moved, *ONE_LAUNCH, "train.max_steps=4", "ssl.unsup_loss_weight=3") == 2
    err = capsys.readouterr().err
    assert f"changes what the run in {moved} trained" in err and "ssl.unsup_loss_weight: 0.5 -> 3.0" in err


def test_a_one_launch_run_resumed_from_a_named_checkpoint(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH, "train.checkpoint_every=1") == 0
    named = out / "checkpoints" / "step_00000001"
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH, "train.checkpoint_every=1", f"resume={named}") == 0
    assert json.loads((out / "run_info.json").read_text())[-1]["resumed_at_step"] == 1


def test_the_card_names_only_the_launches_that_trained_its_weights(synthetic_root, tmp_path):
    import shutil

    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    assert "Trained in 2 launches" in (out / "final" / "README.md").read_text()
    for name in ("checkpoints", "best", "final"):
        shutil.rmtree(out / name, ignore_errors=True)
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0  # a fresh start
    assert "launches" not in (out / "final" / "README.md").read_text()
    assert len(json.loads((out / "run_info.json").read_text())) == 3  # the record keeps all of them


def test_an_unreadable_run_record_is_kept_aside_not_overwritten(synthetic_root, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    (out / "run_info.json").write_text('[{"x"')
    caplog.set_level("WARNING")
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    assert (out / "run_info.json.unreadable").read_text() == '[{"x"'
    assert "cannot be read: kept as" in caplog.text


@pytest.mark.parametrize("junk", ['{"step": null, "loss": 1}', '{"step": "7"}', "[1, 2]", "not json at all"])
def test_junk_lines_in_the_metrics_log_are_dropped_at_relaunch(synthetic_root, tmp_path, junk):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    log = out / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], junk, *lines[1:]]) + "\n")
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    assert junk not in log.read_text()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines() if "loss" in line] == [1, 2, 3]


def test_an_output_folder_whose_lock_cannot_be_written_is_exit_2(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    (out / ".gd_hf.lock").mkdir(parents=True)  # as root, permissions do not stop a write: a folder does
    assert run_tiny(synthetic_root, out) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err


def test_a_one_launch_run_relaunched_from_its_own_recipe_file_goes_on(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, *ONE_LAUNCH) == 0
    assert main([str(out / "recipe.yaml"), "train.max_steps=3"]) == 0
    assert json.loads((out / "run_info.json").read_text())[-1]["recipe_changes"] == {"train.max_steps": [2, 3]}


def test_a_one_launch_run_resumed_from_another_folders_checkpoint_does_not_train_a_teacher(synthetic_root, tmp_path):
    first = tmp_path / "first"
    assert run_tiny(synthetic_root, first, *ONE_LAUNCH, "train.checkpoint_every=1") == 0
    second = tmp_path / "second"
    named = first / "checkpoints" / "step_00000001"
    assert run_tiny(synthetic_root, second, *ONE_LAUNCH, f"resume={named}") == 0
    assert not (second / "teacher").exists()  # the checkpoint holds the teacher it started from
    assert json.loads((second / "run_info.json").read_text())[-1]["resumed_at_step"] == 1


def test_checkpoint_needs_the_files_of_the_processes_that_wrote_it(synthetic_root, tmp_path):
    from gd_hf.run.checkpointing import checkpoint_problem

    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=1", "train.checkpoint_every=1") == 0
    checkpoint = out / "checkpoints" / "step_00000001"
    assert checkpoint_problem(checkpoint) is None  # written by 1 process: resumable by any number
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 1
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    assert "random_states_1.pkl" in checkpoint_problem(checkpoint)
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"")
    assert "written by an older gd_hf" in checkpoint_problem(checkpoint)


def test_a_run_record_with_odd_fields_does_not_stop_a_relaunch(synthetic_root, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.max_steps=2") == 0
    (out / "run_info.json").write_text(json.dumps([{"resumed_at_step": 1, "recipe_changes": []}]))
    assert run_tiny(synthetic_root, out, "train.max_steps=3") == 0
    card = (out / "final" / "README.md").read_text()
    assert "Trained in more than 2 launches" in card  # the record of the first launch is gone: not "from step 0"


@pytest.mark.parametrize("error", ["ENOSPC", "EFBIG", "wrapped"])
def test_a_full_disk_is_exit_2_saying_so_and_the_relaunch_resumes(synthetic_root, tmp_path, monkeypatch, capsys, error):
    """A full disk or a file-size limit mid-run (here at the second checkpoint) is not "an unexpected error ...
    please report it": exit 2 names it, and a relaunch with space goes on from the last checkpoint."""
    import errno as errnos

    import gd_hf.run.periodic as periodic_module

    real_save, calls = periodic_module.save_checkpoint, []

    def full_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if error == "wrapped":  # as torch.save and safetensors report it
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device")
            code = getattr(errnos, error)
            raise OSError(code, os.strerror(code))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(periodic_module, "save_checkpoint", full_at_the_second)
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out) == 2
    err = capsys.readouterr().err
    assert "the disk is full or a file-size limit was reached" in err and "Traceback" not in err
    assert "a bad recipe, data or output folder, or a full disk" in err.strip().splitlines()[-1]
    monkeypatch.setattr(periodic_module, "save_checkpoint", real_save)
    assert run_tiny(synthetic_root, out) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_what_a_killed_launch_left_half_done_is_put_right_by_the_next(synthetic_root, tmp_path, caplog):
    """A kill while an export was written leaves `.final.tmp.*` (the size of the model; no later launch removed
    them) or, between moving the previous export aside and renaming the new one in, `.best.old` and no `best/`:
    the next launch removes the one and puts the other back."""
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "train.eval_every=2") == 0
    best = sorted(p.name for p in (out / "best").iterdir())
    (out / ".final.tmp.k1ll3d").mkdir()
    (out / ".final.tmp.k1ll3d" / "model.safetensors").write_bytes(b"half")
    os.replace(out / "best", out / ".best.old")
    caplog.set_level("WARNING")
    assert run_tiny(synthetic_root, out, "train.eval_every=2") == 0
    assert not list(out.glob(".*.tmp.*")) and not (out / ".best.old").exists()
    assert sorted(p.name for p in (out / "best").iterdir()) == best
    assert "removed .final.tmp.k1ll3d" in caplog.text and "put best/ back" in caplog.text


@pytest.mark.parametrize("edit", ["annotations", "image"])
def test_data_changed_in_place_is_a_change_to_what_is_trained(synthetic_root, tmp_path, capsys, edit):
    """The recipe names the same files, but an annotation was edited or a training image replaced at its path: a
    relaunch stops (exit 2) naming the files, as for a changed key; `resume=force` goes on and records it."""
    import shutil

    import numpy as np
    from PIL import Image

    root, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synthetic_root, root)
    assert run_tiny(root, out) == 0
    if edit == "annotations":
        path = root / "annotations" / "instances_train.json"
        coco = json.loads(path.read_text())
        coco["annotations"] = coco["annotations"][:-1]
        path.write_text(json.dumps(coco))
        key = "data.train_annotations (the files)"
    else:
        pixels = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / "000002.png")
        key = "data.train_images (the files)"
    capsys.readouterr()
    assert run_tiny(root, out, "train.max_steps=6") == 2
    err = capsys.readouterr().err
    assert "this relaunch changes what the run" in err and key in err
    assert run_tiny(root, out, "train.max_steps=6", "resume=force") == 0
    launches = json.loads((out / "run_info.json").read_text())  # (a list of launches)
    assert key in launches[-1]["recipe_changes"]


def test_a_relaunch_may_change_the_trackers_and_the_data_sets_name(synthetic_root, tmp_path):
    """Neither changes what is trained: the relaunch goes on (it stopped with exit 2)."""
    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out) == 0
    assert run_tiny(synthetic_root, out, "train.max_steps=6", "train.report_to=none", "data.dataset_name=shapes") == 0
    assert json.loads((out / "final_metrics.json").read_text())["final"]


@pytest.mark.parametrize("name", ["metrics.jsonl", "run_info.json"])
def test_a_folder_where_the_run_writes_a_file_is_exit_2_before_any_work(synthetic_root, tmp_path, capsys, name):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    assert run_tiny(synthetic_root, out) == 2
    err = capsys.readouterr().err
    assert f"{out / name} is not a file (the run writes its {name} there): move it away" in err
    assert sorted(p.name for p in out.iterdir() if p.name != ".gd_hf.lock") == [name]  # (the lock: held, not data)


def test_the_data_fingerprint_counts_data_files_only_and_any_file_name(tmp_path):
    """A `.DS_Store` or a note beside the images changes no record (it stopped a relaunch as "data changed"); a
    file name that is not UTF-8 is hashed, not a crash of every launch; a replaced image is seen."""
    from gd_hf.data.fingerprint import folder_digest

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(b"x" * 10)
    before = folder_digest(folder)
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / "notes.txt").write_text("labelled by Ann")
    assert folder_digest(folder) == before
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(b"y")
    with_odd_name = folder_digest(folder)
    assert with_odd_name != before
    (folder / "1.jpg").write_bytes(b"x" * 11)
    assert folder_digest(folder) not in (before, with_odd_name)


def test_a_launch_that_stops_before_its_val_check_ends_cuts_the_check_short(synthetic_root, tmp_path, monkeypatch):
    """The val images are read in the background while the model is built; a launch refused before it waits for
    the verdict (here a relaunch that changes train.lr) stops the check: the images not read yet are not read (at
    COCO's size the process waited ~20 s for them on its way out)."""
    import threading
    import time

    import gd_hf.data.images as images

    out = tmp_path / "run"
    assert run_tiny(synthetic_root, out, "data.records_cache=null") == 0
    release, read = threading.Event(), []
    real = images.check_image

    def blocked(example):
        read.append(example["image_id"])
        release.wait(30)
        return real(example)

    monkeypatch.setattr(images, "check_image", blocked)
    started = time.perf_counter()
    assert run_tiny(synthetic_root, out, "data.records_cache=null", "train.lr=1e-3") == 2  # refused, not waiting
    assert time.perf_counter() - started < 25
    release.set()
    time.sleep(0.5)
    assert 0 < len(read) < 8  # those in flight when it stopped; not the rest


def test_ctrl_c_through_accelerate_launch_exits_130_and_the_relaunch_resumes(synthetic_root, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group (accelerate's launcher and gd_hf.train): the launcher
    exits 130, what was written is whole, and the same run relaunched resumes from its last checkpoint."""
    import signal

    out = tmp_path / "run"
    launch_command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                      str(ROOT / "accelerate_configs" / "cpu.yaml"), "-m", "gd_hf.train", DEMO_RECIPE,
                      *tiny_overrides(synthetic_root, out), "train.checkpoint_every=5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(launch_command + ["train.max_steps=400"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step_00000010").is_dir() and time.monotonic() < deadline:
        assert launcher.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)
    assert launcher.wait(timeout=60) == 130
    finished = subprocess.run(launch_command + ["train.max_steps=40"], cwd=ROOT, env=env, capture_output=True,
                              text=True)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    launches = json.loads((out / "run_info.json").read_text())
    assert 10 <= launches[-1]["resumed_at_step"] < 40 and (out / "final" / "model.safetensors").is_file()
