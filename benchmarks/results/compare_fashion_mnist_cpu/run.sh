#!/bin/bash
# Fashion-MNIST compare for issue 19, code frozen at commit e835221 (copied to /tmp/cmp/code_run)
source /work/main/.venv/bin/activate
export PYTHONPATH=/tmp/cmp/code_run
cd /tmp/cmp/final

run() { echo "+ mae-timm $*"; /usr/bin/time -v python -c 'import sys; from mae_timm.cli import main; sys.exit(main())' "$@"; }
run shards verify /tmp/cmp/fmnist
run compare --data /tmp/cmp/fmnist --arms raw_pixels,scratch,mae --updates 3000 --seeds 3 --holdout 5000 \
  --knn-k 10,20,50 --feature-blocks 1,4 --pools avg,token --probe-blr 1.0,0.3 --probe-epochs 10 \
  --finetune-epochs 2 --finetune-images 20000 --partial-blocks 1 --curve-points 3 --curve-bank 10000 \
  --out /tmp/cmp/final/main > main.log 2>&1
echo main rc $?
run compare --data /tmp/cmp/fmnist --arms raw_pixels,scratch,mae,early_mask,apl,early_mask@compute,apl@compute \
  --updates 600 --seeds 3 --holdout 5000 --knn-k 10,20,50 --feature-blocks 1,4 --pools avg --probe-blr 1.0,0.3 \
  --probe-epochs 10 --finetune-epochs 1 --finetune-images 10000 --partial-blocks 1 --curve-points 2 \
  --curve-bank 10000 --out /tmp/cmp/final/pretexts > pretexts.log 2>&1
echo pretexts rc $?
