#!/usr/bin/env bash
# Copy the inference files of a trained patch model (autoencoder or latent diffusion; no optimiser
# state) into weights/, and write its card.   Usage: scripts/export_patch_demo.sh RUN_DIR/MODEL [NAME]
set -euo pipefail
SRC=${1:?model folder}
NAME=${2:-$(basename "$SRC")}
DEST=weights/$NAME
rm -rf "$DEST.tmp"; mkdir -p "$DEST.tmp"
cp "$SRC/model.json" "$DEST.tmp/"
for part in vae unet; do
  [ -f "$SRC/$part/stage.json" ] || continue
  mkdir -p "$DEST.tmp/$part"
  cp "$SRC/$part/config.json" "$SRC/$part/diffusion_pytorch_model.safetensors" "$SRC/$part/stage.json" "$DEST.tmp/$part/"
  cp "$SRC/training/$part/log.jsonl" "$DEST.tmp/$part/train_log.jsonl" 2>/dev/null || true
done
# a latent model's autoencoder log lives with the autoencoder it was trained from
VAE_RUN=$(dirname "$SRC")/$(basename "$SRC" | sed 's/-ldm-/-vae-/')
if [ -f "$VAE_RUN/training/vae/log.jsonl" ] && [ ! -f "$DEST.tmp/vae/train_log.jsonl" ]; then
  cp "$VAE_RUN/training/vae/log.jsonl" "$DEST.tmp/vae/train_log.jsonl"
fi
${PY:-.venv/bin/python} scripts/write_patch_card.py "$DEST.tmp" --name "$NAME"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
