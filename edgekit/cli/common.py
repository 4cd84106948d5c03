"""Shared by the command groups: device-selection options, the inventory, per-device results."""

from __future__ import annotations

import json

import click


_inventory_opt = click.option("--inventory", type=click.Path(), envvar="EDGEKIT_INVENTORY",
                              help="devices.toml (default: ./devices.toml, or $EDGEKIT_INVENTORY).")
_trust_opt = click.option("--trust-new-host", is_flag=True,
                          help="Accept and record an unknown host key (a changed key is always refused).")


def _select(inventory, device, group, all_devices):
    from edgekit.deploy.inventory import load_inventory

    inv = load_inventory(inventory)
    return inv, inv.select(device, group, all_devices)


def _options(inv, trust_new_host=False, keep=3, quiet=False):
    from edgekit.deploy.ops import Options
    from edgekit.progress import Progress

    ctx = click.get_current_context(silent=True)
    debug = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("debug"))
    return Options(inv, trust_new_host=trust_new_host, keep=keep, progress=Progress(enabled=not quiet),
                   debug=debug)


def _on_devices(inventory, name, group, all_devices, trust_new_host, op, parallel=8, quiet=False):
    """op(device, opts) on each selected device of the inventory, `parallel` at a time."""
    from edgekit.deploy.fleet import fan_out

    inv, devs = _select(inventory, name, group, all_devices)
    opts = _options(inv, trust_new_host, quiet=quiet)
    return fan_out(devs, lambda d: op(d, opts), parallel, debug=opts.debug)


def _finish(group, as_json, headers, row, title=""):
    """Print per-device results (table or JSON); exit 1 when any device failed."""
    from edgekit.table import render

    if as_json:
        click.echo(json.dumps([r.to_dict() for r in group.results], indent=2, default=str))
    else:
        click.echo(render(headers, [row(r) for r in group.results], title=title))
        for r in group.results:
            for w in r.warnings:
                click.echo(f"warning: {r.device}: {w}", err=True)
            if r.reason:
                click.echo(f"{r.device}: {r.reason}", err=True)
    if group.failed:
        raise click.exceptions.Exit(1)


def _device_timer(recipe, device_name, inventory, trust_new_host, quiet):
    """convert --device (image, tensor and language models): the candidates of the device's target are
    timed there (checked before any work)."""
    from edgekit.deploy.timing import DeviceTimer
    from edgekit.targets import load_target

    if recipe.select != "fastest":
        raise click.UsageError("--device times --select fastest's candidates: add --select fastest")
    inv, devs = _select(inventory, device_name, None, False)
    dev = devs[0]
    names = [load_target(t).name for t in recipe.targets]
    if dev.target not in names:
        raise click.BadParameter(f"device {dev.name} is a {dev.target or 'device without a target'}, not one of the "
                                 f"targets ({', '.join(names)})", param_hint="--device")
    return DeviceTimer(dev, _options(inv, trust_new_host, quiet=quiet))


def _device_selection(f):
    f = click.option("--all", "all_devices", is_flag=True, help="Every device in the inventory.")(f)
    f = click.option("--group", "-g", help="A group of devices.")(f)
    return f


def _html_report(build_dir, profiles=(), err=False):
    from edgekit.report import write_report

    click.echo(f"html report: {write_report(build_dir, profiles)}", err=err)
