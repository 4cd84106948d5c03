"""The device side on the oldest releases edgekit declares: Python 3.9 and constraints/oldest.txt.

The wheel is installed with its extras [onnxruntime,serve,cli] under those constraints in a venv of its own
(cached, keyed by the constraints and the wheel's code); there a bundle runs, passes its health check, and is
served over HTTP; the CLI starts. setup.cfg's lower bounds for these extras are what this test installs."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, bundle_of

CONSTRAINTS = ROOT / "constraints" / "oldest.txt"


def _pins():
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.lower()] = version
    return out


def _oldest_python():
    cands = sorted(Path.home().glob(".pyenv/versions/3.9.*/bin/python3.9")) + \
        [Path(p) for p in ("/usr/bin/python3.9", "/usr/local/bin/python3.9")]
    for cand in cands:
        if cand.is_file() and subprocess.run([str(cand), "-c", "import venv"], capture_output=True).returncode == 0:
            return str(cand)
    pytest.fail("no Python 3.9 on this machine: the oldest Python edgekit declares (python_requires) is untested")


def test_declared_lower_bounds_are_the_tested_ones():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    declared = {}
    for text in [cfg["options"]["install_requires"]] + [extras[k] for k in ("onnxruntime", "cli", "deploy", "serve")]:
        for line in text.splitlines():
            line = line.split(";")[0].strip()
            if ">=" in line:
                name, version = line.split(">=")
                declared[name.strip().lower()] = version.strip()
    pins = _pins()
    assert {k: declared.get(k) for k in pins} == pins, "setup.cfg's lower bounds differ from constraints/oldest.txt"
    assert cfg["options"]["python_requires"] == ">=3.9"


@pytest.fixture(scope="module")
def oldest_venv(tmp_path_factory):
    py = _oldest_python()
    wheel_dir = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheel_dir.glob("edgekit-*.whl")
    # the dependencies are cached (keyed by the constraints and the Python); the wheel is installed anew each run
    key = hashlib.sha256(CONSTRAINTS.read_bytes() + py.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("EDGEKIT_COMPAT_CACHE", Path.home() / ".cache" / "edgekit" / "compat"))
    venv = cache / f"oldest-{key}"
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:"]
    if not (venv / ".complete").is_file():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([py, "-m", "venv", str(venv)], check=True, capture_output=True)
        r = subprocess.run(pip + ["-c", str(CONSTRAINTS), f"{wheel}[onnxruntime,serve,cli]"],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"pip install under constraints/oldest.txt failed:\n{r.stderr[-3000:]}"
        (venv / ".complete").write_text(wheel.name)
    else:
        r = subprocess.run(pip + ["--no-deps", "--force-reinstall", str(wheel)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _run(venv, *args, **kw):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(venv / "bin/python"), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=kw.get("cwd", "/"))


def test_device_side_on_the_oldest_releases(oldest_venv, digits_build, tmp_path):
    code = ("import sys, json, numpy, onnxruntime, click, uvicorn, edgekit;"
            "print(json.dumps({'python': sys.version.split()[0], 'numpy': numpy.__version__,"
            "'onnxruntime': onnxruntime.__version__, 'click': click.__version__, 'uvicorn': uvicorn.__version__,"
            "'edgekit': edgekit.__file__}))")
    r = _run(oldest_venv, "-c", code)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    pins = _pins()
    assert got["python"].startswith("3.9.")
    assert {k: got[k] for k in ("numpy", "onnxruntime", "click", "uvicorn")} == \
        {k: pins[k] for k in ("numpy", "onnxruntime", "click", "uvicorn")}, got
    assert "site-packages" in got["edgekit"]                 # the installed wheel, not the checkout

    bundle = bundle_of(digits_build, "x86-avx2", "onnx").path
    r = _run(oldest_venv, "-m", "edgekit.runtime", "check", bundle, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["ok"] is True

    r = _run(oldest_venv, "-m", "edgekit.cli", "--help")
    assert r.returncode == 0 and "convert" in r.stdout, r.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as lf:
        proc = subprocess.Popen([str(oldest_venv / "bin/python"), "-m", "edgekit.serve", str(bundle),
                                 "--port", str(port)], stdout=lf, stderr=subprocess.STDOUT, env=env, cwd="/")
    try:
        meta = json.loads((bundle / "manifest.json").read_text())
        inp = meta["inputs"][0]
        arr = np.zeros([1] + list(inp["shape"][1:]), np.float32)
        doc = {"inputs": [{"name": inp["name"], "shape": list(arr.shape), "datatype": "FP32",
                           "data": arr.reshape(-1).tolist()}]}
        model = meta["name"]
        deadline = time.monotonic() + 60
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                             data=json.dumps(doc).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    body = json.loads(resp.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert body["outputs"] and len(body["outputs"][0]["data"]) == int(np.prod(body["outputs"][0]["shape"]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
