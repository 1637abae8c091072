#!/usr/bin/env bash
# Issue 15 (part 4): time to quality of the depth cascade's base stage on a 2-core CPU.
# For each real multi-depth stack (CHO: 20 time points x 5 planes; cells3d nuclei: 60 planes in 6
# depth classes) and each training setting, train the base stage for MINUTES minutes in increments
# and measure, at a checkpoint about every EVERY minutes, the depth accuracy of generated 64x64 planes
# (over that of held-out real planes) and their nearest-neighbour distance to the training planes
# (over that of held-out real planes). The bottom-right quarter of every plane is held out.
#
# Usage: scripts/time_to_quality.sh [OUT_DIR]
#   env: MINUTES=60 EVERY=10 THREADS=2 DEVICE=cpu GRID=oat|full ONLY="setting names" STACKS="cho nuclei3d"
#        EXTRA="more options of the tool" FIGURES=docs/images PY=.venv/bin/python
#   GRID=oat (default): the defaults (small, lr 1e-3, batch 16) and one change at a time (tiny; lr 2e-4,
#   the default before these curves;
#   batch 8): 4 runs per stack, 8 in all (8 x MINUTES of training, plus start-up and evaluations).
#   GRID=full: every combination of size small/tiny x lr 2e-4/1e-3 x batch 16/8 (16 runs).
# Run it on an otherwise idle machine: the minutes are what is measured. A killed run continues where
# it stopped when the script is started again (finished runs are skipped).
# Writes OUT_DIR/<stack>_<setting>/time_to_quality.{json,png} and the curves of each stack,
# docs/images/time_to_quality_<stack>.png.
set -euo pipefail
OUT=${1:-runs/time_to_quality}
PY=${PY:-.venv/bin/python}
MINUTES=${MINUTES:-60}
EVERY=${EVERY:-10}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
GRID=${GRID:-oat}
ONLY=${ONLY:-}
STACKS=${STACKS:-cho nuclei3d}
EXTRA=${EXTRA:-}
FIGURES=${FIGURES:-docs/images}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT" "$FIGURES"

$PY -m napari_zfdiffusion.cli -q fetch-data --dataset cho
$PY -m napari_zfdiffusion.cli -q fetch-data --dataset nuclei3d
DATA=$($PY -c "from napari_zfdiffusion.core.fetch import data_dir; print(data_dir())")
# one (Z, Y, X) stack per CHO time point: all 20 (the held-out region is a quarter of each plane)
CHO=("$DATA/cho/train" "$DATA/cho/test")
NUCLEI=("$DATA/nuclei3d/nuclei.tif")  # not the folder: it also holds nuclei_label.tif

# setting name | options of the tool (left out: train cascade's defaults)
if [ "$GRID" = full ]; then
  SETTINGS=()
  for size in small tiny; do for lr in 2e-4 1e-3; do for batch in 16 8; do
    SETTINGS+=("${size}_lr${lr}_b${batch}|--size $size --lr $lr --batch-size $batch")
  done; done; done
else
  SETTINGS=("defaults|" "tiny|--size tiny" "lr2e-4|--lr 2e-4" "batch8|--batch-size 8")
fi

finished() {  # the run in $1 reached MINUTES (its results say so)
  [ -f "$1/time_to_quality.json" ] && $PY - "$1/time_to_quality.json" "$MINUTES" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
ok = "total_wall_seconds" in r and r["settings"]["schedule"].get("minutes") == float(sys.argv[2])
sys.exit(0 if ok else 1)
EOF
}

measure() {  # stack name, setting name, setting options, then the tool's data options
  local stack=$1 name=$2 opts=$3
  shift 3
  local run="$OUT/${stack}_${name}"
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if finished "$run"; then echo "done already: $run"; return; fi
  local resume=""
  if [ -e "$run/time_to_quality.json" ] || [ -e "$run/run" ]; then resume=--resume; fi
  echo "=== $stack, $name: $MINUTES training minutes -> $run"
  # shellcheck disable=SC2086  # $opts, $EXTRA and $resume are lists of options
  $PY -m napari_zfdiffusion.evaluation.time_to_quality "$@" --out "$run" --label "$stack: $name" $opts \
      --minutes "$MINUTES" --every "$EVERY" --threads "$THREADS" --device "$DEVICE" $EXTRA $resume \
      2>&1 | tee -a "$OUT/${stack}_${name}.log"
}

for s in "${SETTINGS[@]}"; do
  for stack in $STACKS; do
    case $stack in
      cho) measure cho "${s%%|*}" "${s#*|}" --data "${CHO[@]}" ;;
      nuclei3d) measure nuclei3d "${s%%|*}" "${s#*|}" --data "${NUCLEI[@]}" --depth-classes 6 ;;
      *) echo "unknown stack '$stack' (cho, nuclei3d)" >&2; exit 2 ;;
    esac
  done
done

for stack in $STACKS; do
  runs=("$OUT/${stack}"_*/time_to_quality.json)
  [ -e "${runs[0]}" ] || continue
  $PY -m napari_zfdiffusion.evaluation.time_to_quality --plot "${runs[@]}" --to "$FIGURES/time_to_quality_${stack}.png"
done
echo "results in $OUT/*/time_to_quality.json; curves in $FIGURES/time_to_quality_<stack>.png"
