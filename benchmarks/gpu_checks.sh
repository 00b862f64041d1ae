#!/usr/bin/env bash
# The checks to run when a session is lent a GPU, in order of value, each bounded so that the whole fits one
# device call: the loop's overhead per step, the accelerator post-processing, the paper recipe at COCO's image
# sizes (bf16, every phase, evaluation), then the demo recipe for as long as the budget lasts.
#
#     bash benchmarks/gpu_checks.sh OUT_DIR [BUDGET_SECONDS=540]
#
# Each check's full log goes to OUT_DIR/<name>.log; the console gets its exit code, time and last lines.
# Results go to benchmarks/RESULTS.md by hand, with the date and the device.
#
# Through this workplace's device tool (its image has torch/transformers/accelerate, not datasets, pycocotools,
# orjson, torchdata, dill, multiprocess, nor a new enough pyarrow): download their cp312 wheels into .whl/ (see
# the tool's README), carry `.whl`, and run
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD && mkdir -p /tmp/bin &&
#   printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >/tmp/bin/python && chmod +x /tmp/bin/python &&
#   PATH=/tmp/bin:$PATH bash benchmarks/gpu_checks.sh "$OUT" 500
# (`python` must be a wrapper, not a symlink: a symlinked venv interpreter loses its venv, and torch with it.)
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
began=$(date +%s)

check() {  # check NAME LIMIT_SECONDS COMMAND...: run it for at most LIMIT, or what is left of the budget
    local name=$1 limit=$2 left
    shift 2
    left=$((budget - ($(date +%s) - began)))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        echo "=== $name: skipped, budget spent"
        return
    fi
    echo "=== $name (at most ${limit} s): $*"
    local start=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "--- $name: exit $? after $(($(date +%s) - start)) s"
    grep -v -e '%|' -e '^\s*$' "$out/$name.log" | tail -n "${TAIL:-14}"
}

timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Bounded like every check, one import per line: on 2026-11-26 an unbounded one-line version of this hung for
# a whole device call (10 min) without a word, and the session's GPU time with it; this shows where it stops.
TAIL=20 check environment 90 python -u -c "
import time
for name in ('numpy', 'torch', 'pyarrow', 'datasets', 'transformers', 'accelerate', 'pycocotools.mask', 'gd_hf.train'):
    start = time.perf_counter()
    module = __import__(name, fromlist=['_'])
    print(f'{name} {getattr(module, \"__version__\", \"\")} imported in {time.perf_counter() - start:.1f} s', flush=True)
import torch
print('cuda available:', torch.cuda.is_available(), flush=True)
print(torch.ones(1, device='cuda') + 1, flush=True)
"

check train_step_supervised 45 python benchmarks/train_step.py --steps 20
check train_step_distill 45 python benchmarks/train_step.py --steps 20 --distill ssl.unlabeled_batch_size=4
check eval_cost_blobs 45 python benchmarks/eval_cost.py --device cuda --images 6
check eval_cost_scattered 40 python benchmarks/eval_cost.py --device cuda --images 2 --logits scattered
# The paper recipe (coco_1pct: 1,024-px crops, jitter 0.1-2.0, Swin-T sizes) on a 5,500-image stand-in at COCO's
# image sizes: start-up, s/step of each phase, peak memory, evaluation split. bf16, as users run it on a GPU.
TAIL=20 check coco_scale 220 python benchmarks/coco_scale.py --data /tmp/coco_standin_5000 --out /tmp/coco_scale \
    --train-images 5000 --val-images 500 --processes 1 --steps 5 --eval-images 50 --skip-cocoeval \
    train.mixed_precision=bf16 data.num_workers=8
# The demo recipe as README command 1 runs it, on the GPU, for what is left (its metrics.jsonl has s/step).
rm -rf /tmp/demo  # resume: auto would go on from a run of an earlier call on a warm machine
check demo 600 python -m gd_hf.train recipes/demo_synthetic.yaml output_dir=/tmp/demo data.num_workers=4
# (a device call brings back 8 files: the seven logs and this one; coco_scale's table is in its log)
cat /tmp/demo/teacher/metrics.jsonl /tmp/demo/metrics.jsonl >"$out/demo_metrics.jsonl" 2>/dev/null
echo "=== all checks done in $(($(date +%s) - began)) s"
