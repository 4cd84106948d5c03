"""The root `edgekit` group and its error rule. Each command module adds its commands to `cli`; the package
(edgekit.cli) imports those modules, and they import this one, never the package: no import circle."""

from __future__ import annotations

import click

import errno

from edgekit import __version__
from edgekit.errors import EdgekitError

# the OSErrors a path the user chose can meet, where "choose another path" is the advice; others (a missing
# executable is ENOENT with its name as the filename) keep their traceback: they are not the user's path
PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
               errno.EEXIST, errno.ENAMETOOLONG, errno.EXDEV}


class _Group(click.Group):
    """Turns EdgekitError into one clear line and its exit code; an OSError on a path the user named (an --out in a
    read-only folder, a directory where a file goes, a full disk) into one line naming the path, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:
            if e.filename is None or e.errno not in PATH_ERRNOS or (ctx.obj and ctx.obj.get("debug")):
                raise
            where = e.filename if e.filename2 is None else e.filename2   # a rename's: the destination, not a temp
            click.echo(f"error: {where}: {e.strerror or e} (choose another path; --debug for the traceback)",
                       err=True)
            ctx.exit(2)


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
