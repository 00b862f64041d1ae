"""Does `gd_hf.label_next` pick better images to label than chance? Measured as the issue asks, on the synthetic
sets of the seed-averaged benchmark (`benchmarks/ssl_gain.py`, whose runs this reuses):

For each set (`--sets`: `square`, `mixed`) and seed, start from that benchmark's supervised teacher trained on 2 %
of the 2,400 training images (its arm (a): `outputs/ssl_gain_128px/mask2former_<set>/supervised_seed<S>`, with
its held-out AP). For each strategy (`--strategies`, `random` among them), `gd_hf.label_next` picks `--count`
more images (1 %: 24) from that run's unlabeled pool; their labels (the synthetic set has them all) join the
labeled split through the job's `split.json` (`data.split_file`), and the same recipe is trained again from
scratch on the 3 %: a supervised run (500 steps, as (a)) and, with `--guided`, a Guided Distillation student of
that new teacher (800 steps, as (c)). Every run is scored on the held-out set (500 images of another seed).

One retrain per pick is noisy (a 500-step run's held-out AP moves by 2-4 between seeds, more than 24 images
add), so `--train-seeds K` trains the supervised arm K times per pick, with training seeds S, S+1000, ...,
against a 2 % run of the same training seed (the split stays that of seed S): the gain of a pick is the mean
of its K paired gains. The guided arm trains once per pick (seed S).

    python benchmarks/label_next.py [--sets square mixed] [--seeds 0 1 2] [--train-seeds 1]
        [--strategies near_threshold entropy disagreement random] [--count 24] [--guided] [--jobs 2]
        [--base outputs/ssl_gain_128px] [--out outputs/label_next_128px] [--table-only] [--docs]

Prints (and writes OUT/results.md) per set and strategy: the held-out AP after, the gain over the 2 % run, the
gain per added image and per added object (the labeller's work), and that gain as a multiple of random's
(the goal: >= 1.5x), mean and per seed; then, over every (set, arm, seed) cell, each strategy's mean gain against
random's, the multiple and how often it is ahead (the goal's figure). Finished jobs and runs are reused when
started again. The full measure (`--guided --train-seeds 2`) is 24 labelling jobs and 78 runs on top of
ssl_gain's; its guided arm and second training seed alone (54 runs) took 2 h 2 min with 2 jobs on the 2-core
machine. `--docs` writes
the table into docs/labelling.md and benchmarks/RESULTS.md between `<!-- label_next:begin/end -->` (generated,
not typed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ssl_gain import write_block  # (benchmarks/, the script's folder, is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("near_threshold", "entropy", "disagreement", "random")
BOUNDS = ("<!-- label_next:begin -->", "<!-- label_next:end -->")


def base_run(args: argparse.Namespace, set_name: str, seed: int) -> Path:
    run = Path(args.base) / f"mask2former_{set_name}" / f"supervised_seed{seed}"
    if not (run / "final_metrics.json").is_file() or not (run / "heldout.json").is_file():
        raise SystemExit(f"{run} is not a finished, scored run: train it first with `python benchmarks/ssl_gain.py "
                         f"--families mask2former --sets {set_name} --seeds {seed} --arms supervised`")  # fmt: skip
    return run


TRAIN_SEED_STEP = 1000  # training seed k of split seed S is S + 1000 k


def with_seed(overrides: list[str], seed: int) -> list[str]:
    """The overrides with the training seed replaced (the split seed, and so the 2 % split, stays)."""
    return [o for o in overrides if not o.startswith(("seed=", "output_dir="))] + [f"seed={seed}"]


def suffix(k: int) -> str:
    """The folder suffix of training seed k: none for the first (the folders of a one-seed run)."""
    return "" if k == 0 else f"_t{k}"


def base_heldout(args: argparse.Namespace, set_name: str, arm: str, seed: int, k: int) -> Path:
    """The held-out score of the 2 % run of split seed `seed`, training seed k."""
    if k == 0:
        return Path(args.base) / f"mask2former_{set_name}" / f"{arm}_seed{seed}" / "heldout.json"
    return Path(args.out) / set_name / f"base_seed{seed}{suffix(k)}" / arm / "heldout.json"


def train_and_score(overrides: list[str], out: Path, set_name: str, args: argparse.Namespace) -> None:
    """One `gd_hf.train` run of the demo recipe into `out`, then its held-out score; both skipped when done."""
    if not (out / "final_metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "gd_hf.train", str(ROOT / "recipes" / "demo_synthetic.yaml"), *overrides,
             f"output_dir={out}"], out / "train.log")  # fmt: skip
    if not (out / "heldout.json").is_file():
        heldout = Path(args.base) / f"heldout_{set_name}_500_seed7"
        run([sys.executable, str(ROOT / "benchmarks" / "ssl_gain.py"), "--score", str(out), str(heldout)],
            out / "score.log")  # fmt: skip


def base_pipeline(args: argparse.Namespace, set_name: str, seed: int, k: int) -> None:
    """The 2 % supervised run of training seed k > 0 (k = 0 is the ssl_gain benchmark's own run)."""
    overrides = json.loads((base_run(args, set_name, seed) / "ssl_gain_overrides.json").read_text())
    out = Path(args.out) / set_name / f"base_seed{seed}{suffix(k)}" / "supervised"
    train_and_score(with_seed(overrides, seed + TRAIN_SEED_STEP * k), out, set_name, args)


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "a") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def pipeline(args: argparse.Namespace, set_name: str, seed: int, strategy: str) -> None:
    """The labelling job, the supervised run(s) on 3 % (and the guided one), each scored on the held-out set."""
    base = base_run(args, set_name, seed)
    folder = Path(args.out) / set_name / f"{strategy}_seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job"
    if not (job / "label_next.json").is_file():
        run([sys.executable, "-m", "gd_hf.label_next", str(base), "--count", str(args.count), "--out", str(job),
             "--strategy", strategy, "--seed", str(seed), "--export", "best"], folder / "label_next.log")  # fmt: skip
    overrides = json.loads((base / "ssl_gain_overrides.json").read_text())
    split = f"data.split_file={job / 'split.json'}"
    arms = [(f"supervised{suffix(k)}", with_seed(overrides, seed + TRAIN_SEED_STEP * k) + [split])
            for k in range(args.train_seeds)]  # fmt: skip
    if args.guided:
        guided = json.loads((base.parent / f"guided_seed{seed}" / "ssl_gain_overrides.json").read_text())
        teacher = folder / "supervised" / "best"
        arms.append(("guided", [o for o in guided if not o.startswith(("output_dir=", "ssl.teacher="))]
                     + [f"ssl.teacher={teacher}", split]))  # fmt: skip
    for arm, arm_overrides in arms:
        train_and_score(arm_overrides, folder / arm, set_name, args)


def added_objects(job: Path, annotations: Path) -> int:
    """The non-crowd objects of the picked images (what a labeller would draw)."""
    picked = set(json.loads((job / "split.json").read_text())["added_image_ids"])
    coco = json.loads(annotations.read_text())
    return sum(1 for a in coco["annotations"] if a["image_id"] in picked and not a.get("iscrowd", 0))


def _heldout(path: Path) -> float | None:
    return json.loads(path.read_text())["best"] if path.is_file() else None


def table(args: argparse.Namespace) -> str:
    """Per set and arm: each strategy's held-out AP after, its gain over the 2 % run, per added image and object,
    against random's gain of the same seed (difference per seed; ratio of the means where random's is positive)."""
    lines = []
    arms = ["supervised"] + (["guided"] if args.guided else [])
    cells: dict[str, dict[tuple, tuple[float, int]]] = {}  # strategy -> (set, arm, seed) -> (gain, objects added)
    for set_name in args.sets:
        data = Path(args.base) / f"data_{set_name}" / "annotations" / "instances_train.json"
        for arm in arms:
            gains: dict[str, dict[int, float]] = {}
            rows = []
            for strategy in args.strategies:
                per_seed = {}
                for seed in args.seeds:
                    folder = Path(args.out) / set_name / f"{strategy}_seed{seed}"
                    pairs = [(_heldout(folder / f"{arm}{suffix(k)}" / "heldout.json"),
                              _heldout(base_heldout(args, set_name, arm, seed, k)))
                             for k in range(args.train_seeds if arm == "supervised" else 1)]  # fmt: skip
                    pairs = [(after, base) for after, base in pairs if after is not None and base is not None]
                    if pairs:  # the mean of the paired gains of the training seeds done so far
                        after = statistics.mean(a for a, _ in pairs)
                        gain = statistics.mean(a - b for a, b in pairs)
                        per_seed[seed] = (after, gain, added_objects(folder / "job", data))
                if per_seed:
                    gains[strategy] = {seed: g for seed, (_, g, _) in per_seed.items()}
                    for seed, (_, gain, objects) in per_seed.items():
                        cells.setdefault(strategy, {})[(set_name, arm, seed)] = (gain, objects)
                    rows.append((strategy, per_seed))
            runs = (
                f", {args.train_seeds} training seeds per pick" if arm == "supervised" and args.train_seeds > 1 else ""
            )
            lines += [f"### {set_name}, {arm} retrained on 2 % + {args.count} picked images (held-out AP, `best/`"
                      f"{runs})", "",
                      "| strategy | AP after (mean) | gain over 2 %: mean ± sd (per seed) | gain per image | gain per "
                      "object | − random's gain, per seed (mean) | x random per image |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            random = gains.get("random", {})
            random_mean = statistics.mean(random.values()) if random else None
            for strategy, per_seed in rows:
                ap = statistics.mean(a for a, _, _ in per_seed.values())
                g = [gain for _, gain, _ in per_seed.values()]
                sd = statistics.stdev(g) if len(g) > 1 else 0.0
                per_object = statistics.mean(gain / max(n, 1) for _, gain, n in per_seed.values())
                against = [gains[strategy][s] - random[s] for s in per_seed if s in random]
                versus = (f"{' / '.join(f'{d:+.2f}' for d in against)} ({statistics.mean(against):+.2f})"
                          if against and strategy != "random" else "")  # fmt: skip
                if strategy == "random" or random_mean is None:
                    times = ""
                elif random_mean <= 0:
                    times = "n/a: random's mean gain <= 0"
                else:
                    times = f"{statistics.mean(g) / random_mean:.2f}"
                lines.append(f"| {strategy} | {ap:.2f} | {statistics.mean(g):+.2f} ± {sd:.2f} "
                             f"({' / '.join(f'{x:+.2f}' for x in g)}) | {statistics.mean(g) / args.count:+.3f} | "
                             f"{per_object:+.4f} | {versus} | {times} |")  # fmt: skip
            lines.append("")
    return "\n".join(lines + pooled(cells, args))


def pooled(cells: dict[str, dict[tuple, tuple[float, int]]], args: argparse.Namespace) -> list[str]:
    """The goal's figure: each strategy's mean gain over every (set, arm, seed) cell that random has too, as a
    multiple of random's mean gain there (per image: both add the same count), per object (the labeller's work),
    and in how many of those cells it is ahead of random's."""
    random = cells.get("random", {})
    if not random:
        return []
    lines = ["### All sets and arms together: the goal (the best strategy at >= 1.5x random's gain per label)", "",
             "| strategy | mean gain over 2 % (cells) | x random per image | x random per object | ahead of random "
             "in |", "|---|---|---|---|---|"]  # fmt: skip
    best = None
    for strategy, by_cell in cells.items():
        shared = [c for c in by_cell if c in random]
        if strategy == "random" or not shared:
            continue
        mean = statistics.mean(by_cell[c][0] for c in shared)
        random_mean = statistics.mean(random[c][0] for c in shared)
        per_object = statistics.mean(by_cell[c][0] / max(by_cell[c][1], 1) for c in shared)
        random_per_object = statistics.mean(random[c][0] / max(random[c][1], 1) for c in shared)
        times = mean / random_mean if random_mean > 0 else None
        ratio = f"{times:.2f}" if times is not None else "n/a: random's mean gain <= 0"
        object_ratio = f"{per_object / random_per_object:.2f}" if random_per_object > 0 else "n/a"
        ahead = sum(by_cell[c][0] > random[c][0] for c in shared)
        lines.append(f"| {strategy} | {mean:+.2f} ({len(shared)}; random {random_mean:+.2f}) | {ratio} | "
                     f"{object_ratio} | {ahead} of {len(shared)} |")  # fmt: skip
        if times is not None and (best is None or times > best[1]):
            best = (strategy, times)
    if best is not None:
        verdict = "met" if best[1] >= 1.5 else "not met"
        lines += ["", f"Best on average: `{best[0]}` at {best[1]:.2f}x random's gain per image (goal >= 1.5x: "
                      f"{verdict} on the pooled mean; the tables above say where it comes from)."]  # fmt: skip
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=("square", "mixed"), default=["square", "mixed"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--count", type=int, default=24, help="images to add (24: 1 % of the 2,400)")
    parser.add_argument("--train-seeds", type=int, default=1, help="supervised retrains per pick (paired gains)")
    parser.add_argument("--guided", action="store_true", help="also retrain the guided student on the new teacher")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--base", default="outputs/ssl_gain_128px", help="the ssl_gain benchmark's --out")
    parser.add_argument("--out", default="outputs/label_next_128px")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/labelling.md and RESULTS.md")
    args = parser.parse_args()
    if not args.table_only:
        for s in args.sets:
            for seed in args.seeds:
                base_run(args, s, seed)  # all there before hours of work
        work = [
            (base_pipeline, s, seed, k) for s in args.sets for seed in args.seeds for k in range(1, args.train_seeds)
        ]
        work += [
            (pipeline, s, seed, strategy) for s in args.sets for seed in args.seeds for strategy in args.strategies
        ]
        with ThreadPoolExecutor(args.jobs) as pool:
            for function, *work_item in work:
                pool.submit(function, args, *work_item).add_done_callback(
                    lambda f, w=work_item: print(
                        f"{'FAILED' if f.exception() else 'done'} {w} {f.exception() or ''}", flush=True
                    )  # fmt: skip
                )
    text = table(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.md").write_text(text + "\n")
    print(text)
    if args.docs:
        command = "python benchmarks/label_next.py " + " ".join(
            a for a in sys.argv[1:] if a not in ("--docs", "--table-only")
        )
        for path in (ROOT / "docs" / "labelling.md", ROOT / "benchmarks" / "RESULTS.md"):
            write_block(path, f"`{command.strip()}`\n\n{text}", bounds=BOUNDS)


if __name__ == "__main__":
    main()
