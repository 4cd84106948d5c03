"""Compatibility check: does the artifact load, and match, in the oldest runtime the target runs?

A profile lists that runtime (`runtime.min_runtime`, e.g. tflite-runtime==2.14.0 and numpy<2
for the Raspberry Pi profiles). The converter runs the bundle's golden check in exactly that
environment: for an arm64 profile inside the emulated Debian arm64 root (real ARM kernels
under qemu) when it is built, otherwise in a cached venv here. An artifact that would not
load there fails the conversion with the op and version named, instead of on the device.
Entries with a space or parentheses are what the device needs but cannot be installed here
(NVIDIA's Jetson builds): recorded as not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edgekit.errors import ConversionError
from edgekit.runtime.files import copy_runtime
from edgekit.targets import TargetProfile

MODES = ("auto", "venv", "emulated", "off")
_RUNTIME_PKGS = {"tflite": ("tflite-runtime",), "onnx": ("onnxruntime",)}


class CompatUnavailable(Exception):
    """The environment for the check cannot be had here (offline, no root, ...)."""


def requirements(profile: TargetProfile, fmt: str) -> Tuple[List[str], List[str]]:
    """(pip requirements to check `fmt` against, entries for `fmt` that cannot be installed here)."""
    mine = [e for e in profile.runtime.min_runtime if e.startswith(_RUNTIME_PKGS[fmt])]
    unchecked = [e for e in mine if " " in e or "(" in e]
    runtime = [e for e in mine if e not in unchecked]
    if not runtime:
        return [], unchecked
    numpy = [e for e in profile.runtime.min_runtime if e.startswith("numpy")]
    return runtime + numpy, unchecked


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_COMPAT_CACHE", Path.home() / ".cache" / "edgekit" / "compat"))


def venv_python(reqs: List[str]) -> Path:
    """A cached venv with exactly `reqs` (built once; pip reaches the package registry)."""
    key = hashlib.sha256(("\n".join(sorted(reqs)) + sys.version).encode()).hexdigest()[:16]
    venv = cache_dir() / f"venv-{key}"
    py = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return py
    tmp = cache_dir() / f".venv-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
        r = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary=:all:",
                            "--disable-pip-version-check", *reqs], capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise CompatUnavailable(f"pip install {' '.join(reqs)} failed: "
                                    + (r.stderr.strip().splitlines() or ["?"])[-1])
        (tmp / ".complete").write_text("\n".join(reqs))
        if venv.exists():
            shutil.rmtree(venv)
        os.replace(tmp, venv)  # venvs are relocatable enough for `python -m` use; paths fixed below
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CompatUnavailable(f"cannot build a venv for {' '.join(reqs)}: {e}") from None
    except CompatUnavailable:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return py


def _parse(proc: subprocess.CompletedProcess) -> Dict[str, Any]:
    out = proc.stdout.strip()
    if proc.returncode in (0, 1) and out:
        return json.loads(out.splitlines()[-1])
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    msg = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")),
               lines[-1] if lines else f"exit status {proc.returncode}")
    return {"ok": False, "error": msg}


def _run_in_venv(bundle_dir: Path, reqs: List[str], reference: bool = False) -> Dict[str, Any]:
    py = venv_python(reqs)
    with tempfile.TemporaryDirectory(prefix="edgekit-compat-") as d:
        rt = copy_runtime(Path(d))
        proc = subprocess.run([str(py), "-m", "edgekit.runtime", "check", str(bundle_dir), "--json",
                               *(["--reference-numerics"] if reference else [])],
                              capture_output=True, text=True, cwd=d, timeout=600,
                              env={"PYTHONPATH": str(rt), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                   "PYTHONDONTWRITEBYTECODE": "1"})
    return _parse(proc)


def _emulation_fits(reqs: List[str]) -> bool:
    from edgekit.lab import emulated as emulate

    return (os.geteuid() == 0 and emulate.is_built() and sys.platform == "linux"
            and set(reqs) <= set(emulate.RECIPE["pip"]))


def _run_emulated(bundle_dir: Path) -> Dict[str, Any]:
    from edgekit.lab import emulated as emulate

    root = emulate.root_path()
    emulate.ensure_binfmt()
    tmp = Path(tempfile.mkdtemp(prefix="edgekit-compat-", dir=root / "tmp"))
    try:
        copy_runtime(tmp / "rt")
        shutil.copytree(bundle_dir, tmp / "bundle")
        inside = "/" + str(tmp.relative_to(root))
        proc = emulate.in_root(root, [f"{emulate.VENV}/bin/python", "-m", "edgekit.runtime", "check",
                                      f"{inside}/bundle", "--json"],
                               env={"PYTHONPATH": f"{inside}/rt", "PYTHONDONTWRITEBYTECODE": "1"},
                               timeout=900, capture=True)
        return _parse(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _explain(error: str, reqs: List[str]) -> str:
    m = re.search(r"builtin opcode '(\w+)' version '(\d+)'", error)
    if m:
        return (f"op {m.group(1)} version {m.group(2)} is newer than {' + '.join(reqs)} knows "
                f"(the device would fail to load it)")
    m = re.search(r"Type (\w+) is unsupported by op (\w+)", error)
    if m:
        return f"op {m.group(2).upper()} has no {m.group(1)} kernel in {' + '.join(reqs)}"
    return error


def check(bundle_dir: Path, profile: TargetProfile, fmt: str, mode: str = "auto",
          cache: Optional[Dict] = None, artifact_sha: str = "", reference: bool = False) -> List[Dict[str, Any]]:
    """Check a (temporary) bundle; returns the manifest's compatibility records.
    Raises ConversionError when the artifact fails to load or match there. `reference`: the golden
    outputs are in reference numerics (convert.numerics), so an x86 venv runs the QDQ graph as written
    (the host's kernels would saturate where the target's do not)."""
    if mode not in MODES:
        raise ConversionError(f"unknown compatibility mode {mode!r}", hint="one of " + ", ".join(MODES))
    bundle_dir = Path(bundle_dir).resolve()  # the check runs from another working directory
    reqs, unchecked = requirements(profile, fmt)
    records = [{"requirements": [u], "checked": False,
                "reason": "the device's own build; cannot be installed here"} for u in unchecked]
    if mode == "off" or not reqs:
        if mode == "off" and reqs:
            records.append({"requirements": reqs, "checked": False, "reason": "--compat-check off"})
        return records
    arm = profile.device.arch == "aarch64"
    where = "emulated aarch64 (qemu)" if (arm and mode in ("auto", "emulated") and _emulation_fits(reqs)) \
        else "x86_64 venv"
    if mode == "emulated" and not where.startswith("emulated"):
        raise ConversionError("no emulated arm64 root that has " + " + ".join(reqs), target=profile.name,
                              stage="compatibility", hint="edgekit device emulate up (Linux, root)")
    key = (artifact_sha, tuple(reqs), where, reference)
    if cache is not None and key in cache:
        res = dict(cache[key])
    else:
        t0 = time.monotonic()
        try:
            res = _run_emulated(bundle_dir) if where.startswith("emulated") else \
                _run_in_venv(bundle_dir, reqs, reference)
        except CompatUnavailable as e:
            if mode != "auto":
                raise ConversionError(str(e), target=profile.name, stage="compatibility") from None
            res = {"checked": False, "reason": str(e)}
        res["seconds"] = time.monotonic() - t0
        if cache is not None:
            cache[key] = res
    record = {"requirements": reqs, "where": where, "checked": res.get("checked", True), **res}
    if reference and not where.startswith("emulated"):
        record["numerics"] = "reference (QDQ graph as written: this host's kernels saturate)"
    if record["checked"] and not res.get("ok"):
        detail = _explain(res["error"], reqs) if res.get("error") else ", ".join(
            f"output {k}: SNR {v['snr_db']:.1f} dB vs golden (min {res.get('min_snr_db')}), top-1 agreement "
            f"{v['top1_agreement']}, max difference {v['max_abs_err']:.4g}"
            for k, v in res.get("outputs", {}).items() if not v.get("ok"))
        raise ConversionError(f"the {fmt} artifact fails in {' + '.join(reqs)} ({where}): {detail}",
                              target=profile.name, stage="compatibility",
                              hint="choose ops/precision that runtime supports, update the devices' "
                                   "runtime and min_runtime, or --compat-check off to accept the risk")
    records.append(record)
    return records
