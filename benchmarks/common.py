"""Shared helpers: interleaved timing (ratios, never lone absolute times), the machine, tables, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

NAMES = ("mask_overhead", "data_path", "tracking_overhead", "pipeline", "gpu", "scale")  # `python -m benchmarks` runs these
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, threads torch uses, torch version and the CUDA device, if any."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": gpu,
            "load_avg_1m": os.getloadavg()[0]}


def command(name: str) -> str:
    """The command that reproduces one benchmark."""
    extra = " ".join(a for a in sys.argv[1:] if a not in NAMES)  # the options, with their values
    return f".venv/bin/python -m benchmarks {name}" + (f" {extra}" if extra else "")


def sync() -> None:
    """Wait for queued CUDA work, so a timer measures it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, run alternately (order rotated every repeat) so load drifts hit all alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: Mapping[str, list[float]], name: str, base: str) -> float:
    """Median over repeats of time(name) / time(base): each pair ran back to back."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table."""
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def report(name: str, headers: list[str], rows: list[list[Any]], payload: Mapping[str, Any]) -> dict[str, Any]:
    """Print the table and write results/<name>.json (with the machine and the command)."""
    print(f"\n== {name}\n{table(headers, rows)}")
    out = {"benchmark": name, "command": command(name), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": machine(), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    tmp.replace(RESULTS / f"{name}.json")
    return out
