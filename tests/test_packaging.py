"""`pip install .` ships the target profiles; the import rules keep the device side light."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_ships_the_profiles(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                        str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("edgekit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(Path(n).stem for n in names if n.startswith("edgekit/profiles/") and n.endswith(".toml"))
    assert shipped == sorted(p.stem for p in (ROOT / "targets").glob("*.toml"))
    # installed from the wheel (not the checkout), profiles list and load
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import edgekit.targets as t, json; "
            "print(json.dumps([t.builtin_names(), str(t._profiles_dir()), t.load_target('rpi4').device.cpu]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    import json

    names_, where, cpu = json.loads(r.stdout)
    assert "rpi4" in names_ and len(names_) == len(shipped)
    assert where.startswith(str(site)) and cpu == "Cortex-A72"


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0], node.module


HEAVY = {"tensorflow", "tf2onnx", "keras", "tf_keras", "onnx", "onnxruntime", "paramiko", "click",
         "ai_edge_litert", "tflite_runtime", "PIL", "sklearn"}


def test_import_rules():
    pkg = ROOT / "edgekit"
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg).as_posix()
        for top, full in _imports(f):
            if not rel.startswith("cli/"):  # the command package imports everything; nothing imports it
                assert full != "edgekit.cli" and not full.startswith("edgekit.cli."), f"{rel} imports cli"
            if top in HEAVY:
                if rel.startswith(("convert/", "optimize/", "cli/")):
                    assert top != "paramiko", rel
                    continue
                if rel in ("runtime/tflite.py", "runtime/onnx.py", "runtime/llm_batch.py"):
                    # backends, inside functions (TFLite modules load by name); llm_batch: the batched LLM
                    # decoder runs the bundle's ONNX graph with ONNX Runtime itself
                    assert top in ("onnxruntime",), (rel, top)
                    continue
                if rel.startswith("deploy/"):
                    assert top in ("paramiko",), (rel, top)
                    continue
                raise AssertionError(f"{rel} imports {full}")


def test_runtime_import_is_light():
    code = ("import sys, edgekit.runtime, edgekit.bundle, edgekit.errors; "
            "bad = [m for m in ('tensorflow', 'onnxruntime', 'onnx', 'ai_edge_litert', 'paramiko', 'click') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
