"""One SSH connection to one device (paramiko), with host keys verified.

- known_hosts is honoured; an unknown host is refused unless the user asks to
  trust it (then its key is recorded in known_hosts); a changed key is always refused.
- ~/.ssh/config host aliases (HostName, User, Port, IdentityFile) and ssh-agent work.
- Every remote command is an argv list joined with shell quoting.
"""

from __future__ import annotations

import os
import shlex
import socket
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import paramiko

from edgekit.deploy.inventory import Device, Inventory
from edgekit.errors import DeviceError, HostKeyError

WINDOW = 1 << 27          # 128 MiB SSH window: no stalls waiting for window adjusts on fast links
_KNOWN_HOSTS_LOCK = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    return key.fingerprint  # "SHA256:..." as OpenSSH prints it


class _FastTransport(paramiko.Transport):
    """Prefer AES-GCM: an AEAD cipher needs no separate HMAC pass, which in paramiko is the
    cost that makes uploads slower than OpenSSH's scp. Falls back to the default list."""

    _preferred_ciphers = tuple(dict.fromkeys(
        ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") + tuple(paramiko.Transport._preferred_ciphers)))


def _transport_factory(sock, **kwargs):
    t = _FastTransport(sock, **kwargs)
    if not set(t._preferred_ciphers) <= set(t._cipher_info):  # an older paramiko without GCM
        t._preferred_ciphers = paramiko.Transport._preferred_ciphers
    return t


class _Refuse(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):
        raise _Unknown(hostname, key)


class _TrustAndRecord(paramiko.MissingHostKeyPolicy):
    """Trust on first use, asked for explicitly: record the key in known_hosts."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        with _KNOWN_HOSTS_LOCK:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            hk = paramiko.HostKeys()
            if self.path.is_file():
                hk.load(str(self.path))
            hk.add(hostname, key.get_name(), key)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            hk.save(str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        client.get_host_keys().add(hostname, key.get_name(), key)


class _Unknown(Exception):
    def __init__(self, hostname, key):
        self.hostname, self.key = hostname, key


class DeviceUnreachable(DeviceError):
    """No SSH session could be opened (off, no route, sshd down): a rollout may skip it (--offline skip)."""


def _expand(p: str) -> Path:
    return Path(os.path.expanduser(p))


class Connection:
    """A connected device: `run(argv)`, `sftp`, `home`. Use as a context manager."""

    def __init__(self, device: Device, inventory: Inventory, *, trust_new_host: bool = False,
                 timeout: float = 10.0):
        self.device = device
        self.inventory = inventory
        self.trust_new_host = trust_new_host
        self.timeout = timeout
        self._client: Optional[paramiko.SSHClient] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._home: Optional[str] = None
        self.hostname, self.port, self.user, self.key_files = self._resolve()

    # -- settings ------------------------------------------------------------
    def _resolve(self) -> Tuple[str, int, Optional[str], List[str]]:
        d = self.device
        cfg_path = _expand(self.inventory.ssh_config)
        opts: Dict = {}
        if cfg_path.is_file():
            cfg = paramiko.SSHConfig.from_path(str(cfg_path))
            opts = cfg.lookup(d.host)
        hostname = opts.get("hostname", d.host)
        port = d.port or int(opts.get("port", 22))
        user = d.user or opts.get("user")
        keys = [str(_expand(d.key_file))] if d.key_file else [
            str(_expand(k)) for k in opts.get("identityfile", []) if _expand(k).is_file()]
        return hostname, port, user, keys

    @property
    def where(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.hostname}:{self.port}"

    def _err(self, message: str, hint: Optional[str] = None) -> DeviceError:
        return DeviceError(message, device=self.device.name, host=self.where, hint=hint)

    # -- connect ---------------------------------------------------------------
    def open(self) -> "Connection":
        known = _expand(self.inventory.known_hosts)
        client = paramiko.SSHClient()
        if known.is_file():
            client.load_host_keys(str(known))
        client.set_missing_host_key_policy(_TrustAndRecord(known) if self.trust_new_host else _Refuse())
        try:
            client.connect(self.hostname, port=self.port, username=self.user,
                           key_filename=self.key_files or None, allow_agent=True,
                           look_for_keys=not self.key_files, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout,
                           transport_factory=_transport_factory)
        except _Unknown as e:
            client.close()
            raise HostKeyError(
                f"unknown host key {e.key.get_name()} {fingerprint(e.key)}: not in {known}",
                device=self.device.name, host=self.where, fingerprint=fingerprint(e.key),
                hint="check the fingerprint on the device (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
                     "then rerun with --trust-new-host to record it") from None
        except paramiko.BadHostKeyException as e:
            client.close()
            raise HostKeyError(
                f"HOST KEY CHANGED: got {e.key.get_name()} {fingerprint(e.key)}, known_hosts has "
                f"{fingerprint(e.expected_key)}; refused (someone may be intercepting, or the device "
                "was reinstalled)", device=self.device.name, host=self.where,
                fingerprint=fingerprint(e.key), expected=fingerprint(e.expected_key),
                hint=f"if the device was reinstalled: ssh-keygen -R '{self._known_name()}' -f {known}, "
                     "then --trust-new-host") from None
        except paramiko.AuthenticationException as e:
            client.close()
            raise self._err(f"authentication failed ({e})",
                            hint="check user and key_file in the inventory, or load the key into ssh-agent") from None
        except (paramiko.ssh_exception.NoValidConnectionsError, socket.timeout, TimeoutError,
                ConnectionError, OSError, paramiko.SSHException, EOFError) as e:
            client.close()
            raise DeviceUnreachable(f"unreachable: {type(e).__name__}: {str(e) or 'no answer'}",
                                    device=self.device.name, host=self.where,
                                    hint="is the device on and sshd running? check host and port") from None
        t = client.get_transport()
        t.default_window_size = WINDOW
        t.packetizer.REKEY_BYTES = pow(2, 40)     # no re-key pauses in the middle of an upload
        t.packetizer.REKEY_PACKETS = pow(2, 40)
        t.set_keepalive(15)
        self._client = client
        return self

    def _known_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def __enter__(self) -> "Connection":
        return self.open() if self._client is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except (OSError, EOFError, paramiko.SSHException):  # the link already gone: nothing left to close
                pass
        if self._client is not None:
            self._client.close()
        self._sftp = self._client = None

    # -- use -------------------------------------------------------------------
    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
        return self._sftp

    @property
    def server_version(self) -> Optional[str]:
        """The server's SSH identification, e.g. SSH-2.0-OpenSSH_9.2p1 (None when not connected)."""
        t = self._client.get_transport() if self._client is not None else None
        return t.remote_version if t is not None else None

    @property
    def home(self) -> str:
        if self._home is None:
            self._home = self.sftp.normalize(".")
        return self._home

    def path(self, p: str) -> str:
        """A device path with ~ resolved through SFTP (no shell expansion involved)."""
        if p == "~":
            return self.home
        if p.startswith("~/"):
            return self.home.rstrip("/") + "/" + p[2:]
        return p

    @staticmethod
    def command(argv: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        """The shell command line of argv (every word quoted), with env and cwd."""
        cmd = shlex.join(str(a) for a in argv)
        if env:
            cmd = "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " + cmd
        if cwd:
            cmd = f"cd {shlex.quote(cwd)} && {cmd}"
        return cmd

    def start(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None, timeout: Optional[float] = None) -> paramiko.Channel:
        """Start a command whose standard input and output the caller speaks to (a channel)."""
        chan = self._client.get_transport().open_session()
        chan.settimeout(timeout)
        chan.exec_command(self.command(argv, env, cwd))
        return chan

    def run(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
            timeout: float = 600.0, cwd: Optional[str] = None) -> Tuple[int, str, str]:
        """Run a command; every word is shell-quoted. Returns (exit status, stdout, stderr)."""
        cmd = self.command(argv, env, cwd)
        try:
            _, out, err = self._client.exec_command(cmd, timeout=timeout)
            stdout = out.read().decode("utf-8", "replace")
            stderr = err.read().decode("utf-8", "replace")
            rc = out.channel.recv_exit_status()
        except (socket.timeout, paramiko.SSHException, EOFError, OSError) as e:
            raise self._err(f"connection lost while running {argv[0]}: {type(e).__name__} {e}",
                            hint="check the device and run the command again") from None
        return rc, stdout, stderr
