"""What the benchmarks share: the machine (CPU model, memory, GPU synchronisation) and running one
case in a fresh process while sampling its memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def sync(dev) -> None:
    """Wait for a CUDA device's queued work (torch is imported here only: cli_start.py uses this module
    without it)."""
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def proc_memory_mb(pid: int | str = "self") -> dict[str, float]:
    """Memory of a process from ``/proc/PID/status``, in MB: VmRSS (resident now), VmHWM (its peak),
    RssAnon (heap, stacks: the process's own memory), RssFile (pages of mapped files, e.g. memory-mapped
    TIFFs: page cache the kernel can drop) and RssShmem. ``{}`` where there is no /proc (macOS, Windows)
    or the process has ended. Another process can read these, e.g. to sample a child's memory."""
    out: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, so that the next phase's peak can be
    read on its own (Linux >= 4.0: ``/proc/self/clear_refs``). False where it cannot be done; the
    peak then includes what came before. (``resource.getrusage``'s ru_maxrss is not reset.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_results(json_path, result: dict, md: str) -> None:
    """Write a benchmark's results: ``json_path`` (JSON) and the same name with ``.md`` (markdown)."""
    import json
    from pathlib import Path

    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(md)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")


def run_main(main) -> None:
    """Run a benchmark's ``main()`` as a script: its return code, or a one-line error for bad input."""
    import sys

    from napari_zfdiffusion.core.errors import UserInputError

    try:
        sys.exit(main())
    except UserInputError as e:
        sys.exit(f"error: {e}")


def phase(name: str) -> None:
    """In a case's process: tell :func:`run_case` which phase the memory samples from now on belong to."""
    print(f"@@phase {name}", flush=True)


def run_case(script: str | Path, spec: dict, *, threads: int | None, sample_ms: float) -> dict:
    """One benchmark case in a fresh Python process (``script --child SPEC.json``), its memory sampled
    from /proc every ``sample_ms`` by the phase it reports (stdout lines ``@@phase NAME``; other
    lines are echoed). Returns the result JSON the case wrote to ``spec["result"]``, with ``sampled``."""
    wd = Path(spec["workdir"])
    spec_path, spec["result"] = wd / "spec.json", str(wd / "result.json")
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--child", str(spec_path)],
                            stdout=subprocess.PIPE, text=True, env=env)
    current: list[str | None] = [None]
    sampled: dict[str, dict] = {}

    def reader():
        for line in proc.stdout:
            if line.startswith("@@phase "):
                current[0] = line.split(None, 1)[1].strip()
            else:
                print("    " + line.rstrip(), flush=True)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        m, ph = proc_memory_mb(proc.pid), current[0]
        if m and ph:
            s = sampled.setdefault(ph, {"samples": 0, **{f"first_{k}": v for k, v in m.items()}})
            s["samples"] += 1
            for k in ("VmRSS", "RssAnon", "RssFile"):
                if k in m:
                    s[f"max_{k}"] = max(s.get(f"max_{k}", 0.0), m[k])
        time.sleep(sample_ms / 1000)
    th.join()
    if proc.returncode:
        raise SystemExit(f"the case {spec['name']} failed (exit status {proc.returncode})")
    res = json.loads(Path(spec["result"]).read_text())
    res["sampled"] = sampled
    return res
