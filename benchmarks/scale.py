"""Scale-out: (a) the demo study, serial vs Ray; (b) the paper's full plan under the Ray driver's policy
(targets: <= 1.10x the bound at 16 GPUs, 1.25x at 64).

(a) `lth study run` of the demo's params.yaml in two temp copies of the source tree, one after the other in
this run: `--engine local` (one process, torch on every core) and `--engine ray` (a local Ray the driver
starts, one worker per core, each unit on one CPU thread). `--quick` shrinks the study (benchmarks.pipeline).
(b) Every training unit of configs/paper.yaml (lth.study.plan: 1,280 IMP rounds, the size arm's rounds, every
fine-tune of every arm) gets a modelled duration: epochs x training images / throughput (ResNet-50 at 224 px;
the figures below are ours, not measured on a GPU), scaled down so the whole study takes about a minute at 4
GPUs. Then:
- Ray: a local Ray with 4 and with 16 virtual GPUs (`num_gpus=N` on this GPU-less host; tasks with num_gpus=1
  that sleep their duration; max_calls=0) run by the driver's own policy (lth.study.engine.Scheduler), the plan
  scaled to two minutes at 4 GPUs and one at 16 (mean task 45 and 90 ms);
- simulation: a discrete-event run of the same Scheduler with Ray's first-in-first-out start order and the
  per-task overhead measured on that Ray (calibrated apart from the plan), at 4, 16, 64 and 256 GPUs,
  checked against the Ray runs at 4 and 16 (within 5%).
Reported: makespan against the lower bound max(critical path, total work / GPUs), GPU utilisation, and the
per-task costs.
"""

from __future__ import annotations

import heapq
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import RESULTS, report

ROOT = Path(__file__).resolve().parent.parent
GPUS = (4, 16, 64, 256)
RAY_GPUS = (4, 16)  # run on a local Ray too (each running task is a worker process of ~90 MB)
CHECK = 0.05  # the simulation must be within 5% of the Ray runs
WALL = {4: 120.0, 16: 60.0}  # seconds the scaled plan takes on Ray (a quarter with --quick)
IMG_PER_S = 1000.0  # ours: ResNet-50 training at 224 px, bf16, one GPU
EPOCHS = {"imp": 30, "size": 30, "finetune": 20}  # ours: where early stopping usually ends
NATURAL_TRAIN = {"cifar10": 45000, "cifar100": 45000, "fashion-mnist": 54000}  # the registry gives no paper split
TARGETS = {16: 1.10, 64: 1.25}


def paper_units() -> tuple[list[Any], dict[str, float]]:
    """The paper's training units (plan order, needs kept) and their modelled durations in seconds."""
    from lth.config import load_params
    from lth.data.registry import get_spec
    from lth.study.plan import TRAINING, build_plan

    params = load_params(ROOT / "configs" / "paper.yaml")
    units = [u for u in build_plan(params) if u.kind in TRAINING]
    seconds = {}
    for u in units:
        splits = get_spec(u.dataset).paper_splits
        n = (splits[0] if splits else NATURAL_TRAIN[u.dataset]) * u.train_fraction
        seconds[u.key] = EPOCHS[u.kind] * n / IMG_PER_S
    return units, seconds


def critical_path(units: list[Any], seconds: dict[str, float]) -> float:
    """Longest chain of needs, in seconds (the plan lists every unit after its needs)."""
    finish: dict[str, float] = {}
    for u in units:
        finish[u.key] = seconds[u.key] + max((finish[n] for n in u.needs if n in finish), default=0.0)
    return max(finish.values())


def bound(units: list[Any], seconds: dict[str, float], gpus: int) -> float:
    """No schedule beats max(critical path, total work / GPUs)."""
    return max(critical_path(units, seconds), sum(seconds.values()) / gpus)


def scheduler(units: list[Any], gpus: int) -> Any:
    from lth.study.engine import Scheduler

    return Scheduler(units, finetune_slots=gpus, max_retries=0)  # one GPU per unit: chain_weight 1


def simulate(units: list[Any], seconds: dict[str, float], gpus: int, overhead: float = 0.0) -> float:
    """Makespan of the driver's policy on `gpus` GPUs: submitted tasks start in order as GPUs free up, each
    holding its GPU for its duration plus `overhead` (the driver's and Ray's share per task, measured)."""
    sched = scheduler(units, gpus)
    queue: deque = deque()
    running: list[tuple[float, str]] = []
    now, free = 0.0, gpus
    while True:
        queue.extend(sched.next_units())
        while free and queue:
            unit = queue.popleft()
            heapq.heappush(running, (now + seconds[unit.key] + overhead, unit.key))
            free -= 1
        if not running:
            return now
        now, key = heapq.heappop(running)
        free += 1
        sched.succeeded(key)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _drive(ray: Any, task: Any, units: list[Any], seconds: dict[str, float], gpus: int) -> float:
    """Wall seconds of the driver's loop (Scheduler + ray.wait) over `units` on Ray."""
    sched = scheduler(units, gpus)
    inflight: dict[Any, str] = {}
    t0 = time.perf_counter()
    while True:
        for unit in sched.next_units():
            inflight[task.remote(seconds[unit.key])] = unit.key
        if not inflight:
            return time.perf_counter() - t0
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            ray.get(ref)
            sched.succeeded(inflight.pop(ref))


def ray_run(units: list[Any], seconds: dict[str, float], gpus: int) -> tuple[float, float]:
    """(makespan, per-task overhead) of the same policy on a local Ray with `gpus` virtual GPUs.

    The overhead is calibrated first, apart from the plan: the driver's loop over 100 tasks per GPU, all of the
    plan's mean duration and none waiting on another, against the time they sleep; what is left over, per task
    and GPU, is what a task costs beyond its duration at this concurrency. (Tasks of mixed durations would
    charge the last wave's idle GPUs to the overhead.)
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        task = ray.remote(num_gpus=1, num_cpus=0, max_calls=0, max_retries=0)(_sleep)
        ray.get([task.remote(0.0) for _ in range(4 * gpus)])  # warm: one worker process per GPU
        mean = sum(seconds.values()) / len(seconds)
        sample = [u for u in units if u.kind == "finetune"][:100 * gpus]
        wall = _drive(ray, task, sample, dict.fromkeys((u.key for u in sample), mean), gpus)
        overhead = max(0.0, wall * gpus / len(sample) - mean)
        return _drive(ray, task, units, seconds, gpus), overhead
    finally:
        ray.shutdown()


def plot(rows: list[dict], path: Path) -> None:
    """Makespan vs GPUs, with the lower bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    g = [r["gpus"] for r in rows]
    ax.plot(g, [r["makespan_h"] for r in rows], "o-", label="driver policy (simulated)")
    ax.plot(g, [r["bound_h"] for r in rows], "k--", label="max(critical path, work / GPUs)")
    ray_rows = [r for r in rows if r.get("ray_makespan_h")]
    ax.plot([r["gpus"] for r in ray_rows], [r["ray_makespan_h"] for r in ray_rows], "rs", label="Ray, virtual GPUs")
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="makespan (modelled hours)",
           title="The paper's plan: makespan vs GPUs")
    ax.set_xticks(g, [str(x) for x in g])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo_run(engine: str, quick: bool) -> float:
    """Wall seconds of `lth study run --engine ENGINE` on the demo's params.yaml in a fresh temp copy."""
    from benchmarks.pipeline import BIN, _copy_tree, _shrink

    with tempfile.TemporaryDirectory(prefix=f"lth-bench-scale-{engine}-") as tmp_name:
        tmp = Path(tmp_name)
        _copy_tree(tmp)
        if quick:
            _shrink(tmp / "params.yaml")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
        env |= {"PATH": f"{BIN}:{env.get('PATH', '')}", "TQDM_DISABLE": "1", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}
        t0 = time.perf_counter()
        done = subprocess.run([str(BIN / "lth"), "study", "run", "--engine", engine], cwd=tmp, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"lth study run --engine {engine} failed in {tmp}:\n{done.stderr[-3000:]}")
        timeline = tmp / "reports" / "figures" / "timeline.png"  # the report's picture of the Ray run
        if timeline.is_file():
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(timeline, RESULTS / "scale_demo_timeline.png")
        return seconds


def run(args: Any, ray_runner: Callable[..., tuple[float, float]] = ray_run,
        demo_runner: Callable[[str, bool], float] = demo_run) -> dict:
    """(a) the demo, serial vs Ray; (b) Ray at 4 and 16 virtual GPUs, the simulation at 4..256; into RESULTS."""
    quick = getattr(args, "quick", False)
    demo = {engine: demo_runner(engine, quick) for engine in ("local", "ray")}
    units, hours_s = paper_units()
    work = sum(hours_s.values())
    measured = {}
    for gpus in RAY_GPUS:
        # modelled seconds -> sleeping seconds: the whole plan in WALL[gpus] s (the mean task 45-90 ms)
        scale = WALL[gpus] / (4 if quick else 1) / bound(units, hours_s, gpus)
        scaled = {k: v * scale for k, v in hours_s.items()}
        makespan, overhead = ray_runner(units, scaled, gpus)
        check = simulate(units, scaled, gpus, overhead)  # the Ray run, simulated: same durations and overhead
        measured[gpus] = {"scale": scale, "makespan": makespan, "overhead": overhead, "sim": check,
                          "mean_task_s": sum(scaled.values()) / len(scaled),
                          "ray_vs_sim": makespan / check, "ray_ratio": makespan / bound(units, scaled, gpus)}
    overhead = max(m["overhead"] for m in measured.values())
    rows = []
    for gpus in GPUS:
        sim = simulate(units, hours_s, gpus, overhead)  # real trainings: minutes each, the overhead as measured
        low = bound(units, hours_s, gpus)
        row = {"gpus": gpus, "makespan_h": sim / 3600, "bound_h": low / 3600, "ratio": sim / low,
               "utilisation": work / (sim * gpus), "critical_path_h": critical_path(units, hours_s) / 3600}
        if gpus in measured:
            m = measured[gpus]
            row |= {"ray_makespan_h": m["makespan"] / m["scale"] / 3600, "ray_vs_sim": m["ray_vs_sim"],
                    "ray_ratio": m["ray_ratio"]}
        rows.append(row)
    met = {str(g): next(r["ratio"] for r in rows if r["gpus"] == g) <= t for g, t in TARGETS.items()}
    met |= {f"ray_vs_sim_{g}": abs(m["ray_vs_sim"] - 1) <= CHECK for g, m in measured.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / "scale.png")
    table_rows = [[r["gpus"], r["makespan_h"], r["bound_h"], r["ratio"], r["utilisation"],
                   r.get("ray_ratio", ""), r.get("ray_vs_sim", "")] for r in rows]
    return report("scale", ["GPUs", "makespan h", "bound h", "x bound", "utilisation", "Ray x bound", "Ray / sim"],
                  table_rows, {"units": len(units), "work_gpu_hours": work / 3600, "overhead_s": overhead,
                               "img_per_s": IMG_PER_S, "epochs": EPOCHS, "rows": rows, "met": met,
                               "targets": {str(k): v for k, v in TARGETS.items()}, "check": CHECK,
                               "ray_runs": {str(g): m for g, m in measured.items()},
                               "demo": {"local_s": demo["local"], "ray_s": demo["ray"],
                                        "serial_over_ray": demo["local"] / demo["ray"],
                                        "params": "shrunken (--quick)" if quick else "params.yaml"}})
