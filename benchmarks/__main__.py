"""`python -m benchmarks [NAME ...] [--quick] [--full] [--repeats N] [--demo-log PATH] [--compile]`: run them (default: all)."""

from __future__ import annotations

import argparse
import importlib
import os

NAMES = ("mask_overhead", "data_path", "tracking_overhead", "pipeline", "gpu", "scale")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test, noisier figures)")
    parser.add_argument("--full", action="store_true", help="pipeline: also time a full demo `dvc repro` (minutes)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="tracking_overhead: pairs of untracked/tracked jobs (default 5, 1 with --quick)")
    parser.add_argument("--compile", action="store_true", help="gpu: also time torch.compile (slow to warm up)")
    parser.add_argument("--demo-log", help="pipeline: read the demo's wall time from a `make demo` log")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in args.names or NAMES:
        importlib.import_module(f"benchmarks.{name}").run(args)
    importlib.import_module("benchmarks.summary").main()  # RESULTS.md from the latest JSON of every benchmark


if __name__ == "__main__":
    main()
