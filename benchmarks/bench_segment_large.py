#!/usr/bin/env python
"""Memory of segmenting big single planes (issue 12, part 6): peak RSS of ``zfdiffusion segment`` on
one uint8 plane of 4096^2, 9000^2 and 16384^2 pixels.

Reproduce (CPU; about 11 minutes on 1 thread of an EPYC, most of it the 16384^2 plane's network passes)::

    .venv/bin/python benchmarks/bench_segment_large.py --threads 1
    # -> docs/results/bench_segment_large.json and .md, table printed

    # a smoke run (small planes, strips forced: a minute)
    .venv/bin/python benchmarks/bench_segment_large.py --sizes 1024,1500 --compare 1024 --strips-from 0 \\
        --strip-pixels 200000 --threads 1 --out /tmp/bench/bench_segment_large

What is measured, each case in a fresh subprocess (peak RSS is per process):

* The input: a synthetic uint8 plane of blobs (nuclei of radius about 10 px on a noisy background,
  one per 40x40 pixels), written band by band to an uncompressed TIFF, which the CLI reads as a
  read-only memory map (``read_image_lazy``).
* The job: ``napari_zfdiffusion.cli.main(["segment", "--in", IN, "--out", OUT, ...])``, the command
  itself, with the model card's tile / overlap / threshold / min size; the labels go to a memory-mapped
  TIFF (``TiffMemmap``); ``--prob-out`` adds the probability TIFF. Planes above
  ``Segmenter.strip_threshold`` pixels (4096^2) go in strips; ``--strips-from 0`` sends every case
  through the strips (the 4096^2 plane is also run that way by default, to compare both paths).
* Memory: the process loads the model (RSS "after load"), runs a warm-up job on a 512^2 plane
  (kernels, thread pools), resets its peak (``/proc/self/clear_refs``) and runs the job; peak RSS is
  VmHWM after it. "Peak - after load" is the figure of the issue's target (<= 1.5 GB at 9000^2, growing
  no faster than the labels, 4 bytes per pixel). The parent also samples ``/proc/PID/status`` every
  ``--sample-ms``: the anonymous part (the process's own arrays) and the file-backed part (pages of the
  memory-mapped input and output TIFFs, page cache that counts in RSS but that the kernel can drop).
* Where the 4096^2 plane runs both ways, the two label images are compared: objects matched at
  IoU 0.5 (F1) and the share of pixels with another label.

Options: ``--model``, ``--device``, ``--threads``, ``--sizes``, ``--strips-from`` (pixels; planes
above go in strips; default: the Segmenter's own threshold), ``--compare`` (the side run both ways),
``--strip-pixels``, ``--prob-out``, ``--batch``, ``--sample-ms``, ``--workdir`` (kept if given), ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import (  # benchmarks/_machine.py
    cpu_model,
    phase,
    proc_memory_mb,
    reset_peak_rss,
    run_case,
    run_main,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "weights" / "nuclei-unet-demo"


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


# ----------------------------------------------------------------------------- the input
def blob_rows(a: int, b: int, w: int, ys: np.ndarray, xs: np.ndarray, amp: np.ndarray, rng: np.random.Generator,
              sigma: float = 5.0) -> np.ndarray:
    """Rows a..b of a uint8 plane of Gaussian blobs (peaks ``amp`` at ``ys``, ``xs``) on a noisy background."""
    from scipy import ndimage as ndi

    m = int(4 * sigma) + 1
    lo, hi = max(0, a - m), b + m
    sel = (ys >= lo) & (ys < hi)
    imp = np.zeros((hi - lo, w), np.float32)
    imp[ys[sel] - lo, xs[sel]] = amp[sel]
    img = ndi.gaussian_filter(imp, sigma)[a - lo:b - lo] * np.float32(2 * np.pi * sigma**2)
    img = 20.0 + 180.0 * np.clip(img, 0.0, 1.3) + 8.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_input(path: Path, side: int, seed: int = 0, spacing: int = 40) -> Path:
    """An uncompressed uint8 TIFF of blobs (memory-mappable), written a band of rows at a time."""
    import tifffile

    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    n = side * side // spacing**2
    ys, xs = rng.integers(0, side, n), rng.integers(0, side, n)
    amp = rng.uniform(0.6, 1.4, n).astype(np.float32)
    tmp = path.with_name(path.name + ".part")
    arr = tifffile.memmap(tmp, shape=(side, side), dtype=np.uint8)
    for a in range(0, side, 1024):
        arr[a:a + 1024] = blob_rows(a, min(side, a + 1024), side, ys, xs, amp, rng)
    arr.flush()
    del arr
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- one case (child process)
def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from napari_zfdiffusion import cli
    from napari_zfdiffusion.core.segment import Segmenter

    mem = {"start": proc_memory_mb()}
    seg = Segmenter.load(spec["model"], spec["device"])
    mem["after_load"] = proc_memory_mb()
    phase("warm-up")
    rng = np.random.default_rng(1)
    warm = blob_rows(0, 512, 512, rng.integers(0, 512, 160), rng.integers(0, 512, 160),
                     np.ones(160, np.float32), rng)
    seg.segment(warm, probability=False)
    del warm
    mem["after_warmup"] = proc_memory_mb()
    if spec["strips_from"] is not None:
        Segmenter.strip_threshold = spec["strips_from"]  # the CLI's Segmenter is a new one: set the class's
    if spec["strip_pixels"]:
        Segmenter.strip_pixels = spec["strip_pixels"]
    loaded: list[Segmenter] = []
    load = Segmenter.load.__func__

    def keep(cls, *a, **k):
        s = load(cls, *a, **k)
        loaded.append(s)
        return s

    Segmenter.load = classmethod(keep)
    args = ["-q", "segment", "--model", spec["model"], "--in", spec["input"], "--out", spec["labels"],
            "--device", spec["device"], "--batch", str(spec["batch"])]
    if spec["prob"]:
        args += ["--prob-out", spec["prob"]]
    mem["peak_reset"] = reset_peak_rss()
    mem["before_run"] = proc_memory_mb()
    phase("run")
    t0 = time.perf_counter()
    rc = cli.main(args)
    seconds = time.perf_counter() - t0
    mem["end"] = proc_memory_mb()
    phase("done")
    if rc:
        raise SystemExit(f"segment exited with {rc}")
    import tifffile

    with tifffile.TiffFile(spec["labels"]) as tf:
        prov = json.loads(tf.pages[0].description)
    s = loaded[-1] if loaded else seg
    strips = getattr(s, "strip_stats", None)
    h, w = tifffile.memmap(spec["input"], mode="r").shape
    result = {"shape": [h, w], "megapixels": h * w / 1e6, "seconds": seconds, "objects": prov.get("objects"),
              "path": "strips" if h * w > Segmenter.strip_threshold else "whole plane", "strip_stats": strips,
              "tile": prov.get("tile"), "overlap": prov.get("overlap"), "threshold": prov.get("threshold"),
              "min_size": prov.get("min_size"), "labels_bytes": Path(spec["labels"]).stat().st_size,
              "prob_bytes": Path(spec["prob"]).stat().st_size if spec["prob"] else None,
              "input_bytes": Path(spec["input"]).stat().st_size, "memory": mem,
              "threads": torch.get_num_threads(), "device": str(s.device)}
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- the parent
def run_child(spec: dict, a: argparse.Namespace) -> dict:
    """One case in a fresh Python process, its memory sampled from /proc every --sample-ms."""
    res = run_case(__file__, spec, threads=a.threads, sample_ms=a.sample_ms)
    sampled = res["sampled"]
    mem, run, load = res["memory"], sampled.get("run", {}), res["memory"]["after_load"]
    res["summary"] = {
        "rss_after_load_mb": load.get("VmRSS"), "peak_rss_mb": mem["end"].get("VmHWM"),
        "peak_minus_load_mb": mem["end"].get("VmHWM", 0) - load.get("VmRSS", 0),
        "peak_is_job_only": mem.get("peak_reset", False),
        "anon_peak_minus_load_mb": run["max_RssAnon"] - load["RssAnon"] if "max_RssAnon" in run else None,
        "file_peak_minus_load_mb": run["max_RssFile"] - load["RssFile"] if "max_RssFile" in run else None,
    }
    return res


def compare(a_path: Path, b_path: Path) -> dict:
    """Two label images of one plane: objects matched at IoU 0.5, and pixels with another label."""
    import tifffile

    from napari_zfdiffusion.core.metrics import match_objects

    a, b = tifffile.imread(a_path), tifffile.imread(b_path)
    m = match_objects(a, b)
    return {"identical": bool(np.array_equal(a, b)), "f1": m["f1"], "objects": [int(a.max()), int(b.max())],
            "pixels_differing": int((a != b).sum()), "foreground_pixels": int((a > 0).sum())}


def fmt(v, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(r: dict) -> str:
    e, st = r["environment"], r["settings"]
    c0 = r["cases"][0] if r["cases"] else {}
    L = [f"# Segmentation of big single planes ({e['device']})", "",
         (f"Model `{r['model']['name']}`; {e['cpu']}; torch {e['torch']}, {e['threads']} thread(s); tile "
          f"{c0.get('tile')}, overlap {c0.get('overlap')}, batch {st['batch']}, threshold {c0.get('threshold')}, "
          f"min size {c0.get('min_size')} (the model card's, as the CLI uses them); synthetic uint8 blobs, "
          f"read memory-mapped; labels{' and probability' if st['prob_out'] else ''} written to memory-mapped "
          f"TIFFs; load average at start {e['loadavg_start']}, at end {e['loadavg_end']}."), "",
         ("| plane | path | MP | job (s) | MP / s | objects | RSS after load (MB) | peak RSS (MB) "
          "| **peak - after load (MB)** | anonymous peak - after load (MB) | file-backed peak - after load (MB) "
          "| labels file (MB) | rows per strip / most rows held |"),
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        s, ss = c["summary"], c.get("strip_stats") or {}
        strip = f"{ss['strip_rows']} / {ss['largest_window']}" if c["path"] == "strips" and ss else "-"
        L.append(f"| {c['shape'][0]}x{c['shape'][1]} | {c['path']} | {c['megapixels']:.1f} | {c['seconds']:.0f} | "
                 f"{c['megapixels'] / c['seconds']:.2f} | {c['objects']} | {fmt(s['rss_after_load_mb'])} | "
                 f"{fmt(s['peak_rss_mb'])} | **{fmt(s['peak_minus_load_mb'])}** | "
                 f"{fmt(s['anon_peak_minus_load_mb'])} | {fmt(s['file_peak_minus_load_mb'])} | "
                 f"{c['labels_bytes'] / 2**20:.0f} | {strip} |")
    strips = sorted((c for c in r["cases"] if c["path"] == "strips"), key=lambda c: c["megapixels"])
    if len(strips) >= 2:
        a, b = strips[0], strips[-1]
        dpx = (b["megapixels"] - a["megapixels"]) * 1e6
        parts = []
        for key, label in (("peak_minus_load_mb", "peak RSS"), ("anon_peak_minus_load_mb", "anonymous"),
                           ("file_peak_minus_load_mb", "file-backed")):
            va, vb = a["summary"].get(key), b["summary"].get(key)
            if va is not None and vb is not None:
                parts.append(f"{label} {(vb - va) * 2**20 / dpx:+.1f}")
        L += ["", (f"Growth in strips from {a['shape'][0]}^2 to {b['shape'][0]}^2, bytes per added pixel: "
                   + ", ".join(parts) + " (the labels file alone is 4, the uint8 input 1).")]
    for cmp in r.get("comparisons", []):
        L += ["", (f"{cmp['size']}^2 in strips against the whole plane: "
                   + ("identical labels." if cmp["identical"] else
                      f"object F1 {cmp['f1']:.4f} ({cmp['objects'][0]} vs {cmp['objects'][1]} objects), "
                      f"{cmp['pixels_differing']} of {cmp['foreground_pixels']} foreground pixels labelled "
                      "differently."))]
    L += ["", ("Peak RSS: VmHWM of the case's process over the job only (reset after loading the model and a "
               "512^2 warm-up job); peak - after load: that minus the RSS after loading the model (the issue's "
               "measure). Anonymous and file-backed peaks sampled every "
               f"{st['sample_ms']:g} ms from /proc (file-backed: pages of the memory-mapped input and output "
               "TIFFs, page cache the kernel can drop). Before this change the 9000^2 plane peaked at 3.4 GB "
               "above the loaded model (10.6x the plane as float32; issue 12)."),
          f"Made by `{r['command']}`.", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="segmentation model folder or name")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in each case's process")
    p.add_argument("--sizes", type=ints, default=ints("4096,9000,16384"), help="sides of the square planes")
    p.add_argument("--strips-from", type=int, default=None,
                   help="planes of more pixels than this go in strips (default: Segmenter.strip_threshold)")
    p.add_argument("--strip-pixels", type=int, default=None,
                   help="pixels per strip (default: Segmenter.strip_pixels)")
    p.add_argument("--compare", type=int, default=4096,
                   help="this side also runs the other way (strips / whole plane), and the labels are compared; 0: no")
    p.add_argument("--prob-out", action="store_true", help="also write the probability TIFF")
    p.add_argument("--batch", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--sample-ms", type=float, default=5.0, help="memory sampling interval")
    p.add_argument("--workdir", type=Path, default=None, help="inputs and outputs (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bench_segment_large",
                   help="writes OUT.json and OUT.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(a.child)
    out = a.out.with_suffix("") if a.out.suffix in (".json", ".md") else a.out

    import torch

    from napari_zfdiffusion.core.segment import Segmenter
    from napari_zfdiffusion.core.store import resolve_model

    model = resolve_model(a.model)
    seg = Segmenter.load(model, "cpu")
    info = {"path": str(model), "name": seg.name, "params_M": sum(q.numel() for q in seg.net.parameters()) / 1e6}
    default_threshold = Segmenter.strip_threshold
    del seg
    env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": a.threads or torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "device": a.device,
           "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    wd = Path(tempfile.mkdtemp(prefix="bench_segment_large_")) if a.workdir is None else a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    print(f"{env['cpu']} | torch {env['torch']} | {env['threads']} thread(s) | load {env['loadavg_start']} | "
          f"{info['name']} | work folder {wd}", flush=True)
    threshold = default_threshold if a.strips_from is None else a.strips_from
    runs = [(s, threshold) for s in a.sizes]
    if a.compare and a.compare in a.sizes:  # the same plane the other way
        runs.insert(a.sizes.index(a.compare) + 1,
                    (a.compare, 0 if a.compare ** 2 <= threshold else 10**15))
    cases, comparisons, kept = [], [], {}
    try:
        for side, thr in runs:
            path = make_input(wd / f"in_{side}.tif", side)
            way = "strips" if side * side > thr else "whole plane"
            print(f"{side}^2 ({way}) ...", flush=True)
            labels = wd / f"labels_{side}_{way.replace(' ', '_')}.tif"
            spec = {"name": f"{side}^2 {way}", "model": str(model), "device": a.device, "threads": a.threads,
                    "batch": a.batch, "input": str(path), "labels": str(labels), "workdir": str(wd),
                    "prob": str(wd / "prob.tif") if a.prob_out else None, "strips_from": thr,
                    "strip_pixels": a.strip_pixels}
            res = run_child(spec, a)
            cases.append(res)
            s = res["summary"]
            print(f"{side}^2 ({res['path']}): {res['seconds']:.1f} s, {res['objects']} objects, peak RSS "
                  f"{fmt(s['peak_rss_mb'])} MB, - after load {fmt(s['peak_minus_load_mb'])} MB (anonymous "
                  f"{fmt(s['anon_peak_minus_load_mb'])}, file-backed {fmt(s['file_peak_minus_load_mb'])}); "
                  f"strips {res.get('strip_stats')}", flush=True)
            (wd / "prob.tif").unlink(missing_ok=True)
            if side == a.compare:
                kept.setdefault(side, []).append(labels)
                if len(kept[side]) == 2:
                    cmp = {"size": side, **compare(*kept[side])}
                    comparisons.append(cmp)
                    print(f"{side}^2 strips vs whole plane: {cmp}", flush=True)
            for f in kept.get(side, []) if len(kept.get(side, [])) == 2 else []:
                f.unlink(missing_ok=True)
            if side != a.compare:
                labels.unlink(missing_ok=True)
        env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    finally:
        if a.workdir is None:
            shutil.rmtree(wd, ignore_errors=True)
    result = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_segment_large.py", *(sys.argv[1:] if argv is None else argv)]),
        "model": info, "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"},
        "before": {"9000^2": {"peak_minus_load_gb": 3.4, "source": "issue 12 (whole-plane path)"}},
        "cases": cases, "comparisons": comparisons,
    }
    md = markdown(result)
    print()
    print(md)
    write_results(f"{out}.json", result, md)
    return 0


if __name__ == "__main__":
    run_main(main)
