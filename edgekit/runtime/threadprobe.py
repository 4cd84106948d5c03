"""The thread count by measurement, where measuring is cheap (standard library and numpy).

A profile's thread count (one per core) suits a model whose operators are large enough to split
across cores. A small one (MLPerf Tiny's ResNet-8 runs in about 100 us) can lose more to waking
and joining the thread pool than the split saves: there one or two threads beat four. So when
`load()` of a bundle is not told `threads=`, the count comes, in this order, from:

1. the manifest's measured choice (`runtime.threads_choice`, written by `convert --select fastest`
   where it timed the shipped artifact on the target's ISA or on the device): taken when it was
   measured on a machine of this one's kind (the CPU model and usable CPUs it records, MACHINE_KEYS,
   are this machine's: a count timed on a loaded 2-vCPU build host says nothing of an 8-core
   device) and covers this machine (it tried up to this machine's ceiling, or fewer threads
   already won); a choice without those facts (manifests from before they were recorded) is taken
   only where the device itself measured it (convert --device: its `where` says "on device"),
   else this machine probes (step 2 or 3): a probe costs well under a second once, a wrong
   count costs every inference;
2. a probe result cached for this model file, backend, CPU and ceiling (`cache_dir()`: the user's
   cache directory, never the bundle, whose files are its release id, nor the working directory);
3. a probe: the model opened at 1, 2, 4 ... threads up to the ceiling, each timed in alternating
   rounds within BUDGET_S, then cached;
4. the ceiling itself, when a single inference takes over PROBE_MAX_MS (too slow to probe cheaply;
   such models are what the profile's count is right for) or EDGEKIT_THREAD_PROBE=0.

The ceiling is the profile's count clamped to the CPUs this process may use (runtime.threads).
The rule (`pick`): the fewest threads whose median p50 is within TOLERANCE of the fastest; the
same speed on fewer threads leaves cores to the application. The model records what was chosen,
by what, and the figures (`model.threads_chosen_by`, `model.threads_choice`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

PROBE_ENV = "EDGEKIT_THREAD_PROBE"     # "0" / "off": no probe (the ceiling, or the manifest's choice)
CACHE_ENV = "EDGEKIT_CACHE_DIR"        # where probe results are kept (default: XDG cache / ~/.cache)
TOLERANCE = 0.02                       # within 2% of the fastest counts as as fast
PROBE_MAX_MS = 50.0                    # one inference slower than this: not probed
BUDGET_S = 0.5                         # the probe's timed rounds, all candidates together
ROUNDS = 5
MIN_RUNS, MAX_RUNS = 5, 100            # per candidate per round
MIN_ROUNDS = 3
CACHE_VERSION = 1


def candidates(ceiling: int) -> List[int]:
    """1, 2, 4 ... below the ceiling, and the ceiling."""
    out, t = [], 1
    while t < ceiling:
        out.append(t)
        t *= 2
    return out + [max(1, ceiling)]


def pick(p50_ms: Mapping[int, float], tolerance: float = TOLERANCE) -> int:
    """The fewest threads whose p50 is within `tolerance` of the lowest."""
    best = min(p50_ms.values())
    return min(t for t, v in p50_ms.items() if v <= best * (1 + tolerance))


def explain(p50_ms: Mapping[int, float], chosen: int) -> str:
    """One line: the chosen count's p50 against each other count tried."""
    base = p50_ms[chosen]
    others = ", ".join(f"{p50_ms[t]:.4g} ms at {t} ({(p50_ms[t] / base - 1) * 100:+.1f}%)"
                       for t in sorted(p50_ms) if t != chosen)
    return (f"{chosen} thread{'s' if chosen > 1 else ''}: p50 {base:.4g} ms; {others}; the fewest threads "
            f"within {TOLERANCE:.0%} of the fastest")


def probe_enabled() -> bool:
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in ("0", "off", "no", "false")


MACHINE_KEYS = ("cpu_model", "usable_cpus")   # what a measured choice records of the machine it was measured on
DEVICE_WHERE = "on device "                   # how convert --device's choices begin their `where` (convert.llm)


def machine() -> Dict[str, Any]:
    """This machine as a measured thread count depends on it: the CPU model (runtime.bench.cpu_model) and the
    CPUs this process may use (runtime.threads.usable_cpus). Every measured choice records these (MACHINE_KEYS)."""
    from edgekit.runtime.bench import cpu_model
    from edgekit.runtime.threads import usable_cpus

    return {"cpu_model": cpu_model(), "usable_cpus": usable_cpus()}


def measured_here(rec: Mapping[str, Any], here: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether a recorded choice was measured on a machine of this one's kind (`here`: machine() by default).
    With MACHINE_KEYS recorded: both equal this machine's. Without (a manifest from before they were recorded):
    only a choice the target device measured itself (convert --device) holds, as it always has; one timed on
    the build host does not (it may be a loaded 2-vCPU runner, or a wider one): probing is the safe side."""
    if all(rec.get(k) is not None for k in MACHINE_KEYS):
        here = machine() if here is None else here
        try:
            return (str(rec["cpu_model"]).strip() == str(here["cpu_model"]).strip()
                    and int(rec["usable_cpus"]) == int(here["usable_cpus"]))
        except (TypeError, ValueError):
            return False
    return str(rec.get("where") or "").startswith(DEVICE_WHERE)


def from_manifest(runtime: Mapping[str, Any], ceiling: int,
                  here: Optional[Mapping[str, Any]] = None) -> Optional[Tuple[int, Dict[str, Any]]]:
    """The manifest's measured choice when it was measured on a machine of this kind (measured_here; `here`:
    machine() by default) and covers this machine: (threads, record), else None (the loader probes)."""
    rec = runtime.get("threads_choice") if isinstance(runtime, Mapping) else None
    if not isinstance(rec, Mapping):
        return None
    try:
        chosen = int(rec["threads"])
        tried = [int(t) for t in rec["tried"]]
    except (KeyError, TypeError, ValueError):
        return None
    if chosen < 1 or not tried or not measured_here(rec, here):
        return None
    if chosen < max(tried) or max(tried) >= ceiling:
        return min(chosen, ceiling), dict(rec)
    return None   # the most threads tried won, and this machine may use more: not measured here


def cache_dir() -> Path:
    d = os.environ.get(CACHE_ENV)
    if d:
        return Path(d)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgekit"


def cache_key(model_sha256: str, backend: str, version: str, providers: List[str], ceiling: int,
              cpu: str) -> str:
    doc = json.dumps([CACHE_VERSION, model_sha256, backend, version, list(providers), ceiling, cpu])
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "threads" / f"{key}.json"


def read_cache(key: str, tried: List[int]) -> Optional[Dict[str, Any]]:
    """A cached probe for this key that chose one of `tried`; None when absent or unreadable."""
    try:
        rec = json.loads(cache_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("threads") not in tried or rec.get("tried") != tried:
        return None
    return rec


def write_cache(key: str, rec: Dict[str, Any]) -> Optional[str]:
    """Write atomically; returns the path, or None with the reason recorded in rec['cache_error']."""
    path = cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:   # a read-only home: the choice still holds for this load, and says why
        rec["cache_error"] = f"{type(e).__name__}: {e}"
        return None
    return str(path)


def time_one(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def measure(fns: Mapping[int, Callable[[], Any]], per_call_ms: float,
            budget_s: float = BUDGET_S, rounds: int = ROUNDS) -> Tuple[Dict[int, float], int, int]:
    """Median over alternating rounds of each candidate's p50 (ms); returns (p50 by threads, runs, rounds).
    Runs per round are sized from `per_call_ms` to fit `budget_s`; on a loaded machine, where calls
    take longer than that, the rounds stop once the budget is spent (after MIN_ROUNDS)."""
    runs = int(budget_s * 1e3 / max(per_call_ms, 1e-3) / rounds / len(fns))
    runs = max(MIN_RUNS, min(MAX_RUNS, runs))
    clock = time.perf_counter_ns
    deadline = clock() + int(budget_s * 1e9)
    rounds_p50: Dict[int, List[float]] = {t: [] for t in fns}
    for r in range(rounds):                     # alternate: drift hits every candidate alike
        if r >= MIN_ROUNDS and clock() > deadline:
            break
        for t, fn in fns.items():
            s = []
            for _ in range(runs):
                t0 = clock()
                fn()
                s.append(clock() - t0)
            s.sort()
            rounds_p50[t].append(s[len(s) // 2] / 1e6)
    done = len(next(iter(rounds_p50.values())))
    return {t: sorted(v)[len(v) // 2] for t, v in rounds_p50.items()}, runs, done
