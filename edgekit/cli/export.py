"""`edgekit export ansible`: hand a deploy to Ansible."""

from __future__ import annotations

import json

import click

from edgekit.cli.group import cli
from edgekit.cli.common import _inventory_opt, _select
from edgekit.cli.deploy import _artifacts, _rollout_plan
from edgekit.cli.render import ansible_text


@cli.group()
def export():
    """Hand a deploy to another tool: `export ansible`."""


@export.command("ansible")
@click.option("--group", "-g", required=True, help="The inventory group to deploy to.")
@click.option("--bundle", "bundle", required=True, type=click.Path(), help="A bundle, or a convert output directory.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory to write (inventory, playbook, role).")
@click.option("--canary", help="First N devices (or P%) alone (serial).")
@click.option("--batches", help="Then cumulative shares of the group, e.g. 10%,50%,100%.")
@click.option("--batch-size", help="Or batches of N devices (or P%).")
@click.option("--max-fail", help="max_fail_percentage per batch (staged default 0%).")
@click.option("--max-p50-ms", type=float, help="Health gate: p50 measured on the device after the switch.")
@click.option("--forks", type=int, default=50, show_default=True, help="Ansible forks (hosts at a time).")
@click.option("--keep", type=int, default=3, show_default=True, help="Releases kept per model.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_inventory_opt
@click.option("--json", "as_json", is_flag=True)
def export_ansible(group, bundle, out, canary, batches, batch_size, max_fail, max_p50_ms, forks, keep, force,
                   inventory, as_json):
    """Write an Ansible inventory (a group per target profile), playbook and role that do what
    `edgekit deploy` does, by calling the same device-side release code (`--check`: a dry run)."""
    from edgekit.deploy import ansible

    arts = _artifacts(bundle)
    inv, devs = _select(inventory, None, group, False)
    staged = bool(canary or batches or batch_size or max_fail is not None)
    plan = _rollout_plan(canary, batches, batch_size, max_fail, None, "fail", max_p50_ms, "batch", forks,
                         0.0 if staged else 1.0)
    res = ansible.export(inv, devs, arts, plan, out, group, keep=keep, force=force)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(ansible_text(res))
