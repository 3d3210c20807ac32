"""`lth imp` and `lth transfer`: the study's two kinds of job."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from lth.cli.options import ADDRESS_OPTION, ENGINE_OPTION, PARAMS_OPTION, with_engine
from lth.config import Params, load_params
from lth.errors import UserError

if TYPE_CHECKING:  # the port pulls in the data store (and torch): not for `lth --help`
    from lth.tracking import Tracker


def _tracker(params: Params) -> Tracker:
    from lth.tracking.mlflow import get_tracker  # MLflow loads only for a command that tracks

    return get_tracker(params)


def worker_tracking(params: Params) -> tuple[Tracker, str, Callable[[], Tracker]]:
    """The driver's tracker, its tracking URI, and a factory of trackers that log there from Ray workers."""
    import functools
    from dataclasses import replace

    from lth.tracking.mlflow import MlflowTracker, tracking_uri

    # workers log where this driver does: the URI resolved here, not from their own environment
    cfg = replace(params.tracking, uri=tracking_uri(params.tracking))
    return MlflowTracker(cfg), cfg.uri, functools.partial(MlflowTracker, cfg)


@click.command("imp")
@click.argument("source")
@click.option("--seed", type=int, default=None, help="One seed (default: every seed in imp.seeds).")
@click.option("--rounds", type=click.IntRange(1, 60), default=None, help="Override imp.rounds.")
@PARAMS_OPTION
def imp_cmd(source: str, seed: int | None, rounds: int | None, params_path: str) -> None:
    """Find tickets on SOURCE by iterative magnitude pruning with late resetting."""
    from lth.data.registry import get_spec
    from lth.data.store import read_dataset_meta
    from lth.study.imp import make_job, run_imp

    params = load_params(Path(params_path))
    get_spec(source)
    read_dataset_meta(params.paths.data, source)  # a clear error before any training when data is missing
    tracker = _tracker(params)
    for s in [seed] if seed is not None else list(params.imp.seeds):
        job = make_job(source, s, params, rounds=rounds)
        dirs = run_imp(job, params, tracker)
        click.echo(f"imp {source} seed {s}: {len(dirs)} tickets under {job.out_dir}")


@click.command("transfer")
@click.argument("target")
@click.option("--arm", "arms", multiple=True, help="Run only these arms (repeatable; default: transfer.arms).")
@PARAMS_OPTION
def transfer_cmd(target: str, arms: tuple[str, ...], params_path: str) -> None:
    """Fine-tune every arm of the study on TARGET and write results/transfer/TARGET.csv."""
    from lth.config import ARMS
    from lth.study.transfer import run_transfer

    params = load_params(Path(params_path))
    for arm in arms:
        if arm not in ARMS:
            raise UserError(f"unknown arm {arm!r} (--arm); choose from {', '.join(ARMS)}")
    csv = run_transfer(target, params, _tracker(params), arms=arms or None)
    click.echo(f"transfer {target}: results in {csv}")


@click.group("study")
def study() -> None:
    """The whole study as one plan of units (prepare, IMP rounds, fine-tunes, results, report)."""


@study.command("run")
@ENGINE_OPTION
@ADDRESS_OPTION
@PARAMS_OPTION
def study_run(engine: str | None, address: str | None, params_path: str) -> None:
    """Run every unit of the study not done yet, locally or as Ray tasks, then the report."""
    from lth.data.prepare import prepare_dataset
    from lth.report.build import build_report
    from lth.study.plan import build_plan, missing_inputs

    params = with_engine(load_params(Path(params_path)), engine, address)
    plan = build_plan(params)
    missing = missing_inputs(plan, params)
    if missing:
        raise UserError(f"{missing[0]} (missing): raise imp.rounds or narrow transfer.rounds")
    if params.engine.kind == "local":
        from lth.study.engine import run_local

        run_local(params, _tracker(params), plan)
    else:
        from lth.study.ray_engine import RayDriver

        tracker, uri, make_tracker = worker_tracking(params)
        driver = RayDriver(params, lambda unit, p: prepare_dataset(unit.dataset, p), tracker, (uri, make_tracker))
        driver.connect(params.engine.address)
        try:
            sched = driver.run(plan)
        finally:
            driver.shutdown()
        failed = [r for r in sched.records.values() if r.state == "failed"]
        if failed:
            raise SystemExit(
                f"lth: study: {len(failed)} unit(s) failed after retries, e.g. {failed[0].key}: {failed[0].error} "
                f"(see {params.paths.units_csv}; rerun to retry only those)")
    index = build_report(params)
    click.echo(f"study done: report -> {index}")
    _dvc_commit(params_path)


DVC_STAGES = ("prepare", "imp", "transfer", "report")  # dvc.yaml's stages the study's plan covers (not tune)


def _dvc_commit(params_path: str) -> None:
    """In the DVC project the study belongs to, record its outputs in dvc.lock, so `dvc status` is clean."""
    import shutil
    import subprocess

    if not Path("dvc.yaml").is_file() or Path(params_path).resolve() != Path("params.yaml").resolve():
        return  # not the pipeline's params: the outputs are not its stages'
    dvc = shutil.which("dvc")
    if dvc is None:
        click.echo("dvc not found: run `dvc commit -f prepare imp transfer report` to record the outputs", err=True)
        return
    done = subprocess.run([dvc, "commit", "-f", *DVC_STAGES], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"dvc commit of {', '.join(DVC_STAGES)} failed: {done.stderr.strip().splitlines()[-1:]}")
    click.echo(f"dvc.lock records {', '.join(DVC_STAGES)} (`dvc status` clean for them; tune is its own stage)")
