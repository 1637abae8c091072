#!/usr/bin/env python
"""Seconds per volume at each cascade resolution (``Cascade.generate_volume``), and peak memory.

    .venv/bin/python benchmarks/bench_volume.py --resolutions 64,128,256,512 --threads 2

For each resolution: one volume over every depth of the model (continuity guidance 1, depth
guidance 3, 25 steps per stage), after one warm-up volume at 64 px. Reports seconds per volume and
per plane, the share of time in each stage, the peak RSS of the process (it only grows; the
resolutions run small to large) and, on CUDA, the peak allocated GPU memory. With continuity 1 and
super-resolution guidance 1 a super-resolution stage runs one prediction per step and the base
three (no depth, depth, depth + plane above) in one batched forward; ``--continuity 2`` adds a
second prediction to every super-resolution step.

Writes ``--out`` (.json and .md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model, peak_rss_mb, run_main, sync, write_results  # noqa: E402

from napari_zfdiffusion.core.cascade import Cascade  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zf-cascade-demo")
    p.add_argument("--resolutions", default="64,128,256,512")
    p.add_argument("--continuity", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="default docs/results/bench_volume_<device>.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cas = Cascade.load(a.model, a.device)
    dev = cas.device
    out = a.out or ROOT / "docs" / "results" / f"bench_volume_{dev.type}.json"
    depths = tuple(range(cas.n_classes))
    cas.generate_volume(depths[:2], resolution=64, steps=2, continuity_guidance=a.continuity)  # warm-up
    rows = []
    for res in (int(v) for v in a.resolutions.split(",")):
        stage_time: dict[str, float] = {}
        last = [time.perf_counter(), None]

        def cb(pr, stage_time=stage_time, last=last):
            now = time.perf_counter()
            name = pr.stage.split(" ")[-1]
            stage_time[name] = stage_time.get(name, 0.0) + now - last[0]
            last[0] = now

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        last[0] = t0
        cas.generate_volume(depths, guidance=a.guidance, continuity_guidance=a.continuity, resolution=res,
                            steps=a.steps, callback=cb)
        sync(dev)
        secs = time.perf_counter() - t0
        row = {"resolution": res, "planes": len(depths), "seconds_per_volume": round(secs, 2),
               "seconds_per_plane": round(secs / len(depths), 2),
               "stage_share": {k: round(v / secs, 3) for k, v in stage_time.items()},
               "peak_rss_mb": round(peak_rss_mb())}
        if dev.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
        print(row, flush=True)
        rows.append(row)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    result = {"command": " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_model(), "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": str(cas.path), "settings": {k: v for k, v in vars(a).items() if k != "out"}, "rows": rows}
    where = gpu or f"{cpu_model()}, {torch.get_num_threads()} thread(s)"
    md = "\n".join([
        f"# Volume generation ({dev.type}: {where})", "",
        f"`{cas.name}`, {len(depths)} planes per volume, continuity guidance {a.continuity:g}, depth guidance "
        f"{a.guidance:g}, {a.steps} steps per stage; made by `{' '.join(sys.argv)}`.", "",
        "| resolution | s / volume | s / plane | time per stage | peak RSS (MB) |"
        + (" peak GPU (MB) |" if gpu else ""),
        "|---|---|---|---|---|" + ("---|" if gpu else ""),
        *[f"| {r['resolution']} | {r['seconds_per_volume']} | {r['seconds_per_plane']} | "
          + ", ".join(f"{k} {v:.0%}" for k, v in r["stage_share"].items()) + f" | {r['peak_rss_mb']} |"
          + (f" {r['peak_gpu_mb']} |" if gpu else "") for r in rows], ""])
    write_results(out, result, md)
    return 0


if __name__ == "__main__":
    run_main(main)
