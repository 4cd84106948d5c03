"""The wheel, installed as a user installs it (not editable): every package ships, every command group runs.

One test installs `edgekit[all]` from the wheel into a fresh venv (with the system's site-packages
underneath, so the heavy dependencies are not downloaded again: the venv's own edgekit is the
wheel's, checked) and runs each command group from it, a conversion and a dry-run deploy to a
lab device included. Another installs the wheel with one device extra at a time into venvs that
have nothing else, and runs a bundle there.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(d), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return next(d.glob("edgekit-*.whl"))


def test_every_package_ships(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("__init__.py")}
    in_tree = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "edgekit").rglob("__init__.py")}
    assert in_tree <= shipped, sorted(in_tree - shipped)
    assert "edgekit.profiles" in {str(Path(n).parent).replace("/", ".") for n in names if n.endswith(".toml")}


def _venv(path: Path, system_site: bool) -> Path:
    args = [sys.executable, "-m", "venv", str(path)] + (["--system-site-packages"] if system_site else [])
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    return path / "bin"


def _run(bin_dir: Path, *args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_all_extras_from_the_wheel_run_every_command_group(wheel, tmp_path, digits, lab):
    bin_dir = _venv(tmp_path / "venv", system_site=True)
    r = _run(bin_dir, bin_dir / "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[all]")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(bin_dir, bin_dir / "python", "-c", "import edgekit, edgekit.deploy, edgekit.optimize; "
             "print(edgekit.__file__)", cwd=tmp_path)
    assert r.returncode == 0 and str(tmp_path / "venv") in r.stdout, r.stdout + r.stderr  # not the checkout
    ek = bin_dir / "edgekit"
    for group in ("convert", "deploy", "device", "status", "rollback", "profile", "prune", "distill", "qat",
                  "run", "bench", "targets", "serve", "report", "export"):
        r = _run(bin_dir, ek, group, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "Usage:" in r.stdout, (group, r.stderr[-1500:])
    r = _run(bin_dir, ek, "targets", "list", "--json", cwd=tmp_path)
    assert r.returncode == 0 and {"rpi4", "x86-avx2"} <= {t["name"] for t in json.loads(r.stdout)}
    model, calib, val = digits
    r = _run(bin_dir, ek, "convert", model, "-t", "rpi4", "--format", "tflite", "--calib", calib, "--val", val,
             "--compat-check", "off", "-q", "-o", tmp_path / "build", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "build" / "digits-rpi4" / "manifest.json").is_file()
    r = _run(bin_dir, ek, "deploy", tmp_path / "build" / "digits-rpi4", "-d", "legacy-pi", "--dry-run",
             "--inventory", lab.inventory, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("extra, fmt", [("onnxruntime", "onnx"), ("litert", "tflite"),
                                        ("tflite-runtime", "tflite")])
def test_device_extras_alone_run_a_bundle(wheel, tmp_path, digits_build, extra, fmt):
    from conftest import bundle_of

    bin_dir = _venv(tmp_path / "venv", system_site=False)
    r = _run(bin_dir, bin_dir / "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:",
             f"{wheel}[{extra}]", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = bundle_of(digits_build, "rpi4", fmt).path
    r = _run(bin_dir, bin_dir / "python", "-m", "edgekit.runtime", "check", bundle, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["ok"] and res["backend"] == extra
    r = _run(bin_dir, bin_dir / "python", "-c", "import sys, edgekit.runtime; "
             "print(sorted(m for m in ('tensorflow', 'click', 'paramiko') if m in sys.modules))", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
