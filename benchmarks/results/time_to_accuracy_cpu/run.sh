#!/bin/bash
# Time to accuracy on Fashion-MNIST (issue 27): a hold-out-only recipe search, then one compare of the official
# recipe beside the chosen fast recipe at equal pretraining wall time. Run from the repository root, the machine
# otherwise idle (2 cores here). The search never reads the test split (--holdout-only).
set -euo pipefail
source .venv/bin/activate
OUT=${OUT:-/work/ttA}
python -c 'import torch, json; print(json.dumps(dict(capability=torch.backends.cpu.get_cpu_capability(),
  amx_bf16=torch.cpu._is_amx_tile_supported(), avx512_bf16=torch.cpu._is_avx512_bf16_supported(), torch=torch.__version__)))'
[ -f "$OUT/fmnist/_info.json" ] || mae-timm shards fashion-mnist --out "$OUT/fmnist" --quiet

EVAL="--holdout 5000 --knn-k 10,20,50 --feature-blocks 1,2,4 --pools avg,token,flat --probe-blr 1.0,0.3 --probe-epochs 10"
# 1. the search: 1 seed, a quarter of the reference budget, every candidate at the wall time of 750 official updates
[ -n "${SKIP_SEARCH:-}" ] || mae-timm compare --data "$OUT/fmnist" --holdout-only --seeds 1 --updates 750 $EVAL --finetune-epochs 0 \
  --partial-blocks 0 --curve-points 1 --curve-bank 10000 --out "$OUT/search" \
  --arms "raw_pixels,mae,mae{decoder=cross,predict_ratio=0.25}@wall,mae{blr=4.5e-3}@wall,mae{crop_scale_min=0.8}@wall,mae{blr=4.5e-3,crop_scale_min=0.8,decoder=cross,predict_ratio=0.25}@wall"

# 2. the comparison: the official recipe (today's defaults) at the committed compare's 3,000 updates beside the
#    candidate recipe (FAST) at the same pretraining wall time; the test split is read once, at the end. The readout
#    grid is narrowed to what the hold-out rows chose so far (avg / flat pooling, the last 1-2 blocks) to fit the session
FAST=${FAST:-"mae{batch_size=128}"}
SEEDS=${SEEDS:-2}
FINAL="--holdout 5000 --knn-k 10,20,50 --feature-blocks 1,2 --pools avg,flat --probe-blr 1.0,0.3 --probe-epochs 10"
mae-timm compare --data "$OUT/fmnist" --seeds "$SEEDS" --updates 3000 $FINAL --finetune-epochs 1 \
  --finetune-images 10000 --partial-blocks 1 --curve-points 3 --curve-bank 10000 --out "$OUT/final" \
  --arms "raw_pixels,scratch,mae,${FAST}@wall"
