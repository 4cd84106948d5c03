"""Threads that fit the machine: affinity (taskset) and cgroup CPU quotas clamp a profile's
thread count; an explicit request is honoured; reports record both."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_quota_from_the_process_cgroups(fake_cgroup, monkeypatch):
    """With no file named: the tightest quota from the process's folder up to the root, v2's cpu.max and v1's
    cfs_quota_us / cfs_period_us (a joint cpu,cpuacct mount in either order); where the process's folder is not
    under the mount (a container's own cgroup is the root), the root's; none from a path outside the process's
    cgroup namespace ("..")."""
    monkeypatch.delenv(th.CPU_MAX_ENV, raising=False)
    proc, root, put = fake_cgroup
    proc.write_text("0::/a.slice/svc\n")
    put(root / "a.slice" / "svc", cpu_max="max 100000")
    assert th.cgroup_cpu_limit() is None
    put(root / "a.slice", cpu_max="250000 100000")        # the slice's quota
    assert th.cgroup_cpu_limit() == 2.5
    put(root / "a.slice" / "svc", cpu_max="150000 100000")  # the tightest level
    assert th.cgroup_cpu_limit() == 1.5
    proc.write_text("0::/docker/abc\n")                   # not under the mount: the root's
    put(root, cpu_max="50000 100000")
    assert th.cgroup_cpu_limit() == 0.5
    (root / "cpu.max").unlink()
    for mount in ("cpu,cpuacct", "cpuacct,cpu"):
        proc.write_text("3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
        put(root / mount / "docker" / "abc", cpu_cfs_quota_us="200000", cpu_cfs_period_us="100000")
        put(root / mount / "docker", cpu_cfs_quota_us="100000", cpu_cfs_period_us="100000")
        assert th.cgroup_cpu_limit() == 1.0, mount              # the tightest up the hierarchy
        put(root / mount / "docker" / "abc", cpu_cfs_quota_us="-1")
        assert th.cgroup_cpu_limit() == 1.0, mount              # an unlimited child under its parent's quota
        put(root / mount / "docker", cpu_cfs_quota_us="-1")
        assert th.cgroup_cpu_limit() is None, mount
        shutil.rmtree(root / mount)
    proc.write_text("3:cpu,cpuacct:/docker/abc\n")        # a container on v1: its cgroup at the mount's root
    put(root / "cpu,cpuacct", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    (root / "cpu").symlink_to("cpu,cpuacct")
    assert th.cgroup_cpu_limit() == 3.0
    proc.write_text("3:cpu,cpuacct:/../other\n")          # outside its cgroup namespace: not its limits
    assert th.cgroup_cpu_limit() is None
    proc.write_bytes(b"0::/caf\xe9\n")                     # not UTF-8: its folder is missing, the root is read
    put(root, cpu_max="50000 100000")
    assert th.cgroup_cpu_limit() == 0.5


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
    m3 = load(b.path)   # the profile's count clamped is the ceiling; below it, the count measured fastest
    assert m3.threads_requested == 4 and 1 <= m3.threads <= min(4, aff)
    assert m3.threads_chosen_by in (("profile",) if min(4, aff) == 1 else ("probe", "cache"))


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


# --- the thread count by measurement (runtime.threadprobe) --------------------------------------

def _tiny_bundle(dest, *, profile_threads=4, runtime=None):
    """A float ONNX bundle (one MatMul, built with onnx.helper) whose profile asks for 4 threads."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.bundle import write_bundle

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((2, 16)).astype(np.float32)
    spec = {"dtype": "float32", "quantization": None}
    manifest = {"name": "tiny", "target": {"name": "x86-avx2", "runtime": {"threads": profile_threads}},
                "inputs": [dict(spec, name="x", shape=[1, 16])], "outputs": [dict(spec, name="y", shape=[1, 8])],
                "runtime": runtime}
    write_bundle(dest, fmt="onnx", model_bytes=model.SerializeToString(), manifest=manifest,
                 golden={"input:x": x, "output:y": x @ w})
    return dest


def test_candidates_and_the_rule():
    from edgekit.runtime import threadprobe as tp

    assert [tp.candidates(n) for n in (1, 2, 3, 4, 6, 8)] == [
        [1], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2, 4, 6], [1, 2, 4, 8]]
    assert tp.pick({1: 1.00, 2: 0.99}) == 1            # within 2%: the fewer threads
    assert tp.pick({1: 1.00, 2: 0.90, 4: 0.89}) == 2
    assert tp.pick({1: 0.94, 2: 1.00}) == 1
    assert "+6.4%" in tp.explain({1: 0.94, 2: 1.00}, 1)
    here = {"cpu_model": "Cortex-A76", "usable_cpus": 4}
    rec = {"threads": 1, "tried": [1, 2], **here}
    assert tp.from_manifest({"threads_choice": rec}, 4, here) == (1, rec)    # fewer threads won: holds on more cores
    assert tp.from_manifest({"threads_choice": dict(rec, threads=2)}, 4, here) is None   # 2 won of 1, 2: 4 untried
    assert tp.from_manifest({"threads_choice": dict(rec, threads=2)}, 2, here)[0] == 2
    assert tp.from_manifest({"threads_choice": dict(rec, threads=2)}, 1, here)[0] == 1   # never above the ceiling
    assert tp.from_manifest({"threads_choice": {"threads": "two", **here}}, 2, here) is None
    assert tp.from_manifest({}, 2, here) is None


def test_a_choice_measured_on_another_kind_of_machine_is_not_applied():
    """A count timed on the build host (a loaded 2-vCPU runner chose 1 thread) holds only on a machine with the
    CPU model and usable CPUs it was measured with; elsewhere, and for a host-timed choice from before those were
    recorded, the loader probes. A choice the target device measured itself (convert --device) still holds."""
    from edgekit.runtime import threadprobe as tp

    host = {"cpu_model": "AMD EPYC 7B13", "usable_cpus": 2}
    rec = {"threads": 1, "tried": [1, 2], "where": "decode tok/s timed on this x86_64 host, 2 thread(s)", **host}
    rt = {"threads": 1, "threads_choice": rec}
    assert tp.from_manifest(rt, 2, host) == (1, rec)                                   # the same machine kind
    assert tp.from_manifest(rt, 8, dict(host, usable_cpus=8)) is None                  # an 8-core device
    assert tp.from_manifest(rt, 2, dict(host, cpu_model="Intel Xeon Gold 6248")) is None   # another CPU
    assert tp.from_manifest(rt, 2, dict(host, cpu_model=" AMD EPYC 7B13\n")) == (1, rec)
    assert tp.from_manifest({"threads_choice": dict(rec, usable_cpus="two")}, 2, host) is None
    old = {k: v for k, v in rec.items() if k not in tp.MACHINE_KEYS}                   # before the facts
    assert tp.from_manifest({"threads_choice": old}, 2, host) is None
    assert tp.from_manifest({"threads_choice": dict(old, cpu_model="AMD EPYC 7B13")}, 2, host) is None
    dev = dict(old, where="on device box (x86-avx2): probed at load on this machine (AMD EPYC 7B13)")
    assert tp.from_manifest({"threads_choice": dev}, 8, host) == (1, dev)              # measured on the device
    assert tp.from_manifest({"threads_choice": dict(dev, **host)}, 8, dict(host, usable_cpus=8)) is None
    assert tp.measured_here(tp.machine()) and set(tp.machine()) == set(tp.MACHINE_KEYS)
    assert tp.machine()["usable_cpus"] == th.usable_cpus()


def test_manifest_choice_is_loaded_and_explicit_threads_win(tmp_path, monkeypatch):
    """A bundle whose manifest records a measured choice loads with it, without probing; threads= wins."""
    from edgekit.runtime import load
    from edgekit.runtime import threadprobe as tp

    def no_probe(*a, **k):
        raise AssertionError("probed although the manifest records a measured choice")

    monkeypatch.setattr(tp, "measure", no_probe)
    monkeypatch.setenv(tp.CACHE_ENV, str(tmp_path / "cache"))
    choice = {"threads": 1, "tried": [1, 2, 4], "p50_ms": {"1": 0.1, "2": 0.12, "4": 0.2},
              "where": "timed here", "why": "1 thread: fastest", **tp.machine()}
    b = _tiny_bundle(tmp_path / "b", runtime={"threads": 1, "threads_choice": choice})
    m = load(b)
    assert (m.threads, m.threads_requested, m.threads_chosen_by) == (1, 4, "manifest")
    assert m.threads_choice["p50_ms"] == choice["p50_ms"]
    rep = m.benchmark(runs=3, warmup=1)
    assert (rep["threads"], rep["threads_chosen_by"], rep["threads_choice"]["why"]) == (1, "manifest", choice["why"])
    e = load(b, threads=2)
    assert (e.threads, e.threads_requested, e.threads_chosen_by) == (2, 2, "argument")
    assert not (tmp_path / "cache").exists()


def test_manifest_choice_from_another_machine_is_probed_instead(tmp_path, monkeypatch):
    """Through load(): a choice recorded with another CPU model, or another usable-CPU count, or none (an older
    manifest timed on the build host) is not taken; the load goes on as with no choice (here, probing off: the
    profile's count clamped to the usable CPUs)."""
    from edgekit.runtime import load
    from edgekit.runtime import threadprobe as tp

    monkeypatch.setenv(tp.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(tp.PROBE_ENV, "0")
    ceiling = th.choose_threads(None, 4)
    here = tp.machine()
    base = {"threads": 1, "tried": tp.candidates(ceiling), "where": "timed here", "why": "1 thread: fastest"}
    for i, choice in enumerate([{**base, **here, "cpu_model": "another CPU"},
                                {**base, **here, "usable_cpus": here["usable_cpus"] + 6}, base]):
        m = load(_tiny_bundle(tmp_path / f"b{i}", runtime={"threads": 1, "threads_choice": choice}))
        assert (m.threads, m.threads_chosen_by) == (ceiling, "profile"), choice
    same = load(_tiny_bundle(tmp_path / "same", runtime={"threads": 1, "threads_choice": dict(base, **here)}))
    assert (same.threads, same.threads_chosen_by) == (1, "manifest")


def test_probe_chooses_by_measurement_and_is_cached(tmp_path, monkeypatch):
    """No measured choice in the manifest: load() opens the model at 1, 2 ... threads up to the
    ceiling, takes the count the rule picks from the timings, and caches it in the user's cache
    directory (not the bundle, not the working directory); the next load takes it from there."""
    import numpy as np

    from edgekit.bundle import sha256_tree
    from edgekit.runtime import load
    from edgekit.runtime import threadprobe as tp

    ceiling = th.choose_threads(None, 4)
    if ceiling < 2:
        pytest.skip("one usable CPU: a single candidate, nothing to probe")
    tried = tp.candidates(ceiling)
    b = _tiny_bundle(tmp_path / "b")
    before = sha256_tree(b)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv(tp.CACHE_ENV, str(tmp_path / "cache"))
    real_measure = tp.measure
    seen = {}

    def fake(fns, per_call_ms, **kw):   # the timings a machine might give: 2 threads 10% faster
        seen["fns"] = sorted(fns)
        real_measure(fns, per_call_ms, budget_s=0.05)   # every instance runs
        return {t: (1.0 if t == 1 else 0.9 + 0.001 * t) for t in fns}, 5, 3

    monkeypatch.setattr(tp, "measure", fake)
    m = load(b)
    assert seen["fns"] == tried
    assert (m.threads, m.threads_chosen_by) == (2, "probe")
    rec = m.threads_choice
    assert rec["tried"] == tried and rec["threads"] == 2 and set(rec["p50_ms"]) == {str(t) for t in tried}
    assert "2 threads" in rec["why"] and rec["probe_ms"] > 0 and m.first_inference_ms > 0
    cached = Path(rec["cache"])
    assert cached.parent.parent == tmp_path / "cache" and json.loads(cached.read_text())["threads"] == 2
    np.testing.assert_allclose(m(np.ones((1, 16), np.float32)).shape, (1, 8))
    assert sha256_tree(b) == before and list(cwd.iterdir()) == []

    def no_probe(*a, **k):
        raise AssertionError("probed again although the result is cached")

    monkeypatch.setattr(tp, "measure", no_probe)
    again = load(b, verify=False)
    assert (again.threads, again.threads_chosen_by, again.threads_choice["why"]) == (2, "cache", rec["why"])
    assert load(b, threads=1).threads == 1                      # an explicit count wins over the cache

    cached.write_text("{not json")                               # a damaged cache entry: probed again
    monkeypatch.setattr(tp, "measure", lambda fns, per_call_ms, **kw: ({t: 1.0 for t in fns}, 5, 3))
    m = load(b)
    assert (m.threads, m.threads_chosen_by) == (1, "probe")      # all alike: the fewest threads
    assert json.loads(cached.read_text())["threads"] == 1

    monkeypatch.setenv(tp.CACHE_ENV, str(tmp_path / "cache2"))
    monkeypatch.setattr(tp, "measure", no_probe)
    monkeypatch.setenv(tp.PROBE_ENV, "0")                        # probing off: the ceiling
    off = load(b)
    assert (off.threads, off.threads_chosen_by) == (ceiling, "profile") and "not probed" in off.threads_choice["why"]
    monkeypatch.delenv(tp.PROBE_ENV)
    monkeypatch.setattr(tp, "PROBE_MAX_MS", 0.0)                 # a model too slow to probe cheaply
    slow = load(b)
    assert (slow.threads, slow.threads_chosen_by) == (ceiling, "profile") and slow.threads_choice["skipped"]
    assert load(b).threads_chosen_by == "cache"                  # the skip is remembered too


def test_probe_measures_for_real(tmp_path, monkeypatch):
    """The real timing path: every candidate timed, the rule's pick of those timings loaded."""
    from edgekit.runtime import load
    from edgekit.runtime import threadprobe as tp

    ceiling = th.choose_threads(None, 4)
    if ceiling < 2:
        pytest.skip("one usable CPU: a single candidate, nothing to probe")
    monkeypatch.setenv(tp.CACHE_ENV, str(tmp_path / "cache"))
    m = load(_tiny_bundle(tmp_path / "b"))
    rec = m.threads_choice
    p50 = {int(t): v for t, v in rec["p50_ms"].items()}
    assert sorted(p50) == tp.candidates(ceiling) and all(v > 0 for v in p50.values())
    assert m.threads == rec["threads"] == tp.pick(p50) and m.threads_chosen_by == "probe"
    assert rec["rounds"] >= tp.MIN_ROUNDS and rec["runs_per_round"] >= tp.MIN_RUNS
