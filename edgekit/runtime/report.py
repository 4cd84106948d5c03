"""Tables of benchmark reports (standard library only)."""

from __future__ import annotations

from typing import Any, Dict, List

from edgekit.table import render


def _threads(r: Dict[str, Any]) -> str:
    """Threads used, and what was asked where that differs (a profile's count clamped to the CPUs)."""
    used, asked = r.get("threads"), r.get("threads_requested")
    return f"{used} (of {asked})" if asked is not None and asked != used else str(used)


def bench_table(reports: List[Dict[str, Any]], label: str = "model") -> str:
    rows = []
    for r in reports:
        lat, e2e = r["latency"], r.get("end_to_end") or {}
        rows.append([r.get("label") or r.get("bundle") or r["model"], r["format"],
                     f"{r['backend']} {r['backend_version']}", _threads(r),
                     r["load_ms"], r["first_inference_ms"], lat["p50_ms"], lat["p90_ms"],
                     lat["p99_ms"], lat["cv"], e2e.get("p50_ms"), lat["throughput_per_s"],
                     "NOISY" if r["noisy"] else "ok"])
    table = render([label, "format", "backend", "thr", "load ms", "first ms", "p50 ms", "p90 ms",
                    "p99 ms", "cv", "e2e p50", "inf/s", "run"], rows)
    notes = [f"{r.get('label') or r.get('bundle') or r['model']}: noisy: " + "; ".join(r["noise_reasons"])
             for r in reports if r["noisy"]]
    notes += [f"{r.get('label') or r.get('bundle') or r['model']}: {r['backend_note']}"
              for r in reports if r.get("backend_note")]
    notes += [f"{r.get('label') or r.get('bundle') or r['model']}: threads by {r['threads_chosen_by']}: "
              f"{r['threads_choice']['why']}" for r in reports
              if (r.get("threads_choice") or {}).get("why") and r.get("threads_chosen_by") != "argument"]
    if reports:
        c = reports[0]["conditions"]
        notes.append(f"conditions: {c['cpu_model']} ({c['machine']}, {c['cpu_count']} cores), "
                     f"governor {c['governor'] or 'n/a'}, load {c['loadavg'][0] if c['loadavg'] else 'n/a'}"
                     f", {reports[0]['runs']} runs after {reports[0]['warmup']} warm-up")
    return table + ("\n" + "\n".join(notes) if notes else "")
