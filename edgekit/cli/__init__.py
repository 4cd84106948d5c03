"""The `edgekit` command: the root group, the error rule, one module per command group.

The only package that imports everything; nothing outside it imports it.
A user's mistake: one line on stderr, exit 2 (no traceback unless --debug).
A validation that misses its budget: exit 1, report still written.
"""

from __future__ import annotations

from typing import Optional

import click

from edgekit import __version__
from edgekit.errors import EdgekitError


class _Group(click.Group):
    """Turns EdgekitError into one clear line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgekit")
@click.option("--debug", is_flag=True, help="Show tracebacks and native library output.")
@click.pass_context
def cli(ctx, debug):
    """Take a trained model to edge devices: convert, run, measure."""
    import os

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:
        os.environ["EDGEKIT_DEBUG"] = "1"


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="edgekit", standalone_mode=True)


# Each module adds its commands to `cli` (imported after `cli` exists); serve also adds
# --serve/--no-serve to deploy and the serving state to status.
from edgekit.cli import (convert, deploy, device, export, optimize, report, run, serve,  # noqa: E402,F401
                         targets)
