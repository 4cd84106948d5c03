"""Deploy, status, rollback and profile against real sshd devices in network namespaces."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import LAB_DEVICES, bundle_of
from edgekit.bundle import read_bundle
from edgekit.deploy import ops
from edgekit.deploy.inventory import load_inventory
from edgekit.errors import DeviceError


def ek(cli, lab, *args):
    return cli(*args, "--inventory", lab.inventory)


def _bundle_for(build, device):
    target = LAB_DEVICES[device][1]
    b = bundle_of(build, target)
    return b if device != "legacy-pi" or b.fmt == "tflite" else bundle_of(build, target, "tflite")


def _current(lab, device, model="digits"):
    link = lab.devices[device].root / "models" / model / "current"
    return link.resolve().name if link.is_symlink() else None


def _copy_bundle(src, dst, mutate=None):
    shutil.copytree(src, dst)
    if mutate:
        mutate(dst)
    return dst


def test_device_info(cli, lab):
    r = ek(cli, lab, "device", "info", "--all", "--json")
    assert r.exit_code == 0, r.stderr
    got = {x["device"]: x["facts"] for x in json.loads(r.stdout)}
    for name, (_, _, backend) in LAB_DEVICES.items():
        f = got[name]
        assert f["arch"] == "x86_64" and f["cores"] >= 1 and f["memory_mb"] > 0
        available = [k for k, v in f["backends"].items() if v["available"]]
        assert available == [backend], (name, available)
        assert f["suggested_target"] in ("x86-avx2", "x86-avx512-vnni")
    assert got["legacy-pi"]["numpy"].startswith("1.")


@pytest.mark.parametrize("device", sorted(LAB_DEVICES))
def test_deploy_health_check_and_profile_on_each_device(cli, lab, digits_build, device, tmp_path):
    b = _bundle_for(digits_build, device)
    r = ek(cli, lab, "deploy", b.path, "--device", device, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)[0]
    assert res["status"] == "deployed" and res["health"]["ok"]
    assert res["health"]["backend"] == LAB_DEVICES[device][2]
    sha = read_bundle(b.path).digest()
    assert _current(lab, device) == sha
    root = lab.devices[device].root
    assert (root / "models" / "digits" / "current").is_symlink()
    assert not list((root / "models" / "digits").glob(".incoming-*"))
    # redeploy: nothing uploaded, nothing switched
    r = ek(cli, lab, "deploy", b.path, "--device", device, "--json")
    again = json.loads(r.stdout)[0]
    assert r.exit_code == 0 and again["status"] == "unchanged" and again["bytes_sent"] == 0
    # profile runs ON the device and the JSON is saved
    r = ek(cli, lab, "profile", b.path, "--device", device, "--runs", 30, "--warmup", 3,
           "--save-dir", tmp_path / "profiles")
    assert r.exit_code == 0, r.stderr
    saved = list((tmp_path / "profiles" / device).glob("*.json"))
    assert len(saved) == 1
    rep = json.loads(saved[0].read_text())
    assert rep["backend"] == LAB_DEVICES[device][2] and len(rep["samples_ns"]) == 30
    assert rep["conditions"]["python"] and "p50 ms" in r.stdout
    assert _current(lab, device) == sha  # profiling switched nothing


def test_rollback(cli, lab, digits_build):
    a = bundle_of(digits_build, "rpi5", "tflite").path
    b = bundle_of(digits_build, "rpi4", "tflite").path  # same model, another release
    sha_a, sha_b = read_bundle(a).digest(), read_bundle(b).digest()
    assert ek(cli, lab, "deploy", a, "-d", "modern-pi").exit_code == 0
    assert ek(cli, lab, "deploy", b, "-d", "modern-pi").exit_code == 0
    assert _current(lab, "modern-pi") == sha_b
    r = ek(cli, lab, "status", "-d", "modern-pi", "--json")
    m = json.loads(r.stdout)[0]["models"]["digits"]
    assert m["current"] == sha_b and {x["sha256"] for x in m["releases"]} == {sha_a, sha_b}
    assert m["health"]["ok"]
    r = ek(cli, lab, "rollback", "modern-pi", "digits")
    assert r.exit_code == 0, r.stderr
    assert _current(lab, "modern-pi") == sha_a
    r = ek(cli, lab, "rollback", "modern-pi", "digits", "--to", sha_b[:10])
    assert r.exit_code == 0 and _current(lab, "modern-pi") == sha_b


def test_fleet_deploy_with_one_device_down(cli, lab, digits_build):
    """The whole convert output to the whole group: each device picks its own bundle."""
    lab.devices["legacy-pi"].stop()
    out = digits_build.bundles[0].path.parent
    r = ek(cli, lab, "deploy", out, "--group", "lab", "--parallel", 3, "--json")
    assert r.exit_code == 1
    res = {x["device"]: x for x in json.loads(r.stdout)}
    assert res["legacy-pi"]["status"] == "failed" and "unreachable" in res["legacy-pi"]["reason"]
    assert res["modern-pi"]["status"] == "deployed" and res["modern-pi"]["bundle"] == "digits-rpi5"
    assert res["x86-box"]["status"] == "deployed" and res["x86-box"]["bundle"] == "digits-x86-avx2"
    assert res["x86-box"]["format"] == "onnx" and res["x86-box"]["health"]["ok"]
    lab.devices["legacy-pi"].start()
    r = ek(cli, lab, "deploy", out, "--group", "lab", "--json")
    res = {x["device"]: x["status"] for x in json.loads(r.stdout)}
    assert r.exit_code == 0 and res == {"legacy-pi": "deployed", "modern-pi": "unchanged", "x86-box": "unchanged"}


def test_dry_run_touches_nothing(cli, lab, digits_build):
    b = bundle_of(digits_build, "rpi4", "tflite").path
    r = ek(cli, lab, "deploy", b, "-d", "legacy-pi", "--dry-run", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)[0]["status"] == "would-upload"
    assert list(lab.devices["legacy-pi"].root.iterdir()) == []
    ek(cli, lab, "deploy", b, "-d", "legacy-pi")
    r = ek(cli, lab, "deploy", bundle_of(digits_build, "rpi5", "tflite").path, "-d", "legacy-pi",
           "--dry-run", "--json")
    res = json.loads(r.stdout)[0]
    assert res["status"] == "would-upload" and res["previous"] == read_bundle(b).digest()
    assert _current(lab, "legacy-pi") == read_bundle(b).digest()


class _KillAt:
    """A Progress whose upload ticker kills the device's sshd part-way through the upload."""

    def __init__(self, device, fraction):
        self.device, self.fraction, self.fired = device, fraction, False
        self.enabled = False

    def say(self, text):
        pass

    def ticker(self, label, unit=""):
        def tick(done, total, extra=""):
            if not self.fired and total and done >= self.fraction * total:
                self.fired = True
                self.device.stop()
        return tick


def test_sshd_killed_during_upload_leaves_current_untouched(lab, digits_build, tmp_path):
    dev = lab.devices["modern-pi"]
    inv = load_inventory(lab.inventory)
    first = bundle_of(digits_build, "rpi5", "tflite").path
    assert ops.deploy(inv.devices["modern-pi"], read_bundle(first), ops.Options(inv)).status == "deployed"
    sha0 = read_bundle(first).digest()

    def pad(d):
        (d / "extra").mkdir()
        (d / "extra" / "payload.bin").write_bytes(np.random.default_rng(0).bytes(40 << 20))

    big = read_bundle(_copy_bundle(bundle_of(digits_build, "rpi4", "tflite").path, tmp_path / "big", pad))
    killer = _KillAt(dev, 0.3)
    with pytest.raises(DeviceError, match=r"upload of .*payload.bin failed.*nothing was switched"):
        ops.deploy(inv.devices["modern-pi"], big, ops.Options(inv, progress=killer))
    assert killer.fired
    assert _current(lab, "modern-pi") == sha0
    dev.start()
    res = ops.deploy(inv.devices["modern-pi"], big, ops.Options(inv))
    assert res.status == "deployed", res.reason
    assert _current(lab, "modern-pi") == big.digest()
    assert not list((dev.root / "models" / "digits").glob(".incoming-*"))


def test_tampered_release_is_detected(cli, lab, digits_build):
    b = bundle_of(digits_build, "rpi4", "tflite").path
    assert ek(cli, lab, "deploy", b, "-d", "legacy-pi").exit_code == 0
    sha = read_bundle(b).digest()
    model = lab.devices["legacy-pi"].root / "models" / "digits" / "releases" / sha / "model.tflite"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF
    model.write_bytes(bytes(data))
    r = ek(cli, lab, "status", "-d", "legacy-pi", "--json")
    assert r.exit_code == 1
    h = json.loads(r.stdout)[0]["models"]["digits"]["health"]
    assert not h["ok"] and "sha256" in h["error"]
    r = ek(cli, lab, "deploy", b, "-d", "legacy-pi", "--json")
    res = json.loads(r.stdout)[0]
    assert r.exit_code == 0 and res["status"] == "deployed" and res["bytes_sent"] > 0
    assert any("modified or damaged" in w for w in res["warnings"])
    assert model.read_bytes() == (b / "model.tflite").read_bytes()


def test_unknown_host_key_refused_until_trusted(cli, lab, digits_build):
    lab.write_known_hosts(["modern-pi", "x86-box"])
    b = bundle_of(digits_build, "rpi4", "tflite").path
    r = ek(cli, lab, "deploy", b, "-d", "legacy-pi")
    assert r.exit_code == 1 and "unknown host key" in r.stderr and "--trust-new-host" in r.stderr
    assert list(lab.devices["legacy-pi"].root.iterdir()) == []
    r = ek(cli, lab, "deploy", b, "-d", "legacy-pi", "--trust-new-host")
    assert r.exit_code == 0, r.stderr
    assert lab.devices["legacy-pi"].addr in lab.known_hosts.read_text()
    assert ek(cli, lab, "deploy", b, "-d", "legacy-pi").exit_code == 0  # recorded


def test_changed_host_key_always_refused(cli, lab, digits_build):
    dev = lab.devices["x86-box"]
    dev.regenerate_host_key()
    b = bundle_of(digits_build, "x86-avx2", "onnx").path
    for extra in ([], ["--trust-new-host"]):
        r = ek(cli, lab, "deploy", b, "-d", "x86-box", *extra)
        assert r.exit_code == 1 and "HOST KEY CHANGED" in r.stderr, r.stderr
    assert list(dev.root.iterdir()) == []


def test_tiny_filesystem_fills_up(cli, lab, digits_build, tmp_path):
    dev = lab.devices["modern-pi"]
    dev.mount_tmpfs("1m")      # the pushed runtime (~380 kB) and the small bundle fit; the 2 MB one does not
    try:
        small = bundle_of(digits_build, "rpi5", "tflite").path
        r = ek(cli, lab, "deploy", small, "-d", "modern-pi")
        assert r.exit_code == 0, r.stderr
        sha0 = read_bundle(small).digest()

        def pad(d):
            (d / "extra.bin").write_bytes(b"\0" * (2 << 20))

        big = _copy_bundle(bundle_of(digits_build, "rpi4", "tflite").path, tmp_path / "big", pad)
        r = ek(cli, lab, "deploy", big, "-d", "modern-pi")
        assert r.exit_code == 1 and "no space left" in r.stderr and "MB free" in r.stderr
        assert _current(lab, "modern-pi") == sha0
        assert not list((dev.root / "models" / "digits").glob(".incoming-*"))
    finally:
        dev.unmount()


def test_failed_golden_check_rolls_back(cli, lab, digits_build, tmp_path):
    good = bundle_of(digits_build, "x86-avx2", "onnx").path
    assert ek(cli, lab, "deploy", good, "-d", "x86-box").exit_code == 0

    def corrupt(d):
        g = dict(np.load(d / "golden.npz"))
        for k in g:
            if k.startswith("output:"):
                g[k] = g[k] + 5.0
        np.savez(d / "golden.npz", **g)

    bad = _copy_bundle(good, tmp_path / "bad", corrupt)
    r = ek(cli, lab, "deploy", bad, "-d", "x86-box", "--json")
    assert r.exit_code == 1
    res = json.loads(r.stdout)[0]
    assert res["status"] == "rolled-back" and "health check failed" in res["reason"]
    assert _current(lab, "x86-box") == read_bundle(good).digest()


def test_mismatch_warns_and_missing_backend_is_named(cli, lab, digits_build):
    r = ek(cli, lab, "deploy", bundle_of(digits_build, "rpi4", "tflite").path, "-d", "modern-pi")
    assert r.exit_code == 0 and "bundle built for rpi4, device profile is rpi5" in r.stderr
    r = ek(cli, lab, "deploy", bundle_of(digits_build, "rpi4", "onnx").path, "-d", "legacy-pi")
    assert r.exit_code == 1 and "no backend on the device can run a .onnx model" in r.stderr
    assert "pip install onnxruntime" in r.stderr


def test_keep_last_n_releases(lab, digits_build, tmp_path):
    inv = load_inventory(lab.inventory)
    src = bundle_of(digits_build, "rpi5", "tflite").path
    shas = []
    for i in range(4):
        b = read_bundle(_copy_bundle(src, tmp_path / f"b{i}", lambda d, i=i: (d / "note.txt").write_text(str(i))))
        assert ops.deploy(inv.devices["modern-pi"], b, ops.Options(inv, keep=2)).status == "deployed"
        shas.append(b.digest())
    left = {p.name for p in (lab.devices["modern-pi"].root / "models" / "digits" / "releases").iterdir()}
    assert left == set(shas[-2:])


def test_names_are_validated_and_commands_quoted(cli, lab, digits_build, tmp_path):
    evil = _copy_bundle(bundle_of(digits_build, "rpi5", "tflite").path, tmp_path / "evil")
    m = json.loads((evil / "manifest.json").read_text())
    m["name"] = "../../etc"
    (evil / "manifest.json").write_text(json.dumps(m))
    r = ek(cli, lab, "deploy", evil, "-d", "modern-pi")
    assert r.exit_code == 2 and "invalid model name" in r.stderr
    # a device root with spaces and shell syntax reaches the device as one literal path
    weird = lab.devices["modern-pi"].root / "my models $(touch PWNED); x"
    lab.write_inventory(extra={"modern-pi": {"root": str(weird), "target": "rpi5"}})
    r = ek(cli, lab, "deploy", bundle_of(digits_build, "rpi5", "tflite").path, "-d", "modern-pi")
    assert r.exit_code == 0, r.stderr
    assert (weird / "models" / "digits" / "current").is_symlink()
    assert not list(lab.dir.rglob("PWNED")) and not (lab.devices["modern-pi"].root.parent / "PWNED").exists()


def test_device_add_and_list(cli, tmp_path):
    inv = tmp_path / "devices.toml"
    r = cli("device", "add", "pi-kitchen", "--host", "192.0.2.20", "--user", "pi", "--target", "rpi4",
            "--group", "kitchen", "--inventory", inv)
    assert r.exit_code == 0, r.stderr
    d = load_inventory(inv).devices["pi-kitchen"]
    assert (d.host, d.user, d.target, d.groups) == ("192.0.2.20", "pi", "rpi4", ("kitchen",))
    r = cli("device", "add", "pi-kitchen", "--host", "x", "--inventory", inv)
    assert r.exit_code == 2 and "already in" in r.stderr
    r = cli("device", "add", "bad", "--host", "x", "--target", "rpi9", "--inventory", inv)
    assert r.exit_code == 2 and "unknown target" in r.stderr
    r = cli("device", "list", "--inventory", inv)
    assert "pi-kitchen" in r.stdout and "kitchen" in r.stdout
    inv.write_text(inv.read_text() + 'password = "hunter2"\n')
    r = cli("device", "list", "--inventory", inv)
    assert r.exit_code == 2 and "no passwords in the inventory" in r.stderr


def test_local_device_up_deploy_down(cli, digits_build, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_LOCAL_DEVICES", str(tmp_path / "local"))
    inv = tmp_path / "devices.toml"
    inv.write_text(f'[ssh]\nknown_hosts = "{tmp_path / "known_hosts"}"\nconfig = "{tmp_path / "cfg"}"\n')
    r = cli("device", "local", "up", "bench-box", "--target", "x86-avx2", "--inventory", inv)
    assert r.exit_code == 0, r.stderr
    try:
        d = load_inventory(inv).devices["bench-box"]
        assert d.target == "x86-avx2" and d.host in (tmp_path / "known_hosts").read_text()
        out = digits_build.bundles[0].path.parent
        r = cli("deploy", out, "-d", "bench-box", "--inventory", inv, "--json")
        res = json.loads(r.stdout)[0]
        assert r.exit_code == 0 and res["bundle"] == "digits-x86-avx2" and res["health"]["ok"]
        r = cli("device", "local", "list")
        assert "bench-box" in r.stdout and "yes" in r.stdout
        meta = json.loads((tmp_path / "local" / "bench-box" / "device.json").read_text())
    finally:
        r = cli("device", "local", "down", "bench-box", "--inventory", inv)
    assert r.exit_code == 0 and "removed" in r.stdout
    assert "bench-box" not in load_inventory(inv).devices
    ns = f"ek{meta['tag']}d{meta['index']}"
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_ssh_config_alias_and_agent(cli, lab, digits_build, tmp_path):
    """A Host alias from the ssh config (HostName, User, IdentityFile), and a key only in ssh-agent."""
    import os

    dev = lab.devices["modern-pi"]
    lab.ssh_config.write_text(f"Host kitchen-pi\n    HostName {dev.addr}\n    User root\n"
                              f"    IdentityFile {lab.key}\n")
    inv = tmp_path / "alias.toml"
    inv.write_text(f'[ssh]\nknown_hosts = "{lab.known_hosts}"\nconfig = "{lab.ssh_config}"\n\n'
                   f'[devices.kitchen]\nhost = "kitchen-pi"\nroot = "{dev.root}"\npython = "{dev.python}"\n')
    b = bundle_of(digits_build, "rpi5", "tflite").path
    r = cli("deploy", b, "-d", "kitchen", "--inventory", inv, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)[0]["status"] == "deployed"
    # ssh-agent: no key file anywhere, the key is only loaded into an agent
    lab.ssh_config.write_text("")
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if "=" in line.split(";")[0])
    try:
        subprocess.run(["ssh-add", str(lab.key)], env={**os.environ, **env}, check=True, capture_output=True)
        inv.write_text(f'[ssh]\nknown_hosts = "{lab.known_hosts}"\nconfig = "{lab.ssh_config}"\n\n'
                       f'[devices.kitchen]\nhost = "{dev.addr}"\nuser = "root"\nroot = "{dev.root}"\n'
                       f'python = "{dev.python}"\n')
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            r = cli("status", "-d", "kitchen", "--inventory", inv, "--json")
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)[0]["models"]["digits"]["health"]["ok"]
    finally:
        subprocess.run(["ssh-agent", "-k"], env={**os.environ, **env}, capture_output=True)
