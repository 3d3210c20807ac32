"""`lth tune SOURCE TARGET`: search the rewind epoch and the fine-tuning learning rate with Optuna."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from lth.cli.options import ADDRESS_OPTION, ENGINE_OPTION, PARAMS_OPTION, with_engine
from lth.config import Params, load_params
from lth.errors import UserError

if TYPE_CHECKING:  # the study pulls in optuna and torch: not for `lth --help`
    from lth.study.tune import TuneResult


@click.command("tune")
@click.argument("source")
@click.argument("target")
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Finished (complete or pruned) trials the study should have in total; a rerun adds only "
                   "the missing ones, a larger number resumes it. Default: tune.n_trials.")
@click.option("--study-name", default=None, help="Optuna study to create or resume. Default: tune.study_name.")
@click.option("--storage", default=None,
              help="Optuna RDB URL. Default: tune.storage, else sqlite:///<abs>/<results>/tune/optuna.db.")
@ENGINE_OPTION
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel workers running trials on the one study (--engine ray: one Ray task each, "
                   "engine.finetune_cpus / finetune_gpus).")
@ADDRESS_OPTION
@PARAMS_OPTION
def tune(source: str, target: str, n_trials: int | None, study_name: str | None, storage: str | None,
         engine: str | None, workers: int, address: str | None, params_path: str) -> None:
    """Tune imp.rewind_epoch and transfer.lr for SOURCE's ticket transferred to TARGET; write results/tune/best.yaml."""
    import pandas as pd

    from lth.study.tune import check_tune_inputs, run_tune

    params = with_engine(load_params(Path(params_path)), engine, address)
    overrides = {"n_trials": n_trials, "study_name": study_name, "storage": storage}
    params = replace(params, tune=replace(params.tune, **{k: v for k, v in overrides.items() if v is not None}))
    if workers > 1 and params.engine.kind != "ray":
        raise UserError(f"--workers {workers} runs trials as Ray tasks: add --engine ray (or set engine.kind: ray)")
    check_tune_inputs(source, target, params)  # before the tracker creates anything
    if params.engine.kind == "ray":
        result = _run_on_ray(source, target, params, workers)
    else:
        from lth.tracking.mlflow import get_tracker

        result = run_tune(source, target, params, get_tracker(params))
    click.echo(pd.DataFrame(result.trials).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if len(result.workers) > 1:
        click.echo("trials per worker: " + ", ".join(f"{w} {len(t)}" for w, t in result.workers.items()))
    click.echo(f"best: trial {result.best_trial}  rewind_epoch={result.rewind_epoch}  lr={result.lr:.4g}  "
               f"val_acc={result.val_acc:.4f}")
    click.echo(f"-> {result.best_path} (merge into params.yaml), {result.trials_path}")


def _run_on_ray(source: str, target: str, params: Params, workers: int) -> TuneResult:
    """The study's trials on `workers` Ray tasks sharing its storage; this process drives and writes the results."""
    from lth.cli.study import worker_tracking
    from lth.study.ray_engine import RayWorkers, tracking_store
    from lth.study.tune import Parallel, run_tune, shared_storage

    pool = RayWorkers(params.engine, params.engine.address)
    try:
        tracker, uri, make_tracker = worker_tracking(params)
        pool.check(tracking_store(uri) | shared_storage(params))  # before any training
        name = f"lth tune {params.tune.study_name}"
        parallel = Parallel(lambda fn, args, progress: pool.run(fn, workers, args, name, progress), make_tracker)
        return run_tune(source, target, params, tracker, parallel=parallel)
    finally:
        pool.shutdown()
