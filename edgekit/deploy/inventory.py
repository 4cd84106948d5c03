"""devices.toml: the devices a user deploys to, and the SSH settings to reach them.

    [ssh]                                   # optional
    known_hosts = "~/.ssh/known_hosts"
    config = "~/.ssh/config"

    [devices.pi-kitchen]
    host = "192.168.1.20"                   # or an alias from ~/.ssh/config
    port = 22
    user = "pi"
    key_file = "~/.ssh/id_ed25519"          # optional: ssh-agent and default keys work too
    target = "rpi4"
    root = "~/.edgekit"
    python = "python3"
    groups = ["kitchen"]

No passwords: use a key file or ssh-agent.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from edgekit.bundle import check_name
from edgekit.errors import InventoryError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PATH = "devices.toml"
_DEVICE_KEYS = {"host": str, "port": int, "user": str, "key_file": str, "target": str,
                "root": str, "python": str, "groups": list}
_SSH_KEYS = {"known_hosts": str, "config": str}
_SECRET = re.compile(r"pass(word|phrase)?|secret", re.I)


@dataclass(frozen=True)
class Device:
    name: str
    host: str
    port: Optional[int] = None
    user: Optional[str] = None
    key_file: Optional[str] = None
    target: Optional[str] = None
    root: str = "~/.edgekit"
    python: str = "python3"
    groups: Tuple[str, ...] = ()

    def __post_init__(self):
        check_name(self.name, "device name")
        for g in self.groups:
            check_name(g, "group name")
        if self.port is not None and not 0 < self.port < 65536:
            raise InventoryError(f"device {self.name}: port {self.port} is not a TCP port")

    @property
    def address(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"


@dataclass
class Inventory:
    path: Path
    devices: Dict[str, Device] = field(default_factory=dict)
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_config: str = "~/.ssh/config"

    def select(self, device: Optional[str] = None, group: Optional[str] = None,
               all_devices: bool = False) -> List[Device]:
        if sum(bool(x) for x in (device, group, all_devices)) != 1:
            raise InventoryError("name exactly one of --device, --group or --all")
        if device:
            if device not in self.devices:
                raise InventoryError(f"no device '{device}' in {self.path}",
                                     hint="known: " + (", ".join(sorted(self.devices)) or "none")
                                     + "; add one with `edgekit device add`")
            return [self.devices[device]]
        if all_devices:
            if not self.devices:
                raise InventoryError(f"no devices in {self.path}", hint="add one with `edgekit device add`")
            return list(self.devices.values())
        members = [d for d in self.devices.values() if group in d.groups]
        if not members:
            groups = sorted({g for d in self.devices.values() for g in d.groups})
            raise InventoryError(f"no device in group '{group}' ({self.path})",
                                 hint="groups: " + (", ".join(groups) or "none"))
        return members

    def add(self, dev: Device, replace_existing: bool = False) -> None:
        if dev.name in self.devices and not replace_existing:
            raise InventoryError(f"device '{dev.name}' is already in {self.path}",
                                 hint="use --replace to overwrite it")
        self.devices[dev.name] = dev

    def remove(self, name: str) -> None:
        if name not in self.devices:
            raise InventoryError(f"no device '{name}' in {self.path}")
        del self.devices[name]

    def save(self) -> None:
        lines = ["# edgekit inventory: devices to deploy to (no passwords: keys or ssh-agent)",
                 "", "[ssh]", f"known_hosts = {_q(self.known_hosts)}", f"config = {_q(self.ssh_config)}"]
        for d in self.devices.values():
            lines += ["", f"[devices.{_q(d.name)}]"]
            for k, v in asdict(d).items():
                if k == "name" or v is None or (k == "groups" and not v):
                    continue
                if isinstance(v, (list, tuple)):
                    lines.append(f"{k} = [{', '.join(_q(x) for x in v)}]")
                elif isinstance(v, int):
                    lines.append(f"{k} = {v}")
                else:
                    lines.append(f"{k} = {_q(v)}")
        text = "\n".join(lines) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def default_path() -> Path:
    return Path(os.environ.get("EDGEKIT_INVENTORY", DEFAULT_PATH))


def load_inventory(path: Optional[os.PathLike] = None, must_exist: bool = True) -> Inventory:
    p = Path(path) if path else default_path()
    if not p.is_file():
        if must_exist:
            raise InventoryError(f"inventory {p} not found",
                                 hint="add a device with `edgekit device add NAME --host ...`, "
                                      "or point --inventory / EDGEKIT_INVENTORY at yours")
        return Inventory(p)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InventoryError(f"{p}: not valid TOML: {e}") from None
    inv = Inventory(p)
    for key in data:
        if key not in ("ssh", "devices"):
            raise InventoryError(f"{p}: unknown table '{key}' (valid: ssh, devices)")
    for k, v in data.get("ssh", {}).items():
        if k not in _SSH_KEYS or not isinstance(v, str):
            raise InventoryError(f"{p}: ssh.{k}: unknown key or not a string (valid: known_hosts, config)")
        setattr(inv, "ssh_config" if k == "config" else k, v)
    for name, d in data.get("devices", {}).items():
        if not isinstance(d, dict):
            raise InventoryError(f"{p}: devices.{name} must be a table")
        kwargs = {}
        for k, v in d.items():
            if _SECRET.search(k):
                raise InventoryError(f"{p}: devices.{name}.{k}: no passwords in the inventory",
                                     hint="use key_file, or ssh-agent")
            if k not in _DEVICE_KEYS:
                raise InventoryError(f"{p}: devices.{name}.{k}: unknown key (valid: "
                                     + ", ".join(_DEVICE_KEYS) + ")")
            if not isinstance(v, _DEVICE_KEYS[k]) or isinstance(v, bool):
                raise InventoryError(f"{p}: devices.{name}.{k}: expected {_DEVICE_KEYS[k].__name__}")
            kwargs[k] = tuple(v) if k == "groups" else v
        if "host" not in kwargs:
            raise InventoryError(f"{p}: devices.{name}: 'host' is required")
        try:
            inv.devices[name] = Device(name=name, **kwargs)
        except Exception as e:
            raise InventoryError(f"{p}: devices.{name}: {e}") from None
    return inv


__all__ = ["Device", "Inventory", "load_inventory", "default_path"]
