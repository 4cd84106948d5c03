"""The root `edgekit` group and its error rule. Each command module adds its commands to `cli`; the package
(edgekit.cli) imports those modules, and they import this one, never the package: no import circle."""

from __future__ import annotations

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
