"""No-op `dvc repro` wall time (target <= 2 s) and the whole demo's wall time (target <= 10 min).

Never touches the repository's own data: a temp copy of the source tree (tracked and untracked, not ignored
files, but nothing a run of the study left behind: no outputs under params.yaml's paths, no dvc.lock, no MLflow
store) runs a shrunken pipeline with the demo's stage graph (same datasets, sources and seeds, so the same 13
stages; fewer images, epochs, rounds and trials), then `dvc repro` is timed again with nothing to do.
The demo: `--demo-log PATH` reads "demo finished in N s" from a `make demo` log; `--full` runs the real
params.yaml in the temp copy (minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import median, report

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
UP_TO_DATE = ("Data and pipelines are up to date", "didn't change, skipping")


def _left_behind(root: Path) -> tuple[tuple[str, ...], set[str]]:
    """Folders and files a run of the study writes (e.g. results/tune/optuna.db after `make demo`)."""
    paths = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("paths", {})
    folders = [f"{paths.get('data', 'data')}/prepared"] + [paths.get(k, k) for k in ("models", "results", "reports")]
    return tuple(f"{f.rstrip('/')}/" for f in folders) + ("mlruns/", "benchmarks/results/"), {"dvc.lock", "mlflow.db"}


def _copy_tree(dest: Path, root: Path = ROOT) -> None:
    """The source tree into `dest` (a fresh git repo), without anything a previous run left behind."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    folders, names = _left_behind(root)
    for rel in filter(None, files):
        src = root / rel
        if src.is_file() and not rel.startswith(folders) and rel not in names:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _shrink(params_file: Path) -> None:
    raw = yaml.safe_load(params_file.read_text())
    raw["prepare"]["datasets"]["fashion-mnist"] = {"train": 200, "val": 100, "test": 100}
    raw["train"] |= {"max_epochs": 1, "patience": 1}
    raw["imp"] |= {"rounds": 1, "rewind_epoch": 1, "keep_epochs": 1}
    raw["tune"] |= {"n_trials": 1, "max_epochs": 1, "round": 1, "rewind_epochs": [0, 1]}
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))


def _dvc_repro(cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {cwd}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def _demo_from_log(path: str) -> float | None:
    found = re.findall(r"demo finished in (\d+) s", Path(path).read_text(errors="replace"))
    return float(found[-1]) if found else None


def run(args) -> dict:
    repeats = 2 if getattr(args, "quick", False) else 3
    full = getattr(args, "full", False)
    with tempfile.TemporaryDirectory(prefix="lth-bench-pipeline-") as tmp_name:
        tmp = Path(tmp_name)
        _copy_tree(tmp)
        if not full:
            _shrink(tmp / "params.yaml")
        first, _ = _dvc_repro(tmp)
        noop = []
        for _ in range(repeats):
            seconds, out = _dvc_repro(tmp)
            if "Running stage" in out or not any(s in out for s in UP_TO_DATE):
                raise RuntimeError(f"the second `dvc repro` was not a no-op:\n{out[-2000:]}")
            noop.append(seconds)
        listed = subprocess.run([str(BIN / "dvc"), "stage", "list"], cwd=tmp, capture_output=True, text=True)
        stages = len([line for line in listed.stdout.splitlines() if line.strip()])
    demo = _demo_from_log(args.demo_log) if getattr(args, "demo_log", None) else (first if full else None)
    demo_source = ("log " + args.demo_log) if getattr(args, "demo_log", None) else (
        "dvc repro of params.yaml in a temp copy (--full)" if full else None)
    rows = [["no-op dvc repro (median of %d)" % repeats, median(noop), "<= 2 s"],
            ["first dvc repro, %s params" % ("real" if full else "shrunken"), first, ""],
            ["whole demo", demo if demo is not None else "not measured (pass --demo-log or --full)", "<= 600 s"]]
    return report("pipeline", ["what", "seconds", "target"], rows,
                  {"target": "no-op dvc repro <= 2 s; demo <= 600 s", "noop_seconds": noop,
                   "noop_median": median(noop), "first_repro_seconds": first, "first_repro_params":
                   "real" if full else "shrunken", "demo_seconds": demo, "demo_source": demo_source,
                   "stages": stages, "met_noop": median(noop) <= 2.0,
                   "met_demo": None if demo is None else demo <= 600})
