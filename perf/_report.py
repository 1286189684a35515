"""Small helpers shared by the benchmarks: percentiles and one JSON line per result."""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

import numpy as np


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
