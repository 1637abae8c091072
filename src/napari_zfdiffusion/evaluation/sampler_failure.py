"""How often does a sample fail (bright, noisy background instead of nuclei), per sampler?

A failed plane has a mean normalised intensity above --threshold; real planes have means of
0.02-0.13 (docs/evaluation.md). Usage:
    python -m napari_zfdiffusion.evaluation.sampler_failure --model zf-cascade-demo --threads 1 --out docs
Writes a markdown table to stdout and OUT/results/sampler_failure.json (``--tag`` appended to the name).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..core.cascade import Cascade
from ._common import PROG, run, set_threads, shown_path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG + "sampler_failure", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zf-cascade-demo")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--samplers", default="dpmsolver++:25,ddim:50,ddpm:100")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/results/sampler_failure.json")
    ap.add_argument("--tag", default="", help="suffix for the result name")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    set_threads(a.threads)
    cas = Cascade.load(a.model, "cpu")
    rows = []
    print(f"| sampler | steps | failed / {a.n} | seconds |\n|---|---|---|---|")
    for item in a.samplers.split(","):
        name, steps = item.split(":")
        t = time.perf_counter()
        im = cas.generate(a.depth, guidance=a.guidance, n=a.n, seed=a.seed, sampler=name, steps=int(steps),
                          resolution=64).images
        means = im.mean(axis=(1, 2))
        row = {"sampler": name, "steps": int(steps), "failed": int((means > a.threshold).sum()), "n": a.n,
               "seconds": round(time.perf_counter() - t, 1), "means": [round(float(m), 3) for m in means]}
        rows.append(row)
        print(f"| {name} | {steps} | {row['failed']} | {row['seconds']} |")
    out = a.out / "results" / f"sampler_failure{a.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "depth": a.depth, "guidance": a.guidance, "seed": a.seed,
                               "threshold": a.threshold, "rows": rows}, indent=2) + "\n")
    print(f"wrote {shown_path(out)}")
    return 0


if __name__ == "__main__":
    run(main)
