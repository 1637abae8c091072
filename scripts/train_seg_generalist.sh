#!/usr/bin/env bash
# The generalist segmentation U-Net (issue 14) and its leave-one-source-out models:
#   RUN/all/           trained on the training planes of every annotated nuclei source
#   RUN/without_NAME/  the same, without source NAME (scored on NAME's test planes by
#                      `python -m napari_zfdiffusion.evaluation.generalist --run RUN`)
# Sources (`zfdiffusion fetch-data --dataset seg` cuts them into train/test planes): HeLa (Cell
# Tracking Challenge, ERR_SEG), CHO (the same, 3D), cells3d nuclei (3D labels), DSB 2018 (manual).
# Smaller sources are repeated in the file list so that each weighs about the same in the batches
# (crops are drawn in proportion to area): cells3d x3, DSB x10.
# Usage: scripts/train_seg_generalist.sh [RUN_DIR] [all|without_hela|...]...  (env STEPS, DEVICE, SIZE)
# A killed run continues with `--resume` (the same command again).
set -euo pipefail
RUN=${1:-runs/seg-generalist}
shift || true
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
STEPS=${STEPS:-2500}
SIZE=${SIZE:-small}
CLI=($PY -m napari_zfdiffusion.cli)
S=$("${CLI[@]}" -q fetch-data --dataset seg | sed -n 's/^seg: .* in //p')
SOURCES=(hela cho nuclei3d dsb)
declare -A REPEAT=([hela]=1 [cho]=1 [nuclei3d]=3 [dsb]=10)
CREDIT="Fluo-N2DL-HeLa and Fluo-N3DH-CHO (Cell Tracking Challenge, automatic ERR_SEG masks), cells3d nuclei (Allen Institute, 3D labels), DSB 2018 (manual masks); see SOURCE.txt in the fetched seg folder"
JOBS=("$@")
[ ${#JOBS[@]} -eq 0 ] && JOBS=(all without_hela without_cho without_nuclei3d without_dsb)
mkdir -p "$RUN"
for job in "${JOBS[@]}"; do
  left=${job#without_}
  imgs=() msks=() vimgs=() vmsks=()
  for s in "${SOURCES[@]}"; do
    [ "$job" != all ] && [ "$s" = "$left" ] && continue
    for _ in $(seq "${REPEAT[$s]}"); do imgs+=("$S/$s/train/images"); msks+=("$S/$s/train/masks"); done
    [ "$s" = cho ] && continue  # validation: the other sources' test planes (CHO's 25 would double its time)
    vimgs+=("$S/$s/test/images"); vmsks+=("$S/$s/test/masks")
  done
  echo "$job: ${imgs[*]}" > "$RUN/$job.sources"
  if ! "${CLI[@]}" train unet --images "${imgs[@]}" --masks "${msks[@]}" --val-images "${vimgs[@]}" \
      --val-masks "${vmsks[@]}" --out "$RUN/$job" --size "$SIZE" --crop 128 --batch-size 8 --steps "$STEPS" \
      --checkpoint-every 500 --device "$DEVICE" --resume --credit "$CREDIT" --licence "BSD-3-Clause (data)" \
      > "$RUN/$job.log" 2>&1; then
    echo "training $job failed: see $RUN/$job.log" >&2
    exit 1
  fi
  tail -n 1 "$RUN/$job.log"
done
