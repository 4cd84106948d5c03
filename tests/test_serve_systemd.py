"""edgekit serve as a systemd unit: the decision, the unit (checked by the real `systemd-analyze
verify`, which runs without systemd as PID 1), the env file, and the command sequence of install
and remove (pure logic: a recorded runner stands in for systemctl; this machine has no systemd
running). The supervised-process path is tested on a lab device in test_serve_deploy.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

from edgekit.serve import systemd as sd
from edgekit.serve.systemd import Facts, UnitState

ROOT_FACTS = Facts(systemd_running=True, systemctl="/usr/bin/systemctl", uid=0, user_manager=False, linger=False,
                   version=252)
USER_FACTS = Facts(True, "/usr/bin/systemctl", 1000, user_manager=True, linger=True, version=252)


def test_decide():
    assert sd.decide(ROOT_FACTS)[0] == "system"
    assert sd.decide(USER_FACTS)[0] == "user"
    no = {
        "no /run/systemd/system": Facts(False, "/usr/bin/systemctl", 0, False, False),
        "systemctl is not installed": Facts(True, None, 0, False, False),
        "no user manager": Facts(True, "/usr/bin/systemctl", 1000, False, True),
        "enable-linger": Facts(True, "/usr/bin/systemctl", 1000, True, False),
    }
    for why, f in no.items():
        scope, text = sd.decide(f)
        assert scope is None and why in text, (f, text)


def test_controller_follows_the_device_decision():
    from edgekit.deploy.serving import ServeOptions, use_systemd
    from edgekit.errors import DeviceError

    conn = SimpleNamespace(_err=lambda msg, **kw: DeviceError(msg))
    yes = {"systemd_scope": "system", "systemd_why": "root, systemd is PID 1"}
    no = {"systemd_scope": None, "systemd_why": "systemd is not running here"}
    assert use_systemd(conn, yes, ServeOptions()) == (True, "root, systemd is PID 1")
    assert use_systemd(conn, no, ServeOptions())[0] is False
    assert use_systemd(conn, yes, ServeOptions(manager="process"))[0] is False
    with pytest.raises(DeviceError, match="systemd is not running"):
        use_systemd(conn, no, ServeOptions(manager="systemd"))
    with pytest.raises(DeviceError, match="manager"):
        ServeOptions(manager="cron")


def test_unit_name_is_per_root_and_safe():
    a, b = sd.unit_name("/home/pi/.edgekit"), sd.unit_name("/srv/edge kit/../x;rm -rf")
    assert a.startswith("edgekit-serve-edgekit-") and a.endswith(".service")
    assert sd.unit_name("/home/pi/.edgekit") == a != sd.unit_name("/home/pj/.edgekit")
    assert all(ch.isalnum() or ch in "-_." for ch in b), b


def _verify(path, user=False, tmp=None):
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: bash scripts/system-deps.sh installs it (apt package systemd)"
    env = dict(os.environ)
    if user:  # the user manager's lookup paths need a runtime directory
        rt = tmp / "xdg-runtime"
        rt.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(rt)
    r = subprocess.run([exe, *(["--user"] if user else []), "verify", str(path)], capture_output=True,
                       text=True, env=env, timeout=60)
    return r.returncode, (r.stdout + r.stderr).strip()


@pytest.mark.parametrize("scope", ["system", "user"])
def test_unit_passes_systemd_analyze_verify(tmp_path, scope):
    root = tmp_path / "dev root %h $HOME"  # a space, a specifier and a variable: all must be escaped
    unit = sd.unit_text(str(root), sys.executable, scope, extra=["--poll-interval", "0.5", "--max-batch", "8"],
                        version=252)
    path = tmp_path / sd.unit_name(str(root))
    path.write_text(unit)
    rc, out = _verify(path, user=scope == "user", tmp=tmp_path)
    assert rc == 0 and out == "", out  # no error and no warning (unknown keys, bad values are warnings)
    assert "Restart=on-failure" in unit and "NoNewPrivileges=yes" in unit
    assert ("ProtectSystem=strict" in unit) == (scope == "system") == ("PrivateTmp=yes" in unit)
    esc = str(root).replace("%", "%%")  # ExecStart= expands $VARIABLES; Environment=, ReadWritePaths= do not
    assert f'--pid-file "{esc.replace("$", "$$")}/serve/serve.pid"' in unit
    assert f'Environment="PYTHONPATH={esc}/runtime"' in unit
    assert (f'ReadWritePaths="{esc}/serve"' in unit) == (scope == "system")
    assert "${EDGEKIT_SERVE_HOST}" in unit and "${EDGEKIT_SERVE_PORT}" in unit and "TOKEN" not in unit


def test_verify_catches_a_broken_unit(tmp_path):
    """The check is real: a unit whose program is missing, or with a bad value, is reported."""
    unit = sd.unit_text(str(tmp_path), str(tmp_path / "no-python"), "system")
    path = tmp_path / "edgekit-serve-broken.service"
    path.write_text(unit)
    rc, out = _verify(path)
    assert rc != 0 and "no-python" in out
    path.write_text(sd.unit_text(str(tmp_path), sys.executable, "system").replace("Restart=on-failure",
                                                                                   "Restart=sometimes"))
    rc, out = _verify(path)
    assert "sometimes" in out


def test_old_systemd_gets_what_it_knows():
    u = sd.unit_text("/r", "/usr/bin/python3", "system", version=237)
    assert "Type=simple" in u and "append:" not in u
    assert "Type=exec" in sd.unit_text("/r", "/usr/bin/python3", "system", version=245)


def test_env_file_quotes_and_refuses_control_characters():
    t = sd.env_text("0.0.0.0", 8000, 'tok"en$x\\y')
    assert 'EDGEKIT_SERVE_TOKEN="tok\\"en\\$x\\\\y"' in t and 'EDGEKIT_SERVE_PORT="8000"' in t
    assert "TOKEN" not in sd.env_text("127.0.0.1", 8000, None)
    with pytest.raises(sd.UnitError, match="control character"):
        sd.env_text("127.0.0.1", 8000, "abc\ndef")
    with pytest.raises(sd.UnitError, match="control character"):
        sd.unit_text("/r\n[Service]", "/usr/bin/python3", "system")


U, E = "/etc/systemd/system/edgekit-serve-x.service", "/r/serve/serve.env"
NAME = "edgekit-serve-x.service"


def _cmds(steps):
    return [" ".join(s[1:]) if s[0] == "run" else f"{s[0]} {s[1]}" for s in steps]


def test_install_sequence():
    fresh = UnitState(None, None, active=False, enabled=False)
    steps, action = sd.install_steps("system", U, E, "UNIT", "ENV", fresh)
    assert action == "started"
    assert _cmds(steps) == [f"write {E}", f"write {U}", "systemctl daemon-reload",
                            f"systemctl reset-failed {NAME}", f"systemctl enable --now {NAME}"]
    assert steps[0][3] == "600" and steps[1][3] == "644"

    same = UnitState("UNIT", "ENV", active=True, enabled=True)
    assert sd.install_steps("system", U, E, "UNIT", "ENV", same) == ([], "running")  # it hot-swaps by itself

    steps, action = sd.install_steps("system", U, E, "UNIT", "ENV2", same)  # new port or token
    assert action == "restarted" and _cmds(steps) == [f"write {E}", f"systemctl restart {NAME}"]

    steps, action = sd.install_steps("user", U, E, "UNIT2", "ENV", UnitState("UNIT", "ENV", True, False))
    assert action == "restarted"
    assert _cmds(steps) == [f"write {U}", "systemctl --user daemon-reload", f"systemctl --user enable {NAME}",
                            f"systemctl --user restart {NAME}"]

    crashed = UnitState("UNIT", "ENV", active=False, enabled=True)  # failed: start it again
    steps, action = sd.install_steps("system", U, E, "UNIT", "ENV", crashed)
    assert action == "started" and _cmds(steps) == [f"systemctl reset-failed {NAME}",
                                                    f"systemctl enable --now {NAME}"]


def test_remove_sequence():
    assert _cmds(sd.remove_steps("system", U, E, UnitState("UNIT", "ENV", True, True))) == [
        f"systemctl disable --now {NAME}", f"remove {U}", "systemctl daemon-reload",
        f"systemctl reset-failed {NAME}", f"remove {E}"]
    assert sd.remove_steps("system", U, E, UnitState(None, None, False, False)) == []


class Recorder:
    """Stands in for systemctl: records each argv; `show` answers with the unit's state."""

    def __init__(self, fail=(), active="inactive"):
        self.calls, self.fail, self.active = [], fail, active

    def __call__(self, argv, **kw):
        self.calls.append(argv)
        out = ""
        if "show" in argv:
            out = f"ActiveState={self.active}\nSubState=running\nMainPID=0\nUnitFileState=enabled\nNRestarts=0\n"
        rc = 1 if any(f in argv for f in self.fail) else 0
        return SimpleNamespace(returncode=rc, stdout=out, stderr="Failed to start unit: boom" if rc else "")


def test_install_and_remove_on_the_device_side(tmp_path, monkeypatch):
    """install(): env file 0600 holding the token, the unit (verified), the systemctl sequence;
    remove(): disabled, both files gone. A lingering user's scope, so nothing touches /etc."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    root = tmp_path / "root"
    tok = tmp_path / "token"
    tok.write_text("s3cret-token-0123456789\n")
    run = Recorder()
    res = sd.install(str(root), "0.0.0.0", 8123, str(tok), ["--poll-interval", "0.2"], facts=USER_FACTS, run=run)
    assert res["scope"] == "user" and res["action"] == "started"
    unit_path = tmp_path / "config" / "systemd" / "user" / sd.unit_name(str(root))
    env_path = root / "serve" / "serve.env"
    assert res["unit_path"] == str(unit_path)
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    env = env_path.read_text()
    assert 'EDGEKIT_SERVE_TOKEN="s3cret-token-0123456789"' in env and 'EDGEKIT_SERVE_HOST="0.0.0.0"' in env
    unit = unit_path.read_text()
    assert "s3cret" not in unit and sys.executable in unit and "--poll-interval 0.2" in unit
    rc, out = _verify(unit_path, user=True, tmp=tmp_path)
    assert rc == 0 and out == "", out
    ctl = [a[1:] for a in run.calls if a[0] == "systemctl" and "show" not in a]
    assert ctl == [["--user", "daemon-reload"], ["--user", "reset-failed", unit_path.name],
                   ["--user", "enable", "--now", unit_path.name]]

    run2 = Recorder(active="active")  # the same again: nothing to do, it hot-swaps by itself
    assert sd.install(str(root), "0.0.0.0", 8123, str(tok), ["--poll-interval", "0.2"],
                      facts=USER_FACTS, run=run2)["action"] == "running"
    assert sd.status(str(root), run=run2, facts=USER_FACTS)["manager"] == "systemd"

    run3 = Recorder(active="active")
    res = sd.remove(str(root), run=run3)
    assert res["removed"] == unit_path.name and not unit_path.exists() and not env_path.exists()
    assert ["systemctl", "--user", "disable", "--now", unit_path.name] in run3.calls
    assert sd.status(str(root), run=run3, facts=USER_FACTS)["manager"] is None


def test_a_failing_systemctl_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(sd.UnitError, match=r"enable --now .* failed \(exit status 1\): Failed to start unit: boom"):
        sd.install(str(tmp_path / "r"), "127.0.0.1", 8000, None, [], facts=USER_FACTS, run=Recorder(fail=("enable",)))
    # half-installed is not left behind: the new unit, its env file and the backup are gone
    assert not (tmp_path / "config" / "systemd" / "user" / sd.unit_name(str(tmp_path / "r"))).exists()
    assert not (tmp_path / "r" / "serve" / "serve.env").exists()
    assert not (tmp_path / "r" / "serve" / "unit.prev.json").exists()
    with pytest.raises(sd.UnitError, match="no usable systemd: systemd is not running"):
        sd.install(str(tmp_path / "r"), "127.0.0.1", 8000, None, [], facts=Facts(False, None, 0, False, False),
                   run=Recorder())


def _exposure(path):
    """systemd's own offline rating of a unit's sandboxing (0 = locked down, 10 = none)."""
    import re

    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: scripts/system-deps.sh installs Debian's systemd"
    r = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(path)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def test_system_unit_is_sandboxed(tmp_path):
    """`systemd-analyze security --offline` (no manager needed) rates the hardening; the same unit
    without it rates worse (the rating is real, not a constant)."""
    unit = sd.unit_text(str(tmp_path / "root"), sys.executable, "system", version=252)
    path = tmp_path / "edgekit-serve-a.service"
    path.write_text(unit)
    bare = tmp_path / "edgekit-serve-b.service"
    bare.write_text("\n".join(ln for ln in unit.splitlines()
                              if not ln.startswith(("Protect", "Restrict", "Private", "NoNew", "Lock", "UMask"))))
    hardened, plain = _exposure(path), _exposure(bare)
    assert hardened <= 7.0 and plain - hardened >= 1.5, (hardened, plain)


class FakeDevice:
    """Answers the device-side commands deploy sends (edgekit.serve.systemd, the probe, --stop)
    from a small state machine; records each argv. Pure logic of serving.ensure/stop."""

    def __init__(self, running_process=False, scope="system"):
        self.device = SimpleNamespace(python="/usr/bin/python3")
        self.sftp = SimpleNamespace(open=self._no_file)   # deploy reads a release's manifest (its kind) over SFTP
        self.calls = []
        self.unit_active = False
        self.process = running_process
        self.scope = scope
        self.refuse = False

    @staticmethod
    def _no_file(path, mode="r"):
        raise FileNotFoundError(path)        # these releases hold no manifest: not language models

    def _err(self, msg, **kw):
        from edgekit.errors import DeviceError

        return DeviceError(msg)

    def run(self, argv, env=None, cwd=None, timeout=None):
        import json

        self.calls.append(argv)
        mod = argv[2] if len(argv) > 2 else ""
        if mod == "edgekit.serve.systemd":
            action = argv[3]
            if action == "status":
                st = {"running": self.unit_active or self.process, "systemd_scope": self.scope,
                      "systemd_why": "root, systemd is PID 1" if self.scope else "systemd is not running here",
                      "manager": "systemd" if self.unit_active else ("process" if self.process else None)}
                if self.unit_active:
                    st.update(unit="edgekit-serve-r-0.service", scope="system", active_state="active",
                              sub_state="running", pid=42, url="http://127.0.0.1:8000/v2")
                elif self.process:
                    st.update(pid=7, port=8000, host="127.0.0.1", url="http://127.0.0.1:8000/v2")
                return 0, json.dumps(st), ""
            if action == "install":
                assert not self.process, "the supervised process must be stopped before the unit starts"
                self.unit_active = True
                return 0, json.dumps({"action": "started", "unit": "edgekit-serve-r-0.service", "backup": True}), ""
            if action == "remove":
                self.unit_active = False
                return 0, json.dumps({"removed": "edgekit-serve-r-0.service", "stopped": 42}), ""
            if action == "restore":
                self.unit_active = False
                return 0, json.dumps({"restored": "removed"}), ""
        if mod == "edgekit.serve" and "--stop" in argv:
            self.process = False
            return 0, "stopped the server (pid 7)", ""
        if mod == "edgekit.serve.probe":
            if self.refuse:
                return 1, json.dumps({"ok": False, "models": {"m": {"ok": False, "failed_release": {
                    "version": "a" * 12, "error": "golden check failed"}}}}), ""
            return 0, json.dumps({"ok": True, "models": {"m": {"ok": True, "version": "a" * 12}}}), ""
        raise AssertionError(f"unexpected command {argv}")


def test_ensure_installs_the_unit_and_stop_removes_it():
    from edgekit.deploy import serving

    dev = FakeDevice(running_process=True)
    opts = serving.ServeOptions(host="0.0.0.0", token_file="/etc/edgekit/token", extra=("--max-batch", "8"))
    res = serving.ensure(dev, "/r", opts, "m", "a" * 64)
    assert res["manager"] == "systemd" and res["serving"] == "started" and res["unit"] == "edgekit-serve-r-0.service"
    install = next(a for a in dev.calls if a[2:4] == ["edgekit.serve.systemd", "install"])
    assert install[4:] == ["--root", "/r", "--host", "0.0.0.0", "--port", "8000", "--token-file",
                           "/etc/edgekit/token", "--", "--max-batch", "8"]
    # the process that served before was stopped first (the fake refuses an install otherwise)
    assert any("--stop" in a for a in dev.calls)
    assert serving.stop(dev, "/r") == {"stopped": 42, "manager": "systemd", "unit": "edgekit-serve-r-0.service"}


def test_ensure_without_systemd_keeps_the_process_path():
    from edgekit.deploy import serving
    from edgekit.errors import DeviceError

    dev = FakeDevice(running_process=True, scope=None)
    res = serving.ensure(dev, "/r", serving.ServeOptions(), "m", "a" * 64)
    assert res["manager"] == "process" and res["serving"] == "running" and res["pid"] == 7
    assert not any(a[2:4] == ["edgekit.serve.systemd", "install"] for a in dev.calls)
    with pytest.raises(DeviceError, match="cannot serve as a systemd service: systemd is not running"):
        serving.ensure(FakeDevice(scope=None), "/r", serving.ServeOptions(manager="systemd"), "m", "a" * 64)


def test_a_new_unit_that_fails_the_gate_is_removed():
    from edgekit.deploy import serving
    from edgekit.errors import DeviceError

    dev = FakeDevice()
    dev.refuse = True
    with pytest.raises(DeviceError, match="golden check failed.*the new unit was removed"):
        serving.ensure(dev, "/r", serving.ServeOptions(), "m", "a" * 64)
    assert dev.calls[-1][2:4] == ["edgekit.serve.systemd", "restore"] and not dev.unit_active


def test_restore_puts_back_what_install_replaced(tmp_path, monkeypatch):
    """Device side: a first unit that fails is removed; new settings that fail give the old back."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    root = str(tmp_path / "root")
    unit_path = tmp_path / "config" / "systemd" / "user" / sd.unit_name(root)
    env_path = tmp_path / "root" / "serve" / "serve.env"
    assert sd.install(root, "127.0.0.1", 8000, None, [], facts=USER_FACTS, run=Recorder())["backup"] is True
    assert sd.restore(root, run=Recorder(active="active"))["restored"] == "removed"
    assert not unit_path.exists() and not env_path.exists()

    sd.install(root, "127.0.0.1", 8000, None, [], facts=USER_FACTS, run=Recorder())
    before_unit, before_env = unit_path.read_text(), env_path.read_text()
    res = sd.install(root, "127.0.0.1", 8001, None, ["--max-batch", "4"], facts=USER_FACTS,
                     run=Recorder(active="active"))
    assert res["action"] == "restarted" and res["backup"] and env_path.read_text() != before_env
    run = Recorder(active="active")
    assert sd.restore(root, run=run)["restored"] == "previous settings"
    assert unit_path.read_text() == before_unit and env_path.read_text() == before_env
    assert stat.S_IMODE(env_path.stat().st_mode) == 0o600
    assert [a[1:] for a in run.calls] == [["--user", "daemon-reload"], ["--user", "restart", unit_path.name]]
    assert sd.restore(root, run=Recorder()) == {"restored": None}  # nothing more to put back
