#!/bin/bash
# A short one-launch run (teacher, guided burn-in, EMA) of a tiny Mask2Former on a polygon COCO stand-in with
# mixed sizes and the paper's jitter (0.1-2.0), for a before/after comparison of the data path:
#
#   benchmarks/polygon_run.sh TREE OUT        # TREE: a checkout (e.g. `git archive COMMIT | tar -x -C TREE`)
#   python benchmarks/compare_runs.py OUT_BEFORE OUT_AFTER --console-before OUT_BEFORE.console --console-after ...
#
# The stand-in (40 train + 8 val records of benchmarks/coco_scale.py's writer, seed 3) goes to $STANDIN
# (default /tmp/polygon_standin). PYTHON (default: python) runs it, one thread.
set -e
TREE=$(cd "$1" && pwd); OUT=$2; D=${STANDIN:-/tmp/polygon_standin}; PY=${PYTHON:-python}
[ -d "$D" ] || (cd "$TREE" && OMP_NUM_THREADS=1 PYTHONPATH=$TREE $PY -c "
import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from coco_scale import write_standin; write_standin(Path('$D'), 40, 8, seed=3)")
rm -rf "$OUT" "$OUT.cache"
cd "$TREE" && OMP_NUM_THREADS=1 PYTHONPATH=$TREE $PY -m gd_hf.train recipes/demo_synthetic.yaml output_dir=$OUT \
  data.train_images=$D/train2017 data.train_annotations=$D/annotations/instances_train2017.json \
  data.val_images=$D/val2017 data.val_annotations=$D/annotations/instances_val2017.json data.records_cache=$OUT.cache \
  data.generate_synthetic=false data.labeled_percent=50 data.min_scale=0.1 data.max_scale=2.0 \
  ssl.enabled=true ssl.train_teacher_first=true ssl.teacher_max_steps=4 ssl.burn_in_steps=2 ssl.unlabeled_batch_size=2 \
  ssl.teacher_check=warn train.max_steps=5 data.crop_size=96 data.eval_shortest_edge=96 data.eval_longest_edge=128 \
  data.num_workers=0 model.backbone_hidden_size=16 'model.backbone_depths=[1, 1, 1, 1]' \
  'model.backbone_num_heads=[1, 1, 2, 2]' model.hidden_dim=32 model.encoder_layers=1 model.decoder_layers=2 \
  model.num_queries=8 model.train_num_points=256 train.batch_size=2 train.log_every=1 train.eval_every=0 \
  train.checkpoint_every=2 train.warmup_steps=1 eval.batch_size=4 eval.top_k=10 > "$OUT.console" 2>&1
