"""Small helpers shared by the benchmarks: percentiles and one JSON line per result."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from typing import Any

import numpy as np
import psutil


def percentiles_ms(samples_ns: list[int]) -> dict[str, float]:
    values = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
    }


def emit(name: str, result: dict[str, Any], *, as_json: bool) -> None:
    result = {
        "benchmark": name,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        **result,
    }
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    print(f"== {name}")
    for key, value in result.items():
        if key != "benchmark":
            print(f"  {key}: {value}")


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, memory, kernel, load."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def git_commit(root: str) -> dict[str, Any]:
    """The commit the figures were measured at, and whether the tree had changes."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
    }
