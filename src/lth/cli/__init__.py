"""`lth`: one subcommand per pipeline stage, plus `datasets`, `tickets`, `tune` and `report`.

User mistakes (lth.errors.UserError, click usage errors) end with one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from lth.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lth")
def cli() -> None:
    """Lottery-ticket transfer studies: find tickets by IMP, transfer them, compare, report."""


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
    # Imported here, after `cli` exists; each command module is a leaf that never imports lth.cli.
    from lth.cli.data import build, datasets_cmd, prepare_cmd, pull
    from lth.cli.report import report
    from lth.cli.study import imp_cmd, study, transfer_cmd
    from lth.cli.tickets import tickets
    from lth.cli.tune import tune
    from lth.cli.ui import ui

    for command in (datasets_cmd, prepare_cmd, imp_cmd, transfer_cmd, pull, build, tune, report, tickets, study, ui):
        cli.add_command(command)


_register_subcommands()

if __name__ == "__main__":
    main()
