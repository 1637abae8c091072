#!/usr/bin/env bash
# Copy the inference files of a trained cascade (no optimiser state) into weights/, and write its card.
# Usage: scripts/export_demo.sh RUN_DIR [NAME [`evaluation.cards cascade` options, e.g. --parent DIR]]
set -euo pipefail
RUN=${1:?run folder}
NAME=${2:-zf-cascade-demo}
shift $(( $# < 2 ? $# : 2 ))
DEST=weights/$NAME
rm -rf "$DEST.tmp"; mkdir -p "$DEST.tmp"
cp "$RUN/cascade.json" "$DEST.tmp/"
for st in base sr128 sr256 sr512; do
  [ -f "$RUN/$st/stage.json" ] || continue
  mkdir -p "$DEST.tmp/$st"
  cp "$RUN/$st/config.json" "$RUN/$st/diffusion_pytorch_model.safetensors" "$RUN/$st/stage.json" "$DEST.tmp/$st/"
  cp "$RUN/training/$st/log.jsonl" "$DEST.tmp/$st/train_log.jsonl" 2>/dev/null || true
done
${PY:-.venv/bin/python} -m napari_zfdiffusion.evaluation.cards cascade "$DEST.tmp" --name "$NAME" "$@"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
du -sh "$DEST"
