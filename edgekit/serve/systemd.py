"""edgekit serve as a systemd service, where systemd runs (standard library only: runs on the device).

    python -m edgekit.serve.systemd detect  --root ROOT
    python -m edgekit.serve.systemd install --root ROOT --host H --port P [--token-file F] [-- SERVE OPTIONS]
    python -m edgekit.serve.systemd remove  --root ROOT
    python -m edgekit.serve.systemd restore --root ROOT     (after a failed gate: the settings before)
    python -m edgekit.serve.systemd status  --root ROOT

Each prints one JSON object. `deploy --serve` calls them over SSH (edgekit.deploy.serving).

Detection is the standard one: systemd is PID 1 when /run/systemd/system exists, and systemctl is
there. As root the unit is a system unit (/etc/systemd/system); otherwise a user unit
(~/.config/systemd/user) when the user's manager answers `systemctl --user` and the user lingers
(without lingering the service would stop at logout and not start at boot). Else: no systemd, and
the caller runs the server as a supervised process with a pid file (edgekit.serve.pidfile).

One server serves one device root (every model under ROOT/models, like the supervised process),
so the unit is named after the root: edgekit-serve-<root's last name>-<8 hex of its path>.service.
The address and the token go in ROOT/serve/serve.env (mode 0600; the token never reaches a command
line); the unit reads it with EnvironmentFile=. The server writes its pid file and log under
ROOT/serve, the only path it may write (ProtectSystem=strict, ProtectHome=read-only); the models are
read-only to it. `systemd-analyze security --offline=true` rates the system unit (see the tests).

The pure parts (decide, unit_text, env_text, install_steps, remove_steps) hold the logic and are
unit-tested; `run_steps` executes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

UNIT_PREFIX = "edgekit-serve-"
ENV_HOST, ENV_PORT, ENV_TOKEN = "EDGEKIT_SERVE_HOST", "EDGEKIT_SERVE_PORT", "EDGEKIT_SERVE_TOKEN"


class UnitError(Exception):
    """A value that cannot go into a unit or environment file safely."""


# -- facts and the decision ------------------------------------------------------------------

@dataclass(frozen=True)
class Facts:
    systemd_running: bool        # /run/systemd/system exists: systemd is PID 1
    systemctl: Optional[str]     # its path, or None
    uid: int
    user_manager: bool           # `systemctl --user` answers (a user manager with a bus)
    linger: bool                 # loginctl: Linger=yes for this user
    version: int = 0             # systemd's version (0: unknown)


def gather(run: Callable = subprocess.run) -> Facts:
    """What this machine says about systemd (cheap: at most three short commands)."""
    running = os.path.isdir("/run/systemd/system")
    ctl = shutil.which("systemctl")
    uid = os.getuid()
    version, user_manager, linger = 0, False, False
    if running and ctl:
        r = run([ctl, "--version"], capture_output=True, text=True, timeout=15)
        m = re.match(r"systemd (\d+)", r.stdout or "")
        version = int(m.group(1)) if m else 0
        if uid != 0:
            r = run([ctl, "--user", "is-system-running"], capture_output=True, text=True, timeout=15)
            # any state word (running, degraded, starting...) means the user manager answered
            user_manager = (r.stdout or "").strip() not in ("", "offline", "unknown")
            lc = shutil.which("loginctl")
            if lc:
                user = _user_name(uid)
                r = run([lc, "show-user", user, "--property=Linger"], capture_output=True, text=True, timeout=15)
                linger = (r.stdout or "").strip() == "Linger=yes"
            else:
                linger = os.path.exists(f"/var/lib/systemd/linger/{_user_name(uid)}")
    return Facts(running, ctl, uid, user_manager, linger, version)


def _user_name(uid: int) -> str:
    import pwd

    return pwd.getpwuid(uid).pw_name


def decide(f: Facts) -> Tuple[Optional[str], str]:
    """('system' | 'user' | None, why). None: run the supervised process instead."""
    if not f.systemd_running:
        return None, "systemd is not running here (no /run/systemd/system)"
    if not f.systemctl:
        return None, "systemctl is not installed"
    if f.uid == 0:
        return "system", "root, systemd is PID 1"
    if not f.user_manager:
        return None, "not root, and `systemctl --user` has no user manager to talk to"
    if not f.linger:
        return None, ("not root, and the user does not linger (a user service would stop at logout); "
                      "`loginctl enable-linger` makes it a systemd service")
    return "user", "a lingering user's systemd manager"


# -- names and files -------------------------------------------------------------------------

def unit_name(root: str) -> str:
    """edgekit-serve-<last name of root>-<8 hex of the absolute root>.service (one server per root)."""
    absroot = os.path.abspath(root)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(absroot.rstrip("/")).lstrip(".")).strip("-.")
    digest = hashlib.sha256(absroot.encode()).hexdigest()[:8]
    return f"{UNIT_PREFIX}{(slug or 'root')[:32]}-{digest}.service"


def unit_dir(scope: str, home: Optional[str] = None, xdg_config: Optional[str] = None) -> str:
    if scope == "system":
        return "/etc/systemd/system"
    base = xdg_config or os.environ.get("XDG_CONFIG_HOME") or os.path.join(home or os.path.expanduser("~"), ".config")
    return os.path.join(base, "systemd", "user")


def serve_files(root: str) -> Dict[str, str]:
    d = os.path.join(os.path.abspath(root), "serve")
    return {"dir": d, "env": os.path.join(d, "serve.env"), "pid": os.path.join(d, "serve.pid"),
            "log": os.path.join(d, "serve.log")}


def _check_text(what: str, v: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
        raise UnitError(f"{what} {v!r} holds a control character; it cannot go into a unit file")
    return v


def _word(v: str, variables: bool = True) -> str:
    """One word of ExecStart= (variables: its $ is doubled) or of Environment=/ReadWritePaths= (no
    variable expansion there): specifiers (%) doubled, quoted when needed."""
    _check_text("the value", v)
    esc = v.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if variables:
        esc = esc.replace("$", "$$")
    if esc == v and v and not re.search(r"[\s';]", v):
        return v
    return f'"{esc}"'


def _path(v: str) -> str:
    """A path-valued setting (taken whole, specifiers expanded): % doubled."""
    _check_text("the path", v)
    if not os.path.isabs(v):
        raise UnitError(f"{v!r} is not an absolute path")
    return v.replace("%", "%%")


def env_text(host: str, port: int, token: Optional[str]) -> str:
    """ROOT/serve/serve.env: the server's address and its bearer token (double-quoted values)."""
    lines = ["# edgekit serve: read by the systemd unit (EnvironmentFile=); mode 0600"]
    for k, v in ((ENV_HOST, host), (ENV_PORT, str(int(port))), (ENV_TOKEN, token)):
        if v is None:
            continue
        _check_text(k, v)
        lines.append(f'{k}="' + v.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"')
    return "\n".join(lines) + "\n"


def unit_text(root: str, python: str, scope: str, extra: Sequence[str] = (), version: int = 0) -> str:
    """The unit. `version`: systemd's (Type=exec and StandardOutput=append: need 240; 0 = recent)."""
    f = serve_files(root)
    absroot = os.path.abspath(root)
    recent = version == 0 or version >= 240
    argv = [_word(python), "-m", "edgekit.serve", _word(absroot),
            "--host", "${%s}" % ENV_HOST, "--port", "${%s}" % ENV_PORT, "--pid-file", _word(f["pid"])]
    argv += [_word(x) for x in extra]
    lines = [
        "# Written by `edgekit deploy --serve`; `edgekit deploy --no-serve` disables and removes it.",
        "[Unit]",
        f"Description=edgekit serve: Open Inference Protocol v2 for the models under {_path(absroot)}",
        "After=network.target",
        "StartLimitIntervalSec=120",
        "StartLimitBurst=5",
        "",
        "[Service]",
        f"Type={'exec' if recent else 'simple'}",
        f"EnvironmentFile={_path(f['env'])}",
        "Environment=" + _word(f"PYTHONPATH={absroot}/runtime", variables=False)
        + " PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        "WorkingDirectory=/",
        "ExecStart=" + " ".join(argv),
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=30",
        "NoNewPrivileges=yes",
    ]
    if scope == "system":  # a user manager can apply these only with unprivileged user namespaces
        lines += ["ProtectSystem=strict", "ProtectHome=read-only",
                  "ReadWritePaths=" + _word(f["dir"], variables=False), "PrivateTmp=yes",
                  # none of these touches what an inference server uses (files it reads, a TCP
                  # socket, /dev for accelerators: no PrivateDevices/ProtectClock, which would hide
                  # a GPU or NPU; no MemoryDenyWriteExecute, which breaks JIT kernels)
                  "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectControlGroups=yes",
                  "ProtectHostname=yes", "RestrictNamespaces=yes", "RestrictRealtime=yes", "RestrictSUIDSGID=yes",
                  "LockPersonality=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    lines.append("UMask=0077")
    if recent:
        lines += [f"StandardOutput=append:{_path(f['log'])}", "StandardError=inherit"]
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if scope == 'system' else 'default.target'}", ""]
    return "\n".join(lines)


# -- the command sequence --------------------------------------------------------------------

Step = Tuple[str, ...]  # ("write", path, text, mode) | ("remove", path) | ("run", argv...)


@dataclass(frozen=True)
class UnitState:
    unit_file: Optional[str]  # what is installed now (None: nothing)
    env_file: Optional[str]
    active: bool              # ActiveState active/activating/reloading
    enabled: bool


def _ctl(scope: str, *args: str) -> Step:
    return ("run", "systemctl", *(("--user",) if scope == "user" else ()), *args)


def install_steps(scope: str, unit_path: str, env_path: str, unit: str, env: str, now: UnitState
                  ) -> Tuple[List[Step], str]:
    """(steps, action) to make the unit at unit_path run with these files. action: 'started',
    'restarted' (settings changed) or 'running' (unchanged; it follows `current` by itself)."""
    name = os.path.basename(unit_path)
    steps: List[Step] = []
    changed = now.unit_file != unit or now.env_file != env
    if now.env_file != env:
        steps.append(("write", env_path, env, "600"))
    if now.unit_file != unit:
        steps += [("write", unit_path, unit, "644"), _ctl(scope, "daemon-reload")]
    if not now.active:
        steps += [_ctl(scope, "reset-failed", name), _ctl(scope, "enable", "--now", name)]
        return steps, "started"
    if not now.enabled:
        steps.append(_ctl(scope, "enable", name))
    if changed:
        steps.append(_ctl(scope, "restart", name))
        return steps, "restarted"
    return steps, "running"


def remove_steps(scope: str, unit_path: str, env_path: str, now: UnitState) -> List[Step]:
    name = os.path.basename(unit_path)
    steps: List[Step] = []
    if now.unit_file is not None:
        steps += [_ctl(scope, "disable", "--now", name), ("remove", unit_path), _ctl(scope, "daemon-reload"),
                  _ctl(scope, "reset-failed", name)]
    if now.env_file is not None:
        steps.append(("remove", env_path))
    return steps


def _write(path: str, text: str, mode: int) -> None:
    """Write atomically, created with its final mode (the env file is never readable by others)."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


def run_steps(steps: Sequence[Step], run: Callable = subprocess.run, allow_fail: Sequence[str] = ("reset-failed",)
              ) -> List[Dict]:
    """Execute; stop at the first command that fails (raising UnitError with what it said)."""
    done = []
    for st in steps:
        if st[0] == "write":
            _write(st[1], st[2], int(st[3], 8))
        elif st[0] == "remove":
            try:
                os.unlink(st[1])
            except FileNotFoundError:
                pass
        else:
            argv = list(st[1:])
            r = run(argv, capture_output=True, text=True, timeout=120)
            if r.returncode != 0 and not any(a in argv for a in allow_fail):
                msg = (r.stderr or r.stdout or "").strip().splitlines()
                raise UnitError(f"`{' '.join(argv)}` failed (exit status {r.returncode}): "
                                f"{msg[-1] if msg else 'no message'}")
        done.append({"step": st[0], "what": st[1] if st[0] != "run" else " ".join(st[1:])})
    return done


# -- the device side -------------------------------------------------------------------------

def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _installed(root: str) -> Tuple[Optional[str], Optional[str]]:
    """(scope, unit path) of an installed unit for this root, or (None, None)."""
    name = unit_name(root)
    for scope in ("system", "user"):
        p = os.path.join(unit_dir(scope), name)
        if os.path.isfile(p):
            return scope, p
    return None, None


def show(scope: str, name: str, run: Callable = subprocess.run) -> Dict[str, str]:
    r = run(["systemctl", *(["--user"] if scope == "user" else []), "show", name,
             "--property=ActiveState,SubState,MainPID,UnitFileState,NRestarts"],
            capture_output=True, text=True, timeout=30)
    return dict(ln.split("=", 1) for ln in (r.stdout or "").splitlines() if "=" in ln)


def unit_state(root: str, scope: str, run: Callable = subprocess.run) -> Tuple[UnitState, Dict[str, str]]:
    name = unit_name(root)
    path = os.path.join(unit_dir(scope), name)
    info = show(scope, name, run) if os.path.isfile(path) else {}
    return UnitState(_read(path), _read(serve_files(root)["env"]), _serving(info),
                     info.get("UnitFileState") == "enabled"), info


def _serving(info: Dict[str, str]) -> bool:
    """Active (or starting), and not waiting to restart after a crash."""
    state, sub = info.get("ActiveState"), info.get("SubState")
    return state in ("active", "reloading") or (state == "activating" and sub != "auto-restart")


def status(root: str, run: Callable = subprocess.run, facts: Optional[Facts] = None) -> Dict:
    """The pid file's state plus, when a unit is installed for this root, the unit's; and whether
    a unit could be used here ('systemd_scope', 'systemd_why': the detection)."""
    from edgekit.serve.pidfile import state

    st = state(serve_files(root)["pid"])
    st["systemd_scope"], st["systemd_why"] = decide(facts or gather(run))
    scope, path = _installed(root)
    if scope is None:
        st["manager"] = "process" if st["running"] else None
        return st
    _, info = unit_state(root, scope, run)
    st.update(manager="systemd", scope=scope, unit=os.path.basename(path), unit_path=path,
              active_state=info.get("ActiveState"), sub_state=info.get("SubState"),
              restarts=int(info.get("NRestarts") or 0), enabled=info.get("UnitFileState") == "enabled")
    if not _serving(info):  # failed, inactive, or waiting to restart after a crash: not serving
        st["running"] = False
    return st


def install(root: str, host: str, port: int, token_file: Optional[str], extra: Sequence[str],
            facts: Optional[Facts] = None, run: Callable = subprocess.run) -> Dict:
    facts = facts or gather(run)
    scope, why = decide(facts)
    if scope is None:
        raise UnitError(f"no usable systemd: {why}")
    token = None
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UnitError(f"cannot read the token file {token_file}: {e.strerror}") from None
    f = serve_files(root)
    name = unit_name(root)
    path = os.path.join(unit_dir(scope), name)
    unit = unit_text(root, sys.executable, scope, extra, facts.version)
    env = env_text(host, port, token)
    os.makedirs(f["dir"], exist_ok=True)
    now, _ = unit_state(root, scope, run)
    steps, action = install_steps(scope, path, f["env"], unit, env, now)
    backup = now.unit_file != unit or now.env_file != env
    prev = os.path.join(f["dir"], "unit.prev.json")
    if backup:  # what restore() puts back if the new settings fail the gate (0600: it holds the token)
        _write(prev, json.dumps({"scope": scope, "unit": now.unit_file, "env": now.env_file}), 0o600)
    try:
        done = run_steps(steps, run)
    except UnitError:
        if backup:      # half-installed: put the unit back as it was before re-raising
            restore(root, run)
        raise
    return {"manager": "systemd", "scope": scope, "unit": name, "unit_path": path, "action": action,
            "backup": backup, "steps": done}


def restore(root: str, run: Callable = subprocess.run) -> Dict:
    """After new settings failed deploy's gate: the unit and env file as they were before the last
    install() that changed them (restarted), or no unit at all if there was none (removed)."""
    f = serve_files(root)
    prev = os.path.join(f["dir"], "unit.prev.json")
    try:
        with open(prev, encoding="utf-8") as fh:
            old = json.load(fh)
    except FileNotFoundError:
        return {"restored": None}
    if old["unit"] is None:
        res = dict(remove(root, run), restored="removed")
    else:
        scope = old["scope"]
        path = os.path.join(unit_dir(scope), unit_name(root))
        steps = [("write", path, old["unit"], "644"), _ctl(scope, "daemon-reload"),
                 _ctl(scope, "restart", os.path.basename(path))]
        if old["env"] is not None:
            steps.insert(0, ("write", f["env"], old["env"], "600"))
        res = {"restored": "previous settings", "steps": run_steps(steps, run)}
    if os.path.exists(prev):    # remove() has already deleted it when there was no unit before
        os.unlink(prev)
    return res


def remove(root: str, run: Callable = subprocess.run) -> Dict:
    scope, path = _installed(root)
    f = serve_files(root)
    prev = os.path.join(f["dir"], "unit.prev.json")
    if os.path.exists(prev):            # a backup of settings now gone (it holds the token too)
        os.unlink(prev)
    if scope is None:
        if os.path.exists(f["env"]):
            os.unlink(f["env"])
        return {"removed": None}
    before = status(root, run)
    now, _ = unit_state(root, scope, run)
    done = run_steps(remove_steps(scope, path, f["env"], now), run)
    return {"removed": os.path.basename(path), "scope": scope,
            "stopped": before.get("pid") if before.get("running") else None, "steps": done}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgekit.serve.systemd")
    p.add_argument("action", choices=["detect", "install", "remove", "restore", "status"])
    p.add_argument("--root", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None)
    p.add_argument("extra", nargs="*", help="after --: more `python -m edgekit.serve` options")
    a = p.parse_args(argv)
    try:
        if a.action == "detect":
            facts = gather()
            scope, why = decide(facts)
            out = {"scope": scope, "why": why, "facts": asdict(facts), "unit": unit_name(a.root)}
        elif a.action == "install":
            out = install(a.root, a.host, a.port, a.token_file, a.extra)
        elif a.action == "remove":
            out = remove(a.root)
        elif a.action == "restore":
            out = restore(a.root)
        else:
            out = status(a.root)
    except (UnitError, OSError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
