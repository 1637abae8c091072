#!/usr/bin/env python
"""How fast the ``zfdiffusion`` command starts: ``--help``, ``--version`` and ``models``.

Each command runs ``--repeats`` times (default 7), each time in a fresh process, exactly as a user
types it (the ``zfdiffusion`` script beside this Python, else ``python -m napari_zfdiffusion.cli``);
the median wall time of each is reported, with every run, the time of an empty ``python -c pass``
(the interpreter's own start) and of ``import torch`` for scale. One more run per command says
which heavy modules (torch, diffusers, ...) it imported. The operating system's file cache is warm
after the first run: these are fresh processes, not a machine after a reboot.

``--src DIR`` times another checkout's package (``DIR/src`` first on PYTHONPATH; its ``weights/``
folder must be beside ``src``), e.g. the commit before a change::

    mkdir /tmp/old && git archive HEAD src | tar -x -C /tmp/old && ln -s "$PWD/weights" /tmp/old/weights
    .venv/bin/python benchmarks/cli_start.py --src /tmp/old --out /tmp/cli_start_before.json
    .venv/bin/python benchmarks/cli_start.py --before /tmp/cli_start_before.json

Writes ``--out`` (default ``docs/results/cli_start.json``) and prints a table. Imports neither
torch nor the plugin itself (each command runs in its own process).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402  (benchmarks/_machine.py, without torch)

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["--version"], ["models"])
HEAVY = ("torch", "diffusers", "numpy", "scipy", "skimage", "tifffile", "zarr", "napari")
CHECK = ("import sys, runpy\n"
         "sys.argv = ['zfdiffusion'] + {args!r}\n"
         "try:\n"
         "    runpy.run_module('napari_zfdiffusion.cli', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "sys.stdout.flush()\n"
         "print('@@' + ','.join(m for m in {heavy!r} if m in sys.modules))\n")


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    took = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit status {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes per command")
    ap.add_argument("--src", type=Path, default=None, help="time this checkout's package instead (see above)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "cli_start.json")
    ap.add_argument("--before", type=Path, default=None,
                    help="a result of this script for the code before a change (--src): its medians go into "
                         "the output as `before`")
    a = ap.parse_args()

    env = dict(os.environ)
    script = Path(sys.executable).with_name("zfdiffusion")
    if script.is_file() and a.src is None:
        launcher = [str(script)]
    else:
        launcher = [sys.executable, "-m", "napari_zfdiffusion.cli"]
    if a.src is not None:
        paths = [str(a.src.resolve() / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    baseline = {"python -c pass": [sys.executable, "-c", "pass"],
                "python -c 'import torch'": [sys.executable, "-c", "import torch"]}
    rows = {}
    for label, cmd in [*baseline.items(), *((f"zfdiffusion {' '.join(c)}", launcher + c) for c in COMMANDS)]:
        runs = [timed(cmd, env) for _ in range(a.repeats)]
        rows[label] = {"command": cmd, "median_s": round(statistics.median(runs), 3),
                       "min_s": round(min(runs), 3), "runs_s": [round(r, 3) for r in runs]}
        print(f"{label:32s} median {rows[label]['median_s']:6.3f} s   (min {rows[label]['min_s']:.3f} s)", flush=True)
    for c in COMMANDS:
        out = subprocess.run([sys.executable, "-c", CHECK.format(args=c, heavy=HEAVY)], env=env,
                             capture_output=True, text=True, check=False).stdout
        imported = next((ln[2:] for ln in out.splitlines() if ln.startswith("@@")), "?")
        rows[f"zfdiffusion {' '.join(c)}"]["heavy_modules_imported"] = [m for m in imported.split(",") if m]

    result = {
        "what": "wall time of fresh `zfdiffusion` processes (median of --repeats runs each; warm file cache)",
        "made_by": "benchmarks/cli_start.py" + (f" --src {a.src}" if a.src else ""),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_start": load_start,
                    "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "repeats": a.repeats,
        "results": rows,
    }
    if a.before is not None:
        old = json.loads(a.before.read_text())
        result["before"] = {"made_by": old.get("made_by"), "date": old.get("date"),
                            "median_s": {k: v["median_s"] for k, v in old["results"].items()},
                            "heavy_modules_imported": {k: v.get("heavy_modules_imported")
                                                       for k, v in old["results"].items()
                                                       if "heavy_modules_imported" in v}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
