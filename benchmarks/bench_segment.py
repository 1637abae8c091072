#!/usr/bin/env python
"""Speed and memory of U-Net segmentation (issue item 10): megapixels per second, peak memory, tiling overhead.

Reproduce (CPU, one thread: roughly 10-20 minutes on one core of an EPYC, most of it the 50-plane stack)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_segment.py --model weights/nuclei-unet-demo --threads 1
    # -> docs/results/bench_segment.json and docs/results/bench_segment.md, tables printed

    # on a CUDA machine (fp16 autocast as Segmenter uses), written beside the CPU figures
    python benchmarks/bench_segment.py --model weights/nuclei-unet-demo --device cuda \
        --out docs/results/bench_segment_cuda

    # a smoke run (small sizes only, a minute or so)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_segment.py --quick --threads 1 --out /tmp/bench/bench_segment

If ``--model`` is not a folder (the demo model is not trained yet), a *stand-in* is built in the work
folder: a "small" ResUNet with random weights (seed 0), its batch norms calibrated on the synthetic
blobs and its output biases set for about 25 % foreground. Its speed is the demo model's (same
network) and its maps have structure (so labels and the tiled-vs-whole difference are not trivial),
but they are not nuclei: object counts, labelling times and the difference are only indicative.

What is measured, each case in a fresh subprocess (peak RSS is per process):

* **Segmentation jobs**: 2D images of 1024^2, 2048^2 and 4096^2 pixels and stacks of 10 and 50 planes
  of 1024^2 (synthetic uint16 blobs, Gaussian nuclei of radius about 10 px on a noisy background, written
  to an uncompressed TIFF first and read back as a memory map with ``read_image_lazy``, as the CLI
  does). The job is what ``zfdiffusion segment --out labels.tif --prob-out prob.tif`` does: two
  memory-mapped output TIFFs (``TiffMemmap``, int32 labels, float32 probability), ``Segmenter.segment``
  into them (percentile normalisation, tiled prediction at tile 256 / overlap 32 / batch 4, watershed
  labels), flush and rename. Timed after a warm-up job on a small image; median of ``--repeats``
  (``--repeats-large`` above 8 megapixels). Split, by wrapping the Segmenter's methods: normalisation,
  tiled prediction (of which the network's forward passes), labels (``segment.instances``), and the
  rest (copies into the outputs, creating and flushing the TIFFs).
* **Memory** of the same jobs: the process's peak RSS during the timed jobs (VmHWM, reset after the
  warm-up through ``/proc/self/clear_refs``) minus its RSS after loading the model,
  and, sampled every ``--sample-ms`` by this (parent) process from ``/proc/PID/status``, the peak of the
  anonymous part (the process's own arrays) and of the file-backed part (pages of the memory-mapped
  input and output TIFFs: page cache that the kernel drops under memory pressure, so it is
  counted in RSS but never needs to fit in memory). Flat in the number of planes means the anonymous
  peak stays the same from 10 to 50 planes.
* **Tiling overhead**: on one normalised plane of 1024^2 and 2048^2, ``predict_tiled`` (the Segmenter's
  own network function, tile 256 / overlap 32) against one whole-image pass ``net(x)``: time ratio,
  tiled pixels per image pixel, and the largest absolute difference of the probabilities (both output
  channels), the mean difference, and the share of pixels whose foreground mask flips at 0.5.

Options: ``--model``, ``--device`` (cpu, cuda, mps, auto), ``--threads`` (torch.set_num_threads in
each subprocess, and OMP_NUM_THREADS), ``--repeats`` / ``--repeats-large``, ``--quick``, ``--sizes``,
``--stacks``, ``--stack-size``, ``--whole-sizes``, ``--tile``, ``--overlap``, ``--batch``, ``--dtype``
(uint16 or float32 input), ``--workdir`` (kept if given), ``--out`` (writes OUT.json and OUT.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _machine import (  # noqa: E402
    cpu_model, phase, proc_memory_mb, reset_peak_rss, run_case, run_main, sync, write_results)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "weights" / "nuclei-unet-demo"
LARGE_MP = 8.0  # cases above this many megapixels use --repeats-large


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


# ----------------------------------------------------------------------------- data and model
def blob_plane(h: int, w: int, rng: np.random.Generator, spacing: int = 40, sigma: float = 5.0,
               dtype=np.uint16) -> np.ndarray:
    """Gaussian blobs (nuclei of radius ~2 sigma, some touching) on a noisy background, one per
    ``spacing``^2 pixels on average, brightness varying 0.6-1.4."""
    from scipy import ndimage as ndi

    n = max(1, h * w // spacing**2)
    imp = np.zeros((h, w), np.float32)
    imp[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(0.6, 1.4, n).astype(np.float32)
    img = ndi.gaussian_filter(imp, sigma) * np.float32(2 * np.pi * sigma**2)  # each blob peaks at its amplitude
    img = 100.0 + 2500.0 * np.clip(img, 0.0, 2.0) + 20.0 * rng.standard_normal((h, w), dtype=np.float32)
    return np.clip(img, 0, 65535).astype(dtype)


def make_input(path: Path, shape: tuple[int, ...], dtype: str, seed: int = 0) -> Path:
    """An uncompressed TIFF of blobs (memory-mappable, as ``read_image_lazy`` wants), written plane by plane."""
    import tifffile

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".part")
    arr = tifffile.memmap(tmp, shape=shape, dtype=np.dtype(dtype))
    planes = arr[None] if arr.ndim == 2 else arr
    for k in range(planes.shape[0]):
        planes[k] = blob_plane(shape[-2], shape[-1], rng, dtype=np.dtype(dtype))
    arr.flush()
    del arr, planes
    os.replace(tmp, path)
    return path


def stand_in_model(folder: Path, size: str = "small", fg: float = 0.25, interior: float = 0.15) -> Path:
    """A model folder as ``zfdiffusion train unet`` exports it, holding a ResUNet with random weights (seed 0).

    Untouched, random weights with batch norm's initial statistics (mean 0, variance 1) give saturated
    probabilities: one object per plane, and a tiled-vs-whole difference of 0 that says nothing. So
    the batch norms get their statistics from normalised blob crops (no gradients, no training) and
    the output biases are set so that about ``fg`` of the pixels are foreground and ``interior`` of
    them interior: random-looking but structured maps, whose labels cost what labels cost.
    """
    from torch import nn

    from napari_zfdiffusion.core.images import Normalisation
    from napari_zfdiffusion.core.io import write_json
    from napari_zfdiffusion.core.segment.net import build_segmenter
    from napari_zfdiffusion.core.segment.segmenter import KIND, OUTPUTS
    from napari_zfdiffusion.core.store import CARD_FILE, save_model

    if (folder / CARD_FILE).is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_segmenter(size)
    norm, rng = Normalisation(), np.random.default_rng(0)
    crops = torch.from_numpy(np.stack([norm.apply(blob_plane(128, 128, rng)) * 2 - 1 for _ in range(32)]))[:, None]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        net.train()
        for x in crops.split(8):
            net(x)
        for m in bns:
            m.momentum = 0.1
        net.eval()
        logits = net(crops).transpose(0, 1).reshape(net.config.out_channels, -1)
        for c, share in enumerate((fg, interior)[: net.config.out_channels]):
            net.head.bias[c] -= torch.quantile(logits[c][::7], 1.0 - share)
    save_model(net, folder / "unet", {"kind": "segmentation-unet", "training": {"steps_done": 0},
                                     "note": "random weights, calibrated batch norms: a benchmark stand-in"})
    write_json(folder / CARD_FILE, {
        "kind": KIND, "format_version": 1, "name": f"stand-in-{size}-random",
        "description": "random-weight ResUNet for benchmarks (speed and memory only)",
        "outputs": list(OUTPUTS), "normalisation": norm.to_dict(), "tile": 256, "overlap": 32,
        "threshold": 0.5, "min_size": 16, "steps": 0, "stand_in": True,
    })
    return folder


# ----------------------------------------------------------------------------- the subprocess
class Timers:
    """Seconds spent in wrapped functions (summed over calls); on CUDA the network's are synchronised."""

    def __init__(self, dev: torch.device):
        self.dev, self.t = dev, {}

    def wrap(self, name: str, fn, synchronise: bool = False):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            r = fn(*args, **kw)
            if synchronise:
                sync(self.dev)
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            return r

        return timed


def tile_count(h: int, w: int, tile: int, overlap: int, align: int = 8) -> int:
    from napari_zfdiffusion.core.tiling import tile_starts

    return len(tile_starts(h, tile, overlap, align)) * len(tile_starts(w, tile, overlap, align))


def child_segment(seg, spec: dict, mem: dict) -> dict:
    """The CLI's job, timed in its parts: memory-mapped TIFF outputs, ``Segmenter.segment`` into them."""
    from napari_zfdiffusion.core.segment import segmenter as segmod
    from napari_zfdiffusion.core.io import TiffMemmap, read_image_lazy

    dev, wd = seg.device, Path(spec["workdir"])
    timers = Timers(dev)
    seg.normalise = timers.wrap("normalise", seg.normalise)
    seg.predict = timers.wrap("predict", seg.predict)
    seg._fn = timers.wrap("network", seg._fn, synchronise=True)
    segmod.instances = timers.wrap("labels", segmod.instances)
    runs = []
    mem["peak_reset"] = reset_peak_rss()  # VmHWM from here on is the jobs' peak, not the warm-up's
    mem["before_run"] = proc_memory_mb()
    phase("run")
    for _ in range(spec["repeats"]):
        timers.t.clear()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        image = read_image_lazy(spec["input"])
        shape = tuple(image.shape)
        with contextlib.ExitStack() as stack:
            labels = stack.enter_context(TiffMemmap(wd / "labels.tif", shape, np.int32, {"content": "labels"}))
            prob = stack.enter_context(TiffMemmap(wd / "prob.tif", shape, np.float32, {"content": "probability"}))
            t1 = time.perf_counter()
            res = seg.segment(image, tile=spec["tile"], overlap=spec["overlap"], batch=spec["batch"],
                              threshold=spec["threshold"], min_size=spec["min_size"], labels_out=labels,
                              prob_out=prob)
            sync(dev)
            t2 = time.perf_counter()
            objects = res.provenance["objects"]
            del res, labels, prob  # the memory maps close with the TIFFs
        t3 = time.perf_counter()
        del image
        t = dict(timers.t)
        run = {"job_s": t3 - t0, "segment_s": t2 - t1, "files_s": (t1 - t0) + (t3 - t2),
               "normalise_s": t.get("normalise", 0.0), "predict_s": t.get("predict", 0.0),
               "network_s": t.get("network", 0.0), "labels_s": t.get("labels", 0.0), "objects": objects}
        run["tiled_s"] = run["predict_s"] - run["normalise_s"]  # tiles, network, blending
        run["other_s"] = run["job_s"] - run["predict_s"] - run["labels_s"]  # copies into the outputs, TIFFs
        if dev.type == "cuda":
            run["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        runs.append(run)
        mem.setdefault("after_first_run", proc_memory_mb())
    phase("done")
    n, h, w = (1, *shape) if len(shape) == 2 else shape
    best = sorted(runs, key=lambda r: r["job_s"])[len(runs) // 2]  # the median run, its parts consistent
    return {"shape": list(shape), "planes": n, "megapixels": n * h * w / 1e6, "plane_megapixels": h * w / 1e6,
            "tiles_per_plane": tile_count(h, w, spec["tile"], spec["overlap"]), "median": best, "runs": runs}


def child_tiling(seg, spec: dict, mem: dict) -> dict:
    """Tiled prediction against one whole-image pass on the same normalised plane."""
    from napari_zfdiffusion.core.io import read_image_lazy
    from napari_zfdiffusion.core.tiling import predict_tiled

    dev = seg.device
    plane, _ = seg.normalise(np.asarray(read_image_lazy(spec["input"])))
    h, w = plane.shape
    c = seg.net.config.out_channels
    kw = {"tile": spec["tile"], "overlap": spec["overlap"], "out_channels": c, "batch": spec["batch"],
          "align": seg.net.multiple}  # as Segmenter.predict does

    @torch.no_grad()
    def whole(x: np.ndarray) -> np.ndarray:
        y = seg._fn(torch.from_numpy(x)[None, None])
        sync(dev)
        return y[0].cpu().numpy()

    def timed(fn):
        sync(dev)
        t0 = time.perf_counter()
        r = fn()
        sync(dev)
        return time.perf_counter() - t0, r

    predict_tiled(seg._fn, plane[:512, :512], **kw)  # warm-up
    whole(plane[:256, :256])
    out = {"shape": [h, w], "megapixels": h * w / 1e6, "tiles": tile_count(h, w, spec["tile"], spec["overlap"])}
    for name, fn in (("tiled", lambda: predict_tiled(seg._fn, plane, **kw)), ("whole", lambda: whole(plane))):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        mem["peak_reset"] = reset_peak_rss()
        mem[f"before_{name}"] = proc_memory_mb()
        phase(name)
        times, res = [], None
        for _ in range(spec["repeats"]):
            res = None  # free the previous result first (the tiled one is kept for the comparison)
            s, res = timed(fn)
            times.append(s)
        out[f"{name}_s"] = statistics.median(times)
        out[f"{name}_s_all"] = times
        mem[f"after_{name}"] = proc_memory_mb()
        if mem["peak_reset"] and "VmHWM" in mem[f"after_{name}"]:  # working memory of this way of predicting
            out[f"{name}_extra_rss_mb"] = mem[f"after_{name}"]["VmHWM"] - mem[f"before_{name}"]["VmRSS"]
        if dev.type == "cuda":
            out[f"{name}_peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        if name == "tiled":
            tiled = res.reshape(c, h, w)
        else:
            wh = res
    phase("done")
    diff = np.abs(tiled - wh)
    thr = spec["threshold"]
    out.update({
        "ratio_tiled_to_whole": out["tiled_s"] / out["whole_s"],
        "tiled_px_per_image_px": out["tiles"] * spec["tile"] ** 2 / (h * w),
        "max_abs_diff": [float(d.max()) for d in diff], "mean_abs_diff": [float(d.mean()) for d in diff],
        "p9999_abs_diff": [float(np.percentile(d, 99.99)) for d in diff],
        "mask_flipped_fraction": float(((tiled[0] >= thr) != (wh[0] >= thr)).mean()),
    })
    return out


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from napari_zfdiffusion.core.segment import Segmenter

    mem = {"start": proc_memory_mb()}
    seg = Segmenter.load(spec["model"], spec["device"])
    sync(seg.device)
    mem["after_load"] = proc_memory_mb()
    phase("warm-up")
    if spec["mode"] == "segment":  # one small job: kernels, thread pools, allocator
        seg.segment(blob_plane(512, 512, np.random.default_rng(1)), tile=spec["tile"], overlap=spec["overlap"],
                    batch=spec["batch"])
        mem["after_warmup"] = proc_memory_mb()
    result = (child_segment if spec["mode"] == "segment" else child_tiling)(seg, spec, mem)
    mem["end"] = proc_memory_mb()
    result.update({"memory": mem, "threads": torch.get_num_threads(), "device": str(seg.device),
                   "device_name": torch.cuda.get_device_name(seg.device) if seg.device.type == "cuda" else cpu_model()})
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- the parent
def run_child(spec: dict, a: argparse.Namespace) -> dict:
    """Run one case in a fresh Python process while sampling its memory from /proc every --sample-ms."""
    return run_case(__file__, spec, threads=a.threads, sample_ms=a.sample_ms)

def memory_summary(res: dict, phase_name: str = "run") -> dict:
    """Peak RSS of the jobs minus the RSS after loading the model; sampled anonymous and file-backed peaks likewise."""
    mem, s = res["memory"], res["sampled"].get(phase_name, {})
    load = mem["after_load"]
    out = {"rss_after_load_mb": load.get("VmRSS"), "peak_rss_mb": mem["end"].get("VmHWM"),
           "peak_is_jobs_only": mem.get("peak_reset", False), "anon_after_load_mb": load.get("RssAnon"),
           "file_after_load_mb": load.get("RssFile"), "samples": s.get("samples", 0)}
    if out["peak_rss_mb"] is not None and out["rss_after_load_mb"] is not None:
        out["peak_minus_load_mb"] = out["peak_rss_mb"] - out["rss_after_load_mb"]
        if out["peak_is_jobs_only"] and "VmRSS" in mem.get("before_run", {}):
            # above what the warm-up job left allocated (the allocator keeps freed memory for reuse)
            out["peak_minus_before_jobs_mb"] = out["peak_rss_mb"] - mem["before_run"]["VmRSS"]
    if "max_RssAnon" in s:
        out["anon_peak_minus_load_mb"] = s["max_RssAnon"] - load["RssAnon"]
        out["file_peak_minus_load_mb"] = s["max_RssFile"] - load["RssFile"]
    return out


def fmt(v, spec: str = ".0f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def growth_lines(cases: list[dict]) -> list[str]:
    """How the memory grows from the smallest to the largest 2D image, and from the shallowest to the deepest stack."""
    L = []
    for kind, what in (("2D", "image"), ("stack", "stack")):
        cs = sorted((c for c in cases if c["name"].startswith(kind)), key=lambda c: c["megapixels"])
        if len(cs) < 2:
            continue
        a, b = cs[0], cs[-1]
        dmp = b["megapixels"] - a["megapixels"]
        parts = []
        for key, label in (("peak_minus_load_mb", "peak RSS"), ("anon_peak_minus_load_mb", "anonymous peak"),
                           ("file_peak_minus_load_mb", "file-backed peak")):
            va, vb = a["memory_summary"].get(key), b["memory_summary"].get(key)
            if va is not None and vb is not None:
                parts.append(f"{label} {va:.0f} -> {vb:.0f} MB ({(vb - va) * 2**20 / (dmp * 1e6):+.1f} bytes per added pixel)")
        L.append(f"* From the {a['name']} to the {b['name']} {what} (+{dmp:.1f} MP): " + "; ".join(parts) + ".")
    return L


def markdown(r: dict) -> str:
    e, m = r["environment"], r["model"]
    st = r["settings"]
    cuda = any("peak_cuda_mb" in c["median"] for c in r["cases"])
    L = [f"# Segmentation benchmark ({e['device']})", "",
         (f"Model `{m['name']}` ({m['params_M']:.2f} M parameters, channels {m['channels']}, {m['steps']} "
          "training steps" + ("; RANDOM-WEIGHT STAND-IN: object counts and label times only indicative"
                              if m["stand_in"] else "") + f"). {e['device_name']}; torch {e['torch']}, "
          f"{e['threads']} thread(s); tile {st['tile']}, overlap {st['overlap']}, batch {st['batch']}; synthetic "
          f"{st['dtype']} blobs; load average at start {e['loadavg_start']}, at end {e['loadavg_end']}."), "",
         "## Speed (whole job, as `zfdiffusion segment --out --prob-out`)", "",
         ("| case | shape | MP | job (s) | MP / s | normalise (s) | tiled prediction (s) | of which network (s) "
          "| labels (s) | outputs, TIFFs (s) | objects |"),
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        x = c["median"]
        L.append(f"| {c['name']} | {'x'.join(map(str, c['shape']))} | {c['megapixels']:.1f} | {x['job_s']:.2f} | "
                 f"{c['megapixels'] / x['job_s']:.2f} | {x['normalise_s']:.2f} | {x['tiled_s']:.2f} | "
                 f"{x['network_s']:.2f} | {x['labels_s']:.2f} | {x['other_s']:.2f} | {x['objects']} |")
    L += ["", "## Memory (fresh process per case; outputs are memory-mapped TIFFs)", "",
          "| case | MP | RSS after load (MB) | peak RSS (MB) | peak - after load (MB) | anonymous peak - after load (MB) "
          "| file-backed peak - after load (MB) | peak - before the jobs (MB)" + (" | peak GPU (MB)" if cuda else "") + " |",
          "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for c in r["cases"]:
        mm = c["memory_summary"]
        L.append(f"| {c['name']} | {c['megapixels']:.1f} | {fmt(mm['rss_after_load_mb'])} | {fmt(mm['peak_rss_mb'])} | "
                 f"{fmt(mm.get('peak_minus_load_mb'))} | {fmt(mm.get('anon_peak_minus_load_mb'))} | "
                 f"{fmt(mm.get('file_peak_minus_load_mb'))} | {fmt(mm.get('peak_minus_before_jobs_mb'))}"
                 + (f" | {c['median'].get('peak_cuda_mb', 0):.0f}" if cuda else "") + " |")
    L += [""] + growth_lines(r["cases"])
    L += ["", "## Tiling overhead (one normalised plane: tiles vs one whole-image pass)", "",
          "| size | tiles | tiled px / image px | tiled (s) | whole pass (s) | tiled / whole "
          "| max abs diff (foreground, interior) | mean abs diff | mask pixels flipped | working RSS tiled / whole (MB)"
          + (" | peak GPU tiled / whole (MB)" if cuda else "") + " |",
          "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for t in r["tiling"]:
        L.append(f"| {t['shape'][0]}x{t['shape'][1]} | {t['tiles']} | {t['tiled_px_per_image_px']:.2f} | "
                 f"{t['tiled_s']:.2f} | {t['whole_s']:.2f} | {t['ratio_tiled_to_whole']:.2f} | "
                 + ", ".join(f"{d:.2g}" for d in t["max_abs_diff"]) + " | "
                 + ", ".join(f"{d:.1e}" for d in t["mean_abs_diff"])
                 + f" | {100 * t['mask_flipped_fraction']:.4f} % | {fmt(t.get('tiled_extra_rss_mb'))} / "
                 f"{fmt(t.get('whole_extra_rss_mb'))}"
                 + (f" | {t.get('tiled_peak_cuda_mb', 0):.0f} / {t.get('whole_peak_cuda_mb', 0):.0f}" if cuda else "")
                 + " |")
    reset = all(c["memory_summary"]["peak_is_jobs_only"] for c in r["cases"])
    L += ["", "Median of the repeats (the parts are those of the median job). MP = megapixels of input. "
          "Tiled prediction includes the tiles' network passes, blending and accumulation; outputs/TIFFs = "
          "the rest of the job: creating, filling (probability copy, label offsets) and flushing the "
          "memory-mapped TIFFs. Peak RSS = VmHWM of the case's process "
          + ("over the timed jobs only (reset after the warm-up)" if reset else "including the warm-up job")
          + f"; anonymous and file-backed peaks are sampled every {st['sample_ms']:g} ms from /proc "
          "(anonymous = the process's own arrays; file-backed = pages of the memory-mapped input and output "
          "TIFFs, page cache that the kernel may drop, so it counts in RSS but need not fit in memory). "
          "Peak - before the jobs: above the RSS after the warm-up job, whose freed memory the allocator keeps "
          "and reuses (this baseline varies by some tens of MB from process to process). "
          "Working RSS = peak during that prediction minus the RSS before it. Max abs diff: largest "
          "|tiled - whole| probability over the plane.",
          f"Made by `{r['command']}`.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="segmentation model folder or name; if it does not exist, a random-weight 'small' stand-in")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in each case's process (default: torch's own, OMP_NUM_THREADS or all cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed jobs per case (median)")
    p.add_argument("--repeats-large", type=int, default=1, help=f"the same for cases above {LARGE_MP:g} megapixels")
    p.add_argument("--quick", action="store_true",
                   help="small sizes only, one repeat (a smoke run): 2D 256,512; stacks 2,4 of 256; whole pass 512")
    p.add_argument("--sizes", type=ints, default=ints("1024,2048,4096"), help="2D image sides")
    p.add_argument("--stacks", type=ints, default=ints("10,50"), help="stack depths")
    p.add_argument("--stack-size", type=int, default=1024, help="side of the stacks' planes")
    p.add_argument("--whole-sizes", type=ints, default=ints("1024,2048"),
                   help="sides for the tiled-vs-whole comparison (the whole pass must fit in memory)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--min-size", type=int, default=16)
    p.add_argument("--dtype", default="uint16", choices=("uint16", "float32"), help="input data type")
    p.add_argument("--sample-ms", type=float, default=2.0, help="memory sampling interval of the subprocesses")
    p.add_argument("--workdir", type=Path, default=None,
                   help="inputs, outputs and a stand-in model (default: a temporary folder, removed at the end)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_segment",
                   help="writes OUT.json and OUT.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(a.child)
    if a.quick:
        a.sizes, a.stacks, a.stack_size, a.whole_sizes = [256, 512], [2, 4], 256, [512]
        a.repeats = a.repeats_large = 1
    if a.repeats < 1 or a.repeats_large < 1:
        p.error("--repeats and --repeats-large must be at least 1")
    out = a.out.with_suffix("") if a.out.suffix in (".json", ".md") else a.out

    from napari_zfdiffusion.core.segment import Segmenter

    wd = Path(tempfile.mkdtemp(prefix="bench_segment_")) if a.workdir is None else a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    try:
        model = Path(a.model).expanduser()
        stand_in = False
        try:
            from napari_zfdiffusion.core.store import resolve_model

            model = resolve_model(a.model)
        except Exception:  # noqa: BLE001 - not trained yet: a random-weight stand-in of the same size
            print(f"note: no model '{a.model}'; using a random-weight 'small' ResUNet (speed and memory only: "
                  "its labels are not representative)", flush=True)
            model, stand_in = stand_in_model(wd / "stand-in-small"), True
        seg = Segmenter.load(model, "cpu")
        card = seg.card
        info = {"path": str(model), "name": seg.name, "stand_in": stand_in or bool(card.get("stand_in")),
                "channels": list(seg.net.config.channels), "outputs": seg.outputs, "steps": card.get("steps"),
                "params_M": sum(q.numel() for q in seg.net.parameters()) / 1e6}
        del seg
        env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": a.threads or torch.get_num_threads(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
               "python": platform.python_version(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
        print(f"{env['cpu']} | torch {env['torch']} | {env['threads']} thread(s) | load {env['loadavg_start']} | "
              f"{info['name']} ({info['params_M']:.2f} M parameters) | work folder {wd}", flush=True)
        base = {"model": str(model), "device": a.device, "threads": a.threads, "tile": a.tile, "overlap": a.overlap,
                "batch": a.batch, "threshold": a.threshold, "min_size": a.min_size, "workdir": str(wd)}
        cases = [(f"2D {s}^2", (s, s)) for s in a.sizes] + \
                [(f"stack {n}x{a.stack_size}^2", (n, a.stack_size, a.stack_size)) for n in a.stacks]
        rows = []
        for name, shape in cases:
            mp = float(np.prod(shape)) / 1e6
            path = make_input(wd / f"in_{'x'.join(map(str, shape))}_{a.dtype}.tif", shape, a.dtype)
            print(f"{name}: {mp:.1f} MP ...", flush=True)
            res = run_child({**base, "mode": "segment", "name": name, "input": str(path),
                             "repeats": a.repeats_large if mp > LARGE_MP else a.repeats}, a)
            res["name"] = name
            res["memory_summary"] = memory_summary(res)
            rows.append(res)
            x, mm = res["median"], res["memory_summary"]
            print(f"{name}: {x['job_s']:.2f} s = {res['megapixels'] / x['job_s']:.2f} MP/s (normalise "
                  f"{x['normalise_s']:.2f}, tiled prediction {x['tiled_s']:.2f} [network {x['network_s']:.2f}], "
                  f"labels {x['labels_s']:.2f}, outputs {x['other_s']:.2f}; {x['objects']} objects) | peak RSS "
                  f"{fmt(mm['peak_rss_mb'])} MB, - after load {fmt(mm.get('peak_minus_load_mb'))} MB "
                  f"(anonymous {fmt(mm.get('anon_peak_minus_load_mb'))}, file-backed "
                  f"{fmt(mm.get('file_peak_minus_load_mb'))})", flush=True)
            for f in ("labels.tif", "prob.tif"):
                (wd / f).unlink(missing_ok=True)
        tiling = []
        for s in a.whole_sizes:
            mp = s * s / 1e6
            path = make_input(wd / f"in_{s}x{s}_{a.dtype}.tif", (s, s), a.dtype)
            print(f"tiled vs whole {s}^2 ...", flush=True)
            t = run_child({**base, "mode": "tiling", "name": f"{s}^2", "input": str(path),
                           "repeats": a.repeats_large if mp > LARGE_MP else a.repeats}, a)
            tiling.append(t)
            print(f"tiled vs whole {s}^2: {t['tiled_s']:.2f} s vs {t['whole_s']:.2f} s (x{t['ratio_tiled_to_whole']:.2f}, "
                  f"{t['tiled_px_per_image_px']:.2f} tiled px per px), max abs diff "
                  + ", ".join(f"{d:.2g}" for d in t["max_abs_diff"])
                  + f", mask flipped {100 * t['mask_flipped_fraction']:.4f} %", flush=True)
        dev_name = rows[0]["device_name"] if rows else (tiling[0]["device_name"] if tiling else env["cpu"])
        env.update({"device": rows[0]["device"] if rows else a.device, "device_name": dev_name,
                    "threads": rows[0]["threads"] if rows else env["threads"],
                    "loadavg_end": [round(v, 2) for v in os.getloadavg()]})
    finally:
        if a.workdir is None:
            shutil.rmtree(wd, ignore_errors=True)
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_segment.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"},
        "environment": env,
        "cases": rows,
        "tiling": tiling,
    }
    md = markdown(result)
    print()
    print(md)
    write_results(f"{out}.json", result, md)
    return 0


if __name__ == "__main__":
    run_main(main)
