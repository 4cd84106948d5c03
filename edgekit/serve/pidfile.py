"""The server's pid file and its state (standard library only, so `--status` and `--stop` start
fast on a device): <pid file> holds the pid, <pid file>.json where the server listens."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict

from edgekit.errors import EdgekitError


DEFAULT_PID_FILE = "~/.edgekit/serve/serve.pid"  # where deploy starts it (<root>/serve/serve.pid)


class ServeError(EdgekitError):
    """A serve option or situation the user can fix (bad combination, port in use, no uvicorn)."""


def write_pid(path: str, info: Dict[str, Any]) -> None:
    """The pid file (the pid alone), and beside it <pid file>.json: where the server listens."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    info = dict(info, pid=os.getpid())
    for target, text in ((p.with_name(p.name + ".json"), json.dumps(info) + "\n"), (p, f"{os.getpid()}\n")):
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)


def state(pid_file: str) -> Dict[str, Any]:
    """{'running': bool, 'pid', 'url', ...} of the server started with this pid file."""
    p = Path(pid_file)
    try:
        pid = int(p.read_text().strip())
    except (OSError, ValueError):
        return {"running": False, "pid_file": str(p)}
    try:
        info = json.loads(p.with_name(p.name + ".json").read_text())
    except (OSError, ValueError):
        info = {}
    running = _is_server(pid) and _alive(pid)
    return dict(info, running=running, pid=pid, pid_file=str(p))


def remove_pid(p: Path, pid: int) -> None:
    """Remove the pid file and its .json when they are still this server's."""
    try:
        if p.read_text().strip() != str(pid):
            return
        p.with_name(p.name + ".json").unlink()
    except OSError:
        pass
    try:
        p.unlink()
    except OSError:
        pass


def _is_server(pid: int) -> bool:
    try:
        return b"edgekit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop(pid_file: str, timeout: float = 10.0) -> int:
    """Stop the server whose pid is in pid_file (SIGTERM; it finishes running requests). Returns the pid."""
    p = Path(pid_file)
    try:
        pid = int(p.read_text().strip())
    except (OSError, ValueError):
        raise ServeError(f"no server pid in {pid_file}", hint="is it running? (--pid-file)") from None
    if not _is_server(pid):  # gone, or the pid was reused by another program
        remove_pid(p, pid)
        raise ServeError(f"the server (pid {pid}) is not running; removed the stale {pid_file}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            remove_pid(p, pid)
            return pid
        time.sleep(0.05)
    raise ServeError(f"the server (pid {pid}) did not stop within {timeout:.0f} s")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it has stopped serving)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
