"""`ssl.student_init: teacher` trains bitwise what `model.pretrained=<the teacher's export>` trained.

The seed-averaged benchmark measured a student that starts from its teacher as a variant,
`model.pretrained={run:supervised}/best` (benchmarks/RESULTS.md, issue 34). The recipe key builds the student
the same way; this check shows that the two runs are the same run, so those figures are the key's figures:

    python benchmarks/student_init_equivalence.py [--out DIR]

On the paper's data path (mixed sizes, jitter 0.3-2.0) with the tests' tiny model: a 6-step teacher, then two
6-step students (burn-in 3, EMA 3, an evaluation at 3 and 6), one per spelling; `benchmarks/compare_runs.py`
then compares every export, checkpoint, optimizer, RNG and teacher state, the logs and the predictions. Exits 1
if anything differs. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="student_init_"))
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty: give a new --out")

    from accelerate.state import AcceleratorState

    from gd_hf.config import load_recipe
    from gd_hf.data.synthetic import generate
    from gd_hf.train import train
    from tests.conftest import PAPER_JITTER, tiny_overrides

    data = generate(out / "data", train=24, val=8, size=64, seed=2, varied_sizes=True)

    def run(folder: Path, extra: list[str]) -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        overrides = tiny_overrides(data, folder) + PAPER_JITTER + extra
        train(load_recipe(ROOT / "recipes" / "demo_synthetic.yaml", overrides))

    run(out / "teacher", ["train.max_steps=6"])
    teacher = out / "teacher" / "final"
    student = ["ssl.enabled=true", f"ssl.teacher={teacher}", "ssl.burn_in_steps=3", "ssl.unlabeled_batch_size=2",
               "ssl.pseudo_label_score_threshold=0.2", "ssl.pseudo_label_min_area=1", "train.max_steps=6",
               "train.eval_every=3", "data.labeled_percent=50"]  # fmt: skip
    # (the demo recipe says `student_init: teacher`: this run must be the paper's student from model.pretrained)
    run(out / "model_pretrained", student + ["ssl.student_init=pretrained", f"model.pretrained={teacher}"])
    run(out / "student_init", student + ["ssl.student_init=teacher"])
    compare = [sys.executable, str(ROOT / "benchmarks" / "compare_runs.py"), str(out / "model_pretrained"),
               str(out / "student_init")]  # fmt: skip
    return subprocess.run(compare).returncode


if __name__ == "__main__":
    sys.exit(main())
