"""Mask2Former (Swin) vs EoMT of about the same parameter count, both from random init, side by side: supervised
and Guided Distillation runs of each on one synthetic set (`benchmarks/ssl_gain.py` runs them), then one table of
their cost (seconds per step supervised and distilling, evaluation images/s, peak memory) and their mask AP
(supervised vs distilled, on the held-out set), plus EoMT's EMA teacher masking `follow` vs `none`.

    python benchmarks/model_families.py [--out outputs/gd_family] [--steps 800] [--burn-in 500] [--seeds 0]
                                        [--labeled-percent 2] [--heldout-val 300] [--no-teacher-masks]
                                        [--masks-burn-in 300] [--timing]

Defaults: the demo recipe's two models (`recipes/demo_synthetic.yaml`, `model.family=eomt` for EoMT: 1.907 M vs
1.910 M parameters), images of mixed sizes and aspect ratios with the paper's jitter (0.3-2.0), 2 % labeled.
Runs go to OUT_m2f, OUT_eomt, OUT_eomt_none, OUT_eomt_b300 and OUT_eomt_none_b300 (the last three reuse OUT_eomt's
supervised teacher, linked; the `_b300` pair starts the EMA phase at step 300, while the student's second query
block still trains fully masked, where the two maskings differ longest); finished
runs are reused, so the table can be printed again, or seeds added, by running the command again. Each run's
figures come from its own `metrics.jsonl`: seconds per step is the median of its log windows (the first window,
with start-up, left out), evaluation images/s from its evaluations' forward + post-processing + encoding seconds
per image. Runs started in parallel share the cores, so their times are only comparable when they ran alike;
`--timing` measures the costs again after the runs, one family after the other on whatever the machine has
free: the training step (supervised and distilling, with `benchmarks/train_step.py`, beside the bare model step)
and evaluation images/s of each family's distilled export on the held-out images.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"m2f": [], "eomt": ["model.family=eomt"]}
EOMT_NONE = ["model.family=eomt", "model.eomt_teacher_masks=none"]


def variants(args: argparse.Namespace) -> list[tuple[str, list[str], int, bool]]:
    """(name, overrides, burn-in, reuses `eomt`'s teacher) of every run group. With `--masks-burn-in`, EoMT's two
    teacher maskings again with the EMA phase starting earlier, while the student still trains with masks."""
    groups = [(name, overrides, args.burn_in, False) for name, overrides in FAMILIES.items()]
    if not args.no_teacher_masks:
        groups.append(("eomt_none", EOMT_NONE, args.burn_in, True))
        if args.masks_burn_in:
            groups += [(f"eomt_b{args.masks_burn_in}", FAMILIES["eomt"], args.masks_burn_in, True),
                       (f"eomt_none_b{args.masks_burn_in}", EOMT_NONE, args.masks_burn_in, True)]  # fmt: skip
    return groups


def ssl_gain(out: Path, runs: list[str], overrides: list[str], burn_in: int, args: argparse.Namespace) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "ssl_gain.py"), "--varied-sizes", "--runs", *runs,
               "--seeds", *map(str, args.seeds), "--steps", str(args.steps), "--burn-in", str(burn_in),
               "--labeled-percent", str(args.labeled_percent), "--heldout-val", str(args.heldout_val),
               "--out", str(out), "data.min_scale=0.3", "data.max_scale=2.0", f"train.eval_every={args.steps // 2}",
               *overrides]  # fmt: skip
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def run_figures(folder: Path, heldout: str, burn_in: int) -> dict[str, float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    windows = [r["seconds_per_step"] for r in records if "seconds_per_step" in r][1:]
    evaluations = [r for r in records if "eval/forward_s_per_image" in r]
    per_image = statistics.median(
        r["eval/forward_s_per_image"] + r["eval/postprocess_s_per_image"] + r["eval/encode_s_per_image"]
        for r in evaluations
    )
    ema = [r for r in records if "pseudo_precision" in r and r["step"] > burn_in]  # the EMA teacher's windows
    scores = json.loads((folder / f"{heldout}.json").read_text())
    return {
        "s_per_step": statistics.median(windows),
        "eval_images_per_s": 1 / per_image,
        "peak_rss_gb": max(r.get("peak_rss_gb", 0.0) for r in records),
        "heldout_final": scores["final"],
        "heldout_best": scores["best"],
        "precision": statistics.mean(r["pseudo_precision"] for r in ema) if ema else float("nan"),
        "recall": statistics.mean(r["pseudo_recall"] for r in ema) if ema else float("nan"),
    }


def timing_rows(args: argparse.Namespace, heldout: str) -> list[str]:
    """Each family's training step (supervised, distilling) and evaluation images/s, measured one after the other."""
    from gd_hf.evaluate import evaluate_export

    rows = ["| model | step | gd_hf train_step ms | bare step ms | ratio | eval img/s (held-out, distilled export) |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for family in ("m2f", "eomt"):
        export = Path(f"{args.out}_{family}") / f"guided_seed{args.seeds[0]}" / "final"
        root = Path(f"{args.out}_{family}") / heldout
        start = time.perf_counter()
        evaluate_export(export, root / "annotations" / "instances_val.json", root / "val", top_k=50, batch_size=4,
                        num_workers=1)  # fmt: skip
        images_per_s = args.heldout_val / (time.perf_counter() - start)
        for distill in (False, True):
            command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--steps", "20",
                       *(["--distill"] if distill else []), *FAMILIES[family]]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            bare = float(re.search(r"bare forward\+backward\+step:\s+([\d.]+)", output).group(1))
            ours = float(re.search(r"gd_hf train_step:\s+([\d.]+)", output).group(1))
            rows.append(f"| {family} | {'distilling' if distill else 'supervised'} | {ours:.1f} | {bare:.1f} "
                        f"| {ours / bare:.3f} | {images_per_s:.1f} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/gd_family")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--burn-in", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--labeled-percent", type=float, default=2.0)
    parser.add_argument("--heldout-val", type=int, default=300)
    parser.add_argument("--no-teacher-masks", action="store_true", help="skip EoMT's teacher masking `none` run")
    parser.add_argument("--masks-burn-in", type=int, default=300, help="EoMT's teacher maskings again with this "
                        "burn-in (0: not)")  # fmt: skip
    parser.add_argument("--timing", action="store_true", help="measure step and evaluation costs after the runs")
    args = parser.parse_args()
    groups = variants(args)
    heldout = f"heldout_val{args.heldout_val}_seed7"
    for name, overrides, burn_in, reuses_teacher in groups:
        out = Path(f"{args.out}_{name}")
        runs = ["supervised", "guided"]
        if reuses_teacher:  # the same phase-1 teacher (and data) as `eomt`: only the distillation differs
            out.mkdir(parents=True, exist_ok=True)
            shared = [f"supervised_seed{seed}" for seed in args.seeds] + ["data", heldout]
            for entry in shared:
                if not (out / entry).exists() and (Path(f"{args.out}_eomt") / entry).exists():
                    (out / entry).symlink_to(Path(f"{args.out}_eomt").resolve() / entry)
            runs = ["guided"]
        ssl_gain(out, runs, overrides, burn_in, args)
    rows = ["| model | burn-in | run | s/step | eval img/s | peak RSS GB | held-out AP final / best "
            "| EMA-phase pseudo precision / recall |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, _, burn_in, reuses_teacher in groups:
        for run in ("guided",) if reuses_teacher else ("supervised", "guided"):
            figures = [run_figures(Path(f"{args.out}_{name}") / f"{run}_seed{s}", heldout, burn_in) for s in args.seeds]

            def mean(key: str, figures: list[dict[str, float]] = figures) -> float:
                return statistics.mean(f[key] for f in figures)

            rows.append(
                f"| {name} | {burn_in if run == 'guided' else '-'} | {run} | {mean('s_per_step'):.3f} "
                f"| {mean('eval_images_per_s'):.1f} | {mean('peak_rss_gb'):.2f} "
                f"| {mean('heldout_final'):.2f} / {mean('heldout_best'):.2f} "
                f"| {mean('precision'):.3f} / {mean('recall'):.3f} |"
            )
    if args.timing:
        rows += ["", *timing_rows(args, heldout)]
    table = "\n".join(rows)
    print(table)
    (Path(f"{args.out}_eomt") / "families.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
