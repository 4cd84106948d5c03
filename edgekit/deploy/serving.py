"""The deploy side of `edgekit serve`: the inference server on a device, as a systemd service
where systemd runs (edgekit.serve.systemd decides, on the device), else as a supervised process.

    <root>/serve/serve.pid        the server's pid (and serve.pid.json: where it listens)
    <root>/serve/serve.log        its log (appended)
    <root>/serve/serve.env        systemd only: address and token for the unit (mode 0600)
    /etc/systemd/system/edgekit-serve-<root>-<hash>.service   (or ~/.config/systemd/user/ for a
                                  lingering non-root user)

`ensure()` starts the server when it is not running (or runs with other settings); a running one
follows `current` by itself (golden-checked hot swap). Either way the gate is the API itself:
`python -m edgekit.serve.probe` on the device asks /v2/health/ready, then runs one golden
inference through the API and waits until the server answers with the new release. The caller
rolls `current` back when the gate fails. Every remote command is an argv list (quoted by
Connection.run); nothing from a bundle reaches a shell unquoted.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from edgekit.errors import DeviceError

# Starts the server detached from the SSH session (setsid where there is one, nohup, stdin from
# /dev/null, output to the log) and prints its pid. Positional words only: no value is parsed.
_LAUNCH = r'''
d=$1; log=$2; py=$3; rt=$4; shift 4
mkdir -p "$d" || exit 3
cd / || exit 3
if command -v setsid >/dev/null 2>&1; then set -- setsid "$py" -m edgekit.serve "$@"
else set -- "$py" -m edgekit.serve "$@"; fi
PYTHONPATH="$rt" PYTHONDONTWRITEBYTECODE=1 nohup "$@" >>"$log" 2>&1 </dev/null &
echo $!
'''


@dataclass(frozen=True)
class ServeOptions:
    port: int = 8000
    host: str = "127.0.0.1"
    token_file: Optional[str] = None  # a file on the device holding the bearer token
    extra: Tuple[str, ...] = ()       # more `python -m edgekit.serve` options
    wait_s: float = 90.0              # for the gate
    manager: str = "auto"             # auto (systemd where usable), systemd, or process

    def __post_init__(self):
        if self.manager not in ("auto", "systemd", "process"):
            raise DeviceError(f"serve manager {self.manager!r} is not auto, systemd or process")
        if not 1 <= self.port <= 65535:
            raise DeviceError(f"--serve-port {self.port} is not a TCP port")
        if not _loopback(self.host) and not self.token_file and "--insecure" not in self.extra:
            raise DeviceError(f"serving on {self.host} needs a token file on the device",
                              hint="pass --serve-token-file PATH (a file on the device), or serve on 127.0.0.1")


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def files(root: str) -> Tuple[str, str, str]:
    d = f"{root}/serve"
    return d, f"{d}/serve.pid", f"{d}/serve.log"


def _python(conn, root: str, module: str, *args: str, timeout: float = 60.0):
    return conn.run([conn.device.python, "-m", module, *args],
                    env={"PYTHONPATH": f"{root}/runtime", "PYTHONDONTWRITEBYTECODE": "1"}, cwd="/", timeout=timeout)


def _json(conn, rc: int, out: str, err: str, what: str) -> Dict[str, Any]:
    for text in (out, (out.strip().splitlines() or [""])[-1]):  # anything printed before: the last line
        try:
            return json.loads(text)
        except ValueError:
            pass
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    raise conn._err(f"{what} failed on the device: {lines[-1] if lines else f'exit status {rc}'}",
                    hint="is edgekit's runtime pushed (edgekit device setup) and uvicorn installed "
                         "(pip install uvicorn)?")


def _unit(conn, root: str, action: str, *args: str) -> Dict[str, Any]:
    """python -m edgekit.serve.systemd ACTION --root ROOT ... on the device (its JSON answer)."""
    rc, out, err = _python(conn, root, "edgekit.serve.systemd", action, "--root", root, *args, timeout=180)
    return _json(conn, rc, out, err, f"edgekit.serve.systemd {action}")


def state(conn, root: str) -> Dict[str, Any]:
    """{'running': bool, 'pid', 'url', 'models', 'manager': 'systemd' | 'process' | None, ...}
    of the device's server (with systemd: 'unit', 'scope', 'active_state', 'restarts')."""
    st = _unit(conn, root, "status")
    st["log"] = files(root)[2]
    return st


def log_tail(conn, root: str, lines: int = 8) -> str:
    rc, out, _ = conn.run(["tail", "-n", str(lines), files(root)[2]], timeout=30)
    return out.strip() if rc == 0 else ""


def start(conn, root: str, opts: ServeOptions) -> int:
    d, pid_file, log = files(root)
    args = [root, "--host", opts.host, "--port", str(opts.port), "--pid-file", pid_file, *opts.extra]
    if opts.token_file:
        args += ["--token-file", opts.token_file]
    rc, out, err = conn.run(["sh", "-c", _LAUNCH, "sh", d, log, conn.device.python, f"{root}/runtime", *args],
                            timeout=30)
    if rc != 0 or not out.strip().isdigit():
        raise conn._err(f"cannot start edgekit serve: {(err or out).strip() or f'exit status {rc}'}")
    return int(out.strip())


def stop(conn, root: str) -> Dict[str, Any]:
    """Stop the device's server if it runs (a systemd unit: disabled and removed, with its env
    file); {'stopped': pid or None, 'manager', 'unit'?}."""
    st = state(conn, root)
    if st.get("manager") == "systemd":
        r = _unit(conn, root, "remove")
        return {"stopped": r.get("stopped"), "manager": "systemd", "unit": r.get("removed")}
    if not st["running"]:
        return {"stopped": None}
    rc, out, err = _python(conn, root, "edgekit.serve", "--stop", "--pid-file", files(root)[1])
    if rc != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        raise conn._err(f"cannot stop edgekit serve: {lines[-1] if lines else f'exit status {rc}'}")
    return {"stopped": st["pid"], "manager": "process"}


def _alive(conn, root: str, launched: Optional[int]) -> bool:
    """The server runs (its pid file says so; a unit: active, not waiting to restart after a
    crash), or the process just launched is still starting."""
    st = state(conn, root)
    if st.get("manager") == "systemd":
        return st.get("active_state") in ("active", "activating") and st.get("sub_state") != "auto-restart"
    if st["running"]:
        return True
    return launched is not None and conn.run(["kill", "-0", str(launched)], timeout=30)[0] == 0


# The gate of a language model, on the device (standard library): ready, the release served
# (/v2/models/{m}: edgekit.version), then a short greedy completion of the golden prompt through the
# OpenAI-compatible API that must produce text. Prints the probe's JSON shape. argv: host, port, root,
# model, sha12, token file ('' for none).
LLM_PROBE = r"""
import http.client, json, os, sys
host, port, root, name, sha12, token_file = sys.argv[1:7]
token = open(token_file).read().strip() if token_file else os.environ.get("EDGEKIT_SERVE_TOKEN")
auth = {"Authorization": "Bearer " + token} if token else {}
def call(method, path, body=None):
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        h = dict(auth, **({"Content-Type": "application/json"} if body is not None else {}))
        c.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=h)
        r = c.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data or b"{}")
        except ValueError:
            return r.status, {"error": data[:200].decode("utf-8", "replace")}
    finally:
        c.close()
out = {"url": "http://%s:%s/v1" % (host, port), "ok": False, "models": {}}
res = out["models"][name] = {"ok": False}
def err(d, st):
    e = d.get("error")
    return (e.get("message") if isinstance(e, dict) else e) or "HTTP %d" % st
try:
    st, d = call("GET", "/v2/health/ready")
    if st != 200:
        res["error"] = err(d, st)
    else:
        st, meta = call("GET", "/v2/models/" + name)
        info = meta.get("edgekit", {}) if st == 200 else {}
        res["version"] = info.get("version")
        if info.get("failed_release"):
            res["failed_release"] = info["failed_release"]
        if st != 200:
            res["error"] = err(meta, st)
        elif res["version"] == sha12:
            try:
                g = json.load(open(os.path.join(root, "models", name, "current", "golden.json")))["generation"]
                prompt, n = g["prompt"], max(1, min(int(g.get("max_new_tokens", 8)), 16))
            except (OSError, ValueError, KeyError, TypeError):
                prompt, n = "Hello", 8
            st, d = call("POST", "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": n,
                                                     "temperature": 0})
            if st != 200:
                res["error"] = "/v1/completions: " + err(d, st)
            else:
                text = (d.get("choices") or [{}])[0].get("text") or ""
                res.update(text=text, usage=d.get("usage"), ok=bool(text.strip()))
                if not res["ok"]:
                    res["error"] = "/v1/completions produced no text for the golden prompt"
except OSError as e:
    res["error"] = "no server answers on %s:%s (%s)" % (host, port, e)
out["ok"] = res["ok"]
print(json.dumps(out))
"""


def _is_llm(conn, root: str, model: str, sha: str) -> bool:
    """Whether release `sha` of `model` on the device is a language model (its manifest's kind)."""
    try:
        with conn.sftp.open(f"{root}/models/{model}/releases/{sha}/manifest.json") as f:
            return json.loads(f.read().decode("utf-8")).get("kind") == "llm"
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def wait_ready(conn, root: str, opts: ServeOptions, model: str, sha: str,
               launched: Optional[int] = None) -> Dict[str, Any]:
    """Until the server is ready and answers a golden inference of `model` with release `sha`
    (`launched`: the pid start() returned, alive before the server writes its pid file). A
    language model's gate is a short completion of its golden prompt through /v1/completions."""
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
    args = ["--host", host, "--port", str(opts.port), "--root", root, "--model", model]
    if opts.token_file:
        args += ["--token-file", opts.token_file]
    llm = _is_llm(conn, root, model, sha)
    deadline = time.monotonic() + opts.wait_s
    last: Dict[str, Any] = {}
    while True:
        if llm:
            rc, out, err = conn.run([conn.device.python, "-c", LLM_PROBE, host, str(opts.port), root, model, sha[:12],
                                     opts.token_file or ""], env={"PYTHONDONTWRITEBYTECODE": "1"}, cwd="/",
                                    timeout=180)
            last = _json(conn, rc, out, err, "the language-model probe")
        else:
            rc, out, err = _python(conn, root, "edgekit.serve.probe", *args)
            last = _json(conn, rc, out, err, "edgekit.serve.probe")
        m = last.get("models", {}).get(model, {})
        if last.get("ok") and m.get("version") == sha[:12]:
            return last
        failed = m.get("failed_release") or {}
        if failed.get("version") == sha[:12]:  # the server refused this release: no use waiting
            raise conn._err(f"the server refused release {sha[:12]}: {failed.get('error')}"
                            + (f"; it still serves {m['version']}" if m.get("version") else ""))
        if time.monotonic() > deadline:
            break
        if not _alive(conn, root, launched):
            raise conn._err("edgekit serve stopped: " + (log_tail(conn, root, 3).replace("\n", " | ")
                                                         or "see " + files(root)[2]))
        time.sleep(0.5)
    why = m.get("error") or last.get("error") or (
        f"serving {m.get('version')}, not {sha[:12]}" if m.get("version") else "no answer")
    if m.get("outputs") and not m.get("ok"):
        why = "golden outputs through the API do not match: " + json.dumps(m["outputs"])
    raise conn._err(f"the server did not pass the gate within {opts.wait_s:.0f} s: {why}")


def use_systemd(conn, st: Dict[str, Any], opts: ServeOptions) -> Tuple[bool, str]:
    """(systemd?, why) from the device's state(): systemd is PID 1, systemctl is there, and we are
    root or a lingering user (edgekit.serve.systemd.decide)."""
    if opts.manager == "process":
        return False, "a supervised process was asked for"
    scope, why = st.get("systemd_scope"), st.get("systemd_why", "")
    if scope is None and opts.manager == "systemd":
        raise conn._err(f"cannot serve as a systemd service: {why}")
    return scope is not None, why


def ensure(conn, root: str, opts: ServeOptions, model: str, sha: str) -> Dict[str, Any]:
    """Serve `model` at release `sha` (start, or restart with new settings, or let it hot-swap),
    as a systemd unit where systemd runs, else a supervised process; then gate on ready + one
    golden inference through the API. Raises DeviceError on failure."""
    st = state(conn, root)
    systemd, why = use_systemd(conn, st, opts)
    launched = None
    if systemd:
        if st.get("manager") == "process" and st["running"]:  # moving from a process to the unit
            stop(conn, root)
        args = ["--host", opts.host, "--port", str(opts.port)]
        if opts.token_file:
            args += ["--token-file", opts.token_file]
        installed = _unit(conn, root, "install", *args, "--", *opts.extra)
        action = installed["action"]
    else:
        if st.get("manager") == "systemd":  # systemd went away (or a process was asked for)
            stop(conn, root)
            st = {"running": False}
        action = "running"
        if st["running"] and (st.get("port") != opts.port or st.get("host") != opts.host):
            stop(conn, root)
            st = {"running": False}
            action = "restarted"
        if not st["running"]:
            launched = start(conn, root, opts)
            action = "started" if action == "running" else action
    try:
        probe = wait_ready(conn, root, opts, model, sha, launched)
    except DeviceError as e:
        if systemd and installed.get("backup"):  # new settings failed: the unit as it was before
            done = _unit(conn, root, "restore").get("restored")
            what = "the new unit was removed" if done == "removed" else "the unit is back at its previous settings"
            raise conn._err(f"{e} ({what})") from None
        raise
    st = state(conn, root)
    out = {"serving": action, "url": st.get("url"), "pid": st.get("pid"), "version": sha[:12],
           "manager": "systemd" if systemd else "process", "why": why, "probe": probe["models"][model]}
    if systemd:
        out.update(unit=st.get("unit"), scope=st.get("scope"))
    return out


def releases_of(conn, root: str, model: str) -> Tuple[Optional[str], Optional[str]]:
    """(current, previous) release of `model` on the device (previous: the last other one in its
    history that is still there)."""
    rc, out, err = _python(conn, root, "edgekit.runtime", "release", "status", "--root", root, "--name", model)
    m = _json(conn, rc, out, err, "release status").get("models", {}).get(model, {})
    cur = m.get("current")
    have = {r["sha256"] for r in m.get("releases", [])}
    older = [h for h in m.get("history", []) if h != cur and h in have]
    return cur, (older[-1] if older else None)


def roll_back(conn, root: str, model: str, to: Optional[str]) -> Dict[str, Any]:
    """Put `current` back at release `to` (None: remove it) after a failed gate."""
    if to is None:
        rc, out, err = conn.run(["rm", "-f", f"{root}/models/{model}/current"], timeout=30)
        return {"current": None}
    rc, out, err = _python(conn, root, "edgekit.runtime", "release", "rollback", "--root", root,
                           "--name", model, "--to", to, "--no-check")
    return _json(conn, rc, out, err, "release rollback")
