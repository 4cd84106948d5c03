"""convert --select fastest --device NAME: the candidates of the device's target are timed on the
device itself (a lab device: real sshd in a network namespace, its own venv), as edgekit profile."""

import json

from edgekit.bundle import read_bundle
from edgekit.runtime import load
from edgekit.runtime.check import golden_check


def test_candidates_timed_on_the_device(cli, lab, digits, tmp_path):
    model, calib, val = digits
    out = tmp_path / "out"
    r = cli("convert", model, "-t", "x86-avx2", "--format", "onnx", "--calib", calib, "--val", val,
            "--select", "fastest", "--device", "x86-box", "--inventory", lab.inventory, "--compat-check", "off",
            "-o", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    rows = {b["path"].rsplit("/", 1)[-1]: b for b in res["bundles"]}
    x86 = read_bundle(_path(rows, "digits-x86-avx2"))
    cands = x86.manifest["candidates"]
    on_device = [c for c in cands if c.get("p50_ms")]
    assert len(on_device) >= 2, cands
    assert all("on device x86-box" in c["timed_where"] for c in cands)
    # the device's venv has ONNX Runtime and no OpenVINO: OpenVINO candidates are recorded, not timed
    ov = [c for c in cands if c.get("backend") == "openvino" and c.get("meets")]
    assert all(c["p50_ms"] is None and "timing on x86-box" in c["error"] for c in ov)
    winner = next(c for c in cands if c["chosen"])
    assert winner["p50_ms"] == min(c["p50_ms"] for c in on_device)
    assert winner["threads"] >= 1
    # the candidates were profiled on the device: their releases are in its store, none activated
    store = lab.devices["x86-box"].root / "models" / "digits"
    assert len(list((store / "releases").iterdir())) >= len(on_device)
    assert not (store / "current").exists()
    assert golden_check(load(_path(rows, "digits-x86-avx2")))["ok"]


def test_tflite_candidates_timed_on_a_pi_with_tflite_runtime(cli, lab, digits, tmp_path):
    """An ARM target: this x86 host would not time it; the Pi (tflite-runtime 2.14, numpy<2) does,
    on its own backend, whatever backend this host measured fidelity with."""
    model, calib, val = digits
    r = cli("convert", model, "-t", "rpi4", "--format", "tflite", "--calib", calib, "--val", val,
            "--select", "fastest", "--device", "legacy-pi", "--inventory", lab.inventory, "--compat-check", "off",
            "-o", tmp_path / "out", "--json", "-q")
    assert r.exit_code == 0, r.output
    rows = {b["path"].rsplit("/", 1)[-1]: b for b in json.loads(r.stdout)["bundles"]}
    cands = read_bundle(_path(rows, "digits-rpi4")).manifest["candidates"]
    timed = [c for c in cands if c.get("p50_ms")]
    assert len(timed) >= 2, cands
    assert all("on device legacy-pi" in c["timed_where"] for c in cands)
    winner = next(c for c in cands if c["chosen"])
    assert winner["p50_ms"] == min(c["p50_ms"] for c in timed)
    store = lab.devices["legacy-pi"].root / "models" / "digits" / "releases"
    assert len(list(store.iterdir())) >= len(timed)


def _path(rows, name):
    return rows[name]["path"]


def test_device_needs_select_fastest_and_its_target(cli, lab, digits, tmp_path):
    model, calib, _ = digits
    r = cli("convert", model, "-t", "x86-avx2", "--calib", calib, "--device", "x86-box",
            "--inventory", lab.inventory, "-o", tmp_path / "a")
    assert r.exit_code == 2 and "--select fastest" in r.output
    r = cli("convert", model, "-t", "x86-avx2", "--calib", calib, "--select", "fastest", "--device", "legacy-pi",
            "--inventory", lab.inventory, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "legacy-pi is a rpi4" in r.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
