"""Shared fixtures: a trained digits CNN, its bundles for every target, CLI runners, device venvs."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "models" / "mlperf-tiny"
sys.path.insert(0, str(ROOT / "examples"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _edgekit_debug_restored():
    """`edgekit --debug` run in-process (the cli fixture) sets EDGEKIT_DEBUG in this process's environment, for the
    native-output code it reaches: put it back after each test, or every later subprocess runs in debug mode (the
    libraries' noise on its terminal, a --json stdout no longer JSON alone)."""
    before = os.environ.get("EDGEKIT_DEBUG")
    yield
    if before is None:
        os.environ.pop("EDGEKIT_DEBUG", None)
    else:
        os.environ["EDGEKIT_DEBUG"] = before


@pytest.fixture(autouse=True, scope="session")
def _edgekit_cache(tmp_path_factory):
    """load()'s cached thread probes (runtime.threadprobe) go to a directory of this run, not ~/.cache."""
    d = tmp_path_factory.mktemp("edgekit-cache")
    old = os.environ.get("EDGEKIT_CACHE_DIR")
    os.environ["EDGEKIT_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("EDGEKIT_CACHE_DIR", None)
    else:
        os.environ["EDGEKIT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """(model path, calib.npz, val.npz) of a digits CNN trained here in seconds."""
    from digits import train

    d = tmp_path_factory.mktemp("digits")
    model = train(d, epochs=8)  # also writes train.npz (inputs + labels)
    return model, d / "calib.npz", d / "val.npz"


@pytest.fixture(scope="session")
def digits_build(digits, tmp_path_factory):
    """The digits CNN converted for every shipped target (one ConvertResult)."""
    from edgekit.convert import Calibration, ConvertRecipe, convert
    from edgekit.targets import builtin_names

    model, calib, val = digits
    out = tmp_path_factory.mktemp("build")
    return convert(ConvertRecipe(str(model), builtin_names(), calibration=Calibration(str(calib)),
                                 validation=str(val)), str(out))


@pytest.fixture
def fake_cgroup(tmp_path, monkeypatch):
    """edgekit.runtime.cgroup pointed at files of the test's own: (proc, root, put); proc stands for
    /proc/self/cgroup, root for /sys/fs/cgroup, put(folder, memory_max="...") writes folder/memory.max."""
    import edgekit.runtime.cgroup as cgroup

    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    monkeypatch.setattr(cgroup, "CGROUP_FILE", str(proc))
    monkeypatch.setattr(cgroup, "CGROUP_ROOT", str(root))

    def put(d, **kv):
        d.mkdir(parents=True, exist_ok=True)
        for k, v in kv.items():
            (d / k.replace("_", ".", 1)).write_text(v + "\n")

    return proc, root, put


def unavailable(why: str):
    """Something a test needs from outside (a package fetched from PyPI) cannot be had: a skip on a
    developer's machine, a failure in CI (CI=true), where nothing may be silently left untested."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why} (CI=true: a missing dependency fails the run)")
    pytest.skip(why)


def bundle_of(result, target, fmt=None):
    for b in result.bundles:
        if b.target == target and (fmt is None or b.fmt == fmt):
            return b
    raise KeyError((target, fmt))


@pytest.fixture
def cli():
    """Run the edgekit CLI in process: returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from edgekit.cli import cli as root

    def run(*args):
        return CliRunner().invoke(root, [str(a) for a in args], catch_exceptions=False)

    return run


def run_cli_process(*args, cwd=None, env=None):
    """The real `edgekit` program in a subprocess: exit status and streams as a user sees them."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "edgekit.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=e, timeout=600)


# --- device-like Python environments (no TensorFlow) --------------------------

def device_venv(requirements):
    """A cached venv with only `requirements` (no TensorFlow): like a device's image. The same
    venvs the converter's compatibility check uses (edgekit.lab.venvs.venv_python), so a
    run builds each one once. A failure to build it fails the test: CI never skips devices."""
    from edgekit.lab.venvs import VenvUnavailable, venv_python

    try:
        return venv_python(list(requirements))
    except VenvUnavailable as e:
        pytest.fail(f"cannot build device venv {requirements}: {e}")


def run_in_venv(py, *args, cwd=None):
    """Run `python -m edgekit.runtime ...` from the repo's source in that venv."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONHOME", None)
    return subprocess.run([str(py), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


# --- the device lab: real sshd in network namespaces ----------------------------

LAB_DEVICES = {  # name: (venv requirements, target profile, backend the device will use)
    "legacy-pi": (["numpy<2", "tflite-runtime==2.14.0"], "rpi4", "tflite-runtime"),
    "modern-pi": (["ai-edge-litert"], "rpi5", "litert"),
    "x86-box": (["onnxruntime"], "x86-avx2", "onnxruntime"),
}


@contextlib.contextmanager
def full_and_bare_lab(base, tag: str, full: str, bare: str, target: str = "x86-avx2"):
    """Two lab devices of `target`: `full` runs this Python (onnxruntime-genai and all installed here), `bare` a
    venv with numpy only (a device that lacks the backend)."""
    from devicelab import Lab

    lab = Lab(base, tag=tag)
    lab.setup()
    try:
        lab.add(full, sys.executable)
        lab.add(bare, str(device_venv(["numpy"])))
        lab.write_known_hosts()
        lab.write_inventory(extra={full: {"target": target}, bare: {"target": target}})
        yield lab
    finally:
        lab.teardown()


@pytest.fixture(scope="session")
def lab_session(tmp_path_factory):
    from devicelab import Lab

    lab = Lab(tmp_path_factory.mktemp("lab"))
    lab.setup()
    try:
        for name, (reqs, _, _) in LAB_DEVICES.items():
            lab.add(name, str(device_venv(reqs)))
        yield lab
    finally:
        lab.teardown()


@pytest.fixture
def lab(lab_session):
    """The three lab devices, running, with empty device roots, known host keys, an inventory."""
    import shutil

    for d in lab_session.devices.values():
        if d.proc is None or d.proc.poll() is not None:
            d.start()
        shutil.rmtree(d.root, ignore_errors=True)
        d.root.mkdir(parents=True)
    lab_session.write_known_hosts()
    lab_session.write_inventory(extra={n: {"target": t} for n, (_, t, _) in LAB_DEVICES.items()})
    return lab_session


@pytest.fixture(scope="session")
def emulated(lab_session):
    """The emulated arm64 Pi (Debian 12 arm64 under qemu, tflite-runtime 2.14, numpy<2), as a
    device of the lab: its root is built once and cached (minutes the first time)."""
    from edgekit.lab import emulated as emu

    info = emu.up("emulated-pi", say=lambda t: print(t, flush=True), base=lab_session.dir / "emulated",
                      authorized_keys=lab_session.dir / "authorized_keys")
    try:
        yield info
    finally:
        emu.down("emulated-pi", base=lab_session.dir / "emulated")


@pytest.fixture
def emu_inventory(emulated, lab_session, tmp_path):
    """An inventory with just the emulated device (lab key, its own known_hosts)."""
    known = tmp_path / "known_hosts"
    known.write_text(emulated["host_key"] + "\n")
    inv = tmp_path / "devices.toml"
    inv.write_text(f'[ssh]\nknown_hosts = "{known}"\nconfig = "{lab_session.ssh_config}"\n\n'
                   f'[devices.emulated-pi]\nhost = "{emulated["host"]}"\nuser = "root"\n'
                   f'key_file = "{lab_session.key}"\nroot = "{emulated["root"]}"\n'
                   f'python = "{emulated["python"]}"\ntarget = "rpi4"\n')
    return inv
