#!/usr/bin/env bash
# The GPU check (issue 17): on a machine with a CUDA GPU, in under 8 minutes on an H100,
#   1. the environment (nvidia-smi, torch, CUDA, the commit) and synthetic training data;
#   2. tests/test_device.py (its CUDA smoke test runs where CUDA is);
#   3. the cascade, latent and segmentation benchmarks on the GPU, with few repeats;
#   4. one inference benchmark (latent, batch 8) without and with ZFDIFFUSION_COMPILE=1;
#   5. 200 training steps of each cascade stage (base, sr128, sr256, sr512), of the autoencoder, the
#      latent diffusion UNet and the segmentation U-Net, all at the "base" size;
#   6. the rest of the test suite (not slow, no GUI), in whatever time is left.
# Everything goes into OUT (default runs/gpu_check): summary.md (one line per step: ok or failed,
# seconds), steps.jsonl (the same as JSON), env.txt, nvidia-smi.txt, logs/STEP.log, bench/ (the
# benchmarks' JSON and tables), train/ (the trained models and their logs), tests/ (junit XML).
# A failing step is recorded and the next one runs; the exit status is 1 if any step failed or was
# skipped for lack of time. Without a GPU it says so and exits 0 having run nothing.
#
# Usage: benchmarks/gpu_check.sh [OUT]
# Environment: PYTHON (default .venv/bin/python, else python3; it needs the project and a CUDA
# build of PyTorch), GPU_CHECK_DEVICE (default cuda; e.g. cuda:1), GPU_CHECK_BUDGET_S (default 460:
# no step starts, or runs, past it), GPU_CHECK_QUICK=1 (a rehearsal on the CPU: tiny models, 2
# steps, small benchmarks; checks that the steps run, measures nothing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_ARG=${1:-runs/gpu_check}
case "$OUT_ARG" in /*) OUT=$OUT_ARG ;; *) OUT=$PWD/$OUT_ARG ;; esac
cd "$ROOT"

QUICK=${GPU_CHECK_QUICK:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
if [[ $QUICK == 1 ]]; then
    DEVICE=cpu SIZE=tiny STEPS=2 BANK=32 BATCH=(--batch-size 2)
else
    DEVICE=${GPU_CHECK_DEVICE:-cuda} SIZE=base STEPS=200 BANK=512 BATCH=()  # the commands' own batch sizes
fi
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi

# ---------------------------------------------------------------- is there a GPU to check?
if [[ $QUICK != 1 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or finds none): nothing was run." >&2
        echo "gpu_check: run it on a machine with a CUDA GPU; GPU_CHECK_QUICK=1 rehearses the steps on the CPU." >&2
        exit 0
    fi
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check: nvidia-smi sees a GPU, but the PyTorch of $PY does not" \
             "($("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -n 1)): install a CUDA build" \
             "of PyTorch (make install TORCH=torch), or point PYTHON at a Python that has one." >&2
        exit 1
    fi
fi
if ! "$PY" -c 'import napari_zfdiffusion, diffusers' 2>/dev/null; then
    export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}  # the checkout's package, if its needs are there
    if ! "$PY" -c 'import napari_zfdiffusion, diffusers' 2>/dev/null; then
        echo "gpu_check: $PY cannot import the project (napari_zfdiffusion and its needs, e.g. diffusers):" >&2
        "$PY" -c 'import napari_zfdiffusion, diffusers' 2>&1 | tail -n 1 >&2 || true
        echo "gpu_check: install it first (pip install -e '.[testing]' with a CUDA build of PyTorch)." >&2
        exit 1
    fi
fi

mkdir -p "$OUT"/logs "$OUT"/bench "$OUT"/train "$OUT"/tests "$OUT"/data
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg ZFDIFFUSION_HOME=$OUT/zfhome
unset ZFDIFFUSION_COMPILE
CLI=("$PY" -m napari_zfdiffusion.cli -q)
START=$(date +%s)
FAILED=0
: >"$OUT/steps.jsonl"
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Device $DEVICE, size $SIZE, $STEPS training steps$([[ $QUICK == 1 ]] && echo ' (GPU_CHECK_QUICK rehearsal: measures nothing)');" \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ -n $(git status --porcelain 2>/dev/null | head -n 1) ]] && echo ' (with uncommitted changes)');" \
         "time budget ${BUDGET_S} s. Logs in logs/, results in bench/, train/ and tests/."
    echo
    echo "| step | result | seconds | limit (s) |"
    echo "|---|---|---|---|"
} >"$OUT/summary.md"

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output in logs/NAME.log, and records
# the outcome in summary.md and steps.jsonl; never stops the script.
step() {
    local name=$1 limit=$2 left t0 t1 rc secs result
    shift 2
    left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 15)); then
        result="failed (not run: the ${BUDGET_S} s budget is spent)"
        echo "| $name | $result | 0 | $limit |" >>"$OUT/summary.md"
        printf '{"step": "%s", "result": "skipped", "seconds": 0, "limit_s": %s}\n' "$name" "$limit" >>"$OUT/steps.jsonl"
        echo "== $name: skipped (budget spent)"
        FAILED=$((FAILED + 1))
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s)"
    t0=$(date +%s.%N)
    set +e
    timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then
        result=ok
    elif ((rc == 124 || rc == 137)); then
        result="failed (timed out at ${limit} s)"
    else
        result="failed (exit $rc)"
    fi
    [[ $result == ok ]] || FAILED=$((FAILED + 1))
    echo "| $name | $result | $secs | $limit |" >>"$OUT/summary.md"
    printf '{"step": "%s", "result": "%s", "exit": %s, "seconds": %s, "limit_s": %s, "log": "logs/%s.log"}\n' \
        "$name" "${result%% *}" "$rc" "$secs" "$limit" "$name" >>"$OUT/steps.jsonl"
    echo "   $result, $secs s"
    [[ $result == ok ]] || tail -n 5 "$OUT/logs/$name.log" | sed 's/^/   | /'
    return 0
}

# ---------------------------------------------------------------- 1. environment and data
environment() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true; fi
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "uncommitted: $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') file(s)"
        echo "host: $(uname -a)"
        echo "cpus: $(nproc)"
        echo "python: $PY"
        "$PY" - <<'EOF'
import platform, torch
import diffusers, numpy
print("python version:", platform.python_version())
print("torch:", torch.__version__, "| cuda:", torch.version.cuda, "| cudnn:", torch.backends.cudnn.version())
print("diffusers:", diffusers.__version__, "| numpy:", numpy.__version__)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        print(f"cuda:{i}: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
              f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free), bf16 {torch.cuda.is_bf16_supported()}")
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed (ZFDIFFUSION_COMPILE=1 falls back to eager)")
EOF
    } >"$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

make_data() {  # synthetic, offline: (Z, Y, X) stacks for the cascade; 2D images with labels for the rest
    "$PY" - "$OUT/data" <<'EOF'
import sys
from pathlib import Path

import numpy as np
import tifffile

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:512, :512]


def blobs(n, shape=(512, 512)):
    lab = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(12, shape[0] - 12), rng.integers(12, shape[1] - 12), rng.integers(5, 12)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return lab


(out / "stacks").mkdir(parents=True, exist_ok=True)
for s in range(4):  # 8 planes each, dimmer with depth, like the fish stacks
    planes = [((blobs(60) > 0) * 0.6 + rng.random((512, 512)) * 0.3) * (1.0 - 0.08 * z) for z in range(8)]
    tifffile.imwrite(out / "stacks" / f"specimen_{s:02d}.tif", (np.stack(planes) * 60000).astype(np.uint16))
for d in ("images", "masks"):
    (out / "patches" / d).mkdir(parents=True, exist_ok=True)
for i in range(6):
    lab = blobs(40)
    img = (lab > 0) * 0.6 + rng.random(lab.shape) * 0.3
    tifffile.imwrite(out / "patches" / "images" / f"blobs_{i:02d}.tif", (img * 255).astype(np.uint8))
    tifffile.imwrite(out / "patches" / "masks" / f"blobs_{i:02d}.tif", lab)
print("wrote", sorted(str(p.relative_to(out)) for p in out.rglob("*.tif")))
EOF
}

echo "gpu_check: device $DEVICE, results in $OUT"
export PY OUT
export -f environment make_data  # `timeout` runs programs: these run in a child bash
step env 60 bash -c environment
step data 60 bash -c make_data

# ---------------------------------------------------------------- 2. the GPU tests
step tests_device 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py -rs \
    --junitxml="$OUT/tests/test_device.xml"

# ---------------------------------------------------------------- 3. benchmarks on the device
if [[ $QUICK == 1 ]]; then
    CASCADE_ARGS=(--steps 2 --stages base --base-batches 1 --repeats 1 --sample-repeats 1)
    LATENT_ARGS=(--steps 2 --batches 1 --repeats 1 --forward-repeats 1)
    COMPILE_ARGS=(--steps 2 --batches 2 --repeats 1 --forward-repeats 1)
    SEGMENT_ARGS=(--sizes 256 --stacks 2 --stack-size 128 --whole-sizes 256 --repeats 1)
else
    CASCADE_ARGS=(--repeats 3 --sample-repeats 1 --sample-repeats-large 1)
    LATENT_ARGS=(--steps 25,50 --batches 1,8 --repeats 1 --forward-repeats 3)
    COMPILE_ARGS=(--steps 25 --batches 8 --repeats 2 --forward-repeats 5)
    SEGMENT_ARGS=(--sizes 1024,2048 --stacks 10 --stack-size 512 --whole-sizes 1024 --repeats 1 --repeats-large 1)
fi
step bench_cascade 100 "$PY" benchmarks/bench_cascade.py --model zf-cascade-demo --device "$DEVICE" \
    "${CASCADE_ARGS[@]}" --out "$OUT/bench" --tag gpu
step bench_latent 60 "$PY" benchmarks/bench_latent.py --model em-ldm-demo --device "$DEVICE" \
    "${LATENT_ARGS[@]}" --out "$OUT/bench/bench_latent_gpu.json"
step bench_segment 90 "$PY" benchmarks/bench_segment.py --device "$DEVICE" "${SEGMENT_ARGS[@]}" \
    --workdir "$OUT/bench/segment_work" --out "$OUT/bench/bench_segment_gpu"
rm -rf "$OUT/bench/segment_work"

# ---------------------------------------------------------------- 4. torch.compile: off, then on
step latent_eager 45 "$PY" benchmarks/bench_latent.py --model em-ldm-demo --device "$DEVICE" \
    "${COMPILE_ARGS[@]}" --out "$OUT/bench/bench_latent_eager.json"
step latent_compile 120 env ZFDIFFUSION_COMPILE=1 "$PY" benchmarks/bench_latent.py --model em-ldm-demo \
    --device "$DEVICE" "${COMPILE_ARGS[@]}" --out "$OUT/bench/bench_latent_compile.json"

# ---------------------------------------------------------------- 5. training at the base size
TRAIN=(--steps "$STEPS" --checkpoint-every "$STEPS" --device "$DEVICE" "${BATCH[@]}")
for stage in base sr128 sr256 sr512; do
    step "train_cascade_$stage" 60 "${CLI[@]}" train cascade --data "$OUT/data/stacks" --out "$OUT/train/cascade" \
        --stage "$stage" --size "$SIZE" "${TRAIN[@]}"
done
step train_vae 75 "${CLI[@]}" train vae --images "$OUT/data/patches/images" --out "$OUT/train/vae" \
    --size "$SIZE" "${TRAIN[@]}"
step train_ldm 60 "${CLI[@]}" train ldm --vae "$OUT/train/vae" --images "$OUT/data/patches/images" \
    --out "$OUT/train/ldm" --size "$SIZE" --bank "$BANK" "${TRAIN[@]}"
step train_unet 60 "${CLI[@]}" train unet --images "$OUT/data/patches/images" --masks "$OUT/data/patches/masks" \
    --out "$OUT/train/unet" --size "$SIZE" "${TRAIN[@]}"

# ---------------------------------------------------------------- 6. the rest of the suite
if [[ $QUICK == 1 ]]; then
    echo "| tests_suite | not run (GPU_CHECK_QUICK) | 0 | 0 |" >>"$OUT/summary.md"
else
    XDIST=()
    "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
    step tests_suite 400 "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not gui" "${XDIST[@]}" \
        --junitxml="$OUT/tests/suite.xml" tests
fi

TOTAL=$(($(date +%s) - START))
{
    echo
    echo "Total ${TOTAL} s; $FAILED step(s) failed or not run."
    echo
    echo "Benchmark tables: bench/results/bench_cascade_gpu.md, bench/bench_latent_gpu.md," \
         "bench/bench_segment_gpu.md; torch.compile: bench/bench_latent_eager.md vs bench/bench_latent_compile.md."
} >>"$OUT/summary.md"
echo
cat "$OUT/summary.md"
((FAILED == 0)) || exit 1
