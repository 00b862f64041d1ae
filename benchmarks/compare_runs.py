"""Compare two output folders of the same recipe, for a refactor that must not change behaviour.

    python benchmarks/compare_runs.py BEFORE_OUTPUT AFTER_OUTPUT [--console-before F --console-after F]

Compares, in the run folder and in its `teacher/` (one-launch runs): every `model.safetensors` (exports and
checkpoints) tensor by tensor, the checkpoints' optimizer and extra states (schedule, EMA teacher), their RNG
states byte by byte and their trainer state (the recorded recipe aside), `metrics.jsonl` with
timing, memory and evaluation-cost values left out, `final_metrics.json`, the val predictions, and, when given,
the AP tables printed on the console. Prints one line per item and exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# Values that measure the machine, not the run.
TIMING_KEYS = {"seconds_per_step", "seconds_since_launch", "peak_rss_gb", "seconds_to_first_step"}


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_state_equal, a, b))
    return a == b


def _metrics(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in record.items() if k not in TIMING_KEYS and not k.startswith("eval/")})
    return records


def ap_tables(console: str) -> list[str]:
    """The printed AP tables (per phase, side by side) of a console log."""
    lines = console.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line.startswith("val mask AP after") or line.startswith("val mask AP, side by side"):
            block = [line]
            for following in lines[i + 1 :]:
                if not re.match(r"^\s*[\w|. -]+$", following) or following.startswith(("gd_hf", "20")):
                    break
                block.append(following)
            tables.append("\n".join(block))
    return tables


def compare(before: Path, after: Path) -> list[tuple[str, bool]]:
    checks: list[tuple[str, bool]] = []
    for run in ("", "teacher"):
        a, b = before / run, after / run
        if not a.is_dir():
            continue
        weights = sorted(p.relative_to(a) for p in a.rglob("model.safetensors"))
        other = sorted(p.relative_to(b) for p in b.rglob("model.safetensors"))
        checks.append((f"{run or 'run'}: the same model.safetensors files ({len(weights)})", weights == other))
        for rel in weights:
            if (b / rel).is_file():
                checks.append((f"{run}/{rel}", _tensors_equal(load_file(a / rel), load_file(b / rel))))
        for state in sorted([*a.glob("checkpoints/*/gd_hf_state_*.pt"), *a.glob("checkpoints/*/optimizer.bin")]):
            rel = state.relative_to(a)
            same = (b / rel).is_file() and _state_equal(
                torch.load(state, weights_only=True), torch.load(b / rel, weights_only=True)
            )
            checks.append((f"{run}/{rel}", same))
        for random_states in sorted(a.glob("checkpoints/*/random_states_*.pkl")):
            rel = random_states.relative_to(a)
            checks.append(
                (f"{run}/{rel} (bytes)", (b / rel).is_file() and random_states.read_bytes() == (b / rel).read_bytes())
            )
        for trainer_state in sorted(a.glob("checkpoints/*/trainer_state.json")):
            rel = trainer_state.relative_to(a)
            # The recipe it records names the run's own output folder, which differs between the two runs.
            state_a = {k: v for k, v in json.loads(trainer_state.read_text()).items() if k != "recipe"}
            same = (b / rel).is_file() and state_a == {
                k: v for k, v in json.loads((b / rel).read_text()).items() if k != "recipe"
            }
            checks.append((f"{run}/{rel} (the recipe aside)", same))
        for name in ("metrics.jsonl",):
            checks.append((f"{run}/{name} (timings aside)", _metrics(a / name) == _metrics(b / name)))
        for name in ["final_metrics.json"] + [str(p.relative_to(a)) for p in sorted(a.glob("predictions/*.json"))]:
            same = (b / name).is_file() and json.loads((a / name).read_text()) == json.loads((b / name).read_text())
            checks.append((f"{run}/{name}", same))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--console-before", type=Path)
    parser.add_argument("--console-after", type=Path)
    args = parser.parse_args()
    checks = compare(args.before, args.after)
    if args.console_before and args.console_after:
        tables_a = ap_tables(args.console_before.read_text(errors="replace"))
        tables_b = ap_tables(args.console_after.read_text(errors="replace"))
        checks.append((f"printed AP tables ({len(tables_a)})", bool(tables_a) and tables_a == tables_b))
    for what, same in checks:
        print(f"{'equal' if same else 'DIFFERENT'}  {what}")
    differing = sum(not same for _, same in checks)
    print(f"{len(checks) - differing} of {len(checks)} equal")
    return 1 if differing or not checks else 0


if __name__ == "__main__":
    sys.exit(main())
