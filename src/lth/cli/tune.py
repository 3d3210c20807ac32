"""`lth tune SOURCE TARGET`: search the rewind epoch and the fine-tuning learning rate with Optuna."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from lth.cli.options import PARAMS_OPTION
from lth.config import load_params


@click.command("tune")
@click.argument("source")
@click.argument("target")
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Finished (complete or pruned) trials the study should have in total; a rerun adds only "
                   "the missing ones, a larger number resumes it. Default: tune.n_trials.")
@click.option("--study-name", default=None, help="Optuna study to create or resume. Default: tune.study_name.")
@click.option("--storage", default=None,
              help="Optuna RDB URL. Default: tune.storage, else sqlite:///<abs>/<results>/tune/optuna.db.")
@PARAMS_OPTION
def tune(source: str, target: str, n_trials: int | None, study_name: str | None, storage: str | None,
         params_path: str) -> None:
    """Tune imp.rewind_epoch and transfer.lr for SOURCE's ticket transferred to TARGET; write results/tune/best.yaml."""
    import pandas as pd

    from lth.tracking.mlflow import get_tracker
    from lth.study.tune import check_tune_inputs, run_tune

    params = load_params(Path(params_path))
    overrides = {"n_trials": n_trials, "study_name": study_name, "storage": storage}
    params = replace(params, tune=replace(params.tune, **{k: v for k, v in overrides.items() if v is not None}))
    check_tune_inputs(source, target, params)  # before the tracker creates anything
    result = run_tune(source, target, params, get_tracker(params))
    click.echo(pd.DataFrame(result.trials).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    click.echo(f"best: trial {result.best_trial}  rewind_epoch={result.rewind_epoch}  lr={result.lr:.4g}  "
               f"val_acc={result.val_acc:.4f}")
    click.echo(f"-> {result.best_path} (merge into params.yaml), {result.trials_path}")
