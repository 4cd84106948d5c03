"""Ship the more faithful build when it costs nothing.

The profile's build, or the rescue ladder's first rung that meets the floor, can sit well below
what another build of the same source for the same target reaches at about the same speed. On x86
without VNNI the profile multiplies u8 activations by 7-bit weights (reduce_range, so VPMADDUBSW's
int16 pair sums cannot saturate); u8 x u8 (uint8 weights) is exact there too, gives the weights
their 8th bit and an asymmetric range, and runs within a few percent of it (a depthwise / BatchNorm
/ residual CNN: 22.1 dB shipped against 32.5 dB reachable).

The rule: an artifact that meets the floor but sits more than GAP_DB below the best build measured
for its source and target, when a build within SPEED_SLACK of its speed does better, is not the one
to ship; the most faithful build within SPEED_SLACK of its speed is (it must meet the floor, and
its top-1 agreement must be no lower).

Speed on the target: timed here, in alternating rounds, where this host has the target's ISA;
otherwise the profile's own measurement of the scheme on its CPUs (`onnx.uint8_weights_cost_pct`);
otherwise unknown, and nothing is swapped. Timing on a host of another ISA would mislead: on a VNNI
CPU u8 x u8 runs 2-23x slower than u8 x s8, on AVX2 without VNNI within 3%.

Every candidate's fidelity and speed go to the manifest (`faithful`), shipped or not.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Tuple

from edgekit.convert import measure as measuring
from edgekit.convert import numerics, validate
from edgekit.convert.build import convert_once, error_line, precision_of
from edgekit.convert.native import captured_stderr
from edgekit.convert.result import Artifact
from edgekit.convert.validate import primary_snr
from edgekit.progress import Progress

GAP_DB = 3.0          # more than this below the best build: worth replacing
SPEED_SLACK = 0.05    # "about the same speed": p50 within 5%
ROUNDS, RUNS = 5, 60  # timing here: alternating rounds, p50 of RUNS calls each


def alternatives(row, shipped_build: Dict[str, Any]) -> List[Tuple[str, Any]]:
    """(description, OnnxBuild) of the builds worth weighing against the shipped one: on a target
    without exact 8-bit dot products, u8 x 7-bit builds against u8 x u8 (uint8 weights), with the
    shipped build's calibration and with the profile's."""
    if row.fmt != "onnx" or numerics.target_exact_int8(row.profile):
        return []
    known = {f.name for f in dataclasses.fields(row.build)}
    base = dataclasses.replace(row.build, **{k: v for k, v in shipped_build.items() if k in known})
    if (base.fp16 or base.dynamic or base.activation_type != "uint8" or base.weight_type != "int8"
            or not base.reduce_range):
        return []
    out, seen = [], set()
    for b in (base, row.build):
        alt = dataclasses.replace(b, weight_type="uint8", reduce_range=False)
        if alt in seen:
            continue
        seen.add(alt)
        out.append((f"uint8 weights (u8 x u8, full 8-bit weights), {alt.calibration} calibration", alt))
    return out


def pick(shipped: Dict[str, Any], others: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The most faithful of `others` that meets the floor, is known to be within SPEED_SLACK of the
    shipped build's speed (`speed_ratio`: its p50 over the shipped one's), has a higher SNR and no
    lower top-1 agreement; None: keep the shipped build. (The GAP_DB test comes before.)"""
    agree = shipped.get("top1_agreement")
    eligible = [e for e in others
                if e.get("meets") and e.get("speed_ratio") is not None and e["speed_ratio"] <= 1 + SPEED_SLACK
                and e["snr_db"] > shipped["snr_db"]
                and (agree is None or (e.get("top1_agreement") or 0.0) >= agree)]
    if not eligible:
        return None
    return max(eligible, key=lambda e: (e.get("top1_agreement") if e.get("top1_agreement") is not None else 1.0,
                                        e["snr_db"]))


def _entry(what: str, build: Dict[str, Any], metrics: Dict[str, Any], data: bytes, floor) -> Dict[str, Any]:
    misses = validate.floor_misses(metrics, floor)
    return {"what": what, "weight_type": build.get("weight_type"), "reduce_range": build.get("reduce_range"),
            "calibration": build.get("calibration"), "bytes": len(data),
            "top1_agreement": metrics.get("top1_agreement"), "snr_db": primary_snr(metrics),
            "accuracy_drop_points": metrics.get("accuracy_drop_points"), "meets": not misses, "misses": misses}


def _p50_here(art: Artifact, threads: int) -> float:
    import tempfile
    from pathlib import Path

    from edgekit.bundle import MODEL_FILES
    from edgekit.runtime import load

    with tempfile.TemporaryDirectory(prefix="edgekit-faithful-") as d:
        p = Path(d) / MODEL_FILES[art.fmt]
        p.write_bytes(art.data)
        m = load(p, threads=threads, providers=["CPUExecutionProvider"])
        return m.benchmark(runs=RUNS, warmup=10, end_to_end=False)["latency"]["p50_ms"]


def _speeds(row, shipped: Artifact, arts: List[Tuple[Dict[str, Any], Artifact]]) -> Dict[str, Any]:
    """Each candidate's p50 relative to the shipped artifact's on the target: entry['speed_ratio']."""
    from edgekit.convert.select import host_matches
    from edgekit.runtime.threads import choose_threads

    ok, where = host_matches(row.profile)
    if ok:
        threads = choose_threads(None, row.profile.runtime.threads)
        everyone = [(None, shipped)] + arts
        samples: Dict[int, List[float]] = {id(a): [] for _, a in everyone}
        for _ in range(ROUNDS):                       # alternate: drift hits each alike
            for _, a in everyone:
                samples[id(a)].append(_p50_here(a, threads))
        med = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
        for e, a in arts:
            e.update(p50_ms=med[id(a)], speed_ratio=med[id(a)] / med[id(shipped)], speed_source="timed here")
        return {"source": f"{where}, {threads} thread(s)", "p50_ms": med[id(shipped)]}
    pct = row.profile.onnx.uint8_weights_cost_pct
    for e, _ in arts:
        if pct is not None and e["weight_type"] == "uint8":
            e.update(speed_ratio=1 + pct / 100.0, speed_source=f"{row.profile.name} profile: "
                                                                  "onnx.uint8_weights_cost_pct")
        else:
            e.update(speed_ratio=None, speed_source="unknown: " + where)
    why = row.profile.reason("onnx.uint8_weights_cost_pct")
    return {"source": f"not timed ({where}); the profile's measurement" + (f": {why}" if why else ""),
            "p50_ms": None}


def more_faithful(row, recipe, source, calib, ctx: measuring.Context, float_onnx: Dict[int, bytes],
                  art: Artifact, progress: Progress) -> Artifact:
    """`art` (it meets the floor), or the more faithful build of about its speed, per the rule above;
    the comparison is recorded in the shipped artifact's `faithful` either way."""
    alts = alternatives(row, art.build)
    if not alts or art.mixed:
        return art
    label = f"[{row.profile.name}] {row.fmt}"
    shipped_entry = dict(_entry("shipped build", art.build, art.metrics, art.data, recipe.floor),
                        what=("the profile's build" if not art.rescued_by else art.rescued_by),
                        speed_ratio=1.0, speed_source="reference")
    entries: List[Dict[str, Any]] = [shipped_entry]
    arts: List[Tuple[Dict[str, Any], Artifact]] = []
    for what, build in alts:
        t0 = time.monotonic()
        num = numerics.for_onnx(row.profile, build)
        with captured_stderr() as cap:
            try:
                data = convert_once(source, row.fmt, build, calib, float_onnx)[0]
                m = measuring.measure(data, row.fmt, ctx, num)
            except Exception as e:  # a candidate that cannot be built is recorded, and the shipped one stays
                entries.append({"what": what, "error": error_line(e, cap), "meets": False})
                progress.say(f"{label}: more faithful? {what}: failed ({entries[-1]['error'][:100]})")
                continue
        record = dataclasses.asdict(build)
        e = dict(_entry(what, record, m.metrics, data, recipe.floor), seconds=round(time.monotonic() - t0, 2))
        entries.append(e)
        arts.append((e, Artifact(row.fmt, data, art.float_bytes, m.metrics, m.float_ops, m.inputs, m.outputs,
                                 m.golden, 0.0, record, precision_of(build), measuring.numerics_record(num, m),
                                 m.backend)))
    best = max((e["snr_db"] for e in entries if e.get("snr_db") is not None), default=shipped_entry["snr_db"])
    rec: Dict[str, Any] = {"rule": f"a build more than {GAP_DB:g} dB below the best of its source and target "
                                   f"is replaced by the most faithful build within {SPEED_SLACK:.0%} of its speed",
                           "candidates": entries, "best_snr_db": best}
    gap = best - shipped_entry["snr_db"]
    chosen: Optional[Tuple[Dict[str, Any], Artifact]] = None
    if gap <= GAP_DB:
        rec["why"] = f"kept: {gap:.1f} dB below the best build measured (within {GAP_DB:g} dB)"
    else:
        rec["speed"] = _speeds(row, art, arts)
        e = pick(shipped_entry, [e for e, _ in arts])
        if e is not None:
            chosen = next(ea for ea in arts if ea[0] is e)
            rec["why"] = (f"shipped {e['what']}: {e['snr_db']:.1f} dB against {shipped_entry['snr_db']:.1f} dB, "
                          f"p50 {(e['speed_ratio'] - 1) * 100:+.1f}% ({e['speed_source']})")
        else:
            unknown = [e["what"] for e, _ in arts if e.get("speed_ratio") is None]
            rec["why"] = (f"kept: {gap:.1f} dB below the best build, but no build known to be within "
                          f"{SPEED_SLACK:.0%} of its speed does better"
                          + (f" (speed on the target unknown for: {'; '.join(unknown)})" if unknown else ""))
    shipped = chosen[0] if chosen is not None else shipped_entry
    for e in entries:
        e["shipped"] = e is shipped
    progress.say(f"{label}: more faithful? {rec['why']}")
    if chosen is None:
        art.faithful = rec
        return art
    new = chosen[1]
    new.faithful = rec
    new.rescue, new.rescued_by, new.notes = art.rescue, art.rescued_by, list(art.notes)
    if new.build.get("weight_type") == "uint8":   # fast where built for; not on every x86 CPU
        new.notes.append(f"uint8 weights (u8 x u8): about as fast as the profile's build on {row.profile.name}'s "
                         "CPUs (no VNNI), several times slower on a VNNI CPU, whose u8 x s8 dot products it "
                         "cannot use: convert for a VNNI profile (x86-avx512-vnni) to run there")
    return new
