"""The thread count of a language model by measurement: runtime.threadprobe's rule, timed on decoding.

load_llm (runtime.llm) without `threads=` takes, in order: the manifest's measured choice
(`runtime.threads_choice`, written by `convert --select fastest`; only where it was measured on a machine of this
kind: threadprobe.from_manifest), a probe cached for these model files,
backend, version, CPU and ceiling (threadprobe.cache_dir()), or a probe run here once and cached; the
ceiling (the profile's count clamped to the usable CPUs) when EDGEKIT_THREAD_PROBE=0, when one decoded
token takes over PROBE_MAX_TOKEN_MS (a model that slow is memory-bound at any count worth its cores), or when
the memory available (MemAvailable, or less where the process's cgroup allows less) would not hold a second copy
of the model beside the first (no_room_for_a_twin: the probe times two copies; nothing is cached then). A cached
choice other than the first open's is opened after the first copy is let go where two would not fit ("reopen").

The probe: PROBE_PROMPT prompt tokens prefilled, then PROBE_TOKENS greedy tokens decoded with each step
timed; a count's figure is the median ms per decoded token over PROBE_ROUNDS rounds, alternating with the
ceiling's model (drift hits both alike). At most two models are open at once (the ceiling's and the one
compared with it): a language model's memory is its size. The fewest threads within threadprobe.TOLERANCE
of the fastest decode are chosen: decoding is what a generation spends its time on. The prompt's prefill, which
gains more from threads, is recorded beside it (prefill_ms per count), not weighed: give `threads=` where long
prompts and time to first token matter more. Standard library and numpy; the onnxruntime_genai module and models are passed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgekit.runtime import threadprobe as tp
from edgekit.runtime.llmopts import kv_floor, spinning_of

PROBE_PROMPT = 16
PROBE_TOKENS = 12
PROBE_ROUNDS, PROBE_MIN_ROUNDS = 3, 2
PROBE_BUDGET_S = 1.5          # rounds after PROBE_MIN_ROUNDS stop once this is spent (a loaded machine)
PROBE_MAX_TOKEN_MS = 100.0    # one decoded token slower than this at the ceiling (under 10 tok/s): not probed
# The probes (and a cached choice other than the first open's) hold a second copy of the model beside the first.
# What a copy adds, allowed for: TWIN_FACTOR x the model files' bytes + TWIN_SPARE_MB. Measured on the whole
# process's generation peak over weights + KV, libraries included (so above a second copy's increment): 1.14x
# (scales fp32 in the file) and 1.41x (fp16) for TinyLlama-1.1B's shapes; SmolLM2-135M 217 MiB for 109 MB of
# files, within the 220 MiB allowed.
TWIN_FACTOR, TWIN_SPARE_MB = 1.5, 64.0
BACKEND = "onnxruntime-genai"


def decode_token_ms(og, og_model, ids: Sequence[int], new_tokens: int,
                    prefill: Optional[List[float]] = None, capacity: int = 0) -> List[float]:
    """The ms of each decode step of one greedy generation after prefilling `ids` (the first token is sampled
    from the prefill's logits: not a decode step, not counted). The prefill's ms is appended to `prefill`.
    capacity: the model's smallest KV cache (llmopts.kv_floor: a sliding window), 0 for none."""
    n = len(ids) + new_tokens + 1
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=max(n, capacity), min_length=n, do_sample=False)
    gen = og.Generator(og_model, params)
    clock = time.perf_counter_ns
    t0 = clock()
    gen.append_tokens(np.asarray(list(ids), dtype=np.int32))
    if prefill is not None:
        prefill.append((clock() - t0) / 1e6)
    gen.generate_next_token()
    out: List[float] = []
    while not gen.is_done() and len(out) < new_tokens:
        t0 = clock()
        gen.generate_next_token()
        out.append((clock() - t0) / 1e6)
    return out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def probe_ids(bundle_dir: Optional[Path], vocab: int) -> List[int]:
    """PROBE_PROMPT token ids: the first golden prompt's where the bundle has one (real text), else a fixed
    pattern within the vocabulary."""
    if bundle_dir is not None:
        try:
            prompts = json.loads((bundle_dir / "golden.json").read_text(encoding="utf-8")).get("prompts") or []
            ids = [int(t) for t in prompts[0]][:PROBE_PROMPT]
            if len(ids) == PROBE_PROMPT and all(0 <= t < vocab for t in ids):
                return ids
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            pass   # no usable golden prompt: the pattern below is as good for timing
    return [(7 * i + 3) % max(vocab, 1) for i in range(PROBE_PROMPT)]


def _start(og, model, ids: Sequence[int], tried: List[int], where: Optional[str], capacity: int):
    """A probe's record (what was tried, where, when, the load, the prompt) and the median ms of a decoded token
    of `model` after a warm-up: (record, ms)."""
    from edgekit.runtime.bench import cpu_model

    rec: Dict[str, Any] = {"tried": tried, "where": where or f"probed at load on this machine ({cpu_model()})",
                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                           "prompt_tokens": len(ids), "new_tokens": PROBE_TOKENS,
                           **tp.machine()}   # the machine it holds for (threadprobe.from_manifest checks it)
    decode_token_ms(og, model, ids, 2, capacity=capacity)     # warm-up: the first run allocates
    return rec, median(decode_token_ms(og, model, ids, 4, capacity=capacity))


def no_room_for_a_twin(manifest: Mapping[str, Any]) -> Optional[str]:
    """Why a second copy of the model must not be opened now (None: it fits): the probes time two copies side by
    side, and where the memory holds one but not two (a 0.5B model on a 2 GB board, a container's limit) the second
    would be killed or push the first out to swap."""
    from edgekit.runtime.llmopts import mem_available_mb

    files = int((manifest.get("model") or {}).get("bytes") or 0)
    avail = mem_available_mb()
    need = TWIN_FACTOR * files / 2 ** 20 + TWIN_SPARE_MB
    if avail is None or not files or avail >= need:
        return None
    return (f"not probed: timing needs a second copy of the model open (~{need:.0f} MiB) and {avail:.0f} MiB are "
            "available; as the profile and genai_config say")


def _vocab(genai_config: Mapping[str, Any], manifest: Mapping[str, Any]) -> int:
    return int((genai_config.get("model") or {}).get("vocab_size") or (manifest.get("model") or {}).get("vocab") or 2)


def measure(og, open_at: Callable[..., Any], ceiling: int, ids: Sequence[int], opened=None,
            where: Optional[str] = None, capacity: int = 0,
            spinning: Optional[bool] = None) -> Tuple[Dict[str, Any], Any]:
    """Decode speed at threadprobe.candidates(ceiling) and the count its rule picks: (record, the
    onnxruntime_genai.Model at that count). `open_at(t)` opens the model at t threads; `opened`: the one already
    open at the ceiling. The record: threads, tried, ms_per_token, decode_tok_s and prefill_ms per count, rounds,
    why, where, prompt/new tokens, loadavg, probe_ms; skipped=True (the ceiling kept) where a token takes over
    PROBE_MAX_TOKEN_MS. capacity: the model's smallest KV cache (decode_token_ms).
    spinning: whether the model's intra-op threads spin as opened (genai_config's setting); where given and
    more than one thread is chosen, the chosen count is also timed with spinning the other way round
    (`open_at(t, spin)`), alternating, and that is kept where it decodes faster by more than the tolerance:
    threads that busy-wait between a decode step's ~300 small ops win on an otherwise idle device and lose
    badly where other work wants the cores (record: spinning_chosen, spinning_ms_per_token, spinning_why)."""
    t_start = time.perf_counter()
    tried = tp.candidates(ceiling)
    top = opened if opened is not None else open_at(ceiling)
    rec, first = _start(og, top, ids, tried, where, capacity)
    if first > PROBE_MAX_TOKEN_MS:
        rec.update(threads=ceiling, skipped=True,
                   why=f"one decoded token takes {first:.1f} ms at {ceiling} threads (over {PROBE_MAX_TOKEN_MS:g} "
                       "ms): not probed; the profile's count, clamped to the usable CPUs")
        rec["probe_ms"] = round((time.perf_counter() - t_start) * 1e3, 1)
        return rec, top
    samples: Dict[int, List[float]] = {t: [] for t in tried}
    prefills: Dict[int, List[float]] = {t: [] for t in tried}
    deadline = time.perf_counter() + PROBE_BUDGET_S
    rounds = 0
    last: Tuple[int, Any] = (ceiling, top)
    for t in tried:
        if t == ceiling:
            continue
        last = (ceiling, top)                               # the previous count's model is let go first
        other = open_at(t)
        decode_token_ms(og, other, ids, 2, capacity=capacity)
        for r in range(PROBE_ROUNDS):
            if r >= PROBE_MIN_ROUNDS and time.perf_counter() > deadline:
                break
            for t2, m in ((t, other), (ceiling, top)):
                samples[t2].append(median(decode_token_ms(og, m, ids, PROBE_TOKENS, prefills[t2], capacity)))
            rounds += 1
        last, other = (t, other), None
    if len(tried) == 1:
        samples[ceiling].append(first)
    ms = {t: median(v) for t, v in samples.items()}
    chosen = tp.pick(ms)
    why = tp.explain(ms, chosen).replace(" ms", " ms a token", 1)
    rec.update(threads=chosen, ms_per_token={str(t): round(v, 4) for t, v in sorted(ms.items())},
               decode_tok_s={str(t): round(1e3 / v, 1) for t, v in sorted(ms.items())}, rounds=rounds, why=why,
               prefill_ms={str(t): round(median(v), 3) for t, v in sorted(prefills.items()) if v})
    model = top if chosen == ceiling else (last[1] if last[0] == chosen else open_at(chosen))
    top = last = None                      # at most two models open: the chosen one and its spinning twin
    if spinning is not None and chosen > 1:
        model = _spinning(og, open_at, model, chosen, spinning, ids, capacity, rec)
    rec["probe_ms"] = round((time.perf_counter() - t_start) * 1e3, 1)
    return rec, model


def _spinning(og, open_at, model, threads: int, spinning: bool, ids, capacity: int, rec: Dict[str, Any]):
    """The chosen count with ORT's intra-op spinning as configured and the other way round (see measure)."""
    twin = open_at(threads, not spinning)
    decode_token_ms(og, twin, ids, 2, capacity=capacity)
    samples: Dict[bool, List[float]] = {spinning: [], not spinning: []}
    deadline = time.perf_counter() + PROBE_BUDGET_S
    for r in range(PROBE_ROUNDS):
        if r >= PROBE_MIN_ROUNDS and time.perf_counter() > deadline:
            break
        for s, m in ((not spinning, twin), (spinning, model)):
            samples[s].append(median(decode_token_ms(og, m, ids, PROBE_TOKENS, capacity=capacity)))
    ms = {s: median(v) for s, v in samples.items()}
    flip = ms[not spinning] < ms[spinning] * (1 - tp.TOLERANCE)
    chosen = (not spinning) if flip else spinning
    word = {True: "spinning", False: "not spinning"}
    rec.update(spinning_chosen=chosen,
               spinning_ms_per_token={("on" if s else "off"): round(v, 4) for s, v in ms.items()},
               spinning_why=f"{threads} threads {word[not spinning]} {ms[not spinning]:.2f} ms a token vs "
                            f"{word[spinning]} (as configured) {ms[spinning]:.2f}: "
                            + ("the other way round is faster" if flip else
                               f"kept as configured (within {tp.TOLERANCE:.0%} or slower)"))
    return twin if flip else model


def choose_spinning(og, og_model, open_at: Callable[..., Any], bundle_dir: Path, manifest: Mapping[str, Any],
                    genai_config: Mapping[str, Any], threads: int, version: str):
    """For a thread count the caller fixed (load_llm(threads=N), N > 1): whether ORT's intra-op threads spin at
    that count, cached or timed both ways here as `measure` times the count it chooses (_spinning). The count is
    the caller's; only the spinning is measured: genai_config's is the profile's guess for a busy device, and
    on an idle one the other way round can decode a third faster (docs/llm.md, "Thread spinning").
    Returns (model opened as chosen, record with spinning_chosen, or a "why" where nothing was timed)."""
    from edgekit.runtime.bench import cpu_model

    provider = str((manifest.get("llm") or {}).get("execution_provider") or "cpu")
    if provider != "cpu":
        return og_model, {"why": f"not probed: the decoder runs on {provider}"}
    spinning = spinning_of(genai_config)
    key = tp.cache_key(files_digest(manifest), BACKEND + "+spinning-at", version, [provider], threads, cpu_model())
    rec = tp.read_cache(key, [threads])
    if rec is not None and (isinstance(rec.get("spinning_chosen"), bool) or rec.get("skipped")):
        rec["cache"] = str(tp.cache_path(key))      # a skipped probe (a slow model) is not run again either
        spin = rec.get("spinning_chosen", spinning)
        if spin == spinning:
            return og_model, rec
        if no_room_for_a_twin(manifest):   # no room for two copies: the caller lets the first go, then opens this
            return None, dict(rec, reopen=[threads, spin])
        return open_at(threads, spin), rec
    if not tp.probe_enabled():
        return og_model, {"why": f"not probed ({tp.PROBE_ENV}=0)"}
    full = no_room_for_a_twin(manifest)
    if full:   # not cached: another time there may be room
        return og_model, {"why": full}
    t_start = time.perf_counter()
    ids, capacity = probe_ids(bundle_dir, _vocab(genai_config, manifest)), kv_floor(genai_config)
    rec, first = _start(og, og_model, ids, [threads], None, capacity)
    rec["threads"] = threads
    if first > PROBE_MAX_TOKEN_MS:
        rec.update(skipped=True, why=f"one decoded token takes {first:.1f} ms at {threads} threads (over "
                                     f"{PROBE_MAX_TOKEN_MS:g} ms): spinning not probed; as genai_config says")
        model = og_model
    else:
        model = _spinning(og, open_at, og_model, threads, spinning, ids, capacity, rec)
    rec["probe_ms"] = round((time.perf_counter() - t_start) * 1e3, 1)
    cached = tp.write_cache(key, rec)
    if cached:
        rec["cache"] = cached
    return model, rec


def files_digest(manifest: Mapping[str, Any]) -> str:
    """One sha256 over the manifest's model files (path -> sha256): the cache key's model identity."""
    files = (manifest.get("model") or {}).get("files") or {}
    doc = json.dumps({k: (v or {}).get("sha256") for k, v in files.items()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def choose(og, og_model, open_at: Callable[[int], Any], bundle_dir: Path, manifest: Mapping[str, Any],
           genai_config: Mapping[str, Any], ceiling: int, default_by: str, version: str):
    """The cached or probed thread count of an LLM bundle (model open at `ceiling`):
    (model at the count, threads, chosen_by "cache" | "probe" | default_by, record)."""
    from edgekit.runtime.bench import cpu_model

    provider = str((manifest.get("llm") or {}).get("execution_provider") or "cpu")
    if provider != "cpu":
        return og_model, ceiling, default_by, {"why": f"not probed: the decoder runs on {provider}"}
    tried = tp.candidates(ceiling)
    # "+spinning": probes that also chose intra-op spinning (a cache from before them is not read)
    key = tp.cache_key(files_digest(manifest), BACKEND + "+spinning", version, [provider], ceiling, cpu_model())
    rec = tp.read_cache(key, tried)
    spinning = spinning_of(genai_config)
    if rec is not None:
        rec["cache"] = str(tp.cache_path(key))
        t = int(rec["threads"])
        spin = rec.get("spinning_chosen")
        if t == ceiling and spin in (None, spinning):
            return og_model, t, "cache", rec
        if no_room_for_a_twin(manifest):   # no room for two copies: the caller lets the first go, then opens this
            return None, t, "cache", dict(rec, reopen=[t, None if spin in (None, spinning) else bool(spin)])
        return open_at(t, None if spin in (None, spinning) else bool(spin)), t, "cache", rec
    if not tp.probe_enabled():
        return og_model, ceiling, default_by, {"why": f"not probed ({tp.PROBE_ENV}=0)"}
    full = no_room_for_a_twin(manifest)
    if full:   # not cached: another time there may be room
        return og_model, ceiling, default_by, {"why": full}
    rec, model = measure(og, open_at, ceiling, probe_ids(bundle_dir, _vocab(genai_config, manifest)), opened=og_model,
                         capacity=kv_floor(genai_config), spinning=spinning)
    cached = tp.write_cache(key, rec)
    if cached:
        rec["cache"] = cached
    return model, int(rec["threads"]), ("profile" if rec.get("skipped") else "probe"), rec
