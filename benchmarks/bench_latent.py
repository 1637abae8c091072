#!/usr/bin/env python
"""Speed and memory of a latent diffusion model for patches: sampling and decoding, per patch.

For each batch size (default 1 and 8) and number of sampling steps (default 25 and 50), one
``LatentModel.generate`` call (after a warm-up call) is timed in its parts, from its progress
callback:

* ``sample``: the reverse diffusion in latent space (``steps`` UNet forwards per batch), in seconds
  per patch and per patch per step;
* ``decode``: the autoencoder's decoder, latents to patches, seconds per patch;
* ``labels``: for a paired model, the masks to instance labels (CPU), seconds per patch;
* ``forward``: the median time of one latent UNet forward with the batch the sampler runs, and
  ``overhead`` = sample time / (steps x forward) (1.0: the loop costs nothing beyond the network);
* peak RSS of the process after the row (``resource.getrusage``; it only grows) and its current
  RSS (psutil, if installed); on CUDA the row's peak allocated GPU memory.

Writes ``--out`` (default ``docs/results/bench_latent.json``) and a markdown table beside it (same
name, ``.md``), and prints the table. See benchmarks/README.md.
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

import torch

from _machine import cpu_model, peak_rss_mb, rss_mb, run_main, sync, write_results  # benchmarks/_machine.py
from napari_zfdiffusion.core.latent import LatentModel
from napari_zfdiffusion.core.diffusion.sampling import DEFAULT_SAMPLER, SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "patches" / "em-ldm-demo"


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


@torch.no_grad()
def forward_time(model: LatentModel, batch: int, repeats: int, t_index: int = 500) -> float:
    """Median seconds of one latent UNet forward with ``batch`` latents (autocast as the sampler uses)."""
    dev = model.device
    x = torch.randn((batch, *model.card["latent_shape"]), generator=torch.Generator().manual_seed(0)).to(dev)
    t = torch.tensor(t_index, device=dev)
    amp = torch.autocast(dev.type, dtype=model.dtype) if model.dtype is not None else contextlib.nullcontext()

    def once() -> float:
        sync(dev)
        t0 = time.perf_counter()
        with amp:
            model.unet(x, t)
        sync(dev)
        return time.perf_counter() - t0

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def timed_generate(model: LatentModel, n: int, steps: int, a: argparse.Namespace) -> dict:
    """One ``generate`` call of ``n`` patches as one batch, split into sampling, decoding and labels."""
    marks: dict[str, float] = {}

    def progress(p):
        if p.step == p.total:
            sync(model.device)
            marks[p.stage] = time.perf_counter()

    sync(model.device)
    t0 = time.perf_counter()
    model.generate(n, seed=a.seed, sampler=a.sampler, steps=steps, batch=n, callback=progress)
    t1 = time.perf_counter()
    return {"total": t1 - t0, "sample": marks["sample"] - t0, "decode": marks["decode"] - marks["sample"],
            "labels": t1 - marks["decode"]}


def measure(model: LatentModel, batch: int, steps: int, a: argparse.Namespace) -> dict:
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    runs = [timed_generate(model, batch, steps, a) for _ in range(a.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    fwd = forward_time(model, batch, a.forward_repeats)
    row = {
        "batch": batch, "steps": steps, "repeats": a.repeats,
        "sample_s_per_patch": med["sample"] / batch, "sample_s_per_patch_per_step": med["sample"] / batch / steps,
        "decode_s_per_patch": med["decode"] / batch, "labels_s_per_patch": med["labels"] / batch,
        "total_s_per_patch": med["total"] / batch, "forward_s_median": fwd,
        "sampler_overhead": med["sample"] / (steps * fwd), "seconds_all": runs,
        "peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb(),
    }
    if dev.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def markdown(r: dict) -> str:
    e, m = r["environment"], r["model"]
    cuda = any("peak_cuda_mb" in row for row in r["rows"])
    L = [f"# Latent diffusion benchmark ({e['device']})", "",
         f"Model `{m['name']}` ({m['patch_size']}x{m['patch_size']} patches"
         + (" with masks" if m["paired"] else "") + f", latent {'x'.join(map(str, m['latent_shape']))}; "
         f"UNet {m['unet_params_M']:.1f} M parameters, {m['unet_steps_done']} training steps; decoder "
         f"{m['decoder_params_M']:.2f} M parameters). {e['device_name']}; torch {e['torch']}, {e['threads']} "
         f"thread(s), {e['dtype']}; sampler {r['settings']['sampler']}; load average at start {e['loadavg_start']}, "
         f"at end {e['loadavg_end']}.", "",
         "| batch | steps | sampling s / patch | per step (ms / patch) | UNet forward (ms, batch) | overhead "
         "| decode s / patch | labels s / patch | total s / patch | peak RSS (MB)"
         + (" | peak GPU (MB)" if cuda else "")
         + " |",
         "|---|---|---|---|---|---|---|---|---|---" + ("|---" if cuda else "") + "|"]
    for row in r["rows"]:
        L.append(f"| {row['batch']} | {row['steps']} | {row['sample_s_per_patch']:.3f} | "
                 f"{row['sample_s_per_patch_per_step'] * 1e3:.2f} | {row['forward_s_median'] * 1e3:.1f} | "
                 f"{row['sampler_overhead']:.2f} | {row['decode_s_per_patch']:.3f} | {row['labels_s_per_patch']:.4f} | "
                 f"{row['total_s_per_patch']:.3f} | {row['peak_rss_mb']:.0f}"
                 + (f" | {row['peak_cuda_mb']:.0f}" if cuda else "") + " |")
    L += ["", ("Median of the repeats; overhead = sampling time / (steps x one UNet forward at that batch); "
               "peak RSS is the process high-water mark after the row."), f"Made by `{r['command']}`.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="latent diffusion model folder or model name")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--steps", type=ints, default=ints("25,50"), help="comma-separated sampling steps")
    p.add_argument("--batches", type=ints, default=ints("1,8"), help="comma-separated batch sizes")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    p.add_argument("--repeats", type=int, default=1, help="timed generate calls per row (median)")
    p.add_argument("--forward-repeats", type=int, default=5, help="UNet forward repeats (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own, i.e. OMP_NUM_THREADS or all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_latent.json",
                   help="result JSON; the markdown table goes beside it (.md)")
    a = p.parse_args(argv)
    if not a.steps or not a.batches or min(a.steps + a.batches) < 1 or a.repeats < 1 or a.forward_repeats < 1:
        p.error("--steps, --batches, --repeats and --forward-repeats must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)

    rss0 = rss_mb()
    model = LatentModel.load(a.model, device=a.device)
    dev = model.device
    env = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "python": platform.python_version(), "dtype": str(model.dtype or torch.float32),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()], "rss_before_load_mb": rss0,
        "rss_after_load_mb": rss_mb(),
    }
    info = {"path": str(model.path), "name": model.name, "paired": model.paired, "patch_size": model.patch_size,
            "latent_shape": model.card["latent_shape"],
            "unet_steps_done": model.stage.get("training", {}).get("steps_done"),
            "vae_steps": model.card.get("vae_steps"),
            "unet_params_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
            "decoder_params_M": sum(p.numel() for n, p in model.vae.named_parameters()
                                    if n.startswith(("decoder.", "post_quant_conv."))) / 1e6}
    print(f"{env['device_name']} | torch {env['torch']} | {env['threads']} thread(s) | load {env['loadavg_start']} | "
          f"{info['name']} ({info['patch_size']}px, latent {info['latent_shape']})", flush=True)
    timed_generate(model, max(a.batches), 2, a)  # warm-up: allocations, kernels
    rows = []
    for b in a.batches:
        for s in a.steps:
            row = measure(model, b, s, a)
            rows.append(row)
            print(f"batch {b} steps {s}: sampling {row['sample_s_per_patch']:.3f} s/patch "
                  f"({row['sample_s_per_patch_per_step'] * 1e3:.2f} ms/step), decode {row['decode_s_per_patch']:.3f} "
                  f"s/patch, forward {row['forward_s_median'] * 1e3:.1f} ms (overhead {row['sampler_overhead']:.2f}), "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_latent.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "environment": env,
        "rows": rows,
    }
    md = markdown(result)
    print()
    print(md)
    write_results(a.out, result, md)
    return 0


if __name__ == "__main__":
    run_main(main)
