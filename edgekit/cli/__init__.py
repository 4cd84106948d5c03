"""The `edgekit` command: the root group, the error rule, one module per command group.

The only package that imports everything; nothing outside it imports it.
A user's mistake: one line on stderr, exit 2 (no traceback unless --debug).
A validation that misses its budget: exit 1, report still written.
"""

from __future__ import annotations

from typing import Optional

from edgekit.cli.group import cli


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="edgekit", standalone_mode=True)


# Each module adds its commands to `cli` (edgekit.cli.group); serve also adds
# --serve/--no-serve to deploy and the serving state to status.
from edgekit.cli import (convert, deploy, device, export, optimize, report, run, serve,  # noqa: E402,F401
                         targets)
