"""Measuring a language model (standard library and numpy): the latency method of DESIGN.md for generation.

One run: a fresh generator; the prompt's token ids appended (prefill: one pass over the prompt), the first
token generated (time to first token = prefill + first sample), then new_tokens - 1 tokens decoded one at a
time, each fetched as an application fetches it. End of sequence is held off (min_length) so every run
decodes exactly new_tokens. Greedy decoding. Warm-up runs are discarded; the figures are p50 over the timed
runs, with every run kept. The conditions are recorded as for other models (runtime.bench.conditions), with
ORT GenAI's version and the threads.

Memory, each figure the process's resident set (MiB): the load's peak (VmHWM right after load_llm, where the
load raised it) and the generation's peak (VmHWM reset after load through /proc/self/clear_refs, then read
after the runs: the weights as ONNX Runtime holds them, the KV cache, which ORT GenAI allocates for prompt +
new tokens up front, and the prompt chunks' logits), both against the goal's bound, model bytes + KV cache at
the context used; the libraries' fixed cost (a fresh interpreter after `import onnxruntime_genai` and nothing
else) is given apart, with the ratio of what the process holds beyond it. Where the OS allows no reset,
the generation's peak is None and peak_rss_mb (the process's high-water mark) includes the load.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np

from edgekit.errors import DataError
from edgekit.runtime.llmopts import kv_capacity, spinning_of

# The prompt is this text's tokens, repeated to the length asked for (any ids time the same; real text keeps
# the attention pattern and the tokenizer's cost realistic).
PROMPT_TEXT = (
    "Edge devices run small language models when the network is slow, private data must stay local, or "
    "answers are needed in a fraction of a second. A quantized model reads fewer bytes for every token it "
    "produces, and decoding speed on a small CPU is bounded by memory bandwidth more than by arithmetic. "
    "The prompt is processed in one pass over all of its tokens, which is limited by arithmetic instead. "
)


def _prompt_ids(lm, n: int) -> List[int]:
    base = [t for t in lm.encode(PROMPT_TEXT) if t not in lm.eos_token_ids]
    if not base:
        raise DataError("the tokenizer turns the benchmark text into no tokens")
    reps = -(-n // len(base))
    return (base * reps)[:n]


def benchmark(lm, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3, warmup: int = 1) -> Dict[str, Any]:
    from edgekit.runtime.bench import _cpu_budget, conditions, noise_reasons, stats
    from edgekit.runtime.llmopts import GenOptions as _Options, library_rss_mb, malloc_tuning, memory_breakdown
    from edgekit.runtime.llmopts import reset_peak_rss, rss_mb as _rss_mb

    if prompt_tokens < 1 or new_tokens < 2 or runs < 1 or warmup < 0:
        raise DataError(f"prompt_tokens >= 1, new_tokens >= 2, runs >= 1 and warmup >= 0 (got {prompt_tokens}, "
                        f"{new_tokens}, {runs}, {warmup})")
    total = prompt_tokens + new_tokens
    if total > lm.context:
        raise DataError(f"prompt_tokens + new_tokens = {total} do not fit: {lm.context_words()}",
                        hint="ask for fewer tokens" + lm.context_room(", or ", need=total))
    clock = time.perf_counter_ns
    t = clock()
    ids = _prompt_ids(lm, prompt_tokens)
    encode_ms = (clock() - t) / 1e6
    arr = np.asarray(ids, dtype=np.int32)
    search = _Options().search()
    per_run: List[Dict[str, float]] = []
    token_ns: List[int] = []
    before = _rss_mb()                    # the high-water mark so far (the load, anything before it)
    reset = reset_peak_rss()              # from here the mark is the generations' own
    held: Dict[str, Any] = {}
    gen = None
    for r in range(warmup + runs):
        gen = None                        # the previous run's KV cache goes before the next one is allocated
        gen = lm._generator(total, search, min_length=total)
        t0 = clock()
        lm._prefill(gen, arr)          # as generate() prefills (in chunks)
        t1 = clock()
        gen.generate_next_token()
        gen.get_next_tokens()
        t2 = clock()
        steps = []
        prev = t2
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
            gen.get_next_tokens()
            now = clock()
            steps.append(now - prev)
            prev = now
        if r == warmup + runs - 1:        # where the memory is, the last generator still alive
            held = {"rss_mb": _rss_mb()["rss_mb"], "breakdown": memory_breakdown()}
        if r < warmup:
            continue
        decode_s = (prev - t2) / 1e9
        per_run.append({"prefill_ms": (t1 - t0) / 1e6, "ttft_ms": (t2 - t0) / 1e6,
                        "prefill_tok_s": prompt_tokens / max((t1 - t0) / 1e9, 1e-12),
                        "decode_ms": decode_s * 1e3, "decode_tok_s": (new_tokens - 1) / max(decode_s, 1e-12)})
        token_ns.extend(steps)
    gen = None
    mem = _rss_mb()
    gen_peak = mem["peak_rss_mb"] if reset else None
    peaks = [x for x in (before["peak_rss_mb"], mem["peak_rss_mb"]) if x is not None]
    peak = max(peaks) if peaks else None          # the process's high-water mark, load included
    load_peak = getattr(lm, "peak_rss_load_mb", None)
    libs = library_rss_mb()["libs_mb"]

    def p50(key: str) -> float:
        return float(np.median([x[key] for x in per_run]))

    lat = stats(token_ns)
    cond = conditions()
    cond.update(threads_requested=lm.threads_requested, threads=lm.threads, onnxruntime_genai=lm.backend_version,
                **_cpu_budget())
    cond["memory"] = {"generation_peak": "VmHWM reset after load (/proc/self/clear_refs), read after the runs"
                      if reset else "no reset of the high-water mark here: peak_rss_mb includes the load",
                      "load_peak": "VmHWM after load_llm" if load_peak else
                      "unknown: the process had been higher before the load",
                      "libraries": "fresh interpreter after import onnxruntime_genai", "malloc": malloc_tuning(),
                      "model_pages": getattr(lm, "model_pages", None), "heap_trim": getattr(lm, "heap_trim", None),
                      "huge_pages": getattr(lm, "huge_pages", None)}
    reasons = noise_reasons(lat, cond)
    model_bytes = lm.model_bytes()
    kv = lm.kv_bytes_per_token()
    positions = kv_capacity(lm.genai_config, total)   # what the generator allocates: a sliding window's at least
    bound = model_bytes + (kv or 0) * positions
    bound_mb = bound / 2 ** 20

    def over(x):
        return x / bound_mb if x and bound_mb else None
    llm = (lm.manifest or {}).get("llm") or {}
    bpt = llm.get("bytes_per_token")
    decode = p50("decode_tok_s")
    return {
        "kind": "llm",
        "model": str(lm.path),
        "bundle": (lm.manifest or {}).get("name"),
        "target": ((lm.manifest or {}).get("target") or {}).get("name"),
        "precision": ((lm.manifest or {}).get("recipe") or {}).get("precision"),
        "format": lm.format,
        "backend": lm.backend,
        "backend_version": lm.backend_version,
        "threads": lm.threads,
        "threads_requested": lm.threads_requested,
        "threads_chosen_by": lm.threads_chosen_by,
        "threads_choice": getattr(lm, "threads_choice", None),   # the measured choice and its figures
        # ORT's intra-op threads spinning between ops: as the thread probe chose, else as genai_config.json says
        "intra_op_spinning": (lm.spinning if getattr(lm, "spinning", None) is not None
                              else spinning_of(lm.genai_config)),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "runs": runs,
        "warmup": warmup,
        "load_ms": lm.load_ms,
        "load_s": lm.load_ms / 1e3,
        "load_verify_ms": lm.verify_ms,       # of load_ms: the bundle's files hashed against the manifest
        "load_probe_ms": lm.probe_ms,         # of load_ms: the thread count chosen (a first load's probe)
        "encode_ms": encode_ms,
        "ttft_ms": p50("ttft_ms"),
        "prefill_ms": p50("prefill_ms"),
        "prefill_tok_s": p50("prefill_tok_s"),
        "decode_tok_s": decode,
        "decode_token_ms": lat,               # per-token decode latency over all timed runs
        "per_run": per_run,
        "peak_rss_mb": peak,
        "rss_mb": mem["rss_mb"],
        "rss_before_load_mb": getattr(lm, "rss_before_load_mb", None),
        "rss_after_load_mb": getattr(lm, "rss_after_load_mb", None),
        "peak_rss_load_mb": load_peak,
        "peak_rss_generation_mb": gen_peak,
        "rss_libraries_mb": libs,             # fresh interpreter + import onnxruntime_genai: the fixed cost
        "memory_held": held,                  # RSS by kind of mapping with the last generator alive
        # what loading and generating added to the process (its Python and libraries left out)
        "rss_growth_mb": (peak - lm.rss_before_load_mb) if peak and getattr(lm, "rss_before_load_mb", None)
        else None,
        "model_bytes": model_bytes,
        "kv_bytes_per_token": kv,
        "kv_bytes": (kv or 0) * positions,
        "kv_positions": positions,
        # the goal: peak RSS <= 1.3 x (weights + KV cache at the context used); the process's own baseline
        # (Python, numpy, ORT) is inside peak_rss_mb, so the ratio over the bound is the pessimistic one
        "memory_bound_mb": bound_mb,
        "peak_rss_ratio": over(peak),
        # the goal's figure: the generations' peak over the bound, the whole process (libraries included) ...
        "peak_rss_generation_ratio": over(gen_peak),
        # ... and beyond the libraries' fixed cost; the load's peak the same two ways
        "peak_rss_generation_ratio_over_libs": over(gen_peak - libs) if gen_peak and libs else None,
        "peak_rss_load_ratio": over(load_peak),
        "peak_rss_load_ratio_over_libs": over(load_peak - libs) if load_peak and libs else None,
        "bytes_per_token": bpt,
        # bytes read per token x tokens per second: the memory bandwidth decode uses
        "decode_gb_s": (bpt * decode / 1e9) if bpt else None,
        "conditions": cond,
        "noisy": bool(reasons),
        "noise_reasons": reasons,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def llm_bench_table(reports: List[Dict[str, Any]], label: str = "model") -> str:
    from edgekit.runtime.report import _threads
    from edgekit.table import render

    rows = []
    for r in reports:
        rows.append([r.get("label") or r.get("bundle") or r["model"], r.get("precision") or "-",
                     f"{r['backend']} {r['backend_version']}", _threads(r), r["load_ms"],
                     f"{r['prompt_tokens']}+{r['new_tokens']}", r["ttft_ms"], r["prefill_tok_s"],
                     r["decode_tok_s"], r["decode_token_ms"].get("p99_ms"), r["peak_rss_mb"],
                     r["model_bytes"] / 2 ** 20, "NOISY" if r["noisy"] else "ok"])
    table = render([label, "precision", "backend", "thr", "load ms", "tokens", "TTFT ms", "prefill tok/s",
                    "decode tok/s", "tok p99 ms", "peak RSS MiB", "model MiB", "run"], rows)
    notes = [f"{r.get('bundle') or r['model']}: noisy: " + "; ".join(r["noise_reasons"]) for r in reports if r["noisy"]]
    for r in reports:
        if not r.get("peak_rss_ratio"):
            continue
        parts = []
        for what, key in (("generation", "generation"), ("load", "load")):
            v, x, y = r.get(f"peak_rss_{key}_mb"), r.get(f"peak_rss_{key}_ratio"), \
                r.get(f"peak_rss_{key}_ratio_over_libs")
            if v and x:
                parts.append(f"{what} peak {v:.1f} MiB = {x:.2f}x" + (f" ({y:.2f}x beyond the libraries)" if y else ""))
        if not parts:        # an older report, or no reset of the high-water mark: the process's peak
            parts.append(f"peak RSS {r['peak_rss_mb']:.1f} MiB = {r['peak_rss_ratio']:.2f}x")
        libs = r.get("rss_libraries_mb")
        notes.append(f"{r.get('bundle') or r['model']}: " + "; ".join(parts)
                     + f" of weights + KV cache ({r['memory_bound_mb']:.1f} MiB)"
                     + (f"; libraries alone (python + import onnxruntime_genai) {libs:.1f} MiB" if libs else ""))
    for r in reports:
        v, pr = r.get("load_verify_ms") or 0, r.get("load_probe_ms") or 0
        if v + pr >= 1:
            notes.append(f"{r.get('bundle') or r['model']}: load {r['load_ms']:.0f} ms, of which {v:.0f} ms "
                         f"checking the files against the manifest and {pr:.0f} ms choosing the thread count")
    if reports:
        c = reports[0]["conditions"]
        notes.append(f"conditions: {c['cpu_model']} ({c['machine']}, {c['cpu_count']} cores), governor "
                     f"{c['governor'] or 'n/a'}, load {c['loadavg'][0] if c['loadavg'] else 'n/a'}, p50 of "
                     f"{reports[0]['runs']} runs after {reports[0]['warmup']} warm-up, greedy")
    return table + ("\n" + "\n".join(notes) if notes else "")
