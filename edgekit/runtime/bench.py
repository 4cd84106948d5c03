"""The latency method (DESIGN.md), the same everywhere: locally, on a device, in benchmarks.

Load time and first inference apart; warm-up runs discarded; timed runs with a
monotonic nanosecond clock around the inference call alone, and an end-to-end
figure (quantize input, run, dequantize output) beside it; count, mean, std,
CV, min, p50, p90, p99, max, throughput; raw samples kept; the conditions
recorded; a noisy run flagged.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

NOISY_CV = 0.10          # coefficient of variation above which a run is flagged
NOISY_TAIL = 3.0         # p99 / p50 above which a run is flagged


def stats(samples_ns: List[int]) -> Dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if a.size == 0:
        return {"count": 0}
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {"count": int(a.size), "mean_ms": mean, "std_ms": std,
            "cv": std / mean if mean > 0 else 0.0, "min_ms": float(a.min()),
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": float(a.max()),
            "throughput_per_s": 1000.0 / mean if mean > 0 else 0.0}


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace").strip("\x00 \n")
    except OSError:
        return None


def cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in info.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    dt = _read("/proc/device-tree/model")
    if dt:
        return dt
    parts = {}
    for line in info.splitlines():  # ARM: decode the implementer/part pair
        if ":" in line:
            k, v = (s.strip() for s in line.split(":", 1))
            parts.setdefault(k, v)
    arm = {"0xd03": "Cortex-A53", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
           "0xd0b": "Cortex-A76", "0xd42": "Cortex-A78AE"}
    if parts.get("CPU part") in arm:
        return arm[parts["CPU part"]]
    return platform.processor() or platform.machine()


def conditions() -> Dict[str, Any]:
    """What was true of the machine while measuring (what it exposes, None where it does not)."""
    c: Dict[str, Any] = {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "system": platform.system(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "cpu_mhz": None,
        "temperature_c": None,
        "throttled": None,
        "board": _read("/proc/device-tree/model"),
        "l4t": None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    freq = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    if freq and freq.isdigit():
        c["cpu_mhz"] = int(freq) / 1000
    temps = []
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        t = _read(str(zone))
        if t and t.lstrip("-").isdigit():
            temps.append(int(t) / 1000)
    if temps:
        c["temperature_c"] = max(temps)
    osr = _read("/etc/os-release") or ""
    for line in osr.splitlines():
        if line.startswith("PRETTY_NAME="):
            c["os"] = line.split("=", 1)[1].strip('"')
    tegra = _read("/etc/nv_tegra_release")
    if tegra:
        c["l4t"] = tegra.splitlines()[0]
    vcgencmd = shutil.which("vcgencmd")
    if vcgencmd:  # Raspberry Pi firmware: under-voltage / throttling flags
        try:
            out = subprocess.run([vcgencmd, "get_throttled"], capture_output=True, text=True,
                                 timeout=2).stdout.strip()
            c["throttled"] = out.split("=", 1)[-1] if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    return c


def _cpu_budget() -> Dict[str, Any]:
    from edgekit.runtime.threads import cpu_budget

    b = cpu_budget()
    return {"cpus_affinity": b["affinity"], "cgroup_cpu_limit": b["cgroup_cpu_limit"],
            "cpus_usable": b["usable"]}


def noise_reasons(lat: Dict[str, float], cond: Dict[str, Any]) -> List[str]:
    reasons = []
    if lat.get("count", 0) < 10:
        reasons.append(f"only {lat.get('count', 0)} timed runs")
    if lat.get("cv", 0) > NOISY_CV:
        reasons.append(f"coefficient of variation {lat['cv']:.2f} > {NOISY_CV}")
    if lat.get("p50_ms") and lat.get("p99_ms", 0) / lat["p50_ms"] > NOISY_TAIL:
        reasons.append(f"p99 is {lat['p99_ms'] / lat['p50_ms']:.1f}x p50")
    load, cores = cond.get("loadavg"), cond.get("cpu_count") or 1
    if load and load[0] > 0.75 * cores:
        reasons.append(f"load average {load[0]:.2f} on {cores} cores")
    used, usable = cond.get("threads"), cond.get("cpus_usable")
    if used and usable and used > usable:
        reasons.append(f"{used} threads on {usable} usable CPUs")
    if cond.get("governor") not in (None, "performance"):
        reasons.append(f"cpufreq governor is '{cond['governor']}', not 'performance'")
    if cond.get("throttled") not in (None, "0x0"):
        reasons.append(f"firmware reports throttling ({cond['throttled']})")
    return reasons


def benchmark(model, runs: int = 200, warmup: int = 20, inputs=None,
              end_to_end: bool = True) -> Dict[str, Any]:
    if runs < 1 or warmup < 0:
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"runs must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    xs = [np.asarray(a) for a in (inputs if inputs is not None else model.example_inputs())]
    feeds = [np.ascontiguousarray(s.quantize(a)) for s, a in zip(model.inputs, xs)]
    impl = model._impl
    clock = time.perf_counter_ns  # monotonic, nanoseconds

    first = model.first_inference_ms
    if first is None:
        model._run_raw(feeds)
        first = model.first_inference_ms
    for _ in range(warmup):
        impl.set_inputs(feeds)
        impl.invoke()

    # Inference call alone: inputs are already in place (set once, as an app
    # reusing its input buffer would); only invoke() is inside the clock.
    impl.set_inputs(feeds)
    samples: List[int] = []
    for _ in range(runs):
        t0 = clock()
        impl.invoke()
        samples.append(clock() - t0)

    e2e: List[int] = []
    if end_to_end:
        for _ in range(runs):
            t0 = clock()
            model.run(*xs)
            e2e.append(clock() - t0)

    lat = stats(samples)
    cond = conditions()
    cond.update(threads_requested=getattr(model, "threads_requested", None), threads=model.threads,
                **_cpu_budget())
    reasons = noise_reasons(lat, cond)
    return {
        "model": str(model.path),
        "bundle": (model.manifest or {}).get("name"),
        "target": ((model.manifest or {}).get("target") or {}).get("name"),
        "format": model.format,
        "backend": model.backend,
        "backend_version": model.backend_version,
        "threads": model.threads,
        "threads_requested": getattr(model, "threads_requested", None),
        "threads_chosen_by": getattr(model, "threads_chosen_by", None),   # argument, manifest, probe, cache...
        "threads_choice": getattr(model, "threads_choice", None),         # the measured choice and its figures
        "providers": model.providers,
        "backend_preferred": getattr(model, "backend_preferred", None),   # the manifest's runtime.backend
        "backend_chosen_by": getattr(model, "backend_chosen_by", "default"),
        "backend_note": getattr(model, "backend_note", None),             # why the preferred one is not used
        "inputs": [s.to_dict() for s in model.inputs],
        "load_ms": model.load_ms,
        "first_inference_ms": first,
        "warmup": warmup,
        "runs": runs,
        "latency": lat,
        "end_to_end": stats(e2e) if e2e else None,
        "samples_ns": samples,
        "end_to_end_samples_ns": e2e,
        "conditions": cond,
        "noisy": bool(reasons),
        "noise_reasons": reasons,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
