"""The deploy tests' fleet: several local devices (edgekit.lab.local) sharing one
client key, a known_hosts file and an inventory. Nothing is mocked: the tests deploy over
real SSH to a real sshd into real directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

from edgekit.lab import keys
from edgekit.lab.local import LocalDevice, check_prerequisites, free_net

LabDevice = LocalDevice


class Lab:
    """A set of LabDevices, a client key, a known_hosts file and an inventory."""

    def __init__(self, directory: Path, tag: Optional[str] = None):
        self.dir = directory
        self.tag = tag or f"{os.getpid() % 10000}"   # namespace names are machine-wide: one tag per lab
        self.net = free_net()
        self.devices: Dict[str, LabDevice] = {}
        self.key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.ssh_config = self.dir / "ssh_config"
        self.inventory = self.dir / "devices.toml"

    def setup(self) -> None:
        check_prerequisites()
        self.dir.mkdir(parents=True, exist_ok=True)
        keys.client_key(self.dir)
        self.ssh_config.write_text("")

    def add(self, name: str, python: str) -> LabDevice:
        d = LocalDevice(self.dir / name, name, python, tag=self.tag, net=self.net,
                        index=len(self.devices) + 1, authorized_keys=self.dir / "authorized_keys")
        self.devices[name] = d
        try:
            d.create()
        except Exception:
            d.destroy()
            raise
        return d

    def write_known_hosts(self, names: Optional[List[str]] = None) -> None:
        names = list(self.devices) if names is None else names
        self.known_hosts.write_text("".join(self.devices[n].host_key_line() + "\n" for n in names))

    def write_inventory(self, names: Optional[List[str]] = None, extra: Optional[Dict[str, dict]] = None,
                        path: Optional[Path] = None) -> Path:
        path = path or self.inventory
        lines = ["[ssh]", f'known_hosts = "{self.known_hosts}"', f'config = "{self.ssh_config}"']
        for n in (list(self.devices) if names is None else names):
            d = self.devices[n]
            fields = {"host": d.addr, "user": "root", "key_file": str(self.key), "root": str(d.root),
                      "python": d.python, "groups": ["lab"]}
            fields.update((extra or {}).get(n, {}))
            lines.append(f"\n[devices.{n}]")
            for k, v in fields.items():
                if isinstance(v, list):
                    lines.append(f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]")
                elif isinstance(v, int):
                    lines.append(f"{k} = {v}")
                else:
                    lines.append(f'{k} = "{v}"')
        path.write_text("\n".join(lines) + "\n")
        return path

    def teardown(self) -> None:
        for d in self.devices.values():
            d.destroy()
