"""Does Guided Distillation beat supervised training? Three runs per seed on the synthetic set, same model,
same labeled images, same number of steps:

  (a) supervised   — labeled images only (this run is also the teacher of (c))
  (b) ema_baseline — burn-in on labeled images only, then EMA teacher + pseudo labels (the earlier-work recipe)
  (c) guided       — guided burn-in: pseudo labels of the frozen (a) from the first step, then EMA

    python benchmarks/ssl_gain.py [--labeled-percent 5] [--train-images 2400] [--steps 1000] [--burn-in 500]
                                  [--seeds 0 1] [--heldout-val 500] [--varied-sizes] [--out outputs/ssl_gain]
                                  [key=value ...]

The synthetic set (`--train-images` training images, 100 val) is generated once under OUT/data from
`--data-seed`, whatever the run seeds: every seed trains on the same images and differs only in its labeled
split, initialisation and data order, so seeds run by separate invocations stay comparable. Its 100 val
images pick each run's `best/` export, and 100 images leave about ±1 AP between evaluations of one run; so
every `final/` and `best/` export is also scored on a held-out set of `--heldout-val` images generated from
another seed (`--heldout-seed`), used for neither training nor model selection. That is the comparison that
counts; 0 turns it off. `--varied-sizes` generates both sets with mixed image sizes and aspect ratios (the
paper's data path, with e.g. `data.min_scale=0.3 data.max_scale=2.0`); each run is told so
(`data.synthetic_varied_sizes`), and refuses an OUT/data generated the other way.

Each run is a separate `python -m gd_hf.train` process (extra key=value overrides go to every run); finished
runs (and held-out scores) are reused when the script is started again, so seeds can be added later or run
in parallel by separate invocations. A run started with other settings is not: the script stops and says so
(each run folder keeps its settings in `ssl_gain_overrides.json`), so give each comparison its own `--out`.
Prints markdown tables of mask AP (mean and per seed) and the last logged pseudo-label precision/recall, and
writes them to OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from gd_hf.data.synthetic import generate
from gd_hf.evaluate import evaluate_export

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("supervised", "ema_baseline", "guided")


def run(name: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{name}_seed{seed}"
    data = Path(args.out) / "data"
    overrides = [
        f"output_dir={out}",
        # main() has generated OUT/data from --data-seed; this only makes the run check its image count.
        "data.generate_synthetic=true",
        f"data.synthetic_train_images={args.train_images}",
        f"data.synthetic_varied_sizes={args.varied_sizes}",
        f"data.train_images={data / 'train'}",
        f"data.train_annotations={data / 'annotations' / 'instances_train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_annotations={data / 'annotations' / 'instances_val.json'}",
        f"seed={seed}",
        f"data.labeled_percent={args.labeled_percent}",
        f"data.split_seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.steps}",
        "ssl.evaluate=student",
        # The demo recipe runs the whole method in one launch; here each run is one phase.
        f"ssl.enabled={name != 'supervised'}",
        "ssl.train_teacher_first=false",
        *args.overrides,
    ]
    if name == "ema_baseline":
        overrides += ["ssl.enabled=true", "ssl.burn_in_pseudo_labels=false", f"ssl.burn_in_steps={args.burn_in}"]
    if name == "guided":
        teacher = Path(args.out) / f"supervised_seed{seed}" / "best"
        overrides += ["ssl.enabled=true", f"ssl.teacher={teacher}", f"ssl.burn_in_steps={args.burn_in}"]
    if name != "supervised":
        overrides += [f"ssl.ema_decay={args.ema_decay}", f"ssl.unlabeled_batch_size={args.unlabeled_batch_size}"]
    # A run found in OUT is reused (finished) or resumed (`resume: auto`): only if it was started with the same
    # settings, or a table would mix runs of different recipes without saying so.
    settings = out / "ssl_gain_overrides.json"
    if settings.is_file() and json.loads(settings.read_text()) != overrides:
        sys.exit(
            f"{out} was started with other settings (see {settings}): give this comparison its own --out, "
            "or delete that run folder to train it again"
        )
    if not (out / "final_metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(overrides, indent=1) + "\n")
        command = [sys.executable, "-m", "gd_hf.train", str(ROOT / "recipes" / "demo_synthetic.yaml"), *overrides]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    summary = json.loads((out / "final_metrics.json").read_text())
    pseudo = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        pseudo.update({k: v for k, v in record.items() if k.startswith("pseudo_")})
    # "best": the highest of the periodic evaluations (what the exported `best/` scores); with few labeled
    # images a long supervised run overfits, so comparing final APs alone would flatter distillation.
    return {"AP": summary["final"]["AP"], "best_AP": summary["best_ap"], **pseudo}


def heldout_scores(name: str, seed: int, args: argparse.Namespace, heldout: Path) -> dict[str, float]:
    """Mask AP of the run's `final/` and `best/` exports on the held-out set, cached beside the run."""
    out = Path(args.out) / f"{name}_seed{seed}"
    cache = out / f"{heldout.name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    scores = {}
    for export in ("final", "best"):
        print(f"scoring {out / export} on {heldout}", flush=True)
        metrics, _ = evaluate_export(
            out / export,
            heldout / "annotations" / "instances_val.json",
            heldout / "val",
            top_k=args.top_k,
            batch_size=4,
            num_workers=1,
        )
        scores[export] = metrics["AP"]
    cache.write_text(json.dumps(scores) + "\n")
    return scores


def ap_table(title: str, results: dict, keys: tuple[str, str], args: argparse.Namespace) -> list[str]:
    """Markdown rows: mean and per-seed AP of each run under two keys (final, best), then the gains."""
    lines = [
        title,
        "",
        "| run | final mask AP (mean) | per seed | best export AP (mean) | per seed "
        "| pseudo labels per image / precision / recall / duplicates (last log, mean of seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.runs:
        final = [results[name][s][keys[0]] for s in args.seeds]
        best = [results[name][s][keys[1]] for s in args.seeds]
        quality = " / ".join(
            f"{statistics.mean(results[name][s][key] for s in args.seeds):.2f}"
            if all(key in results[name][s] for s in args.seeds)
            else "—"
            for key in ("pseudo_labels_per_image", "pseudo_precision", "pseudo_recall", "pseudo_fp_duplicate")
        )
        lines.append(
            f"| {name} | {statistics.mean(final):.2f} | {' / '.join(f'{a:.2f}' for a in final)} "
            f"| {statistics.mean(best):.2f} | {' / '.join(f'{a:.2f}' for a in best)} | {quality} |"
        )
    lines.append("")
    for baseline in ("supervised", "ema_baseline"):
        if "guided" in results and baseline in results:
            for key, label in zip(keys, ("final", "best export")):
                gains = [results["guided"][s][key] - results[baseline][s][key] for s in args.seeds]
                goal = " (goal >= +3)" if baseline == "supervised" else " (goal > 0)"
                lines.append(
                    f"guided - {baseline}, {label}: {statistics.mean(gains):+.2f} AP{goal}; "
                    f"per seed {' / '.join(f'{g:+.2f}' for g in gains)}"
                )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labeled-percent", type=float, default=5.0)
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--burn-in", type=int, default=500)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--unlabeled-batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed of the training/val images")
    parser.add_argument("--heldout-val", type=int, default=500, help="held-out val images (0: none)")
    parser.add_argument("--heldout-seed", type=int, default=7, help="generator seed of the held-out set")
    parser.add_argument("--top-k", type=int, default=50, help="instances per image when scoring held-out")
    parser.add_argument("--varied-sizes", action="store_true", help="images of mixed sizes and aspect ratios")
    parser.add_argument("--out", default="outputs/ssl_gain")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which runs (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_intermixed_args()
    if args.heldout_val and args.heldout_seed == args.data_seed:
        # The same generator seed would make the held-out images copies of the training images.
        parser.error(f"--heldout-seed and --data-seed are both {args.data_seed}; choose another held-out seed")

    data = Path(args.out) / "data"
    if not data.exists():
        generate(data, train=args.train_images, val=100, seed=args.data_seed, varied_sizes=args.varied_sizes)
    results = {name: {seed: run(name, seed, args) for seed in args.seeds} for name in args.runs}
    lines = [
        f"{args.train_images} training images, labeled {args.labeled_percent} %, {args.steps} steps, "
        f"burn-in {args.burn_in}, seeds {args.seeds}, data seed {args.data_seed}"
        + (", images of mixed sizes and aspect ratios" if args.varied_sizes else "")
        + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""),
        "",
        *ap_table("On the 100 val images (these also pick `best/`):", results, ("AP", "best_AP"), args),
    ]
    if args.heldout_val:
        heldout = Path(args.out) / f"heldout_val{args.heldout_val}_seed{args.heldout_seed}"
        if not heldout.exists():
            generate(heldout, train=0, val=args.heldout_val, seed=args.heldout_seed, varied_sizes=args.varied_sizes)
        for name in args.runs:
            for seed in args.seeds:
                scores = heldout_scores(name, seed, args, heldout)
                results[name][seed].update(heldout_final=scores["final"], heldout_best=scores["best"])
        title = f"On {args.heldout_val} held-out val images (generator seed {args.heldout_seed}):"
        lines += ap_table(title, results, ("heldout_final", "heldout_best"), args)
    text = "\n".join(lines)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
