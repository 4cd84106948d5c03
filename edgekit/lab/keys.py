"""SSH keys for stand-in devices: one ssh-keygen call for host keys and client keys."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Tuple


def keygen(path: Path, comment: str = "", replace: bool = False) -> Path:
    """An ed25519 key pair at path (and path.pub), no passphrase; an existing one is kept
    unless `replace`."""
    path = Path(path)
    if path.exists():
        if not replace:
            return path
        path.unlink()
        path.with_name(path.name + ".pub").unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True, text=True)
    return path


def client_key(directory: Path, comment: str = "") -> Tuple[Path, Path]:
    """A client key in directory (client_ed25519) and an authorized_keys file holding it."""
    key = keygen(Path(directory) / "client_ed25519", comment)
    auth = Path(directory) / "authorized_keys"
    auth.write_text(key.with_name(key.name + ".pub").read_text())
    return key, auth


def public_line(host_key: Path) -> str:
    """'type base64' of a host key's public half (for a known_hosts line)."""
    return " ".join(Path(str(host_key) + ".pub").read_text().split()[:2])
