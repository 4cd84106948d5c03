"""Generation options, stop-string hold-back, memory readings and golden-check thresholds of language models.

A leaf of edgekit.runtime (stdlib + numpy only): edgekit.runtime.llm, its benchmark and health check, and the
continuous-batching engine all take them from here, so none of those modules imports another in a circle.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from edgekit.errors import DataError
from edgekit.runtime.cgroup import cgroup_folders

MIN_TOP1 = 0.90      # teacher-forced top-1 agreement with the converting machine (INT4 rounds differently per ISA)
MIN_SNR_DB = 20.0    # logit SNR on the golden top-k logits


class GenOptions:
    """Validated generation options (one place checks them)."""

    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty")

    def __init__(self, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
                 repetition_penalty: float = 1.0):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise DataError(f"max_new_tokens must be an integer >= 1 (got {max_new_tokens!r})")
        if not _finite(temperature) or temperature < 0:
            raise DataError(f"temperature must be a finite number >= 0 (got {temperature!r}; 0 is greedy)")
        if top_p is None or not 0.0 < top_p <= 1.0:
            raise DataError(f"top_p must be in (0, 1] (got {top_p!r})")
        if top_k is None or top_k < 0:
            raise DataError(f"top_k must be >= 0 (got {top_k!r}; 0 is no limit)")
        if not _finite(repetition_penalty) or repetition_penalty <= 0:
            raise DataError(f"repetition_penalty must be a finite number > 0 (got {repetition_penalty!r})")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            # ONNX Runtime GenAI keeps random_seed as a 32-bit int
            raise DataError(f"seed must be an integer in [0, 2**31) (got {seed!r})")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise DataError(f"stop strings must be non-empty strings (got {stop!r})")
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, float(temperature), \
            float(top_p), int(top_k)
        self.seed, self.stop, self.repetition_penalty = seed, stops, float(repetition_penalty)

    def search(self) -> Dict[str, Any]:
        """The sampling part as ONNX Runtime GenAI search options (max_length is added by the caller)."""
        o: Dict[str, Any] = {"num_beams": 1, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0.0:
            o.update(do_sample=False)
        else:
            o.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
            if self.seed is not None:
                o["random_seed"] = self.seed
        return o


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def hold_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may begin a stop string (kept until the next piece decides)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


def rss_mb() -> Dict[str, Optional[float]]:
    """This process's resident memory now and at its peak (VmRSS, VmHWM), MiB; None where not exposed."""
    out: Dict[str, Optional[float]] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _cgroup_level_room(base: str, files: Sequence[str], cache: str) -> Optional[float]:
    """Bytes one cgroup folder still allows (its limit less its usage less the inactive file pages it counts),
    None where it sets no limit or cannot be read."""
    try:
        with open(os.path.join(base, files[0])) as f:
            limit = f.read().strip()
        with open(os.path.join(base, files[1])) as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:   # no limit here
        return None
    try:
        with open(os.path.join(base, "memory.stat")) as f:
            current -= next((int(v) for k, v in (line.split() for line in f if line.count(" ") == 1)
                             if k == cache), 0)
    except (OSError, ValueError):
        pass   # no memory.stat: the usage as it is (the cautious side)
    return float(max(int(limit) - current, 0))


def _cgroup_room_mb() -> Optional[float]:
    """What this process's memory cgroup still allows, MiB: the least over its folder and every folder above it
    that sets a limit (a systemd slice's MemoryMax, a container's limit over the cgroup its init moved it to) of
    memory.max - memory.current (v2) or limit_in_bytes - usage_in_bytes (v1), each usage less the inactive file
    pages it counts (memory.stat inactive_file / total_inactive_file: cache the kernel reclaims first, as `docker
    stats` does); None where no level sets a limit (the machine's MemAvailable is then what counts)."""
    rooms: List[float] = []
    for version, folder in cgroup_folders("memory"):
        if version == 2:
            room = _cgroup_level_room(folder, ("memory.max", "memory.current"), "inactive_file")
        else:
            room = _cgroup_level_room(folder, ("memory.limit_in_bytes", "memory.usage_in_bytes"),
                                      "total_inactive_file")
        if room is not None:
            rooms.append(room)
    return min(rooms) / 2 ** 20 if rooms else None


def mem_available_mb() -> Optional[float]:
    """Memory available for a new allocation now, MiB: Linux's MemAvailable, or less where this process's cgroup
    allows less; the cgroup's room alone where /proc does not say; None where neither does."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 1024
                    break
    except (OSError, ValueError, IndexError):
        pass   # no MemAvailable: the cgroup's room, if any, is what is known
    known = [v for v in (avail, _cgroup_room_mb()) if v is not None]
    return min(known) if known else None


def reset_peak_rss() -> bool:
    """Reset this process's high-water mark (VmHWM) to its resident memory now, so the next rss_mb()
    peak covers only what runs after this call (Linux: "5" into /proc/self/clear_refs). False where the
    OS does not allow it (the peak then still includes everything before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# What a mapping in /proc/self/smaps holds, by the name the kernel gives it.
_MODEL_SUFFIXES = (".onnx", ".data", ".onnx_data", ".bin", ".gguf")


def memory_breakdown() -> Optional[Dict[str, float]]:
    """Resident memory now (MiB) by what holds it, from /proc/self/smaps: "anon" (heap and anonymous
    mappings: everything the process allocated, prepacked weights included), "model_files" (mapped
    model files: ONNX Runtime maps external initializers), "libraries" (shared objects' pages), "other_files",
    and "total". File-backed pages are clean copies of the page cache (the kernel can drop them under
    pressure); anonymous ones are not. None where smaps is not readable."""
    cats = {"anon": 0.0, "model_files": 0.0, "libraries": 0.0, "other_files": 0.0}
    name = ""
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if head and not head[0].endswith(":"):     # a mapping's header: range perms offset dev inode [name]
                    name = head[5].strip() if len(head) > 5 else ""
                    continue
                if line.startswith("Rss:"):
                    mb = int(line.split()[1]) / 1024
                    if not name or name.startswith("["):
                        cats["anon"] += mb
                    elif ".so" in name.rsplit("/", 1)[-1]:
                        cats["libraries"] += mb
                    elif name.endswith(_MODEL_SUFFIXES):
                        cats["model_files"] += mb
                    else:
                        cats["other_files"] += mb
    except OSError:
        return None
    cats["total"] = sum(cats.values())
    return {k: round(v, 1) for k, v in cats.items()}


_LIB_RSS: Dict[str, Optional[float]] = {}


def library_rss_mb(module: str = "onnxruntime_genai") -> Dict[str, Optional[float]]:
    """The fixed cost of the runtime's libraries, measured in a fresh interpreter of this Python: its RSS
    bare (python_mb), after `import numpy` (numpy_mb) and after `import <module>` and nothing else (libs_mb,
    the floor any process that generates pays before a model loads). Cached per process; Nones where
    the child cannot report."""
    if module in _LIB_RSS:
        return dict(_LIB_RSS[module])  # type: ignore[arg-type]
    import json
    import subprocess
    import sys

    code = ("import json\n"
            "def r():\n"
            "    for l in open('/proc/self/status'):\n"
            "        if l.startswith('VmRSS:'): return int(l.split()[1]) / 1024\n"
            "a = r()\nimport numpy\nb = r()\nimport " + module + "\nc = r()\n"
            "print(json.dumps({'python_mb': a, 'numpy_mb': b, 'libs_mb': c}))\n")
    out: Dict[str, Optional[float]] = {"python_mb": None, "numpy_mb": None, "libs_mb": None}
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if p.returncode == 0 and p.stdout.strip():
            out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    _LIB_RSS[module] = out  # type: ignore[assignment]
    return dict(out)


# glibc's malloc serves a request of at least M_MMAP_THRESHOLD with its own mmap (unmapped again on free) and
# below it from the heap, which it gives back only from the top past M_TRIM_THRESHOLD. Left alone, both
# thresholds grow to the largest block freed so far (up to 32 MiB / 64 MiB): after ONNX Runtime frees its
# load-time buffers, every later block of tens of MiB (a prompt chunk's logits, KV cache buffers) comes from
# the heap and stays there after the generator is gone, so each generation raised the process by another
# 10-25 MB (SmolLM2-135M INT4: 329 -> 342 MiB over 4 generations, INT8 315 -> 340, block-32 INT4 263 -> 288).
# Fixed thresholds keep such blocks in their own mappings, returned on free (332, 318, 264 MiB flat). load_llm
# fixes them once the model is loaded (ONNX Runtime's load-time layout unchanged; set before the load instead,
# the generation peaks were 3-5 MiB higher). Decode tok/s with and without: the same within the noise of a
# 2-core host at load 1.3-1.8 (3 A/B sessions, SmolLM2-135M INT4/INT8, 2 threads; no malloc system call
# during decode either way, strace).
MALLOC_MMAP_THRESHOLD = 1 << 20
MALLOC_TRIM_THRESHOLD = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC: Dict[str, Any] = {}


def switched_off(var: str) -> bool:
    """An EDGEKIT_* switch set to 0 / false / no / off (unset: on)."""
    import os

    return os.environ.get(var, "1").strip().lower() in ("0", "false", "no", "off")


def tune_malloc() -> Dict[str, Any]:
    """Fix glibc malloc's mmap and trim thresholds for this process (once; see above): load_llm calls it
    after the load. Process-wide and harmless to other code (it only decides where large blocks live).
    EDGEKIT_MALLOC_TUNE=0 leaves malloc alone. Returns what was done: {"applied": bool, "why"?: str,
    "mmap_threshold"?, "trim_threshold"?}."""
    if _MALLOC:
        return dict(_MALLOC)
    if switched_off("EDGEKIT_MALLOC_TUNE"):
        _MALLOC.update(applied=False, why="EDGEKIT_MALLOC_TUNE=0")
        return dict(_MALLOC)
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        glibc = version().decode()
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError) as e:   # not glibc (musl, macOS, Windows): nothing to tune
        _MALLOC.update(applied=False, why=f"no glibc malloc ({e})")
        return dict(_MALLOC)
    if ok:
        _MALLOC.update(applied=True, glibc=glibc, mmap_threshold=MALLOC_MMAP_THRESHOLD,
                       trim_threshold=MALLOC_TRIM_THRESHOLD)
    else:
        _MALLOC.update(applied=False, why=f"glibc {glibc} mallopt refused the thresholds")
    return dict(_MALLOC)


# Loading a tokenizer parses tokenizer.json into a document many times its size and frees it again; glibc keeps
# the freed pages (most of them below the heap's top, where no trim threshold reaches) until malloc_trim(0)
# hands every free page back (madvise). Measured on Gemma 3 270M (262,144-token vocabulary, 33 MB
# tokenizer.json): og.Tokenizer raised RSS by 174.6 MiB and malloc_trim(0) gave back 123.6 of it; a second
# tokenizer +193.9 MiB, 70.3 after the trim. load_llm trims once the model and its tokenizer are loaded, and
# again after making a tokenizer variant. Only free pages are returned: nothing in use moves.


def trim_heap() -> Dict[str, Any]:
    """malloc_trim(0) (see above); EDGEKIT_MALLOC_TUNE=0 leaves malloc alone. Returns {"applied": bool,
    "released_mb": RSS drop, "why"?: str}."""
    if switched_off("EDGEKIT_MALLOC_TUNE"):
        return {"applied": False, "released_mb": 0.0, "why": "EDGEKIT_MALLOC_TUNE=0"}
    before = rss_mb()["rss_mb"]
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError) as e:   # not glibc: nothing to trim
        return {"applied": False, "released_mb": 0.0, "why": f"no glibc malloc ({e})"}
    after = rss_mb()["rss_mb"]
    released = before - after if before is not None and after is not None else 0.0
    return {"applied": True, "released_mb": round(max(released, 0.0), 1)}


# Transparent huge pages for the weights. MLAS's prepacked weights (the bulk of a loaded model) live in large
# anonymous mappings on 4 KiB pages; a decode step reads all of them, so every step walks tens of thousands of
# pages through the TLB. Where the kernel's THP mode is "madvise" (Debian's and Raspberry Pi OS's default) nothing
# asks for huge pages. After the load, madvise(MADV_HUGEPAGE) then MADV_COLLAPSE (Linux >= 6.1; older kernels
# leave the collapse to khugepaged) on the anonymous read-write mappings of at least HUGE_MIN_MB: SmolLM2-135M INT4
# (pruned ladder build, x86-avx512-vnni, prompt 128 + 96, load < 1): decode 122 -> 140 tok/s at 1 thread (+15%),
# 176 MiB on huge pages, ~400 ms at load, peak RSS unchanged (257 MiB); glibc's own hugetlb tunable gave the same
# (1 thread 122-124 -> 141-143, 2 threads 174-176 -> 192-195). The heap is included: malloc placed most of the
# prepacked weights there during the load (anonymous mappings alone: 58 MiB on huge pages, decode +2-3%); it was
# trimmed just before (trim_heap), and the peak RSS did not grow.
HUGE_MIN_MB = 4
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def huge_pages() -> Dict[str, Any]:
    """Ask for transparent huge pages on this process's large anonymous mappings (see above).
    EDGEKIT_HUGEPAGES=0 leaves them. Returns {"applied": bool, "regions": n, "mb": bytes advised / MiB,
    "collapsed": regions collapsed now, "anon_huge_mb": AnonHugePages after, "ms": time taken, "why"?: str}."""
    import time

    out: Dict[str, Any] = {"applied": False, "regions": 0, "mb": 0.0, "collapsed": 0, "anon_huge_mb": 0.0, "ms": 0.0}
    if switched_off("EDGEKIT_HUGEPAGES"):
        out["why"] = "EDGEKIT_HUGEPAGES=0"
        return out
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        out["why"] = "no transparent huge pages in this kernel"
        return out
    if "[never]" in mode:
        out["why"] = "transparent huge pages are off ([never])"
        return out
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError) as e:
        out["why"] = f"no madvise ({e})"
        return out
    t0 = time.perf_counter()
    huge = 2 << 20
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError as e:
        out["why"] = f"cannot read /proc/self/maps ({e})"
        return out
    for line in lines:
        parts = line.split()
        if "w" not in parts[1] or not (len(parts) == 5 or parts[5:] == ["[heap]"]):   # anonymous or the heap
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        start, end = (lo + huge - 1) & ~(huge - 1), hi & ~(huge - 1)
        if end - start < HUGE_MIN_MB << 20:
            continue
        if madvise(start, end - start, _MADV_HUGEPAGE) != 0:
            continue
        out["regions"] += 1
        out["mb"] += (end - start) / (1 << 20)
        out["collapsed"] += madvise(start, end - start, _MADV_COLLAPSE) == 0
    out.update(applied=out["regions"] > 0, mb=round(out["mb"], 1), ms=round((time.perf_counter() - t0) * 1e3, 1))
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    out["anon_huge_mb"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if not out["applied"]:
        out["why"] = "no anonymous mapping of at least %d MiB" % HUGE_MIN_MB
    return out


# ONNX Runtime maps every external initializer of model.onnx.data (lazily); prepacking reads the MatMulNBits
# weights, scales and zero points, and keeps the scales' and zero points' pages mapped although the packed
# copies are what the kernels use from then on (SmolLM2-135M INT4: 20 MiB resident after load, 2.3 MiB of it
# touched again by generation: embedding rows, norms, rotary caches). madvise(MADV_PAGEOUT) on those mappings
# after the load gives the clean pages back; whatever a run touches again faults back in from the file (3 major
# faults in the first prefill, none while decoding). Never a data loss: PAGEOUT only reclaims, it drops no
# change. Linux >= 5.4; elsewhere nothing is done. Measured with tune_malloc, under the bench lock (2 threads,
# prompt 128/512 + 128, load 1.5-1.9: noisy), untouched -> both: generation peak INT4 (116.9 MB) 299.0 ->
# 280.2 / 329.1 -> 306.1 MiB, INT8 337.8 -> 318.3 / 374.3 -> 343.9; decode tok/s 96.0/88.3 -> 98.5/78.3 and
# 101.6/88.1 -> 103.3/93.2 (per-round spread 10-25%: the same within that noise); first TTFT +5-10 ms.
_MADV_PAGEOUT = 21
_MODEL_DATA_SUFFIXES = (".data", ".onnx_data", ".bin")


def release_model_pages(model_dir: Any) -> Dict[str, Any]:
    """Page out this process's mappings of the model's external-data files under `model_dir` (see above).
    EDGEKIT_MODEL_PAGEOUT=0 leaves them. Returns {"applied": bool, "mappings": n, "released_mb": RSS drop,
    "why"?: str}."""
    import os

    out: Dict[str, Any] = {"applied": False, "mappings": 0, "released_mb": 0.0}
    if switched_off("EDGEKIT_MODEL_PAGEOUT"):
        out["why"] = "EDGEKIT_MODEL_PAGEOUT=0"
        return out
    root = os.path.realpath(str(model_dir)) + os.sep
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6:
                    continue
                name = parts[5].strip()
                if name.startswith(root) and name.endswith(_MODEL_DATA_SUFFIXES):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((a, b - a))
    except OSError as e:
        out["why"] = f"no /proc/self/maps ({e.strerror})"
        return out
    if not spans:
        out["why"] = "no mapped model data"
        return out
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    before = rss_mb()["rss_mb"]
    for addr, size in spans:
        if madvise(addr, size, _MADV_PAGEOUT) != 0:
            err = ctypes.get_errno()
            out["why"] = f"madvise(MADV_PAGEOUT) refused ({os.strerror(err)})"
            if out["mappings"] == 0:
                return out
            break
        out["mappings"] += 1
    after = rss_mb()["rss_mb"]
    out.update(applied=True, released_mb=round(max(0.0, (before or 0) - (after or 0)), 1))
    return out


def after_load(model_dir: Any) -> Dict[str, Any]:
    """What a process does once its language model is loaded (sessions and tokenizer made), in this order:
    glibc malloc's thresholds fixed (tune_malloc: after the load, which keeps ONNX Runtime's load-time layout as it
    was), the model file's pages that only prepacking read handed back to the kernel (release_model_pages), the
    pages the tokenizer's parse and the load's buffers freed returned (trim_heap), the prepacked weights advised
    onto transparent huge pages (huge_pages: fewer TLB misses a decode step). load_llm and the serving engine's
    load_llm_release both end with it. Returns each step's record: {"malloc", "model_pages", "heap_trim",
    "huge_pages"}."""
    return {"malloc": tune_malloc(), "model_pages": release_model_pages(model_dir), "heap_trim": trim_heap(),
            "huge_pages": huge_pages()}


def malloc_tuning() -> Dict[str, Any]:
    """What tune_malloc did in this process (without doing it): its result, or applied False, why "not asked"."""
    return dict(_MALLOC) if _MALLOC else {"applied": False, "why": "not asked (no language model loaded)"}


def kv_floor(genai_config: Mapping[str, Any]) -> int:
    """The fewest positions a generator's KV cache may hold for this model: its sliding window where it has one
    (genai_config decoder.sliding_window.window_size, e.g. Gemma 3's 512), else 0. ONNX Runtime GenAI sizes the
    cache it shares between past and present by max_length, and GroupQueryAttention refuses a sliding-window
    layer whose cache is smaller than the window ("KV cache capacity (23) must be at least local_window_size
    (512)"), so a short generation gets the window's capacity and is stopped by its own token count.
    The builder also writes the window of a configuration where it windows no layer (`layers: []`: Phi-3.5-mini
    and Phi-4-mini name a 262,144 window beyond their 131,072 context): 0 there, and never more than the model's
    context_length (ONNX Runtime GenAI refuses a max_length above it)."""
    model = genai_config.get("model") or {}
    window = ((model.get("decoder") or {}).get("sliding_window") or {})
    if "layers" in window and not window["layers"]:
        return 0
    size = int(window.get("window_size") or 0)
    context = int(model.get("context_length") or 0)
    return min(size, context) if context > 0 else size


def kv_capacity(genai_config: Mapping[str, Any], max_length: int) -> int:
    """max_length for a generator that must hold `max_length` positions (see kv_floor)."""
    return max(int(max_length), kv_floor(genai_config))


def prompt_bos(manifest: Optional[Mapping[str, Any]]) -> Optional[int]:
    """The BOS id a plain prompt must start with where ONNX Runtime GenAI's tokenizer leaves it out (it ignores
    tokenizer.json's post-processor, which is where Gemma's tokenizer adds <bos>); convert records it as
    manifest llm.prompt_bos after comparing both tokenizers. None: nothing to add (or a bare folder)."""
    bos = ((manifest or {}).get("llm") or {}).get("prompt_bos")
    return int(bos) if bos is not None else None


def with_bos(ids: List[int], bos: Optional[int]) -> List[int]:
    """`ids` led by `bos` (once) where one is due."""
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


# ONNX Runtime's intra-op threads busy-wait between ops unless this config entry is "0" (ORT's default: "1")
SPIN_KEY = "session.intra_op.allow_spinning"


def spinning_of(genai_config: Dict[str, Any]) -> bool:
    """Whether the decoder's intra-op threads spin as genai_config.json has it (ORT's default: they do)."""
    so = ((genai_config.get("model") or {}).get("decoder") or {}).get("session_options") or {}
    return str(so.get(SPIN_KEY, "1")).strip() != "0"
