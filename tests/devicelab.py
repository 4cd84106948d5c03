"""Simulated devices for the deploy tests: OpenSSH's sshd, each in its own network namespace.

Every device has its own veth pair and address (10.<net>.<i>.2, the host side .1), its own
host key, its own device root and its own Python environment. Nothing is mocked: the
tests deploy over real SSH to a real sshd into real directories.

Needs root, /usr/sbin/sshd (openssh-server) and `ip` (iproute2): scripts/test.sh installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

SSHD = "/usr/sbin/sshd"
_SSHD_CONFIG = """\
Port 22
ListenAddress {addr}
HostKey {dir}/host_ed25519
PidFile {dir}/sshd.pid
AuthorizedKeysFile {lab}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 100:30:200
MaxSessions 100
"""


def _sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


class LabDevice:
    def __init__(self, lab: "Lab", index: int, name: str, python: str):
        self.lab, self.index, self.name, self.python = lab, index, name, python
        self.ns = f"ek{lab.tag}d{index}"
        self.veth_host = f"ek{lab.tag}h{index}"
        self.veth_dev = f"ek{lab.tag}v{index}"
        self.addr = f"10.{lab.net}.{index}.2"
        self.host_addr = f"10.{lab.net}.{index}.1"
        self.dir = lab.dir / name
        self.root = self.dir / "edgekit-root"
        self.proc: Optional[subprocess.Popen] = None

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.dir / "host_ed25519")
        (self.dir / "sshd_config").write_text(_SSHD_CONFIG.format(addr=self.addr, dir=self.dir, lab=self.lab.dir))
        _sh("ip", "netns", "add", self.ns)
        _sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_dev)
        _sh("ip", "link", "set", self.veth_dev, "netns", self.ns)
        _sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.veth_host)
        _sh("ip", "link", "set", self.veth_host, "up")
        _sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.addr}/30", "dev", self.veth_dev)
        _sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_dev, "up")
        _sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        self.start()

    def host_key_line(self) -> str:
        return f"{self.addr} " + " ".join((self.dir / "host_ed25519.pub").read_text().split()[:2])

    def start(self, timeout: float = 15.0) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "sshd.log", "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, SSHD, "-D", "-e",
                                      "-f", str(self.dir / "sshd_config")],
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd for {self.name} exited: {(self.dir / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection((self.addr, 22), timeout=0.5) as s:
                    if s.recv(4).startswith(b"SSH"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd for {self.name} did not answer on {self.addr}:22")

    def stop(self) -> None:
        """Kill sshd and every session of this device (like pulling its network cable)."""
        r = _sh("ip", "netns", "pids", self.ns, check=False)
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    def regenerate_host_key(self) -> None:
        self.stop()
        for f in self.dir.glob("host_ed25519*"):
            f.unlink()
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.dir / "host_ed25519")
        self.start()

    def mount_tmpfs(self, size: str) -> None:
        """Put the device root on a small tmpfs. `ip netns exec` gives sshd its own mount
        namespace (a copy taken at start), so sshd restarts to see the mount."""
        self.stop()
        _sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.root)
        self.start()

    def unmount(self) -> None:
        self.stop()
        _sh("umount", "-l", self.root, check=False)
        self.start()

    def destroy(self) -> None:
        self.stop()
        _sh("umount", "-l", self.root, check=False)
        _sh("ip", "link", "del", self.veth_host, check=False)
        _sh("ip", "netns", "del", self.ns, check=False)


def _free_net() -> int:
    """A 10.N.0.0/16 no interface here uses (another lab, a leftover, the host's own)."""
    used = _sh("ip", "-4", "-o", "addr", "show", check=False).stdout
    start = 200 + os.getpid() % 50
    for k in range(50):
        n = 200 + (start - 200 + k) % 50
        if f" 10.{n}." not in used:
            return n
    raise RuntimeError("no free 10.200-249.x.x network for the device lab")


class Lab:
    """A set of LabDevices, a client key, a known_hosts file and an inventory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.tag = f"{os.getpid() % 10000}"
        self.net = _free_net()
        self.devices: Dict[str, LabDevice] = {}
        self.key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.ssh_config = self.dir / "ssh_config"
        self.inventory = self.dir / "devices.toml"

    def setup(self) -> None:
        for tool in (SSHD, shutil.which("ip"), shutil.which("ssh-keygen")):
            if not tool or not Path(tool).exists():
                raise RuntimeError("the device lab needs openssh-server and iproute2 (run scripts/test.sh as root)")
        if os.geteuid() != 0:
            raise RuntimeError("the device lab needs root (network namespaces)")
        self.dir.mkdir(parents=True, exist_ok=True)
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        (self.dir / "authorized_keys").write_text((self.dir / "client_ed25519.pub").read_text())
        self.ssh_config.write_text("")

    def add(self, name: str, python: str) -> LabDevice:
        d = LabDevice(self, len(self.devices) + 1, name, python)
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
