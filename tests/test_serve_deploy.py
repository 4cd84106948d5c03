"""edgekit serve on a lab device (real sshd in its own network namespace, a device Python with
onnxruntime and uvicorn, no TensorFlow): started over SSH as a supervised process (no systemd runs
there; the systemd unit is tested in test_serve_systemd.py), gated on ready plus a golden inference
through the API, following `current`, refusing a bad release, stopped."""

from __future__ import annotations

import os

import pytest

from conftest import device_venv
from edgekit.runtime import releases
from edgekit.errors import DeviceError
from test_serve import _install, _onnx_bundle


@pytest.fixture(scope="module")
def serve_box(tmp_path_factory):
    from devicelab import Lab

    from edgekit.deploy.inventory import load_inventory

    py = device_venv(["onnxruntime", "uvicorn"])
    lab = Lab(tmp_path_factory.mktemp("serve-lab"), tag=f"{os.getpid() % 1000}s")
    lab.setup()
    try:
        dev = lab.add("serve-box", str(py))
        lab.write_known_hosts()
        lab.write_inventory(extra={"serve-box": {"target": "x86-avx2"}})
        inv = load_inventory(lab.inventory)
        yield lab, dev, inv
    finally:
        lab.teardown()


def _connect(inv):
    from edgekit.deploy.ops import Options
    from edgekit.deploy.session import DeviceSession

    c = Options(inv).connect(inv.devices["serve-box"])
    DeviceSession(c).ensure_runtime()
    return c


def test_serve_on_a_device_follows_current_and_refuses_a_bad_release(serve_box, tmp_path):
    from edgekit.deploy import serving

    lab, dev, inv = serve_box
    root = str(dev.root)
    v1 = _onnx_bundle(tmp_path / "v1", bias=0.0)
    v2 = _onnx_bundle(tmp_path / "v2", bias=10.0)
    bad = _onnx_bundle(tmp_path / "bad", bias=20.0, bad_golden=True)
    shas = {k: _install(dev.root, "two", b) for k, b in (("v1", v1), ("v2", v2), ("bad", bad))}
    mdir = releases.model_dir(root, "two")
    releases.switch(mdir, shas["v1"])
    # the process manager, asked for: lab devices share this host's /run, and on a host whose PID 1
    # is systemd, auto would put a real unit in the host's /etc (outside the device's namespace)
    opts = serving.ServeOptions(port=18000, wait_s=60, extra=("--poll-interval", "0.2"), manager="process")
    c = _connect(inv)
    try:
        assert serving.state(c, root)["running"] is False
        res = serving.ensure(c, root, opts, "two", shas["v1"])
        assert res["serving"] == "started" and res["version"] == shas["v1"][:12]
        assert res["manager"] == "process" and res["why"] == "a supervised process was asked for"
        assert res["url"] == "http://127.0.0.1:18000/v2" and res["probe"]["ok"]
        st = serving.state(c, root)
        assert st["running"] and st["pid"] == res["pid"]

        releases.switch(mdir, shas["v2"])  # what a deploy does; the server hot-swaps
        res = serving.ensure(c, root, opts, "two", shas["v2"])
        assert res["serving"] == "running" and res["pid"] == st["pid"] and res["version"] == shas["v2"][:12]

        releases.switch(mdir, shas["bad"])
        with pytest.raises(DeviceError, match=f"refused release {shas['bad'][:12]}.*still serves {shas['v2'][:12]}"):
            serving.ensure(c, root, opts, "two", shas["bad"])
        back = serving.roll_back(c, root, "two", shas["v2"])
        assert back["current"] == shas["v2"]
        assert serving.ensure(c, root, opts, "two", shas["v2"])["version"] == shas["v2"][:12]

        res = serving.ensure(c, root, serving.ServeOptions(port=18001, wait_s=60, manager="process"), "two", shas["v2"])
        assert res["serving"] == "restarted" and res["url"].endswith(":18001/v2")
        assert serving.stop(c, root)["stopped"] == res["pid"]
        assert serving.state(c, root)["running"] is False
        assert serving.stop(c, root) == {"stopped": None}
        assert "serving" in serving.log_tail(c, root, 50)
    finally:
        if serving.state(c, root)["running"]:
            serving.stop(c, root)
        c.close()


def test_cli_deploy_serve_status_no_serve(serve_box, cli, tmp_path):
    """edgekit deploy --serve: deployed, served, gated through the API; a redeploy hot-swaps;
    edgekit status shows the address; deploy --no-serve stops it."""
    lab, dev, inv = serve_box
    v1 = _onnx_bundle(tmp_path / "v1", bias=0.0)
    v2 = _onnx_bundle(tmp_path / "v2", bias=10.0)

    def ek(*args):
        return cli(*args, "--inventory", lab.inventory)

    r = ek("deploy", v1, "--device", "serve-box", "--serve", "--serve-port", "18010", "--serve-manager", "process")
    assert r.exit_code == 0, r.output
    assert "http://127.0.0.1:18010/v2" in r.output and "started (process)" in r.output
    r = ek("deploy", v2, "--device", "serve-box", "--serve", "--serve-port", "18010", "--serve-manager", "process")
    assert r.exit_code == 0, r.output
    from edgekit.bundle import sha256_tree

    assert sha256_tree(v2)[:12] in r.output and "running" in r.output  # the same server, hot-swapped
    r = ek("status", "--device", "serve-box")
    assert "http://127.0.0.1:18010/v2" in r.output and "yes (process)" in r.output, r.output
    r = ek("deploy", v2, "--device", "serve-box", "--no-serve")
    assert r.exit_code == 0 and "stopped (pid" in r.output, r.output
    r = ek("status", "--device", "serve-box", "--no-health")
    assert "http://127.0.0.1:18010" not in r.output


def test_open_host_needs_a_token_file():
    from edgekit.deploy.serving import ServeOptions

    with pytest.raises(DeviceError, match="token"):
        ServeOptions(host="0.0.0.0")
    ServeOptions(host="0.0.0.0", token_file="/etc/edgekit/token")
