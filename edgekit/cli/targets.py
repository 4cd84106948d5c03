"""`edgekit targets list|show`: the target profiles."""

from __future__ import annotations

import json

import click

from edgekit.cli.group import cli
from edgekit.cli.render import profile_text, targets_table


@cli.group()
def targets():
    """Target profiles: what each device class is, and what gets built for it."""


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON for machines.")
def targets_list(as_json):
    """Every shipped profile, one line each."""
    from edgekit.targets import all_targets

    profiles = all_targets()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    click.echo(targets_table(profiles))


@targets.command("show")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="JSON for machines.")
def targets_show(target, as_json):
    """A profile and the reason for each hardware-driven choice (TARGET: name or .toml path)."""
    from edgekit.targets import load_target

    p = load_target(target)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(profile_text(p))
