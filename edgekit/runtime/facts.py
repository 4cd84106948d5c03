"""What this machine can run: backends and versions, plus the measuring conditions."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any, Dict

from edgekit.runtime.cpuid import cpu_flags

_PROBES = (
    ("litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow", "tensorflow"),
    ("onnxruntime", "onnxruntime", "onnxruntime"),
    ("openvino", "openvino", "openvino"),
)

# which model formats each backend runs
FORMATS = {"litert": "tflite", "tflite-runtime": "tflite", "tensorflow": "tflite",
           "onnxruntime": "onnx", "openvino": "onnx"}


def dist_version(dist: str) -> str:
    """The installed version of `dist`, or of its -cpu / -gpu build (tensorflow-cpu, onnxruntime-gpu)."""
    from importlib.metadata import PackageNotFoundError, version

    for d in (dist, dist + "-cpu", dist + "-gpu"):
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return "unknown"


def backends() -> Dict[str, Any]:
    """Backend -> {'version', 'providers'} for each importable one; failures named, not raised."""
    found: Dict[str, Any] = {}
    for name, mod, dist in _PROBES:
        try:
            m = importlib.import_module(mod)
        except Exception as e:
            found[name] = {"available": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
            continue
        entry: Dict[str, Any] = {"available": True, "version": dist_version(dist)}
        if name == "onnxruntime":
            entry["providers"] = list(m.get_available_providers())
        elif name == "openvino":
            try:
                entry["providers"] = list(m.Core().available_devices)
            except RuntimeError as e:  # installed, but no device plugin loads
                entry.update(available=False, error=f"RuntimeError: {e}".splitlines()[0])
        entry["format"] = FORMATS[name]
        found[name] = entry
    return found


def installed_backends() -> Dict[str, Any]:
    """Which backends are installed, without importing them (cheap: used on every deploy).
    A broken install still shows up later, when the health check loads the model."""
    from importlib.util import find_spec

    found: Dict[str, Any] = {}
    for name, mod, dist in _PROBES:
        try:
            spec = find_spec(mod.split(".")[0]) and find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        found[name] = ({"available": True, "version": dist_version(dist), "format": FORMATS[name]} if spec
                       else {"available": False, "error": f"{mod} is not installed"})
    return found


def device_facts() -> Dict[str, Any]:
    from edgekit.runtime.bench import conditions

    cond = conditions()
    mem_kb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
    except OSError:
        pass
    flags = sorted(cpu_flags())
    return {
        "arch": platform.machine(),
        "cpu_model": cond["cpu_model"],
        "cpu_features": flags,
        "cores": cond["cpu_count"],
        "memory_mb": mem_kb // 1024 if mem_kb else None,
        "os": cond.get("os"),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": cond["numpy"],
        "board": cond["board"],
        "l4t": cond["l4t"],
        "backends": backends(),
        "conditions": cond,
    }
