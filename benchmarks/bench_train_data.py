#!/usr/bin/env python
"""Cascade training at a lab's data size: start-up time and peak memory per stage, 1 and 2 processes.

Makes (once) a synthetic set shaped like the original zebrafish work (default 52 specimens x 14
planes x 2048 x 2048 uint16, 5.7 GB on disk: bright blobs on a dim background, dimmer with depth),
then trains each stage for a few steps in a fresh process (under torchrun for 2 processes) and
records, per process:

* **start-up**: seconds from the start of ``train_stage`` to the end of the first training step
  (opening the files, each stack's percentiles, the 64 px cache for the base stage, the model);
* **peak RSS** (VmHWM) and the RSS after the model is built, so "above the model" is the data's share;
* seconds per step after the first.

    .venv/bin/python benchmarks/bench_train_data.py --data /tmp/labset            # about 15 min on 2 cores
    .venv/bin/python benchmarks/bench_train_data.py --specimens 8 --size 1024 --data /tmp/small --out /tmp/b.json

Results: docs/results/bench_train_data.json and .md (``--out``), table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import cpu_model  # noqa: E402

STAGES = ("base", "sr128", "sr256", "sr512")


def make_set(folder: Path, specimens: int, planes: int, size: int, seed: int = 0) -> float:
    """Write the synthetic stacks (skipped when they exist); returns their size on disk in GB."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    for i in range(specimens):
        path = folder / f"fish_{i:02d}.tif"
        if path.is_file():
            continue
        stack = np.empty((planes, size, size), np.uint16)
        for z in range(planes):
            cy, cx = rng.random(2)
            texture = np.sin(40 * (yy + cy)) * np.cos(40 * (xx + cx))  # a field of blobs, shifted per plane
            stack[z] = np.clip((texture > 0.5) * 30000 * (1 - z / (2 * planes)) + 800
                               + rng.integers(0, 400, (size, size)), 0, 65535)
        tmp = path.with_suffix(".part")
        tifffile.imwrite(tmp, stack)
        tmp.replace(path)
    return sum(p.stat().st_size for p in folder.glob("*.tif")) / 1e9


CHILD = r"""
import json, os, sys, time
t_start = time.perf_counter()
from napari_zfdiffusion.core.cascade.train import TrainConfig, train_stage
from napari_zfdiffusion.core.cascade import data as data_mod
from napari_zfdiffusion.core.training import loop

def rss(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
rec = {"rank": int(os.environ.get("RANK", 0)), "rss_imports_mb": rss("VmRSS")}
real_from_paths = data_mod.DepthDataset.from_paths.__func__
def from_paths(cls, *a, **k):
    t = time.perf_counter()
    ds = real_from_paths(cls, *a, **k)
    rec.update(data_open_s=round(time.perf_counter() - t, 2), data_held_mb=round(ds.held_bytes() / 2**20, 1),
               specimens_mine=len(ds.mine), specimens=len(ds.stacks))
    return ds
data_mod.DepthDataset.from_paths = classmethod(from_paths)
real_run = loop.run
def run(model, **kw):
    rec["rss_model_mb"] = rss("VmRSS")
    return real_run(model, **kw)
loop.run = run
steps = []
peak = {"anon": 0.0, "file": 0.0}
t0 = time.perf_counter()
def cb(p):
    steps.append(time.perf_counter())
    peak["anon"] = max(peak["anon"], rss("RssAnon"))
    peak["file"] = max(peak["file"], rss("RssFile"))
stage, data, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = TrainConfig(stage=stage, size="small", steps=n, batch_size=16, checkpoint_every=10**6, log_every=1)
train_stage(data, out, cfg, device="cpu", show_progress=False, callback=cb)
rec.update(startup_s=round(steps[0] - t0, 2), s_per_step=round((steps[-1] - steps[0]) / max(len(steps) - 1, 1), 2),
           peak_rss_mb=round(rss("VmHWM")), steps=len(steps))
rec["peak_above_model_mb"] = round(rec["peak_rss_mb"] - rec["rss_model_mb"])
rec.update(anon_at_steps_mb=round(peak["anon"]), file_at_steps_mb=round(peak["file"]))
with open(os.path.join(out, f"bench_rank{rec['rank']}.json"), "w") as f:
    json.dump(rec, f)
"""


def run_stage(stage: str, data: Path, procs: int, steps: int, threads: int) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench_{stage}_{procs}_"))
    script = out / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if procs == 1:
        cmd = [sys.executable, str(script), stage, str(data), str(out), str(steps)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               str(script), stage, str(data), str(out), str(steps)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{stage} x{procs} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("bench_rank*.json"))]
    for r in recs:
        r.update(stage=stage, procs=procs, wall_s=round(wall, 1))
    return recs


def markdown(result: dict) -> str:
    d = result["data"]
    lines = [f"# Cascade training at lab size ({result['machine'].get('cpu', '')})", "",
             f"{d['specimens']} specimens x {d['planes']} planes x {d['size']} x {d['size']} uint16, "
             f"{d['gb_on_disk']:.1f} GB on disk; batch 16, model size small, CPU, {result['threads']} thread(s) per "
             "process.", "",
             "| stage | processes | rank | start-up (s) | opening the data (s) | data held (MB) | RSS after model (MB) "
             "| peak RSS (MB) | peak above model (MB) | anonymous / file pages at the steps (MB) | s / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['stage']} | {r['procs']} | {r['rank']} | {r['startup_s']} | {r['data_open_s']} | "
                     f"{r['data_held_mb']} | {round(r['rss_model_mb'])} | {r['peak_rss_mb']} | {r['peak_above_model_mb']} | "
                     f"{r['anon_at_steps_mb']} / {r['file_at_steps_mb']} | {r['s_per_step']} |")
    lines += ["", "Start-up: from `train_stage` to the end of the first step (files opened, percentiles, the base "
              "stage's 64 px cache, the model). Peak above model: VmHWM minus the RSS once the model is built.",
              f"Made by `{result['command']}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder for the synthetic set (kept between runs)")
    ap.add_argument("--specimens", type=int, default=52)
    ap.add_argument("--planes", type=int, default=14)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_train_data.json")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    gb = make_set(a.data, a.specimens, a.planes, a.size)
    print(f"data: {a.specimens} x {a.planes} x {a.size}^2 uint16, {gb:.1f} GB ({time.perf_counter() - t:.0f} s)",
          flush=True)
    runs = []
    for stage in a.stages.split(","):
        for procs in (int(p) for p in a.procs.split(",")):
            recs = run_stage(stage, a.data, procs, a.steps, a.threads)
            runs.extend(recs)
            for r in recs:
                print(json.dumps(r), flush=True)
    result = {"data": {"specimens": a.specimens, "planes": a.planes, "size": a.size, "gb_on_disk": round(gb, 2)},
              "threads": a.threads, "steps": a.steps, "runs": runs, "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
              "command": "benchmarks/bench_train_data.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    a.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
