"""Devices on this machine: OpenSSH's sshd, each in its own network namespace.

A local device has its own veth pair and address (10.<net>.<i>.2, the host side .1), its
own host key, its own device root and its own Python. It is a real SSH target: the tests
deploy to a fleet of them, and `edgekit device local up` gives a user without a board one
to try the whole path on. Linux, root, /usr/sbin/sshd (openssh-server) and `ip` (iproute2).
The emulated arm64 device (emulated.py) is a LocalDevice whose sshd runs in a chroot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from edgekit.errors import DeviceError
from edgekit.lab import keys

SSHD = "/usr/sbin/sshd"
_SSHD_CONFIG = """\
Port 22
ListenAddress {addr}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {keys}
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


def sshd_config(addr: str, host_key: str, pid_file: str, authorized_keys: str) -> str:
    """The one sshd configuration of every stand-in device (paths as its sshd sees them)."""
    return _SSHD_CONFIG.format(addr=addr, host_key=host_key, pid_file=pid_file, keys=authorized_keys)


def _sh(*args, check=True, **kw):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


class LocalDevice:
    """One device on this machine: sshd in its own network namespace, own address and host key."""

    def __init__(self, directory: Path, name: str, python: str, *, tag: str, net: int, index: int,
                 authorized_keys: Path):
        self.name, self.python, self.index = name, python, index
        self.ns = f"ek{tag}d{index}"
        self.veth_host = f"ek{tag}h{index}"
        self.veth_dev = f"ek{tag}v{index}"
        self.addr = f"10.{net}.{index}.2"
        self.host_addr = f"10.{net}.{index}.1"
        self.dir = Path(directory).resolve()          # sshd wants absolute paths in its config
        self.root = self.dir / "edgekit-root"
        self.device_root = str(self.root)             # the root as the device's own paths name it
        self.authorized_keys = Path(authorized_keys).resolve()
        self.proc: Optional[subprocess.Popen] = None

    def create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        keys.keygen(self.dir / "host_ed25519")
        (self.dir / "sshd_config").write_text(sshd_config(self.addr, f"{self.dir}/host_ed25519",
                                                          f"{self.dir}/sshd.pid", str(self.authorized_keys)))
        self._netns()
        self.start()

    def _netns(self) -> None:
        """The device's network namespace and its veth pair: its own address, reachable from here."""
        _sh("ip", "netns", "add", self.ns)
        _sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_dev)
        _sh("ip", "link", "set", self.veth_dev, "netns", self.ns)
        _sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.veth_host)
        _sh("ip", "link", "set", self.veth_host, "up")
        _sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.addr}/30", "dev", self.veth_dev)
        _sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth_dev, "up")
        _sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")

    def host_key_line(self) -> str:
        return f"{self.addr} " + keys.public_line(self.dir / "host_ed25519")

    def launch(self, record: Dict, what: str) -> None:
        """Record the device (device.json) and start it; on failure undo all of it."""
        (self.dir / "device.json").write_text(json.dumps(record))
        try:
            self.create()
        except Exception as e:
            self.destroy()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise DeviceError(f"cannot start {what} device {self.name}: {e}") from None

    def connection(self) -> Dict[str, str]:
        """What an inventory entry needs to reach it."""
        return {"host": self.addr, "user": "root", "key_file": str(self.dir / "client_ed25519"),
                "root": self.device_root, "python": self.python, "host_key": self.host_key_line()}

    def start(self, timeout: float = 15.0) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        with open(self.dir / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.sshd_argv()],
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

    def sshd_argv(self) -> List[str]:
        return [SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")]

    def running(self) -> bool:
        return bool(_sh("ip", "netns", "pids", self.ns, check=False).stdout.split())

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
        keys.keygen(self.dir / "host_ed25519", replace=True)
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


def free_net() -> int:
    """A 10.N.0.0/16 no interface here uses (another lab, a leftover, the host's own)."""
    used = _sh("ip", "-4", "-o", "addr", "show", check=False).stdout
    start = 200 + os.getpid() % 50
    for k in range(50):
        n = 200 + (start - 200 + k) % 50
        if f" 10.{n}." not in used:
            return n
    raise RuntimeError("no free 10.200-249.x.x network for the device lab")


def free_slot(prefix: str, used=(), start: int = 1) -> int:
    """An index i whose namespace ek<prefix><i>d<i> exists nowhere on this machine (names are global)."""
    existing = set(_sh("ip", "netns", "list", check=False).stdout.split())
    for i in range(start, start + 250):
        if i not in used and f"ek{prefix}{i}d{i}" not in existing:
            return i
    raise DeviceError("no free network namespace name for a local device")


def check_prerequisites() -> None:
    missing = [t for t, ok in (("openssh-server (/usr/sbin/sshd)", Path(SSHD).exists()),
                                ("iproute2 (ip)", shutil.which("ip")), ("ssh-keygen", shutil.which("ssh-keygen")))
               if not ok]
    if missing:
        raise DeviceError("a local device needs " + ", ".join(missing),
                          hint="apt-get install openssh-server iproute2")
    if sys.platform != "linux" or os.geteuid() != 0:
        raise DeviceError("a local device needs Linux and root (it creates a network namespace)",
                          hint="run as root, or deploy to a real device")


# --- the user's local devices: state under a directory, sshd left running ----------------

def state_dir(base: Optional[Path] = None) -> Path:
    return Path(base or os.environ.get("EDGEKIT_LOCAL_DEVICES",
                                       Path.home() / ".cache" / "edgekit" / "local-devices"))


def _load(d: Path) -> LocalDevice:
    m = json.loads((d / "device.json").read_text())
    dev = LocalDevice(d, m["name"], m["python"], tag=m["tag"], net=m["net"], index=m["index"],
                      authorized_keys=Path(m["authorized_keys"]))
    return dev


def up(name: str, python: Optional[str] = None, base: Optional[Path] = None) -> Dict[str, str]:
    """Create (or restart) a local device; returns what an inventory entry needs."""
    check_prerequisites()
    d = (state_dir(base) / name).resolve()
    if (d / "device.json").is_file():
        dev = _load(d)
        if not dev.running():
            if not _sh("ip", "netns", "list", check=False).stdout.count(dev.ns):
                shutil.rmtree(d)
                return up(name, python, base)
            dev.start()
    else:
        d.mkdir(parents=True, exist_ok=True)
        keys.client_key(d, f"edgekit-local-{name}")
        used = {_load(p).index for p in state_dir(base).iterdir() if (p / "device.json").is_file()}
        index = free_slot("l", used)
        dev = LocalDevice(d, name, python or sys.executable, tag=f"l{index}", net=free_net(), index=index,
                          authorized_keys=d / "authorized_keys")
        dev.launch({"name": name, "python": dev.python, "tag": f"l{index}", "net": int(dev.addr.split(".")[1]),
                    "index": index, "authorized_keys": str(d / "authorized_keys")}, "local")
    return dev.connection()


def down(name: str, base: Optional[Path] = None, loader=None) -> bool:
    """Stop a device started here and remove its state (`loader`: how its kind reads device.json)."""
    d = state_dir(base) / name
    if not (d / "device.json").is_file():
        return False
    (loader or _load)(d).destroy()
    shutil.rmtree(d, ignore_errors=True)
    return True


def listing(base: Optional[Path] = None) -> List[Dict[str, object]]:
    s = state_dir(base)
    out = []
    for d in sorted(s.iterdir()) if s.is_dir() else []:
        if (d / "device.json").is_file():
            dev = _load(d)
            out.append({"name": dev.name, "address": dev.addr, "running": dev.running(),
                        "python": dev.python, "root": str(dev.root)})
    return out
