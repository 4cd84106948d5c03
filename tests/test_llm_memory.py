"""Memory of a language model on the device (issue 21's goal: peak RSS during generation <= 1.3 x (model bytes +
KV cache at the context used)): the readings edgekit.runtime.llmopts takes (high-water mark reset, resident
memory by kind of mapping, the libraries' fixed cost), glibc malloc's fixed thresholds (freed large blocks go
back to the OS), and LanguageModel.benchmark() reporting the generation's peak apart from the load's."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from tinylm import tiny_int4_avx2, tiny_lm  # noqa: F401  (the session fixtures)

from edgekit.runtime.llmopts import library_rss_mb, memory_breakdown, reset_peak_rss, rss_mb

LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/self/smaps")
pytestmark = pytest.mark.skipif(not LINUX, reason="the readings are Linux's /proc (elsewhere they are None)")


def test_peak_reset_and_breakdown_by_mapping(tmp_path):
    spike = np.ones(200 * 2**20 // 8)          # 200 MiB touched, then freed: the high-water mark keeps it
    del spike
    before = rss_mb()
    assert before["peak_rss_mb"] > before["rss_mb"] + 150
    assert reset_peak_rss() is True
    after = rss_mb()
    assert after["peak_rss_mb"] < before["peak_rss_mb"] - 150 and after["peak_rss_mb"] >= after["rss_mb"] - 1

    # a mapped model file counts as model_files, not as the heap; the categories add up to VmRSS
    data = tmp_path / "model.onnx.data"
    data.write_bytes(os.urandom(1 << 20) * 32)
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        base = memory_breakdown()
        touched = sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))   # fault every page in
        got = memory_breakdown()
        rss = rss_mb()["rss_mb"]
    assert touched >= 0
    assert got["model_files"] - base["model_files"] >= 31
    assert got["anon"] - base["anon"] < 8
    assert abs(got["total"] - rss) < 0.03 * rss + 2


def test_model_pages_go_back_to_the_kernel_and_fault_back_intact(tmp_path, monkeypatch):
    from edgekit.runtime.llmopts import release_model_pages

    model, other = tmp_path / "model", tmp_path / "elsewhere"
    model.mkdir()
    other.mkdir()
    payload = os.urandom(1 << 20) * 24
    for d in (model, other):
        (d / "model.onnx.data").write_bytes(payload)
    with open(model / "model.onnx.data", "rb") as f, open(other / "model.onnx.data", "rb") as g, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, \
            mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as o:
        for x in (m, o):
            sum(x[i] for i in range(0, len(x), mmap.PAGESIZE))        # both files resident: 48 MiB
        held = memory_breakdown()["model_files"]
        assert held >= 46
        monkeypatch.setenv("EDGEKIT_MODEL_PAGEOUT", "0")
        assert release_model_pages(model) == {"applied": False, "mappings": 0, "released_mb": 0.0,
                                              "why": "EDGEKIT_MODEL_PAGEOUT=0"}
        monkeypatch.delenv("EDGEKIT_MODEL_PAGEOUT")
        got = release_model_pages(model)
        if not got["applied"] and "MADV_PAGEOUT" in got.get("why", ""):
            pytest.skip(got["why"])                                    # a kernel older than 5.4
        assert got["applied"] and got["mappings"] == 1 and got["released_mb"] >= 20
        left = memory_breakdown()["model_files"]
        assert 22 <= left <= held - 20                                 # the other folder's file stays resident
        assert bytes(m[:]) == payload                                  # faults back in, unchanged
    assert release_model_pages(tmp_path / "nothing-mapped")["why"] == "no mapped model data"


def test_library_cost_is_a_fresh_interpreter_after_import():
    libs = library_rss_mb()
    assert 5 < libs["python_mb"] < libs["numpy_mb"] <= libs["libs_mb"] < 500
    assert library_rss_mb() == libs          # measured once per process


# a process that loads and frees as ONNX Runtime does: a large load-time buffer, then per generation
# blocks of a few MiB with small long-lived allocations between them (the KV cache, the logits, the
# generator's own state); what does it still hold, beyond the small blocks it keeps, once the big ones are freed?
_FRAGMENT = textwrap.dedent("""
    import ctypes, json, sys
    from edgekit.runtime.llmopts import rss_mb, tune_malloc
    state = tune_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def block(n):
        p = libc.malloc(n)
        libc.memset(p, 1, n)
        return p
    libc.free(block(30 << 20))          # load: one 30 MiB buffer, freed
    base = rss_mb()["rss_mb"]
    keep = []
    for gen in range(3):
        big = []
        for i in range(20):
            big.append(block(3 << 20))
            keep.append(block(256 << 10))   # smaller and long-lived, between the blocks
        for p in big:
            libc.free(p)
    kept_mb = len(keep) * 256 / 1024
    print(json.dumps({"state": state, "held_mb": rss_mb()["rss_mb"] - base - kept_mb}))
""")


def _fragment(tune: str) -> dict:
    env = dict(os.environ, EDGEKIT_MALLOC_TUNE=tune, PYTHONPATH=str(ROOT))   # this checkout's edgekit
    p = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_memory_available_is_the_cgroups_where_it_allows_less(fake_cgroup):
    """mem_available_mb: MemAvailable, or what this process's memory cgroup still allows where that is less (v2
    memory.max - memory.current; v1 limit_in_bytes - usage_in_bytes; a container sees its cgroup at the root);
    no limit ("max", v1's huge number): MemAvailable."""
    import edgekit.runtime.llmopts as opts

    machine = opts.mem_available_mb()
    proc, root, files = fake_cgroup
    proc.write_text("0::/app.slice/svc\n")
    files(root / "app.slice" / "svc", memory_max=str(300 << 20), memory_current=str(100 << 20))
    assert opts._cgroup_room_mb() == 200.0 and opts.mem_available_mb() == min(machine, 200.0)
    # the inactive file pages it counts are the kernel's to reclaim: room
    (root / "app.slice" / "svc" / "memory.stat").write_text(f"anon {60 << 20}\ninactive_file {40 << 20}\n")
    assert opts._cgroup_room_mb() == 240.0
    files(root / "app.slice" / "svc", memory_max="max")
    assert opts._cgroup_room_mb() is None
    files(root / "app.slice", memory_max=str(1 << 30), memory_current=str(900 << 20))   # the slice's limit
    assert opts._cgroup_room_mb() == 124.0
    files(root / "app.slice" / "svc", memory_max=str(50 << 20))         # the least of the levels; never below 0
    assert opts._cgroup_room_mb() == 0.0
    for f in ("memory.max", "memory.current", "memory.stat"):
        for d in (root / "app.slice", root / "app.slice" / "svc"):
            (d / f).unlink(missing_ok=True)
    proc.write_text("4:memory:/docker/abc\n0::/\n")                 # v1, the container's own cgroup at the root
    files(root / "memory", memory_limit_in_bytes=str(512 << 20), memory_usage_in_bytes=str(500 << 20))
    assert opts._cgroup_room_mb() == 12.0
    (root / "memory" / "memory.stat").write_text(f"cache {30 << 20}\ntotal_inactive_file {20 << 20}\n")
    assert opts._cgroup_room_mb() == 32.0
    files(root / "memory", memory_limit_in_bytes=str(9223372036854771712))
    assert opts._cgroup_room_mb() is None


def test_fixed_malloc_thresholds_give_freed_blocks_back():
    tuned, untuned = _fragment("1"), _fragment("0")
    if not tuned["state"]["applied"] and "no glibc" in tuned["state"].get("why", ""):
        pytest.skip(tuned["state"]["why"])
    assert tuned["state"]["applied"] and tuned["state"]["mmap_threshold"] == 1 << 20
    assert untuned["state"] == {"applied": False, "why": "EDGEKIT_MALLOC_TUNE=0"}
    # glibc's own thresholds grew past the 30 MiB buffer: the 3 MiB blocks came from the heap and stayed
    assert untuned["held_mb"] > 40, untuned
    # fixed: each block was its own mapping, unmapped on free
    assert tuned["held_mb"] < 8, tuned


_TRIM = r"""
import ctypes, json
from edgekit.runtime.llmopts import trim_heap, tune_malloc
tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = []
for _ in range(800):                         # 800 x 64 KiB from the heap (below the 1 MiB mmap threshold), touched
    p = libc.malloc(64 << 10)
    ctypes.memset(p, 1, 64 << 10)
    blocks.append(p)
for p in blocks[:-1]:                        # freed below the last block: no trim threshold reaches them
    libc.free(p)
print(json.dumps(trim_heap()))
"""


def test_trim_heap_hands_freed_heap_pages_back():
    """What a tokenizer's parse leaves (freed blocks below the heap's top) goes back with llmopts.trim_heap."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EDGEKIT_MALLOC_TUNE", None)
    p = subprocess.run([sys.executable, "-c", _TRIM], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    if not got["applied"] and "no glibc" in got.get("why", ""):
        pytest.skip(got["why"])                                        # musl and other C libraries
    assert got["released_mb"] > 40, got      # ~50 MiB freed, all but the pages glibc keeps for its chunk headers
    env["EDGEKIT_MALLOC_TUNE"] = "0"
    p = subprocess.run([sys.executable, "-c", _TRIM], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"applied": False, "released_mb": 0.0,
                                                             "why": "EDGEKIT_MALLOC_TUNE=0"}


_HUGE = r"""
import json, mmap
from edgekit.runtime.llmopts import huge_pages
m = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # as malloc maps prepacked weights
m.write(b"x" * (32 << 20))
print(json.dumps(huge_pages()))
"""


def test_huge_pages_advises_large_anonymous_mappings():
    """llmopts.huge_pages: large anonymous mappings get MADV_HUGEPAGE (and MADV_COLLAPSE where the kernel has it);
    EDGEKIT_HUGEPAGES=0 leaves them."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _HUGE], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    if not got["applied"] and "transparent huge pages" in got.get("why", ""):
        pytest.skip(got["why"])
    assert got["applied"] and got["regions"] >= 1 and got["mb"] >= 30, got   # the 32 MiB mapping, 2 MiB-aligned
    if got["collapsed"]:
        assert got["anon_huge_mb"] >= 2, got
    env["EDGEKIT_HUGEPAGES"] = "0"
    p = subprocess.run([sys.executable, "-c", _HUGE], capture_output=True, text=True, env=env, timeout=60)
    off = json.loads(p.stdout.strip().splitlines()[-1])
    assert off["applied"] is False and off["why"] == "EDGEKIT_HUGEPAGES=0" and off["regions"] == 0


@pytest.fixture(scope="module")
def bundle(tiny_int4_avx2):  # noqa: F811
    return tiny_int4_avx2


def test_benchmark_reports_the_generation_peak_apart_from_the_load(bundle):
    from edgekit.runtime import load
    from edgekit.runtime.llmopts import malloc_tuning

    lm = load(bundle, threads=1)
    # the load raised RSS, less what its heap trim handed back (this process's earlier garbage included)
    trim = lm.heap_trim
    assert trim["applied"] is True and trim["released_mb"] >= 0
    assert lm.rss_before_load_mb < lm.rss_after_load_mb + trim["released_mb"]
    assert lm.peak_rss_load_mb is None or lm.peak_rss_load_mb >= lm.rss_after_load_mb
    assert malloc_tuning()["applied"] is True            # load_llm fixed the thresholds (glibc here)
    spike = np.ones(300 * 2**20 // 8)                    # after the load, before the benchmark
    del spike
    r = lm.benchmark(prompt_tokens=40, new_tokens=24, runs=2, warmup=1)
    gen, libs, bound = r["peak_rss_generation_mb"], r["rss_libraries_mb"], r["memory_bound_mb"]
    # the generations' peak is measured from the reset: the 300 MiB before it is not in it ...
    assert r["rss_mb"] <= gen < r["rss_after_load_mb"] + 200
    # ... but the process's own high-water mark keeps it, reported as peak_rss_mb
    assert r["peak_rss_mb"] > gen + 250
    assert bound * 2**20 == r["model_bytes"] + r["kv_bytes_per_token"] * 64
    assert r["peak_rss_generation_ratio"] == pytest.approx(gen / bound)
    assert r["peak_rss_generation_ratio_over_libs"] == pytest.approx((gen - libs) / bound)
    assert 5 < libs < gen
    if r["peak_rss_load_mb"] is not None:
        assert r["peak_rss_load_ratio"] == pytest.approx(r["peak_rss_load_mb"] / bound)
    held = r["memory_held"]["breakdown"]
    assert held["libraries"] > 10 and held["total"] == pytest.approx(r["memory_held"]["rss_mb"], rel=0.05)
    mem = r["conditions"]["memory"]
    assert "reset after load" in mem["generation_peak"] and mem["malloc"]["applied"] is True
    assert mem["model_pages"]["applied"] is True and mem["model_pages"]["mappings"] >= 1   # ORT mapped the data
    assert mem["heap_trim"] == trim and mem["huge_pages"] == lm.huge_pages
    from edgekit.runtime.llmbench import llm_bench_table
    table = llm_bench_table([r])
    assert "generation peak" in table and "libraries alone" in table
