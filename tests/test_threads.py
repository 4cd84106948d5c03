"""Threads that fit the machine: affinity (taskset) and cgroup CPU quotas clamp a profile's
thread count; an explicit request is honoured; reports record both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, bundle_of
from edgekit.errors import EdgekitError
from edgekit.runtime import threads as th


@pytest.mark.parametrize("text,cpus", [("150000 100000", 1.5), ("max 100000", None), ("max", None),
                                       ("50000 100000\n", 0.5), ("400000 100000", 4.0), ("200000", 2.0)])
def test_parse_cpu_max(text, cpus):
    assert th.parse_cpu_max(text) == cpus


@pytest.mark.parametrize("text", ["", "lots 100000", "0 100000", "1 2 3"])
def test_parse_cpu_max_rejects(text):
    with pytest.raises(ValueError):
        th.parse_cpu_max(text)


def _quota(tmp_path, text):
    f = tmp_path / "cpu.max"
    f.write_text(text)
    return str(f)


def test_quota_file_clamps(tmp_path):
    aff = len(os.sched_getaffinity(0))
    # 1.5 CPUs -> 1 thread (rounded down: a second thread on half a CPU gets throttled)
    assert th.usable_cpus(_quota(tmp_path, "150000 100000\n")) == 1
    assert th.usable_cpus(_quota(tmp_path, "50000 100000")) == 1  # at least one
    assert th.usable_cpus(_quota(tmp_path, "max 100000")) == aff  # no limit
    assert th.usable_cpus(_quota(tmp_path, "6400000 100000")) == aff  # affinity is tighter
    q = _quota(tmp_path, "150000 100000")
    assert th.choose_threads(None, 4, q) == 1
    assert th.choose_threads(3, 4, q) == 3  # explicit: as asked
    assert th.choose_threads(None, None, q) == 1  # a bare model file: the usable CPUs
    assert th.cpu_budget(q) == {"affinity": aff, "cgroup_cpu_limit": 1.5, "usable": 1}


def test_quota_file_named_but_wrong(tmp_path, monkeypatch):
    with pytest.raises(EdgekitError, match="cpu.max"):
        th.usable_cpus(_quota(tmp_path, "lots of cpus"))
    monkeypatch.setenv(th.CPU_MAX_ENV, str(tmp_path / "missing"))
    with pytest.raises(EdgekitError, match="missing"):
        th.usable_cpus()
    with pytest.raises(EdgekitError, match="at least 1"):
        th.choose_threads(0, 4)


def test_quota_env_clamps_bundle(digits_build, tmp_path, monkeypatch):
    """A cgroup-style quota read from the file EDGEKIT_CGROUP_CPU_MAX names: the x86-avx2 profile's
    4 threads become 1; the Model and the benchmark report record asked and used."""
    from edgekit.runtime import load

    b = bundle_of(digits_build, "x86-avx2", "onnx")
    monkeypatch.setenv(th.CPU_MAX_ENV, _quota(tmp_path, "150000 100000"))
    m = load(b.path)
    assert (m.threads_requested, m.threads) == (4, 1)
    rep = m.benchmark(runs=3, warmup=1)
    assert (rep["threads_requested"], rep["threads"]) == (4, 1)
    c = rep["conditions"]
    assert (c["threads_requested"], c["threads"], c["cgroup_cpu_limit"], c["cpus_usable"]) == (4, 1, 1.5, 1)
    m2 = load(b.path, threads=2)  # explicit: honoured even above the quota, and flagged
    assert (m2.threads_requested, m2.threads) == (2, 2)
    assert any("2 threads on 1 usable" in r for r in m2.benchmark(runs=3, warmup=1)["noise_reasons"])
    monkeypatch.setenv(th.CPU_MAX_ENV, _quota(tmp_path, "max 100000"))
    aff = len(os.sched_getaffinity(0))
    assert load(b.path).threads == min(4, aff)


_PROBE = """
import json, sys
from edgekit.runtime import load
out = {}
for fmt_path in sys.argv[1:]:
    m = load(fmt_path)
    e = load(fmt_path, threads=3)
    out[fmt_path] = [m.threads_requested, m.threads, e.threads_requested, e.threads, m.backend]
print(json.dumps(out))
"""


def test_taskset_clamps_to_one_cpu(digits_build):
    """Under `taskset -c 0` the profile's 4 threads become 1 (TFLite and ONNX bundles);
    an explicit threads=3 stays 3."""
    paths = [str(bundle_of(digits_build, "rpi4", "tflite").path),
             str(bundle_of(digits_build, "x86-avx2", "onnx").path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(th.CPU_MAX_ENV, None)
    p = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", _PROBE, *paths],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got[paths[0]][:4] == [4, 1, 3, 3]
    assert got[paths[1]][:4] == [4, 1, 3, 3]
    assert got[paths[1]][4] == "onnxruntime"
