#!/usr/bin/env python
"""Speed and memory of the depth cascade: seconds per sample per stage, UNet forward time, sampler overhead.

For each stage (base 64 at batch 1 and 4, then sr128, sr256, sr512 at batch 1):

* ``s/sample``: wall time of the stage's whole sampling loop (``Cascade.generate`` for the base,
  ``Cascade.upsample`` from the stage's input resolution for a super-resolution stage), divided by
  the batch size. One warm-up call first.
* ``forward``: the median time of one UNet forward with the batch the sampler really runs (the base
  stage with guidance > 1 runs the unconditional and conditional predictions as one batch of 2B;
  super-resolution with guidance 1 runs B).
* ``overhead`` = total / (steps x forward): 1.0 means the loop costs nothing beyond the network.
* peak RSS of the process after the stage (it only grows, and the stages run small to large), and on
  CUDA the peak allocated GPU memory of the stage.

Writes ``OUT/results/bench_cascade.json`` and ``.md`` and prints the table. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _machine import cpu_model, peak_rss_mb, rss_mb, run_main, sync, write_results  # benchmarks/_machine.py
from napari_zfdiffusion.core.cascade import Cascade
from napari_zfdiffusion.core.store import resolve_model

ROOT = Path(__file__).resolve().parents[1]
RUN_MODEL = ROOT / "runs" / "zf-cascade-demo"


def default_model() -> str:
    return str(RUN_MODEL) if (RUN_MODEL / "base" / "stage.json").is_file() else "zf-cascade-demo"


def timed(fn, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


@torch.no_grad()
def forward_time(cas: Cascade, name: str, batch: int, repeats: int, t_index: int = 500) -> float:
    """Median seconds of one UNet forward of stage ``name`` with ``batch`` images."""
    stage = cas.stages[name]
    model = cas._model(stage)
    dev, res = cas.device, stage.resolution
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 1, res, res), generator=g).to(dev)
    kw = {"class_labels": torch.zeros(batch, dtype=torch.long, device=dev)}
    if stage.input_resolution:
        kw["cond"] = torch.randn((batch, 1, res, res), generator=g).to(dev)
        kw["noise_level"] = torch.full((batch,), 0.1, device=dev)
    t = torch.tensor(t_index, device=dev)
    def once():
        with torch.autocast(dev.type, dtype=cas.dtype) if cas.dtype is not None else contextlib.nullcontext():
            model(x, t, **kw)

    once()  # warm-up
    return statistics.median(timed(once, dev) for _ in range(repeats))


def measure(cas: Cascade, name: str, batch: int, a: argparse.Namespace) -> dict:
    stage = cas.stages[name]
    dev = cas.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    steps = a.steps if name == "base" else a.sr_steps
    if name == "base":
        guided = a.guidance not in (0.0, 1.0)

        def run(k):
            cas.generate(a.depth, guidance=a.guidance, resolution=stage.resolution, n=batch, seed=a.seed,
                         sampler=a.sampler, steps=k)
    else:
        guided = False
        rng = np.random.default_rng(a.seed)
        low = rng.random((batch, stage.input_resolution, stage.input_resolution)).astype(np.float32)

        def run(k):
            cas.upsample(low, a.depth, resolution=stage.resolution, seed=a.seed, sampler=a.sampler, steps=k,
                         normalise=False)
    fwd_batch = batch * (2 if guided else 1)
    run(2)  # warm-up: loads the stage, allocates
    reps = a.sample_repeats if stage.resolution <= 128 else a.sample_repeats_large
    totals = [timed(lambda: run(steps), dev) for _ in range(reps)]
    total = statistics.median(totals)
    fwd = forward_time(cas, name, fwd_batch, a.repeats)
    params = sum(p.numel() for p in cas._model(stage).parameters())
    out = {
        "stage": name, "resolution": stage.resolution, "batch": batch, "steps": steps,
        "guidance": a.guidance if name == "base" else 1.0, "forward_batch": fwd_batch,
        "sample_repeats": reps, "seconds_total": total, "seconds_total_all": totals, "seconds_per_sample": total / batch, "forward_s_median": fwd,
        "sampler_overhead": total / (steps * fwd), "params_M": params / 1e6,
        "peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb(),
        "train_steps_done": stage.info.get("training", {}).get("steps_done"),
    }
    if dev.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def markdown(r: dict) -> str:
    e = r["environment"]
    cuda = any("peak_cuda_mb" in row for row in r["rows"])
    L = [f"# Cascade benchmark ({e['device']})", "",
         f"Model `{r['model']['name']}` (training steps " + ", ".join(f"{k} {v}" for k, v in r["model"]["steps"].items())
         + f"). {e['device_name']}; torch {e['torch']}, {e['threads']} thread(s); sampler {r['settings']['sampler']}; "
         f"load average at start {e['loadavg_start']}, at end {e['loadavg_end']}.", "",
         "| stage | resolution | batch | steps | forward batch | s / sample | forward (ms, median) | overhead | peak RSS (MB)"
         + (" | peak GPU (MB)" if cuda else "") + " |",
         "|---|---|---|---|---|---|---|---|---" + ("|---" if cuda else "") + "|"]
    for row in r["rows"]:
        L.append(f"| {row['stage']} | {row['resolution']} | {row['batch']} | {row['steps']} | {row['forward_batch']} | "
                 f"{row['seconds_per_sample']:.2f} | {row['forward_s_median'] * 1e3:.1f} | {row['sampler_overhead']:.2f} | "
                 f"{row['peak_rss_mb']:.0f}" + (f" | {row['peak_cuda_mb']:.0f}" if cuda else "") + " |")
    full = r.get("full_cascade_s_per_sample")
    if full:
        L += ["", f"One sample through the whole cascade (sum of the batch-1 stages): **{full:.1f} s**."]
    L += ["", "overhead = stage total / (steps x forward); peak RSS is the process high-water mark after the stage.",
          f"Made by `{r['command']}`.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=default_model(), help="cascade folder or bundled model name")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--steps", type=int, default=25, help="base-stage steps (the CLI's default)")
    p.add_argument("--sr-steps", type=int, default=None, help="super-resolution steps (default: --steps, as the CLI)")
    p.add_argument("--guidance", type=float, default=3.0, help="base-stage guidance (the CLI's default)")
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--base-batches", default="1,4", help="batch sizes for the base stage")
    p.add_argument("--sr-batch", type=int, default=1, help="batch size for the super-resolution stages")
    p.add_argument("--stages", default="all", help="comma-separated subset of base,sr128,sr256,sr512")
    p.add_argument("--repeats", type=int, default=7, help="forward-pass repeats (median)")
    p.add_argument("--sample-repeats", type=int, default=3,
                   help="repeats of each whole sampling run at 64 and 128 (median)")
    p.add_argument("--sample-repeats-large", type=int, default=1, help="the same at 256 and 512")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own, i.e. OMP_NUM_THREADS or all cores)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs", help="writes OUT/results/bench_cascade.{json,md}")
    p.add_argument("--tag", default="", help="suffix for the result files, e.g. 'cuda' -> bench_cascade_cuda.json")
    a = p.parse_args(argv)
    a.sr_steps = a.sr_steps or a.steps
    if a.threads:
        torch.set_num_threads(a.threads)

    cas = Cascade.load(a.model, device=a.device)
    dev = cas.device
    wanted = list(cas.stages) if a.stages == "all" else [s.strip() for s in a.stages.split(",")]
    missing = [s for s in wanted if s not in cas.stages]
    if missing:
        p.error(f"stages {missing} are not in {a.model} (it has {', '.join(cas.stages)})")
    env = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "python": platform.python_version(), "dtype": str(cas.dtype or torch.float32),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()], "rss_after_load_mb": rss_mb(),
    }
    print(f"{env['device_name']} | torch {env['torch']} | {env['threads']} thread(s) | load {env['loadavg_start']}",
          flush=True)
    rows = []
    for name in wanted:
        batches = [int(b) for b in a.base_batches.split(",")] if name == "base" else [a.sr_batch]
        for b in batches:
            row = measure(cas, name, b, a)
            rows.append(row)
            print(f"{name:6s} {row['resolution']:4d}px batch {b}: {row['seconds_per_sample']:.2f} s/sample, "
                  f"forward {row['forward_s_median'] * 1e3:.1f} ms (x{row['forward_batch']}), "
                  f"overhead {row['sampler_overhead']:.2f}, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    one = {r["stage"]: r["seconds_per_sample"] for r in rows if r["batch"] == 1}
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_cascade.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": {"path": str(resolve_model(a.model)), "name": cas.name,
                  "steps": {n: s.info.get("training", {}).get("steps_done") for n, s in cas.stages.items()}},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "environment": env,
        "rows": rows,
        "full_cascade_s_per_sample": sum(one.values()) if set(one) == set(cas.stages) else None,
    }
    md = markdown(result)
    print()
    print(md)
    res_dir = a.out / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_cascade" + (f"_{a.tag}" if a.tag else "")
    write_results(res_dir / f"{stem}.json", result, md)
    return 0


if __name__ == "__main__":
    run_main(main)
