"""Does Guided Distillation beat supervised training? The seed-averaged evidence, sized to re-run in one working
session on 2 CPU cores (rerun it after any change to the method).

For each model family (`--families`), synthetic set (`--sets`: `square`, equal squares with whole crops as the
demo; `mixed`, mixed sizes and aspect ratios with scale jitter 0.3-2.0, the paper's data path) and seed, the
same model, the same labeled images:

  (a) supervised   — the labeled images only, `--teacher-steps` steps; its `best/` export is also the teacher of (c)
  (a') supervised_long — the same for `--steps` steps, as many as the students take (is (c) ahead only by
                     training longer?)
  (b) ema_baseline — burn-in on labeled images only, then EMA teacher + pseudo labels (the earlier-work recipe;
                     its pseudo-label threshold is `--baseline-threshold`: it has no fixed teacher to choose one from;
                     its student starts as (a) did)
  (c) guided       — guided burn-in with the pseudo labels of the frozen (a), then EMA distillation (the demo
                     recipe's rules: its student starts from (a)'s weights, `ssl.student_init: teacher`)
  plus any `--variant NAME key=value ...`: (c) with those overrides (e.g. the paper's threshold against `auto`).
  In a variant's values `{run:ARM}` is the same family / set / seed's run folder of arm ARM (the variant then
  waits for it), e.g. `ssl.teacher={run:supervised_long}/best` (a teacher as long as the student) or
  `model.pretrained={run:supervised}/best` (a student that starts from its teacher's weights); a variant with
  `ssl.enabled=false` is a supervised arm.

    python benchmarks/ssl_gain.py [--families mask2former eomt] [--sets square mixed] [--seeds 0 1 2]
        [--arms supervised supervised_long ema_baseline guided] [--skip FAMILY:ARM ...]
        [--jobs 2] [--steps 800] [--teacher-steps 500] [--burn-in 560] [--size 128] [--docs [--docs-block NAME]]
        [--out DIR (default outputs/ssl_gain_<size>px)] [--variant NAME key=value ...] [--lever-base ARM]
        [--baseline-threshold T] [--baseline-unsup-weight W] [--table-only] [--rank-against OTHER_OUT]
        [key=value ...]

The check after a change to the method is `python benchmarks/ssl_gain.py --skip eomt:supervised_long --docs`:
both families, both sets, 3 seeds, 42 runs; 81 min of wall time on the 2-core machine (2026-12-05).

Every run is its own `python -m gd_hf.train` process on `recipes/demo_synthetic.yaml` (extra key=value
overrides go to every run), `--jobs` at a time with OMP_NUM_THREADS=1 each (two on the 2-core machine: more
threads than cores slow a step many times over). Its log is `OUT/<family>_<set>/<arm>_seed<S>/train.log`.

What counts is the mask AP on a held-out set (`--heldout-val`, 500 images, generated from another seed): those
images train nothing and pick nothing. The run's own 100 val images pick `best/` (and, with
`ssl.pseudo_label_score_threshold=auto`, the threshold). Both `best/` and `final/` exports are scored there.

Finished runs and their held-out scores are reused when the script is started again (so an interrupted
benchmark goes on where it stopped); a run folder started with other settings stops the script
(`ssl_gain_overrides.json` keeps each run's settings): give each comparison its own `--out`.

Prints and writes OUT/results.md: per family, mean ± sd and per seed of each arm, the gains against the goals,
the pseudo-label figures. `--docs` also writes that table into docs/benchmarks.md and benchmarks/RESULTS.md between
their `<!-- ssl_gain:begin -->` / `<!-- ssl_gain:end -->` markers (generated, not typed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("supervised", "supervised_long", "ema_baseline")  # the arms without a teacher to wait for
BEGIN, END = "<!-- ssl_gain:begin -->", "<!-- ssl_gain:end -->"
RUN_PLACEHOLDER = re.compile(r"\{run:([^}]*)\}")  # `{run:ARM}` in a variant's value: that arm's run folder
SET_OVERRIDES = {
    "square": ["data.synthetic_varied_sizes=false"],  # the recipe's min_scale 1: whole crops, no padding
    "mixed": ["data.synthetic_varied_sizes=true", "data.min_scale=0.3", "data.max_scale=2.0"],
}


@dataclass
class Job:
    family: str
    set_name: str
    arm: str
    seed: int
    overrides: list[str]
    out: Path
    needs: list[Job] = field(default_factory=list)
    state: str = "pending"  # pending, running, done, failed, skipped

    @property
    def name(self) -> str:
        return f"{self.family}/{self.set_name}/{self.arm}/seed{self.seed}"


def data_folder(args: argparse.Namespace, set_name: str) -> Path:
    return Path(args.out) / f"data_{set_name}"


def heldout_folder(args: argparse.Namespace, set_name: str) -> Path:
    return Path(args.out) / f"heldout_{set_name}_{args.heldout_val}_seed{args.heldout_seed}"


def run_overrides(family: str, set_name: str, arm: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The key=value overrides of one run."""
    data = data_folder(args, set_name)
    out = run_folder(args, family, set_name, arm, seed)
    supervised = arm in ("supervised", "supervised_long")
    steps = args.teacher_steps if arm == "supervised" else args.steps
    overrides = [
        f"output_dir={out}",
        # main() generated the data; this makes each run check the folder's image count and kind.
        "data.generate_synthetic=true",
        f"data.synthetic_train_images={args.train_images}",
        f"data.train_images={data / 'train'}",
        f"data.train_annotations={data / 'annotations' / 'instances_train.json'}",
        f"data.val_images={data / 'val'}",
        f"data.val_annotations={data / 'annotations' / 'instances_val.json'}",
        *SET_OVERRIDES[set_name],
        f"data.crop_size={args.size}",
        f"data.eval_shortest_edge={args.size}",
        f"data.eval_longest_edge={args.size}",
        f"model.family={family}",
        f"seed={seed}",
        f"data.split_seed={seed}",
        f"data.labeled_percent={args.labeled_percent}",
        f"train.max_steps={steps}",
        f"train.eval_every={max(steps // args.evals, 1)}",
        f"train.checkpoint_every={steps}",
        "train.log_every=25",
        "train.report_to=none",
        "eval.pictures=0",
        "ssl.evaluate=student",
        f"ssl.enabled={not supervised}",
        "ssl.train_teacher_first=false",  # each arm is one phase; (a) is the teacher of (c)
    ]
    if family == "eomt":
        overrides.append(f"model.eomt_image_size={args.size}")
    if not supervised:
        # `warn`: a teacher the check would stop still distills, so every arm has a figure (the check's own
        # figures, and its warning, are in the run's metrics.jsonl and train.log).
        overrides += [f"ssl.burn_in_steps={args.burn_in}", f"ssl.ema_decay={args.ema_decay}", "ssl.teacher_check=warn"]
    if arm == "ema_baseline":
        # No fixed teacher: its student starts as the teacher did, whatever the demo recipe's student_init says.
        overrides += ["ssl.burn_in_pseudo_labels=false", f"ssl.pseudo_label_score_threshold={args.baseline_threshold}",
                      "ssl.student_init=pretrained"]  # fmt: skip
        if getattr(args, "baseline_unsup_weight", None) is not None:
            overrides.append(f"ssl.unsup_loss_weight={args.baseline_unsup_weight}")
    elif not supervised:
        teacher = Path(args.out) / f"{family}_{set_name}" / f"supervised_seed{seed}" / "best"
        overrides.append(f"ssl.teacher={teacher}")
    overrides += args.overrides
    for override in args.variant_overrides.get(arm, []):
        overrides.append(RUN_PLACEHOLDER.sub(lambda m: str(run_folder(args, family, set_name, m[1], seed)), override))
    return overrides  # (placeholders in the overrides of every run are not replaced: a run has no arm to name)


def run_folder(args: argparse.Namespace, family: str, set_name: str, arm: str, seed: int) -> Path:
    return Path(args.out) / f"{family}_{set_name}" / f"{arm}_seed{seed}"


def arms_needed(arm: str, args: argparse.Namespace) -> list[str]:
    """The arms whose runs `arm` starts from: (a) for the guided arms (their teacher, unless a variant names
    another), and those a variant names with `{run:ARM}`."""
    named = [m[1] for o in args.variant_overrides.get(arm, []) for m in RUN_PLACEHOLDER.finditer(o)]
    default = [] if arm in BASELINES or supervised_variant(arm, args) else ["supervised"]
    return list(dict.fromkeys(default + named))


def supervised_variant(arm: str, args: argparse.Namespace) -> bool:
    """A `--variant` with `ssl.enabled=false`: a supervised arm (e.g. (a) trained on for as long as a student that
    starts from it). It is not judged itself; each guided arm is compared with it, against the same goal as with
    (a') (it is a baseline of the same kind: supervised training with the student's steps)."""
    values = [o.partition("=")[2] for o in args.variant_overrides.get(arm, []) if o.partition("=")[0] == "ssl.enabled"]
    return bool(values) and values[-1].strip().lower() in ("false", "no", "off", "0")


def check_variants(args: argparse.Namespace) -> str | None:
    """What is wrong with the variants' `{run:ARM}` placeholders (None: nothing): an arm that is not run for every
    family that needs it, or variants that wait for each other."""
    for name, overrides in args.variant_overrides.items():
        for arm in (m[1] for o in overrides for m in RUN_PLACEHOLDER.finditer(o)):
            if arm not in args.arms or arm == name:
                return f"--variant {name}: {{run:{arm}}} is not another arm in --arms"
    for family in args.families:
        for arm in args.arms:
            if f"{family}:{arm}" in args.skip:
                continue
            for needed in arms_needed(arm, args):
                if needed not in args.arms or f"{family}:{needed}" in args.skip:
                    return f"{family}:{arm} starts from the {needed} arm's runs: put {needed} in --arms, not skipped"
    done: set[str] = set()  # the arms in an order where each comes after those it needs; a cycle leaves some out
    while len(done) < len(args.arms):
        ready = {a for a in args.arms if a not in done and set(arms_needed(a, args)) <= done}
        if not ready:
            return f"the variants {sorted(set(args.arms) - done)} wait for each other ({{run:ARM}} in a circle)"
        done |= ready
    return None


def train_and_score(job: Job, args: argparse.Namespace) -> None:
    """Train the run (unless finished), then score its exports on the held-out set (unless cached)."""
    out = job.out
    settings = out / "ssl_gain_overrides.json"
    if settings.is_file() and json.loads(settings.read_text()) != job.overrides:
        raise SystemExit(f"{out} was started with other settings (see {settings}): give this comparison its own "
                         "--out, or delete that run folder to train it again")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    drift = recipe_drift(out, job.overrides) if (out / "final_metrics.json").is_file() else {}
    if drift:  # the recipe changed since: that run is not what this arm is now
        raise SystemExit(f"{out} was trained with {describe_drift(drift)}: give this comparison its own --out "
                         "(--table-only still tabulates the old runs, naming what they ran with)")  # fmt: skip
    if not (out / "final_metrics.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(job.overrides, indent=1) + "\n")
        command = [sys.executable, "-m", "gd_hf.train", str(ROOT / "recipes" / "demo_synthetic.yaml"), *job.overrides]
        with open(out / "train.log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    cache = out / "heldout.json"
    if args.heldout_val and not cache.is_file():
        command = [sys.executable, __file__, "--score", str(out), str(heldout_folder(args, job.set_name))]
        with open(out / "score.log", "a") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def score(run: Path, heldout: Path) -> None:
    """`--score RUN HELDOUT`: the held-out mask AP of RUN's `final/` and `best/` exports, into RUN/heldout.json."""
    from gd_hf.evaluate import evaluate_export

    scores = {}
    for export in ("final", "best"):
        if export == "best" and same_weights(run / "final", run / "best"):
            scores[export] = scores["final"]  # `best/` was picked at the last step: the same model, the same AP
            continue
        metrics, _ = evaluate_export(run / export, heldout / "annotations" / "instances_val.json", heldout / "val",
                                     top_k=50, batch_size=4, num_workers=0)  # fmt: skip
        scores[export] = metrics["AP"]
    (run / "heldout.json").write_text(json.dumps(scores) + "\n")


def same_weights(a: Path, b: Path) -> bool:
    """Whether two exports hold byte-identical weights (and configs): then they score the same, once is enough."""
    names = ("model.safetensors", "config.json", "preprocessor_config.json")
    return all(
        (a / n).is_file() and (b / n).is_file() and (a / n).stat().st_size == (b / n).stat().st_size
        and (a / n).read_bytes() == (b / n).read_bytes()
        for n in names
    )  # fmt: skip


def run_jobs(jobs: list[Job], args: argparse.Namespace) -> None:
    """Run the jobs `args.jobs` at a time, each once the jobs it needs are done; a failed job skips those that
    need it and the others go on."""
    lock, running = threading.Lock(), {}

    def work(job: Job) -> None:
        started = time.monotonic()
        try:
            train_and_score(job, args)
            state = "done"
        except (subprocess.CalledProcessError, SystemExit) as e:
            print(f"FAILED {job.name}: {e} (see {job.out / 'train.log'})", flush=True)
            state = "failed"
        with lock:
            job.state = state
            running.pop(job.name)
        print(f"{state} {job.name} in {time.monotonic() - started:.0f} s", flush=True)

    while True:
        with lock:
            for job in jobs:
                if job.state == "pending" and any(n.state in ("failed", "skipped") for n in job.needs):
                    job.state = "skipped"
            pending = [j for j in jobs if j.state == "pending"]
            if not pending and not running:
                return
            for job in pending:
                if len(running) >= args.jobs:
                    break
                if all(n.state == "done" for n in job.needs):
                    job.state = "running"
                    print(f"start {job.name}", flush=True)
                    running[job.name] = threading.Thread(target=work, args=(job,), daemon=True)
                    running[job.name].start()
        time.sleep(1)


def generate_sets(args: argparse.Namespace) -> None:
    """The training/val sets and the held-out sets, generated in parallel processes (once)."""
    commands = []
    for set_name in args.sets:
        varied = ["--varied-sizes"] if set_name == "mixed" else []
        if not data_folder(args, set_name).exists():
            commands.append([str(data_folder(args, set_name)), "--train", str(args.train_images), "--val", "100",
                             "--seed", str(args.data_seed), *varied])  # fmt: skip
        if args.heldout_val and not heldout_folder(args, set_name).exists():
            commands.append([str(heldout_folder(args, set_name)), "--train", "0", "--val", str(args.heldout_val),
                             "--seed", str(args.heldout_seed), *varied])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for start in range(0, len(commands), args.jobs):
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "gd_hf.data.synthetic", *c, "--size", str(args.size)],
                env=env,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            for c in commands[start : start + args.jobs]
        ]
        if any(p.wait() for p in processes):
            raise SystemExit("generating the synthetic sets failed")


def read_run(out: Path) -> dict[str, float]:
    """What the table shows of one run: held-out and val AP, the last logged pseudo-label figures, the teacher
    check's threshold."""
    summary = json.loads((out / "final_metrics.json").read_text())
    row = {"val_final": summary["final"]["AP"], "val_best": summary["best_ap"]}
    if (out / "heldout.json").is_file():
        heldout = json.loads((out / "heldout.json").read_text())
        row.update(heldout_final=heldout["final"], heldout_best=heldout["best"])
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        row.update({k: v for k, v in record.items() if k.startswith(("pseudo_", "teacher_check/"))})
        row["run_seconds"] = max(row.get("run_seconds", 0.0), record.get("seconds_since_launch", 0.0))
    return row


def recipe_drift(out: Path, overrides: list[str]) -> dict[str, tuple]:
    """What the finished run in `out` was trained with that the recipe and overrides no longer say: {key: (then,
    now)}, from the run's own `recipe.yaml` (the resolved recipe). A key the run's recipe lacks (added to gd_hf
    later, whose default keeps what ran before) was at its library default then: a recipe that now sets it to
    something else has drifted. Not compared: `output_dir` (the folder itself) and the `ssl.*` keys of a
    supervised run."""
    import yaml

    from gd_hf.config import Recipe, load_recipe, recipe_to_dict

    def flat(tree: dict, prefix: str = "") -> dict[str, object]:
        items: dict[str, object] = {}
        for key, value in tree.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    if not (out / "recipe.yaml").is_file():
        return {}
    then = {**flat(recipe_to_dict(Recipe())), **flat(yaml.safe_load((out / "recipe.yaml").read_text()))}
    now = flat(recipe_to_dict(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", overrides)))
    supervised = not then.get("ssl.enabled") and not now["ssl.enabled"]  # (the ssl.* keys do not act then)
    return {
        k: (then[k], v)
        for k, v in now.items()
        if k in then and k != "output_dir" and then[k] != v and not (supervised and k.startswith("ssl."))
    }


def read_course(out: Path, burn_in: int) -> dict[str, list[float] | float]:
    """How one run went: val AP at each evaluation, and the pseudo labels (per image, precision, recall, small
    hard masks) as means over the log lines of the burn-in and of the EMA phase."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    course: dict[str, list[float] | float] = {"val_AP": [r["val/AP"] for r in records if "val/AP" in r]}
    if (out / "recipe.yaml").is_file():  # the run's own burn-in (a variant may change it)
        import yaml

        burn_in = (yaml.safe_load((out / "recipe.yaml").read_text()).get("ssl") or {}).get("burn_in_steps", burn_in)
    for phase, lines in (("burn_in", [r for r in records if r["step"] <= burn_in]),
                         ("ema", [r for r in records if r["step"] > burn_in])):  # fmt: skip
        for key in ("pseudo_labels_per_image", "pseudo_precision", "pseudo_recall",
                    "pseudo_labels_small_mask_per_image"):  # fmt: skip
            values = [r[key] for r in lines if key in r]
            if values:
                course[f"{phase}/{key}"] = statistics.mean(values)
    return course


def course_table(courses: dict, args: argparse.Namespace) -> str:
    """Per family, set and arm (means over the seeds): val AP at each evaluation, and the pseudo labels of the
    burn-in and of the EMA phase — what the diagnosis of a losing student reads."""
    lines = [
        "How the runs went (means over the seeds; val AP on the 100 val images at each evaluation; pseudo labels "
        "as the mean of the log lines of each phase, against the unlabeled images' hidden labels):",
        "",
        "| family / set / arm | val AP at each evaluation | burn-in: labels / image, precision, recall, small "
        "masks / image | EMA: the same |",
        "|---|---|---|---|",
    ]
    for (family, set_name, arm), runs in courses.items():
        aps = list(zip(*[r["val_AP"] for r in runs]))
        cells = []
        for phase in ("burn_in", "ema"):
            keys = (
                "pseudo_labels_per_image",
                "pseudo_precision",
                "pseudo_recall",
                "pseudo_labels_small_mask_per_image",
            )
            cells.append(" / ".join(
                f"{statistics.mean(r[f'{phase}/{k}'] for r in runs):.2f}" if all(f"{phase}/{k}" in r for r in runs)
                else "—" for k in keys))  # fmt: skip
        lines.append(f"| {family} / {set_name} / {arm} | {' → '.join(f'{statistics.mean(a):.1f}' for a in aps)} "
                     f"| {cells[0]} | {cells[1]} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# What may differ between two settings whose rankings are compared: where the runs go and how long they train.
LENGTH_KEYS = ("output_dir", "train.max_steps", "train.eval_every", "train.checkpoint_every", "ssl.burn_in_steps")


def comparable_settings(run: Path, out: Path) -> dict[str, str] | None:
    """A run's overrides (its `ssl_gain_overrides.json`) without the length keys, with its out folder written
    `OUT` (the data and teacher paths name it); None without the file."""
    settings = run / "ssl_gain_overrides.json"
    if not settings.is_file():
        return None
    pairs = (o.partition("=") for o in json.loads(settings.read_text()))
    return {k: v.replace(str(out), "OUT") for k, _, v in pairs if k not in LENGTH_KEYS}


def ranking_table(results: dict, other_out: Path, args: argparse.Namespace, export: str = "best") -> str:
    """`--rank-against OTHER_OUT`: for each family, set and seed, the arms ordered by held-out AP (`export`) in these
    runs and in the same arms' runs under OTHER_OUT (the check's short setting), and every pair of arms that the two
    put in another order (a tie on one side and an order on the other included), with its gap in each. This is how
    a short setting shows that it ranks the arms as the long one does. A pair of runs that differ in more than
    their length (other data, weights, thresholds: see LENGTH_KEYS) is not compared. `export`: rank the `best/`
    exports (picked on the 100 val images) or the `final/` ones."""
    lines = [f"Ranking against `{other_out}` (held-out `{export}/` AP; ↔ marks a pair in another order):", "",
             f"| family / set / seed | these runs | the runs of `{other_out}` | pairs in another order |",
             "|---|---|---|---|"]  # fmt: skip
    for family in args.families:
        for set_name in args.sets:
            for seed in args.seeds:
                arms = [a for a in args.arms if f"{family}:{a}" not in args.skip]
                here, there, problems = {}, {}, []
                for arm in arms:
                    run = run_folder(args, family, set_name, arm, seed)
                    other = other_out / f"{family}_{set_name}" / f"{arm}_seed{seed}"
                    here[arm] = results.get((family, set_name, arm, seed), {}).get(f"heldout_{export}")
                    heldout = other / "heldout.json"
                    there[arm] = json.loads(heldout.read_text()).get(export) if heldout.is_file() else None
                    if here[arm] is None or there[arm] is None:
                        problems.append(f"{arm}: no held-out score {'here' if here[arm] is None else 'there'}")
                        continue
                    mine, theirs = comparable_settings(run, Path(args.out)), comparable_settings(other, other_out)
                    if mine is not None and theirs is not None and mine != theirs:
                        keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                        problems.append(f"{arm}: other settings there ({', '.join(keys)})")
                if problems:
                    lines.append(f"| {family} / {set_name} / {seed} | not compared: {'; '.join(problems)} | | |")
                    continue
                order = [sorted(arms, key=lambda a, d=d: -d[a]) for d in (here, there)]
                swapped = []
                for k, a in enumerate(arms):
                    for b in arms[k + 1 :]:
                        gap_here, gap_there = here[a] - here[b], there[a] - there[b]
                        if gap_here * gap_there < 0 or (gap_here == 0) != (gap_there == 0):
                            swapped.append(f"{a} − {b}: {gap_here:+.2f} here, {gap_there:+.2f} there ↔")
                lines.append(
                    f"| {family} / {set_name} / {seed} | "
                    + " | ".join(" > ".join(f"{a} {d[a]:.2f}" for a in o) for o, d in zip(order, (here, there)))
                    + f" | {'; '.join(swapped) or 'none: the same order'} |"
                )
    return "\n".join(lines) + "\n"


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def table(results: dict, args: argparse.Namespace) -> str:
    """The markdown the script prints and writes (and `--docs` puts into docs/benchmarks.md and RESULTS.md)."""
    key = "heldout" if args.heldout_val else "val"
    lines = [
        f"`python benchmarks/ssl_gain.py {' '.join(args.argv)}`: {args.train_images} synthetic training images of "
        f"{args.size} px, {args.labeled_percent} % labeled, (a) {args.teacher_steps} steps, (b)/(c) {args.steps} "
        f"steps with burn-in {args.burn_in}, EMA decay {args.ema_decay}, seeds {' / '.join(map(str, args.seeds))}; "
        + (
            f"mask AP on {args.heldout_val} held-out images (generator seed {args.heldout_seed}) that train and pick "
            "nothing"
            if args.heldout_val
            else "mask AP on the 100 val images that also pick `best/`"
        ),  # fmt: skip
        "",
    ]
    for family in args.families:
        lines += [
            f"**{family}**",
            "",
            "| set | arm | `best/` AP mean ± sd | per seed | `final/` AP mean ± sd | per seed "
            "| pseudo labels / image, precision, recall (last log) | threshold |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for set_name in args.sets:
            for arm in args.arms:
                if f"{family}:{arm}" in args.skip:
                    continue
                rows = [results.get((family, set_name, arm, s)) for s in args.seeds]
                if any(r is None or f"{key}_best" not in r for r in rows):
                    done = [r for r in rows if r is not None and f"{key}_best" in r]
                    seeds = " / ".join(f"{r[f'{key}_best']:.2f}" if r in done else "—" for r in rows)
                    lines.append(
                        f"| {set_name} | {arm} | missing ({len(done)} of {len(rows)} seeds) | {seeds} | — | | | |"
                    )
                    continue
                best, final = [r[f"{key}_best"] for r in rows], [r[f"{key}_final"] for r in rows]
                quality = " / ".join(
                    f"{statistics.mean(r[k] for r in rows):.2f}" if all(k in r for r in rows) else "—"
                    for k in ("pseudo_labels_per_image", "pseudo_precision", "pseudo_recall")
                )
                thresholds = sorted({r.get("teacher_check/score_threshold") for r in rows} - {None})
                chosen = " / ".join(f"{t:g}" for t in thresholds) if thresholds else "—"
                lines.append(
                    f"| {set_name} | {arm} | {mean_sd(best)} | {' / '.join(f'{a:.2f}' for a in best)} | {mean_sd(final)} "
                    f"| {' / '.join(f'{a:.2f}' for a in final)} | {quality} | {chosen} |"
                )
        drifted = {}  # what runs were trained with that the recipe no longer says, per arm
        for (fam, _, arm, _), row in results.items():
            if fam == family and row.get("drift"):
                drifted.setdefault(arm, {}).update(row["drift"])
        if drifted:
            lines.append("")
        for arm, drift in drifted.items():
            lines.append(f"- `{arm}` ran with {describe_drift(drift)}")
        lines.append("")
        supervised_variants = [(a, 3.0) for a in args.arms if supervised_variant(a, args)]
        for set_name in args.sets:
            for arm in [a for a in args.arms if a not in BASELINES and not supervised_variant(a, args)]:
                # a variant is also compared with (c) (or --lever-base), its lever's own effect
                base = getattr(args, "lever_base", "guided")
                lever = [(base, 0.0)] if arm != base else []
                for baseline, goal in (("supervised", 3.0), ("supervised_long", 3.0), ("ema_baseline", 0.0),
                                       *supervised_variants, *lever):  # fmt: skip
                    pairs = [(results.get((family, set_name, arm, s)), results.get((family, set_name, baseline, s)))
                             for s in args.seeds]  # fmt: skip
                    if baseline not in args.arms or any(a is None or b is None or f"{key}_best" not in a
                                                        or f"{key}_best" not in b for a, b in pairs):  # fmt: skip
                        continue
                    gains = [a[f"{key}_best"] - b[f"{key}_best"] for a, b in pairs]
                    wins = sum(g > 0 for g in gains)
                    target = goal if family == "mask2former" else 0.0
                    every_seed = baseline not in ("ema_baseline", base)
                    ahead = statistics.mean(gains) >= target if target else statistics.mean(gains) > 0
                    met = ahead and (not every_seed or wins == len(gains))
                    lines.append(
                        f"- {set_name}: {arm} − {baseline} (`best/`): **{statistics.mean(gains):+.2f}** AP, per seed "
                        f"{' / '.join(f'{g:+.2f}' for g in gains)}, ahead in {wins} of {len(gains)} "
                        f"(goal {'≥ +' if target else '> '}{target:g}{', every seed' if every_seed else ''}: "
                        f"{'met' if met else 'not met'})"
                    )
        lines.append("")
    return "\n".join(lines)


def markers(block: str | None) -> tuple[str, str]:
    """The markers of the default block (`<!-- ssl_gain:begin -->`) or of a named one (`<!-- ssl_gain:NAME:begin -->`)."""
    if block is None:
        return BEGIN, END
    return f"<!-- ssl_gain:{block}:begin -->", f"<!-- ssl_gain:{block}:end -->"


def describe_drift(drift: dict[str, tuple]) -> str:
    return ", ".join(f"{key} {then} (the recipe now: {now})" for key, (then, now) in sorted(drift.items()))


def write_block(path: Path, text: str, block: str | None = None, bounds: tuple[str, str] | None = None) -> None:
    """Replace what lies between the ssl_gain markers (of `block`, see `markers`), or the `bounds` given, of
    `path` with `text`."""
    begin, end = bounds or markers(block)
    content = path.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{path} has no {begin} ... {end} block to write the table into")
    head, _, rest = content.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    if sys.argv[1:2] == ["--score"]:
        score(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("--families", nargs="+", choices=("mask2former", "eomt"), default=["mask2former", "eomt"])
    parser.add_argument("--sets", nargs="+", choices=tuple(SET_OVERRIDES), default=list(SET_OVERRIDES))
    parser.add_argument("--arms", nargs="+", default=["supervised", "supervised_long", "ema_baseline", "guided"],
                        help="supervised, supervised_long, ema_baseline, guided and any --variant names")  # fmt: skip
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="an arm: guided with these overrides (repeatable)")  # fmt: skip
    parser.add_argument("--skip", nargs="+", default=[], metavar="FAMILY:ARM",
                        help="arms not run for a family, e.g. eomt:ema_baseline")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on --threads threads)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--labeled-percent", type=float, default=2.0)
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--size", type=int, default=128, help="image side (the mean longer side of mixed images)")
    parser.add_argument("--steps", type=int, default=800, help="steps of (b) and (c)")
    parser.add_argument("--teacher-steps", type=int, default=500, help="steps of (a), the teacher of (c)")
    parser.add_argument("--burn-in", type=int, default=560)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--evals", type=int, default=4, help="val evaluations per run (they pick `best/`)")
    parser.add_argument("--baseline-threshold", default="0.7", help="(b)'s pseudo-label score threshold")
    parser.add_argument(
        "--baseline-unsup-weight", type=float, help="(b)'s unsupervised loss weight (default: the recipe's)"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="generator seed of the training/val images")
    parser.add_argument("--heldout-val", type=int, default=500, help="held-out images (0: none)")
    parser.add_argument("--heldout-seed", type=int, default=7)
    parser.add_argument("--lever-base", default="guided", metavar="ARM",
                        help="the arm each variant is also compared with (its lever's own effect)")  # fmt: skip
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md and RESULTS.md")
    parser.add_argument("--docs-block", metavar="NAME",
                        help="with --docs: write between <!-- ssl_gain:NAME:begin/end --> instead, in the documents "
                        "that have them (an ablation's own table)")  # fmt: skip
    parser.add_argument("--table-only", action="store_true", help="tabulate the finished runs, train nothing")
    parser.add_argument("--rank-against", metavar="OTHER_OUT",
                        help="also order the arms of each seed as these runs and OTHER_OUT's runs rank them (e.g. the "
                        "2,000-step check against the short setting)")  # fmt: skip
    parser.add_argument("--out", help="where the runs go (default: outputs/ssl_gain_<size>px)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_intermixed_args()
    args.argv = [a for a in sys.argv[1:] if a not in ("--table-only", "--docs")]  # the command that trains it all
    if args.docs_block:
        if not args.docs:
            parser.error("--docs-block NAME says where --docs writes: give --docs too")
        k = next(k for k, a in enumerate(args.argv) if a.startswith("--docs-block"))
        del args.argv[k : k + (1 if "=" in args.argv[k] else 2)]
    args.out = args.out or f"outputs/ssl_gain_{args.size}px"  # runs of another image size never share a folder
    if args.rank_against and not Path(args.rank_against).is_dir():
        parser.error(f"--rank-against {args.rank_against}: no such folder (give the --out of the runs to rank against)")
    args.variant_overrides = {v[0]: v[1:] for v in args.variant}
    unknown = set(args.arms) - {*BASELINES, "guided", *args.variant_overrides}
    if unknown:
        parser.error(f"--arms {sorted(unknown)}: not an arm (supervised, supervised_long, ema_baseline, guided, "
                     "or a --variant name)")  # fmt: skip
    problem = check_variants(args)  # before minutes of generating data
    if problem:
        parser.error(problem)
    if args.heldout_val and args.heldout_seed == args.data_seed:
        parser.error(f"--heldout-seed and --data-seed are both {args.data_seed}: the held-out images would be "
                     "copies of the training images")  # fmt: skip
    started = time.monotonic()
    generate_sets(args)
    jobs: dict[tuple, Job] = {}
    for family in args.families:
        for set_name in args.sets:
            for seed in args.seeds:
                for arm in sorted(args.arms, key=lambda a: a != "supervised"):  # the teachers first
                    if f"{family}:{arm}" in args.skip:
                        continue
                    overrides = run_overrides(family, set_name, arm, seed, args)
                    out = Path(args.out) / f"{family}_{set_name}" / f"{arm}_seed{seed}"
                    job = Job(family, set_name, arm, seed, overrides, out)
                    jobs[(family, set_name, arm, seed)] = job
    for (family, set_name, arm, seed), job in jobs.items():
        job.needs = [jobs[(family, set_name, needed, seed)] for needed in arms_needed(arm, args)]  # (checked above)
    # Family by family in --families order (the first one's table is whole first), each family's teachers first,
    # then arm by arm in --arms order.
    rank = {arm: k for k, arm in enumerate(sorted(args.arms, key=lambda a: a != "supervised"))}
    order = sorted(jobs.values(), key=lambda j: (args.families.index(j.family), rank[j.arm], j.set_name, j.seed))
    if args.table_only:  # what has finished, without training anything
        for job in order:
            finished = (job.out / "final_metrics.json").is_file() and (
                not args.heldout_val or (job.out / "heldout.json").is_file())  # fmt: skip
            job.state = "done" if finished else "skipped"
    else:
        run_jobs(order, args)
    results = {key: read_run(job.out) for key, job in jobs.items() if job.state == "done"}
    for key, row in results.items():  # only --table-only can get here with old runs: the table names them
        row["drift"] = recipe_drift(jobs[key].out, jobs[key].overrides)
    courses: dict[tuple, list] = {}
    for (family, set_name, arm, _), job in jobs.items():
        if job.state == "done":
            courses.setdefault((family, set_name, arm), []).append(read_course(job.out, args.burn_in))
    text = table(results, args) + "\n" + course_table(courses, args)
    if args.rank_against:
        for export in ("best", "final"):  # `best/` is picked on 100 val images: the ranking of both is shown
            text += "\n" + ranking_table(results, Path(args.rank_against), args, export)
    log = Path(args.out) / "invocations.jsonl"
    if not args.table_only:  # each training invocation's wall time, so that the table can say what it all cost
        with open(log, "a") as f:
            f.write(json.dumps({"argv": args.argv, "wall_min": round((time.monotonic() - started) / 60, 1)}) + "\n")
    walls = [json.loads(line)["wall_min"] for line in log.read_text().splitlines()] if log.is_file() else []
    seconds = sum(r.get("run_seconds", 0.0) for r in results.values())
    text += (
        f"\nCost: the {len(results)} runs took {seconds / 60:.0f} process-minutes of training (launch to last log line; "
        f"about {seconds / 60 / args.jobs:.0f} min of wall time at {args.jobs} at a time, plus generating the sets "
        "and scoring); the script's training invocations into this folder took "
        f"{sum(walls):.0f} min of wall time in all ({len(walls)} logged).\n"
    )
    print(text)
    Path(args.out, "results.md").write_text(text)
    if args.docs:
        documents = [ROOT / "docs" / "benchmarks.md", ROOT / "benchmarks" / "RESULTS.md"]
        if args.docs_block:
            documents = [d for d in documents if markers(args.docs_block)[0] in d.read_text()]
            if not documents:
                sys.exit(f"--docs-block {args.docs_block}: neither docs/benchmarks.md nor benchmarks/RESULTS.md has "
                         f"{markers(args.docs_block)[0]}")  # fmt: skip
        for path in documents:
            write_block(path, text, args.docs_block)
    failed = [job.name for job in jobs.values() if job.state != "done"]
    if failed:
        sys.exit(f"{len(failed)} run(s) did not finish: {', '.join(failed)}")


if __name__ == "__main__":
    main()
