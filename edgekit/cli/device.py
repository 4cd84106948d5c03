"""`edgekit device`: the inventory (add, list, info, setup) and the lab's local and emulated devices."""

from __future__ import annotations

import json

import click

from edgekit.cli.group import cli
from edgekit.cli.common import _device_selection, _finish, _inventory_opt, _on_devices, _trust_opt
from edgekit.cli.render import (INFO_HEADERS, SETUP_HEADERS, devices_table, emulated_status_text, info_row,
                                local_devices_table, setup_row)


@cli.group()
def device():
    """The devices in the inventory: add, list, info, setup; local and emulated devices."""


@device.command("add")
@click.argument("name")
@click.option("--host", required=True, help="Address, or a Host alias from ~/.ssh/config.")
@click.option("--port", type=int)
@click.option("--user")
@click.option("--key-file", type=click.Path())
@click.option("--target", help="The device's target profile (see `edgekit targets list`).")
@click.option("--root", default="~/.edgekit", show_default=True, help="Device directory for edgekit.")
@click.option("--python", "python_", default="python3", show_default=True, help="Python on the device.")
@click.option("--group", "groups", multiple=True, help="Group(s) for fleet commands.")
@click.option("--replace", is_flag=True, help="Overwrite a device of that name.")
@_inventory_opt
def device_add(name, host, port, user, key_file, target, root, python_, groups, replace, inventory):
    """Add a device to devices.toml (no passwords stored: keys or ssh-agent)."""
    from edgekit.deploy.inventory import Device, load_inventory
    from edgekit.targets import load_target

    if target:
        load_target(target)
    inv = load_inventory(inventory, must_exist=False)
    inv.add(Device(name=name, host=host, port=port, user=user, key_file=key_file, target=target,
                   root=root, python=python_, groups=tuple(groups)), replace_existing=replace)
    inv.save()
    click.echo(f"added {name} ({user + '@' if user else ''}{host}) to {inv.path}")


@device.command("list")
@_inventory_opt
@click.option("--json", "as_json", is_flag=True)
def device_list(inventory, as_json):
    """The devices in the inventory."""
    import dataclasses

    from edgekit.deploy.inventory import load_inventory

    inv = load_inventory(inventory)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(d) for d in inv.devices.values()], indent=2))
        return
    click.echo(devices_table(inv.devices.values()))


@device.group("local")
def device_local():
    """Devices on this machine (sshd in a network namespace; Linux, root): try deploy without a board."""


@device_local.command("up")
@click.argument("name", default="local")
@click.option("--target", help="The profile it stands in for (default: what `device info` suggests).")
@click.option("--python", "python_", help="Python for its runtime (default: this one).")
@click.option("--group", "groups", multiple=True)
@_inventory_opt
def device_local_up(name, target, python_, groups, inventory):
    """Start local device NAME and add it to the inventory (its host key to known_hosts)."""
    from edgekit.lab import local

    info = local.up(name, python_)
    inv, known = _add_started_device(inventory, name, info, target, groups, "local")
    click.echo(f"local device {name} is up at {info['host']} (root {info['root']}); "
               f"in {inv.path}, host key in {known}")


@device_local.command("down")
@click.argument("name", default="local")
@_inventory_opt
def device_local_down(name, inventory):
    """Stop local device NAME, remove its state and its inventory entry."""
    from edgekit.lab import local

    gone = local.down(name)
    _remove_started_device(inventory, name)
    click.echo(f"local device {name} {'removed' if gone else 'was not running'}")


@device_local.command("list")
def device_local_list():
    """Local devices on this machine."""
    from edgekit.lab import local

    click.echo(local_devices_table(local.listing()))


def _add_started_device(inventory, name, info, target, groups, default_group):
    """Add a device edgekit started here (local or emulated) to the inventory, its key to known_hosts."""
    from edgekit.deploy.inventory import Device, load_inventory

    inv = load_inventory(inventory, must_exist=False)
    known = _record_host_key(inv, info["host_key"])
    inv.add(Device(name=name, host=info["host"], user="root", key_file=info["key_file"], target=target,
                   root=info["root"], python=info["python"], groups=tuple(groups) or (default_group,)),
            replace_existing=True)
    inv.save()
    return inv, known


def _remove_started_device(inventory, name):
    from edgekit.deploy.inventory import load_inventory

    inv = load_inventory(inventory, must_exist=False)
    if name in inv.devices:
        inv.remove(name)
        inv.save()


def _record_host_key(inv, line):
    import os
    from pathlib import Path

    known = Path(os.path.expanduser(inv.known_hosts))
    known.parent.mkdir(parents=True, exist_ok=True)
    host = line.split(" ", 1)[0]
    lines = [ln for ln in (known.read_text().splitlines() if known.is_file() else []) if ln.split(" ", 1)[0] != host]
    known.write_text("\n".join(lines + [line]) + "\n")
    return known


@device.group("emulate")
def device_emulate():
    """An emulated arm64 Raspberry-Pi-OS-like device (Debian 12 arm64 under qemu; Linux, root)."""


@device_emulate.command("up")
@click.argument("name", default="emulated-pi")
@click.option("--target", default="rpi4", show_default=True, help="The profile it stands in for.")
@click.option("--group", "groups", multiple=True)
@_inventory_opt
def device_emulate_up(name, target, groups, inventory):
    """Build the arm64 root once (cached; minutes), start device NAME, add it to the inventory."""
    from edgekit.lab import emulated
    from edgekit.targets import load_target

    load_target(target)
    info = emulated.up(name, say=lambda t: click.echo(t, err=True))
    inv, known = _add_started_device(inventory, name, info, target, groups, "emulated")
    click.echo(f"emulated arm64 device {name} is up at {info['host']} (aarch64 under qemu; tflite-runtime "
               f"2.14, numpy<2); in {inv.path}, host key in {known}")


@device_emulate.command("down")
@click.argument("name", default="emulated-pi")
@_inventory_opt
def device_emulate_down(name, inventory):
    """Stop emulated device NAME and remove it from the inventory (the cached root stays)."""
    from edgekit.lab import emulated

    gone = emulated.down(name)
    _remove_started_device(inventory, name)
    click.echo(f"emulated device {name} {'removed' if gone else 'was not running'}")


@device_emulate.command("status")
@click.argument("name", default="emulated-pi")
@click.option("--json", "as_json", is_flag=True)
def device_emulate_status(name, as_json):
    """Whether the arm64 root is built (and how long it took), and whether NAME runs."""
    from edgekit.lab import emulated

    st = emulated.status(name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(emulated_status_text(st))


@device.command("info")
@click.argument("name", required=False)
@_device_selection
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
def device_info(name, group, all_devices, inventory, trust_new_host, as_json):
    """What a device is: arch, CPU, memory, OS, Python, backends; the profile that fits."""
    from edgekit.deploy import ops

    res = _on_devices(inventory, name, group, all_devices, trust_new_host, ops.info)
    _finish(res, as_json, INFO_HEADERS, info_row)


@device.command("setup")
@click.argument("name", required=False)
@_device_selection
@_inventory_opt
@_trust_opt
@click.option("--parallel", type=int, default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def device_setup(name, group, all_devices, inventory, trust_new_host, parallel, as_json):
    """Push the edgekit runtime to the device(s) and check a backend is there."""
    from edgekit.deploy import ops

    res = _on_devices(inventory, name, group, all_devices, trust_new_host, ops.setup, parallel)
    _finish(res, as_json, SETUP_HEADERS, setup_row)
