#!/usr/bin/env bash
# A refactoring check: the same commands with another commit's code and with the working tree, and
# whether their outputs are bit-identical (images, volumes, patches, labels, probabilities, and the
# weights and cards of short trainings of every model family). CPU, one thread, a few minutes.
# Usage: scripts/compare_outputs.sh BASE_COMMIT [OUT_DIR]     (exit 1 if anything differs)
set -euo pipefail
BASE=${1:?usage: scripts/compare_outputs.sh BASE_COMMIT [OUT_DIR]}
OUT=${2:-$(mktemp -d)}
mkdir -p "$OUT"
ROOT=$(git rev-parse --show-toplevel)
PY=${PY:-$ROOT/.venv/bin/python}
WT=$(mktemp -d)/base
git -C "$ROOT" worktree add -q --detach "$WT" "$BASE"
trap 'git -C "$ROOT" worktree remove --force "$WT"' EXIT
export OMP_NUM_THREADS=1 ZFDIFFUSION_HOME=$OUT/home
DATA=$ROOT/src/napari_zfdiffusion/_data
CHO=$DATA/cho_t00_crop.tif HELA=$DATA/hela_t16-19_crop.tif MASKS=$ROOT/tests/data/hela_t16-19_crop_err_seg.tif
for side in base work; do
  D=$OUT/$side; mkdir -p "$D"
  if [ $side = base ]; then export PYTHONPATH=$WT/src; else export PYTHONPATH=$ROOT/src; fi
  C=("$PY" -m napari_zfdiffusion.cli -q)
  T=(--size tiny --steps 3 --batch-size 2 --checkpoint-every 3 --device cpu)
  "${C[@]}" generate --depth 2 --resolution 128 --steps 8 --seed 0 --n 2 --device cpu --out "$D/gen.tif"
  "${C[@]}" generate --depth 1 --resolution 64 --steps 6 --seed 2 --device cpu --out "$D/g64.tif"
  "${C[@]}" upsample "$D/g64.tif" --resolution 128 --steps 5 --seed 3 --device cpu --out "$D/up.tif"
  "${C[@]}" volume --depths 0-2 --resolution 64 --steps 8 --seed 1 --device cpu --out "$D/vol.tif"
  "${C[@]}" volume --depths 1-3 --resolution 64 --steps 5 --seed 6 --first-plane "$D/g64.tif" --device cpu --out "$D/vol2.tif"
  "${C[@]}" em generate --model nuclei-ldm-demo --n 2 --steps 8 --seed 5 --device cpu --out "$D/em.tif" --masks-out "$D/em_lab.tif"
  "${C[@]}" segment --in "$HELA" --out "$D/seg.tif" --prob-out "$D/prob.tif" --device cpu
  "${C[@]}" train cascade --data "$CHO" --out "$D/cas" --stage base --continuity "${T[@]}"
  "${C[@]}" train cascade --data "$CHO" --out "$D/cas" --stage sr128 --continuity "${T[@]}"
  "${C[@]}" train unet --images "$HELA" --masks "$MASKS" --out "$D/unet" --crop 64 "${T[@]}"
  "${C[@]}" train vae --images "$HELA" --out "$D/vae" --patch-size 64 "${T[@]}"
  "${C[@]}" train ldm --vae "$D/vae" --images "$HELA" --out "$D/ldm" --bank 16 "${T[@]}"
done > "$OUT/log.txt" 2>&1
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
import numpy as np, tifffile
from safetensors.numpy import load_file
out = pathlib.Path(sys.argv[1]); base, work = out / "base", out / "work"
same = True
def report(what, ok):
    global same
    same &= ok
    print(f"{'identical' if ok else 'DIFFERENT'}  {what}")
for f in ["gen.tif", "up.tif", "vol.tif", "vol2.tif", "em.tif", "em_lab.tif", "seg.tif", "prob.tif"]:
    report(f, np.array_equal(tifffile.imread(base / f), tifffile.imread(work / f)))
for d in ["cas/base", "cas/sr128", "unet/unet", "vae/vae", "ldm/unet"]:
    a, b = (load_file(s / d / "diffusion_pytorch_model.safetensors") for s in (base, work))
    report(f"{d} weights", a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a))
    a, b = (json.loads((s / d / "stage.json").read_text()) for s in (base, work))
    for s in (a, b):
        s.get("training", {}).pop("train_seconds", None)
        s.pop("plugin_version", None)
    report(f"{d}/stage.json", a == b)
for c in ["cas/cascade.json", "unet/model.json", "vae/model.json", "ldm/model.json"]:
    a, b = (json.loads((s / c).read_text()) for s in (base, work))
    for s in (a, b):
        s.pop("plugin_version", None)
    report(c, a == b)
print("all outputs identical" if same else "outputs differ", f"({out})")
sys.exit(0 if same else 1)
PYEOF
