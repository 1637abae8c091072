#!/usr/bin/env python
"""Items per second of ``zfdiffusion dataset`` with 1 and with N processes (torchrun), from scratch.

    .venv/bin/python benchmarks/bench_dataset.py --procs 1,2 --threads-per-proc 1 --resolution 64 --per-depth 8
    .venv/bin/python benchmarks/bench_dataset.py --n-volumes 4 --resolution 64 \
        --out docs/results/bench_dataset_volumes.json

Each run fills a fresh temporary folder with the same data set and is timed end to end (process
start, model load, generation, writing). Writes ``--out`` (.json and .md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, run_main, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_run(procs: int, threads: int, a, folder: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    args = ["-m", "napari_zfdiffusion.cli", "-q", "dataset", "--model", a.model, "--depths", a.depths,
            *(["--n-volumes", str(a.n_volumes)] if a.n_volumes else ["--per-depth", str(a.per_depth)]),
            "--resolution", str(a.resolution), "--steps", str(a.steps),
            "--device", a.device, "--out", str(folder)]
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({procs} processes):\n{proc.stderr[-3000:]}")
    items = len(list((folder / "items").iterdir()))
    return {"processes": procs, "threads_per_process": threads, "items": items, "seconds": round(secs, 2),
            "items_per_s": round(items / secs, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zf-cascade-demo")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--threads-per-proc", type=int, default=1)
    p.add_argument("--depths", default="all")
    p.add_argument("--per-depth", type=int, default=8)
    p.add_argument("--n-volumes", type=int, default=None, help="volumes (over --depths) instead of slices")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_dataset.json")
    a = p.parse_args()
    rows = []
    for n in (int(v) for v in a.procs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            r = one_run(n, a.threads_per_proc, a, Path(tmp) / "ds")
        print(f"{n} process(es) x {a.threads_per_proc} thread(s): {r['items']} items in {r['seconds']} s "
              f"= {r['items_per_s']} items/s")
        rows.append(r)
    result = {"command": " ".join(sys.argv), "cpu": cpu_model(), "settings": vars(a) | {"out": str(a.out)},
              "rows": rows}
    md = "\n".join([
        f"# `zfdiffusion dataset` throughput ({a.device}, {cpu_model()})", "",
        f"{a.model}, depths {a.depths}, "
        + (f"{a.n_volumes} volumes" if a.n_volumes else f"{a.per_depth} per depth")
        + f", resolution {a.resolution}, {a.steps} steps; "
        "end to end (start, load, generate, write).", "",
        "| processes | threads each | items | seconds | items / s |", "|---|---|---|---|---|",
        *[f"| {r['processes']} | {r['threads_per_process']} | {r['items']} | {r['seconds']} | {r['items_per_s']} |"
          for r in rows], ""])
    write_results(a.out, result, md)
    return 0


if __name__ == "__main__":
    run_main(main)
