"""Real processes: SIGKILL in the middle of a run then resume, and 2 DDP processes vs 1 (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gd_hf.config import ModelConfig
from gd_hf.models.eomt import MaskAnnealing
from tests.conftest import EOMT_TINY, tiny_overrides

from .conftest import DEMO_RECIPE

pytestmark = pytest.mark.slow
# One thread per process: 2 processes x 2 threads on 2 cores makes steps swing wildly (hf-notes).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def ssl_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        DEMO_RECIPE,
        *tiny_overrides(root, out),
        "ssl.enabled=true",
        "ssl.train_teacher_first=true",
        "ssl.teacher_max_steps=3",
        "ssl.burn_in_steps=3",
        "ssl.unlabeled_batch_size=4",
        "ssl.pseudo_label_score_threshold=0.2",
        "ssl.pseudo_label_min_area=1",
        "ssl.ema_decay=0.5",
        "train.batch_size=4",
        "train.max_steps=6",
        "train.checkpoint_every=1",
        *extra,
    ]


def train_command(args: list[str], processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "gd_hf.train", *args]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gd_hf.train", *args,
    ]  # fmt: skip


def run_to_end(args: list[str], processes: int = 1) -> None:
    result = subprocess.run(train_command(args, processes), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def kill_after_checkpoint(args: list[str], checkpoint: Path, processes: int = 1) -> None:
    """Start a run and SIGKILL it (every process of the launch) as soon as `checkpoint` exists (it is then
    inside the next step)."""
    process = subprocess.Popen(
        train_command(args, processes), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the launcher and its workers die together
    )  # fmt: skip
    deadline = time.time() + 300
    while not checkpoint.is_dir():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # The launcher is gone; its workers may take a moment longer to die (a SIGKILL waits for a write in flight),
    # and a worker holds the output folder's lock until it has: the relaunch must not race it.
    while time.time() < deadline + 60:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


@pytest.mark.parametrize(
    ("phase_folder", "killed_after"),
    [("teacher", 2), (".", 1), (".", 4)],
    ids=["killed_in_phase_1", "killed_in_burn_in", "killed_in_ema"],
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(synthetic_root, tmp_path, phase_folder, killed_after):
    """One `train_teacher_first` launch killed (SIGKILL: no handler runs) in phase 1, in burn-in or in the EMA
    phase, then launched again with the same command: the same teacher, student, losses and metrics, bitwise."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(ssl_args(synthetic_root, reference))
    checkpoint = killed / phase_folder / "checkpoints" / f"step_{killed_after:08d}"
    kill_after_checkpoint(ssl_args(synthetic_root, killed), checkpoint)
    assert not (killed / "final").exists()
    run_to_end(ssl_args(synthetic_root, killed))  # resume: auto

    t_ref, t_killed = weights(reference / "teacher" / "final"), weights(killed / "teacher" / "final")
    assert all(torch.equal(t_ref[k], t_killed[k]) for k in t_ref)  # phase 1's export
    assert losses(killed / "teacher") == losses(reference / "teacher")

    a, b = weights(reference / "final"), weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on CPU
    assert losses(killed) == losses(reference)
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (reference / "final_metrics.json").read_text()
    )
    # The phase that was killed records both launches: the killed one and the resume.
    assert len(json.loads((killed / phase_folder / "run_info.json").read_text())) == 2


def logged(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r}


def test_eomt_killed_in_the_ema_phase_then_resumed_anneals_and_trains_as_an_uninterrupted_run(synthetic_root, tmp_path):
    """EoMT, one launch of phases 1-3 whose student anneals its masked attention over steps 1-5 of 6 (in train mode
    a probability strictly between 0 and 1 un-masks random queries: the RNG is part of the state), SIGKILLed after
    step 4's checkpoint and launched again: the probabilities of every step are the schedule's, and the
    teacher, student, losses and metrics are bitwise those of an uninterrupted run."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(ssl_args(synthetic_root, reference, *EOMT_TINY))
    kill_after_checkpoint(ssl_args(synthetic_root, killed, *EOMT_TINY), killed / "checkpoints" / "step_00000004")
    assert not (killed / "final").exists()
    run_to_end(ssl_args(synthetic_root, killed, *EOMT_TINY))

    schedule = MaskAnnealing.from_recipe(ModelConfig(), 6, 2)  # the default span [1/6, 5/6] of 6 steps
    assert (schedule.starts, schedule.ends) == ([1, 3], [3, 5])
    for block in (0, 1):
        expected = {step + 1: schedule.probabilities(step)[block] for step in range(6)}  # logged after the step
        assert logged(killed, f"mask_prob/block_{block}") == pytest.approx(expected, abs=1e-6)
    # The EMA teacher (steps 3-5) masks the blocks the student still mostly trains masked.
    assert logged(killed, "teacher_masked_blocks") == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 0}
    a, b = weights(reference / "final"), weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["attn_mask_probs"].tolist() == [0.0, 0.0]  # the export predicts as at inference
    t_ref, t_killed = weights(reference / "teacher" / "final"), weights(killed / "teacher" / "final")
    assert all(torch.equal(t_ref[k], t_killed[k]) for k in t_ref)
    assert losses(killed) == losses(reference) and losses(killed / "teacher") == losses(reference / "teacher")
    assert json.loads((killed / "final_metrics.json").read_text()) == json.loads(
        (reference / "final_metrics.json").read_text()
    )


def test_eomt_on_two_processes_keeps_its_replicas_and_teachers_identical(synthetic_root, tmp_path):
    """2 DDP processes (gloo) through phases 1-3 of EoMT: the student and the EMA teacher are identical on both
    processes at the checkpoints (the annealing buffer included: each process writes the schedule's value),
    both processes anneal alike, and rank 0 exports a plain EoMT. The student starts from phase 1's export
    (`ssl.student_init: teacher`, as the demo recipe runs): every process builds it from the export that rank 0
    has just written."""
    two = tmp_path / "two"
    run_to_end(ssl_args(synthetic_root, two, *EOMT_TINY, "train.batch_size=2", "ssl.unlabeled_batch_size=2",
                        "ssl.student_init=teacher"), processes=2)  # fmt: skip
    assert "from the supervised teacher's weights" in (two / "final" / "README.md").read_text()
    kept = sorted((two / "checkpoints").glob("step_*"))
    assert [c.name for c in kept] == ["step_00000005", "step_00000006"]  # (train.keep_checkpoints: 2)
    for checkpoint in kept:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        fingerprints = state["replica_fingerprints"]
        assert set(fingerprints) == {"student", "teacher"}
        assert all(len(values) == 2 and values[0] == values[1] for values in fingerprints.values()), checkpoint
    assert logged(two, "mask_prob/block_1")[5] == pytest.approx(0.5**0.9, abs=1e-6)  # step 4 of [3, 5]
    assert weights(two / "final")["attn_mask_probs"].tolist() == [0.0, 0.0]
    assert json.loads((two / "final" / "config.json").read_text())["model_type"] == "eomt"


def test_two_processes_match_one_with_the_double_batch(synthetic_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_to_end(ssl_args(synthetic_root, one))
    # Per-process batches of 2 (+2 unlabeled) on 2 processes = the single process's 4 (+4): the sampler hands
    # out the same images with the same augmentation, DDP averages gradients, the loss normalises by the mask
    # count over processes.
    run_to_end(ssl_args(synthetic_root, two, "train.batch_size=2", "ssl.unlabeled_batch_size=2"), processes=2)

    single, double = losses(one), losses(two)
    assert single.keys() == double.keys() == set(range(1, 7))
    # Same data and weights; the loss's random point sampling draws differently on 2 processes, hence a tolerance.
    for step in single:
        assert double[step] == pytest.approx(single[step], rel=0.1), step
    # The weights after 6 distillation steps: only the loss's random point sampling differs between the launches,
    # so they stay close. Relative difference of all weights measured 2026-11-26: 0.0073; the bound is 0.02. (The
    # exact equivalence, step-1 gradients within 1e-5 with the sampling fixed, is tests/test_ddp_units.py.)
    a, b = weights(one / "final"), weights(two / "final")
    difference = sum(float((a[k] - b[k]).double().norm() ** 2) for k in a) ** 0.5
    scale = sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5
    assert difference / scale < 0.02
    teacher_single, teacher_double = losses(one / "teacher"), losses(two / "teacher")
    assert teacher_double[1] == pytest.approx(teacher_single[1], rel=0.02)  # same init, same batch: step 1 matches

    # Only rank 0 writes the logs, exports and cards; every rank saves its own RNG state.
    for out in (two, two / "teacher"):
        assert len(json.loads((out / "run_info.json").read_text())) == 1
        assert json.loads((out / "run_info.json").read_text())[0]["num_processes"] == 2
        assert (out / "final" / "README.md").is_file()
    assert len((two / "metrics.jsonl").read_text().splitlines()) == len(
        (one / "metrics.jsonl").read_text().splitlines()
    )
    last = two / "checkpoints" / "step_00000006"
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()
    # The EMA teacher (and the student) stayed identical on both processes at every checkpoint.
    fingerprints = json.loads((last / "trainer_state.json").read_text())["replica_fingerprints"]
    assert set(fingerprints) == {"student", "teacher"}
    assert all(len(values) == 2 and values[0] == values[1] for values in fingerprints.values())


def test_two_streaming_processes_killed_then_resumed_equal_an_uninterrupted_run(synthetic_root, tmp_path):
    """Streamed data on 2 processes: each rank saves its own stream positions (labeled and unlabeled, per
    worker); a launch killed in the EMA phase and launched again reads on from them: the same losses and
    weights as a launch that was never killed."""
    streaming = ["data.streaming=true", "data.num_workers=1", "data.shuffle_buffer=8",
                 "ssl.labeled_repeat_threshold=null", "train.batch_size=2", "ssl.unlabeled_batch_size=2"]  # fmt: skip
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(ssl_args(synthetic_root, reference, *streaming), processes=2)
    kill_after_checkpoint(ssl_args(synthetic_root, killed, *streaming), killed / "checkpoints" / "step_00000004", 2)
    assert not (killed / "final").exists()
    last = killed / "checkpoints" / "step_00000004"
    assert (last / "data_state_rank0.pt").is_file() and (last / "data_state_rank1.pt").is_file()  # one per rank
    run_to_end(ssl_args(synthetic_root, killed, *streaming), processes=2)
    a, b = weights(reference / "final"), weights(killed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(killed) == losses(reference)


def test_bad_records_skipped_on_two_processes_are_each_counted_once(synthetic_root, tmp_path):
    """`data_skipped` in the checkpoint is every process's own count, added up once (an evaluation used to copy
    rank 0's running count over the others', so the sum became 2 x rank 0's)."""
    root, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(synthetic_root, root)
    for name in ("000001.png", "000002.png", "000005.png"):
        (root / "train" / name).write_bytes(b"not a png")
    args = [DEMO_RECIPE, *tiny_overrides(root, out), "data.on_error=skip", "train.max_steps=8", "train.eval_every=2",
            "train.checkpoint_every=8", "train.log_every=8"]  # fmt: skip
    result = subprocess.run(train_command(args, 2), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # What each process's reader skipped: it warns for each of its first 10 (here ~4 over both processes).
    warned = result.stderr.count("skipping a bad record")
    assert 1 <= warned <= 10
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["data_skipped"] == warned
    assert state["best_step"] in (2, 4, 6, 8) and state["best_ap"] >= 0  # rank 0's choice reached the checkpoint
