"""benchmarks/ssl_gain.py: the table it prints is computed from the runs' files (mean ± sd, per seed, the gains
against the goals), and `--docs` writes it between the markers of a document, nothing else."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, demo_recipe


@pytest.fixture(scope="module")
def ssl_gain():
    spec = importlib.util.spec_from_file_location("ssl_gain", ROOT / "benchmarks" / "ssl_gain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ssl_gain"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def fake_run(folder: Path, heldout_best: float, threshold: float | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "final_metrics.json").write_text(json.dumps({"final": {"AP": 1.0}, "best_ap": 2.0}))
    (folder / "heldout.json").write_text(json.dumps({"final": heldout_best - 1, "best": heldout_best}))
    lines = [{"step": 0, "pseudo_labels_per_image": 2.0, "pseudo_precision": 0.5, "pseudo_recall": 0.25},
             {"step": 5, "pseudo_labels_per_image": 3.0, "pseudo_precision": 0.7, "pseudo_recall": 0.5}]  # fmt: skip
    if threshold is not None:
        lines.insert(0, {"step": 0, "teacher_check/score_threshold": threshold})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_the_table_is_computed_from_the_runs(ssl_gain, tmp_path):
    args = argparse.Namespace(
        argv=["--seeds", "0", "1", "2"], train_images=2400, size=160, labeled_percent=2.0, teacher_steps=500,
        steps=800, burn_in=560, ema_decay=0.999, seeds=[0, 1, 2], heldout_val=500, heldout_seed=7,
        families=["mask2former"], sets=["square"], arms=["supervised", "guided"], skip=[], variant_overrides={},
    )  # fmt: skip
    supervised, guided = [20.0, 22.0, 24.0], [24.0, 26.5, 23.0]
    results = {}
    for seed in range(3):
        results[("mask2former", "square", "supervised", seed)] = ssl_gain.read_run(
            fake_run(tmp_path / f"s{seed}", supervised[seed])
        )
        results[("mask2former", "square", "guided", seed)] = ssl_gain.read_run(
            fake_run(tmp_path / f"g{seed}", guided[seed], threshold=0.45))  # fmt: skip
    text = ssl_gain.table(results, args)
    assert "| square | supervised | 22.00 ± 2.00 | 20.00 / 22.00 / 24.00 | 21.00 ± 2.00 |" in text
    # the last logged pseudo-label figures, and the teacher check's threshold
    assert (
        "| square | guided | 24.50 ± 1.80 | 24.00 / 26.50 / 23.00 |" in text and "| 3.00 / 0.70 / 0.50 | 0.45 |" in text
    )
    # +2.5 on average (goal +3) and behind in seed 2: not met
    assert "guided − supervised (`best/`): **+2.50** AP, per seed +4.00 / +4.50 / -1.00, ahead in 2 of 3" in text
    assert "not met" in text
    del results[("mask2former", "square", "guided", 2)]
    assert "| square | guided | missing (2 of 3 seeds) | 24.00 / 26.50 / — |" in ssl_gain.table(results, args)


def test_docs_get_the_table_between_their_markers_only(ssl_gain, tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(f"before\n{ssl_gain.BEGIN}\nold table\n{ssl_gain.END}\nafter\n")
    ssl_gain.write_block(doc, "new table")
    assert doc.read_text() == f"before\n{ssl_gain.BEGIN}\nnew table\n{ssl_gain.END}\nafter\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- ssl_gain:begin -->"):
        ssl_gain.write_block(tmp_path / "plain.md", "x")
    named = tmp_path / "RESULTS.md"  # a named block (an ablation's table) leaves the default block alone
    named.write_text(
        f"{ssl_gain.BEGIN}\nmain\n{ssl_gain.END}\n<!-- ssl_gain:abl:begin -->\nold\n<!-- ssl_gain:abl:end -->\n"
    )
    ssl_gain.write_block(named, "ablations", "abl")
    assert named.read_text() == (
        f"{ssl_gain.BEGIN}\nmain\n{ssl_gain.END}\n<!-- ssl_gain:abl:begin -->\nablations\n<!-- ssl_gain:abl:end -->\n"
    )
    with pytest.raises(SystemExit, match="ssl_gain:other:begin"):
        ssl_gain.write_block(named, "x", "other")
    assert (ROOT / "docs" / "benchmarks.md").read_text().count(ssl_gain.BEGIN) == 1
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text().count(ssl_gain.BEGIN) == 1


def test_a_variant_starts_from_another_arms_run_and_a_supervised_variant_is_a_baseline(ssl_gain, tmp_path):
    """`{run:ARM}` in a variant's value is that arm's run folder of the same family / set / seed, the variant waits
    for it, and a variant with `ssl.enabled=false` is compared with the guided arms, not against the goals."""
    args = argparse.Namespace(
        out=str(tmp_path), train_images=2400, size=160, labeled_percent=2.0, teacher_steps=500, steps=800,
        burn_in=560, ema_decay=0.999, baseline_threshold="0.7", overrides=[], evals=4,
        variant_overrides={"guided_init": ["model.pretrained={run:supervised}/best"],
                           "supervised_more": ["ssl.enabled=false", "model.pretrained={run:supervised}/best"],
                           "guided_t800": ["ssl.teacher={run:supervised_long}/best"]},
    )  # fmt: skip
    overrides = ssl_gain.run_overrides("mask2former", "mixed", "guided_init", 2, args)
    teacher = tmp_path / "mask2former_mixed" / "supervised_seed2"
    assert overrides[-1] == f"model.pretrained={teacher}/best"
    assert f"ssl.teacher={teacher}/best" in overrides  # still distilled from (a)
    # the variant's own teacher comes after the default one: the later override wins
    long_teacher = tmp_path / "mask2former_mixed" / "supervised_long_seed2"
    overrides = ssl_gain.run_overrides("mask2former", "mixed", "guided_t800", 2, args)
    assert overrides[-1] == f"ssl.teacher={long_teacher}/best"
    assert ssl_gain.arms_needed("guided_t800", args) == ["supervised", "supervised_long"]
    assert ssl_gain.arms_needed("supervised_more", args) == ["supervised"]
    assert ssl_gain.arms_needed("supervised_long", args) == []
    assert ssl_gain.supervised_variant("supervised_more", args) and not ssl_gain.supervised_variant("guided_init", args)

    args.argv, args.seeds, args.heldout_val, args.heldout_seed = ["x"], [0, 1], 500, 7
    args.families, args.sets, args.skip = ["mask2former"], ["square"], []
    args.arms = ["supervised", "supervised_more", "guided", "guided_init"]
    results = {}
    for seed, (more, init) in enumerate([(25.0, 27.0), (24.0, 23.0)]):
        for arm, ap in (("supervised", 20.0), ("supervised_more", more), ("guided", 22.0), ("guided_init", init)):
            results[("mask2former", "square", arm, seed)] = ssl_gain.read_run(fake_run(tmp_path / f"{arm}{seed}", ap))
    text = ssl_gain.table(results, args)
    assert "guided_init − supervised_more (`best/`): **+0.50** AP, per seed +2.00 / -1.00, ahead in 1 of 2" in text
    assert "supervised_more − supervised" not in text  # a baseline, not an arm judged against the goals
    # a variant against (c): its lever's own effect
    assert (
        "guided_init − guided (`best/`): **+3.00** AP, per seed +5.00 / +1.00, ahead in 2 of 2 (goal > 0: met)" in text
    )
    assert "guided − guided" not in text


def test_variant_placeholders_are_checked_before_any_work(ssl_gain):
    """A `{run:ARM}` that is not run, variants that wait for each other, a supervised variant spelt another way."""

    def problem(arms, variants, skip=()):
        args = argparse.Namespace(arms=arms, variant_overrides=variants, families=["mask2former", "eomt"], skip=skip)
        return ssl_gain.check_variants(args)

    init = {"init": ["model.pretrained={run:supervised}/best"]}
    assert problem(["supervised", "init"], init) is None
    assert "not another arm in --arms" in problem(["init"], init)
    assert "eomt:init starts from the supervised arm" in problem(["supervised", "init"], init, ["eomt:supervised"])
    assert problem(["supervised", "init"], init, ["eomt:supervised", "eomt:init"]) is None
    circle = {"a": ["ssl.teacher={run:b}/best"], "b": ["ssl.teacher={run:a}/best"]}
    assert "wait for each other" in problem(["supervised", "a", "b"], circle)
    assert "not another arm" in problem(["supervised", "a-b"], {"a-b": ["x={run:a-b}"]})  # any name, itself refused
    for value in ("false", "False", "no", "OFF"):
        args = argparse.Namespace(variant_overrides={"more": [f"ssl.enabled={value}"]})
        assert ssl_gain.supervised_variant("more", args)
    assert not ssl_gain.supervised_variant("more", argparse.Namespace(variant_overrides={"more": ["ssl.enabled=true"]}))


def test_docs_block_needs_docs(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ssl_gain.py"), "--table-only", "--docs-block", "abl",
         "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "give --docs too" in result.stderr
    assert not any(tmp_path.iterdir())  # refused before generating anything


def test_a_finished_run_trained_with_another_recipe_is_not_reused_and_the_table_names_it(ssl_gain, tmp_path):
    """The demo recipe changed since a run finished: a rerun refuses to count it as the arm it is now, and
    `--table-only` names what it ran with. A key the run's recipe lacks (added later) counts only where the recipe
    now leaves its default; the ssl keys of a supervised run do not count."""
    import yaml

    from gd_hf.config import recipe_to_dict

    overrides = [f"output_dir={tmp_path / 'run'}", "ssl.train_teacher_first=false", "ssl.teacher=somewhere/best"]
    then = recipe_to_dict(demo_recipe(overrides))
    then["ssl"]["unsup_loss_weight"] = 7.0
    del then["ssl"]["unsup_no_object_weight"]  # a key added to gd_hf after the run
    then["output_dir"] = "elsewhere"
    run = fake_run(tmp_path / "run", 20.0)
    (run / "recipe.yaml").write_text(yaml.safe_dump(then))
    now = demo_recipe(overrides).ssl.unsup_loss_weight
    assert ssl_gain.recipe_drift(run, overrides) == {"ssl.unsup_loss_weight": (7.0, now)}
    job = ssl_gain.Job("mask2former", "square", "guided", 0, overrides, run)
    args = argparse.Namespace(threads=1, heldout_val=500)
    (run / "ssl_gain_overrides.json").write_text(json.dumps(overrides))
    with pytest.raises(SystemExit, match=f"ssl.unsup_loss_weight 7.0 \\(the recipe now: {now}\\)"):
        ssl_gain.train_and_score(job, args)
    # A key added later that the recipe now sets away from its default: the run had the default, so it drifted.
    del then["ssl"]["student_init"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(then))
    assert ssl_gain.recipe_drift(run, [*overrides, "ssl.unsup_loss_weight=7.0", "ssl.student_init=teacher"]) == {
        "ssl.student_init": ("pretrained", "teacher")
    }
    then["ssl"]["enabled"] = False  # a supervised run: its ssl keys do not act
    (run / "recipe.yaml").write_text(yaml.safe_dump(then))
    assert ssl_gain.recipe_drift(run, [*overrides, "ssl.enabled=false"]) == {}


def test_every_arm_loads_on_the_demo_recipe_and_only_the_guided_student_starts_from_its_teacher(ssl_gain, tmp_path):
    """The demo recipe's `ssl.student_init: teacher` needs a fixed teacher: (b) has none and says
    `pretrained`, (c) inherits the recipe's choice. Each arm's overrides load as the run would load them."""

    args = argparse.Namespace(
        out=str(tmp_path), train_images=2400, size=160, labeled_percent=2.0, teacher_steps=500, steps=800,
        burn_in=560, ema_decay=0.999, baseline_threshold="0.7", overrides=[], evals=4, variant_overrides={},
    )  # fmt: skip
    loaded = {
        arm: demo_recipe(ssl_gain.run_overrides("eomt", "mixed", arm, 1, args))
        for arm in ("supervised", "supervised_long", "ema_baseline", "guided")
    }
    assert not loaded["supervised"].ssl.enabled and not loaded["supervised_long"].ssl.enabled
    assert loaded["ema_baseline"].ssl.student_init == "pretrained"
    assert not loaded["ema_baseline"].ssl.burn_in_pseudo_labels
    assert loaded["guided"].ssl.student_init == "teacher"
    assert loaded["guided"].ssl.teacher == str(tmp_path / "eomt_mixed" / "supervised_seed1" / "best")


def test_an_export_identical_to_final_is_scored_once_and_a_different_one_is_scored(ssl_gain, tmp_path, monkeypatch):
    """`best/` picked at the last step holds `final/`'s bytes: scoring it again would cost a pass over the held-out
    set for the same figure. A `best/` from an earlier step is scored on its own."""
    import gd_hf.evaluate

    scored = []

    def fake_evaluate(export, annotations, images, **kwargs):
        scored.append(export.name)
        return {"AP": 30.0 if export.name == "final" else 25.0}, None

    monkeypatch.setattr(gd_hf.evaluate, "evaluate_export", fake_evaluate)
    run = tmp_path / "run"
    for export in ("final", "best"):
        (run / export).mkdir(parents=True)
        for name in ("model.safetensors", "config.json", "preprocessor_config.json"):
            (run / export / name).write_bytes(b"same bytes")
    ssl_gain.score(run, tmp_path / "heldout")
    assert scored == ["final"]
    assert json.loads((run / "heldout.json").read_text()) == {"final": 30.0, "best": 30.0}
    for damage in ("config.json", "preprocessor_config.json"):  # the same weights, another config: scored
        (run / "best" / damage).write_bytes(b"other bytes")
        scored.clear()
        ssl_gain.score(run, tmp_path / "heldout")
        assert scored == ["final", "best"], damage
        (run / "best" / damage).write_bytes(b"same bytes")
    (run / "best" / "preprocessor_config.json").unlink()  # an export without a file: scored, not assumed equal
    scored.clear()
    ssl_gain.score(run, tmp_path / "heldout")
    assert scored == ["final", "best"]
    (run / "best" / "preprocessor_config.json").write_bytes(b"same bytes")
    (run / "best" / "model.safetensors").write_bytes(b"weights of an earlier step")
    scored.clear()
    ssl_gain.score(run, tmp_path / "heldout")
    assert scored == ["final", "best"]
    assert json.loads((run / "heldout.json").read_text()) == {"final": 30.0, "best": 25.0}


def test_the_ranking_against_another_setting_names_each_pair_in_another_order(ssl_gain, tmp_path):
    """The 2,000-step check against the short setting: the arms of each seed in order in both, and every pair the
    two order differently with both gaps (a level pair that flips is named, not hidden; a tie against an order
    too). Runs that differ in more than their length are not compared; a missing score says which."""
    long_out, short_out = tmp_path / "long", tmp_path / "short"
    args = argparse.Namespace(families=["mask2former", "eomt"], sets=["mixed"], seeds=[0], out=str(long_out),
                              skip=["eomt:supervised_long"], arms=["supervised", "supervised_long", "guided"])  # fmt: skip
    here = {"supervised": 15.0, "supervised_long": 22.05, "guided": 22.01}
    there = {"supervised": 12.0, "supervised_long": 17.0, "guided": 20.5}

    def settings(out: Path, steps: int, threshold: str = "0.7") -> list[str]:
        return [f"output_dir={out}/x", f"data.train_images={out}/data_mixed/train", f"train.max_steps={steps}",
                f"ssl.burn_in_steps={steps * 7 // 10}", f"ssl.pseudo_label_score_threshold={threshold}"]  # fmt: skip

    results = {}
    for family in ("mask2former", "eomt"):
        for arm in here:
            for out, scores, steps in ((long_out, here, 2000), (short_out, there, 800)):
                folder = out / f"{family}_mixed" / f"{arm}_seed0"
                folder.mkdir(parents=True)
                (folder / "heldout.json").write_text(json.dumps({"final": -scores[arm], "best": scores[arm]}))
                (folder / "ssl_gain_overrides.json").write_text(json.dumps(settings(out, steps)))
            results[(family, "mixed", arm, 0)] = {"heldout_best": here[arm], "heldout_final": -here[arm]}
    final = ssl_gain.ranking_table(results, short_out, args, "final")  # the `final/` exports' scores, reversed
    assert "held-out `final/` AP" in final and "supervised -15.00 > guided -22.01 > supervised_long -22.05" in final
    text = ssl_gain.ranking_table(results, short_out, args)
    assert "held-out `best/` AP" in text
    row = next(line for line in text.splitlines() if line.startswith("| mask2former / mixed / 0"))
    assert "supervised_long 22.05 > guided 22.01 > supervised 15.00" in row
    assert "guided 20.50 > supervised_long 17.00 > supervised 12.00" in row
    assert "supervised_long − guided: +0.04 here, -3.50 there ↔" in row
    assert row.count("↔") == 1  # supervised is last in both
    eomt = next(line for line in text.splitlines() if line.startswith("| eomt / mixed / 0"))
    assert "supervised_long" not in eomt and "none: the same order" in eomt  # the skipped arm is left out
    # A tie on one side against an order on the other is another order.
    results[("mask2former", "mixed", "guided", 0)] = {"heldout_best": 22.05}
    assert "supervised_long − guided: +0.00 here, -3.50 there ↔" in ssl_gain.ranking_table(results, short_out, args)
    # The other folder's run ran with another threshold: not compared, and the row says why.
    other = short_out / "mask2former_mixed" / "guided_seed0" / "ssl_gain_overrides.json"
    other.write_text(json.dumps(settings(short_out, 800, threshold="auto")))
    text = ssl_gain.ranking_table(results, short_out, args)
    assert "not compared: guided: other settings there (ssl.pseudo_label_score_threshold)" in text
    # A run without a held-out score, on either side: not compared, named.
    (short_out / "eomt_mixed" / "guided_seed0" / "heldout.json").unlink()
    del results[("mask2former", "mixed", "supervised", 0)]
    text = ssl_gain.ranking_table(results, short_out, args)
    assert "not compared: supervised: no held-out score here" in text
    assert "| eomt / mixed / 0 | not compared: guided: no held-out score there |" in text


def test_rank_against_a_folder_that_does_not_exist_is_refused_before_anything_runs(tmp_path):
    import subprocess

    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ssl_gain.py"), "--table-only",
                             "--out", str(tmp_path / "out"), "--rank-against", str(missing)],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert f"--rank-against {missing}: no such folder" in result.stderr
    assert not (tmp_path / "out").exists()
