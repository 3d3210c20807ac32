"""`lth`: one subcommand per pipeline stage, plus `datasets`, `tickets`, `tune` and `report`.

User mistakes (lth.errors.UserError, click usage errors) end with one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lth.cli_options import PARAMS_OPTION
from lth.config import Params, load_params
from lth.errors import UserError



def _params(path: str) -> Params:
    return load_params(Path(path))


def _tracker(params: Params):
    from lth.tracking import get_tracker

    return get_tracker(params)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lth")
def cli() -> None:
    """Lottery-ticket transfer studies: find tickets by IMP, transfer them, compare, report."""


@cli.command("datasets")
@PARAMS_OPTION
def datasets_cmd(params_path: str) -> None:
    """List the known datasets: role, classes, origin, whether prepared."""
    from lth.data.registry import dataset_rows

    params = _params(params_path) if Path(params_path).is_file() else Params()
    rows = dataset_rows(params)
    headers = list(rows[0]) if rows else []
    widths = [max(len(str(h)), *(len(str(r[h])) for r in rows)) for h in headers]
    click.echo("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        click.echo("  ".join(str(row[h]).ljust(w) for h, w in zip(headers, widths)))


@cli.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Prepare every dataset named in prepare.datasets.")
@PARAMS_OPTION
def prepare_cmd(names: tuple[str, ...], all_: bool, params_path: str) -> None:
    """Write data/prepared/NAME (uint8 splits, labels, meta.json) for each NAME."""
    from lth.data.prepare import prepare_dataset
    from lth.data.registry import get_spec

    params = _params(params_path)
    todo = list(params.prepare.datasets) if all_ else list(names)
    if not todo:
        raise UserError("name a dataset to prepare (see `lth datasets`) or pass --all")
    for name in todo:
        get_spec(name)  # fail before any work on an unknown name
    for name in todo:
        out = prepare_dataset(name, params)
        click.echo(f"prepared {name} -> {out}")


@cli.command("imp")
@click.argument("source")
@click.option("--seed", type=int, default=None, help="One seed (default: every seed in imp.seeds).")
@click.option("--rounds", type=click.IntRange(1, 60), default=None, help="Override imp.rounds.")
@PARAMS_OPTION
def imp_cmd(source: str, seed: int | None, rounds: int | None, params_path: str) -> None:
    """Find tickets on SOURCE by iterative magnitude pruning with late resetting."""
    from lth.data.registry import get_spec
    from lth.data.store import read_meta
    from lth.imp import make_job, run_imp

    params = _params(params_path)
    get_spec(source)
    read_meta(params.paths.data, source)  # a clear error before any training when data is missing
    tracker = _tracker(params)
    for s in [seed] if seed is not None else list(params.imp.seeds):
        job = make_job(source, s, params, rounds=rounds)
        dirs = run_imp(job, params, tracker)
        click.echo(f"imp {source} seed {s}: {len(dirs)} tickets under {job.out_dir}")


@cli.command("transfer")
@click.argument("target")
@click.option("--arm", "arms", multiple=True, help="Run only these arms (repeatable; default: transfer.arms).")
@PARAMS_OPTION
def transfer_cmd(target: str, arms: tuple[str, ...], params_path: str) -> None:
    """Fine-tune every arm of the study on TARGET and write results/transfer/TARGET.csv."""
    from lth.config import ARMS
    from lth.transfer import run_transfer

    params = _params(params_path)
    for arm in arms:
        if arm not in ARMS:
            raise UserError(f"unknown arm {arm!r} (--arm); choose from {', '.join(ARMS)}")
    csv = run_transfer(target, params, _tracker(params), arms=arms or None)
    click.echo(f"transfer {target}: results in {csv}")


def main() -> None:
    """Console entry point: user mistakes -> one line on stderr, exit 2."""
    try:
        cli.main(standalone_mode=False)
    except UserError as exc:
        click.echo(f"lth: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("lth: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        msg = exc.format_message().replace("\n", " ")
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        click.echo(f"lth: error: {where}{msg}", err=True)
        sys.exit(2)



def _register_subcommands() -> None:
    # Imported here, after `cli` exists, so each module stays a leaf that never imports lth.cli.
    from lth.cli_data import build, pull
    from lth.cli_report import report
    from lth.cli_tickets import tickets
    from lth.cli_tune import tune

    for command in (pull, build, tune, report, tickets):
        cli.add_command(command)


_register_subcommands()

if __name__ == "__main__":
    main()
