"""--select fastest: build the candidates worth trying for a target, keep those that meet the floor,
time each here when this host has the target's ISA, and ship the fastest.

Candidates, for the row's format: the profile's build (already built and measured), the schemes
worth trying on the target's ISA (ONNX: QOperator instead of QDQ, per-tensor weights, S8S8 only
where the target has exact integer dot products; TFLite: per-tensor weights), dynamic
quantization, and the float model itself (XNNPACK's float32 kernels beat its INT8 on AVX2 for
some models). Each is measured like any artifact (validation, target numerics) and must meet the
floor; the survivors are timed with the latency method of runtime.bench at the target's threads
clamped to this machine's usable CPUs (runtime.threads), alternating rounds so that drift hits
each alike, and the lowest median p50 wins.

On an x86 target, when OpenVINO is importable, each ONNX candidate is also tried on OpenVINO
(the same file, "<candidate>+openvino"): its fidelity is measured through OpenVINO (its own INT8
kernels are what ships with it), it is held to the same floor and timed in the same rounds. The
winner's manifest records the backend it was timed on (`runtime`: backend, threads, hints), which
runtime.load() honours where that backend is installed. When this host is not the target's ISA (an ARM target
on an x86 host, a VNNI target on a host without VNNI), timings here would mislead: nothing is
timed, the profile's build is kept, and the table says so.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from edgekit.convert import measure as measuring
from edgekit.convert import numerics, validate
from edgekit.convert.build import convert_once, error_line, float_onnx_for, precision_of
from edgekit.convert.native import captured_stderr
from edgekit.convert.result import Artifact, Failure
from edgekit.convert.validate import primary_snr
from edgekit.progress import Progress

ROUNDS = 3
RUNS = 40


def host_matches(profile) -> Tuple[bool, str]:
    host = numerics.this_host()
    arch = profile.device.arch.lower()
    if (arch in ("x86_64", "amd64")) != host.is_x86 or (not host.is_x86 and arch != host.arch):
        return False, f"this host ({host.describe()}) is not {profile.name}'s ISA ({arch})"
    if host.is_x86 and numerics.target_exact_int8(profile) != host.exact_int8:
        return False, (f"this host ({host.describe()}) and {profile.name} differ in VNNI: their integer "
                       "kernels are not alike")
    return True, f"timed here ({host.describe()}, {platform.processor() or platform.machine()})"


def _candidates(row, source) -> List[Tuple[str, Any, Optional[Callable[[], bytes]]]]:
    """(label, build or None for float, maker) for the row's format, beyond the profile's build."""

    b = row.build
    out: List[Tuple[str, Any, Optional[Callable[[], bytes]]]] = []
    if row.fmt == "onnx":
        if b.quant_format == "qdq":
            out.append(("QOperator", dataclasses.replace(b, quant_format="qoperator"), None))
        if b.per_channel:
            out.append(("per-tensor weights", dataclasses.replace(b, per_channel=False), None))
        if numerics.target_exact_int8(row.profile) and b.activation_type == "uint8":
            out.append(("S8S8", dataclasses.replace(b, activation_type="int8"), None))
        if b.reduce_range and numerics.target_exact_int8(row.profile):
            out.append(("full-range weights", dataclasses.replace(b, reduce_range=False), None))
        out.append(("dynamic", dataclasses.replace(b, dynamic=True), None))
        out.append(("float32", None, lambda: float_onnx_for(source, b.opset, {})))
    else:
        if b.per_channel:
            out.append(("per-tensor weights", dataclasses.replace(b, per_channel=False), None))
        out.append(("dynamic", dataclasses.replace(b, activations="dynamic", io_type="float32"), None))
        if source.float_tflite:
            out.append(("float32", None, lambda: source.float_tflite))
    return out


def openvino_wanted(profile) -> Tuple[bool, str]:
    """Whether ONNX candidates are also tried on OpenVINO: an x86 target and openvino importable."""
    from importlib.util import find_spec

    if profile.device.arch.lower() not in ("x86_64", "amd64"):
        return False, f"{profile.name} is not x86"
    if find_spec("openvino") is None:
        return False, "openvino is not installed (pip install 'edgekit[openvino]')"
    return True, "openvino installed"


def _runtime_record(backend: str, threads: int, where: str) -> Dict[str, Any]:
    rec: Dict[str, Any] = {"backend": backend, "threads": threads,
                           "why": f"--select fastest: the lowest p50 among the candidates, on {backend}; {where}"}
    if backend == "openvino":
        from edgekit.runtime.openvino import OpenVinoBackend

        rec["hints"] = dict(OpenVinoBackend.DEFAULT_CONFIG)
    return rec


def _float_bytes(row, source, float_onnx: Dict[int, bytes]) -> int:
    """The float model's size in the row's format (what size ratios are against)."""

    if row.fmt == "onnx":
        return len(float_onnx_for(source, row.build.opset, float_onnx))
    return len(source.float_tflite) if source.float_tflite else 0


def _numerics_of(row, build):
    if row.fmt == "onnx" and build is not None:
        return numerics.for_onnx(row.profile, build)
    return row.numerics


@dataclasses.dataclass
class _Selection:
    """One row's selection: what every step needs."""
    row: Any
    recipe: Any
    source: Any
    calib: Any
    ctx: measuring.Context
    float_onnx: Dict[int, bytes]
    progress: Progress
    where: str
    threads: int
    float_bytes: int

    @property
    def label(self) -> str:
        return f"[{self.row.profile.name}] {self.row.fmt}"

    def runtime(self, backend: str) -> Dict[str, Any]:
        return _runtime_record(backend, self.threads, self.where)


def fastest(row, recipe, source, calib, ctx: measuring.Context, float_onnx: Dict[int, bytes],
            chosen: Union[Artifact, Failure], progress: Progress, device=None,
            bundle_for: Optional[Callable[[Artifact, Path], None]] = None) -> Union[Artifact, Failure]:
    """`chosen`: the profile's build, or its Failure when it missed the floor even after the ladder
    (the other candidates, float32 among them, may still meet it: then one of them ships, saying so).
    `device` (deploy.timing.DeviceTimer, handed in by the CLI) times the candidates of its own
    target on the device; `bundle_for(art, dir)` writes a candidate's bundle for it."""
    from edgekit.runtime.threads import choose_threads

    on_device = device is not None and bundle_for is not None and device.covers(row.profile.name)
    ok, where = (True, device.describe()) if on_device else host_matches(row.profile)
    failed = chosen if isinstance(chosen, Failure) else None
    label = f"[{row.profile.name}] {row.fmt}"
    if not ok:
        if failed is None:
            progress.say(f"{label}: --select fastest: {where}; the profile's build is kept")
            chosen.candidates = [dict(_profile_entry(chosen, where), chosen=True, p50_ms=None)]
        return chosen
    sel = _Selection(row, recipe, source, calib, ctx, float_onnx, progress, where,
                     choose_threads(None, row.profile.runtime.threads),
                     _float_bytes(row, source, float_onnx) if failed else chosen.float_bytes)
    profile_entry = _profile_entry(chosen, where)
    arts: List[Tuple[Dict[str, Any], Optional[Artifact]]] = [(profile_entry, None if failed else chosen)]
    # (label, precision, build record, bytes) of each ONNX file built: tried on OpenVINO too
    files: List[Tuple[str, str, Dict[str, Any], bytes]] = []
    if failed:
        progress.say(f"{label}: --select fastest: the profile's build missed the floor; trying the other candidates")
    else:
        if row.fmt == "onnx":
            chosen.runtime = sel.runtime(profile_entry["backend"] or "onnxruntime")
        files.append((profile_entry["what"], chosen.precision, chosen.build, chosen.data))
    _build_candidates(sel, arts, files)
    _on_openvino(sel, arts, files)
    timed = [(e, a) for e, a in arts if a is not None and e.get("meets")]
    if on_device:
        timed = _time_on_device(device, bundle_for, timed, label, progress)
    else:
        _time_here(timed, arts, sel.threads)
    if not timed:
        why = f"no candidate could be timed on {device.device.name}" if on_device else "no candidate meets the floor"
        progress.say(f"{label}: --select fastest: {why}" + ("" if failed else "; the profile's build is kept"))
        if failed:
            return failed
        chosen.candidates = [dict(e, chosen=e is profile_entry, p50_ms=e.get("p50_ms")) for e, _ in arts]
        return chosen
    winner = _ship(sel, arts, timed, chosen)
    if not on_device:   # on a device, its load() probes the thread count itself (runtime.threadprobe)
        _choose_threads(sel, winner)
    return winner


def _profile_entry(chosen: Union[Artifact, Failure], where: str) -> Dict[str, Any]:
    if isinstance(chosen, Failure):
        return {"what": "profile's build", "backend": None, "bytes": 0, "meets": False, "misses": [chosen.reason],
                "timed_where": where}
    return {"what": f"profile's build ({chosen.precision}" + (", rescued" if chosen.rescued_by else "") + ")",
            "backend": chosen.golden_backend.split()[0] if chosen.golden_backend else None,
            "bytes": len(chosen.data), "top1_agreement": chosen.metrics.get("top1_agreement"),
            "snr_db": primary_snr(chosen.metrics), "meets": True, "timed_where": where}


def _build_candidates(sel: _Selection, arts, files) -> None:
    """Each scheme, dynamic and float32 for the row's format: built, measured, judged by the floor."""

    row = sel.row
    for what, build, make in _candidates(row, sel.source):
        entry: Dict[str, Any] = {"what": what, "timed_where": sel.where}
        t0 = time.monotonic()
        with captured_stderr() as cap:
            try:
                data = make() if make else convert_once(sel.source, row.fmt, build, sel.calib,
                                                        sel.float_onnx)[0]
                num = _numerics_of(row, build)
                precision = "float32" if build is None else precision_of(build)
                m = measuring.measure(data, row.fmt, sel.ctx, num, per_sample=precision == "dynamic")
            except Exception as e:  # a candidate that cannot be built is recorded, not hidden
                entry.update(error=error_line(e, cap), meets=False, bytes=0)
                sel.progress.say(f"{sel.label}: candidate {what}: failed ({entry['error'][:100]})")
                arts.append((entry, None))
                continue
        record = dataclasses.asdict(build) if build is not None else {"float32": True}
        art = _artifact(sel, entry, data, m, record, precision, num, t0)
        if row.fmt == "onnx":
            art.runtime = sel.runtime(entry["backend"])
            files.append((what, precision, record, data))
        arts.append((entry, art))


def _on_openvino(sel: _Selection, arts, files) -> None:
    """Each ONNX file again on OpenVINO, measured through OpenVINO (its INT8 kernels are what ships),
    same floor: only for x86 targets, where this host has the target's ISA."""

    row = sel.row
    if row.fmt != "onnx":
        return
    ov, ov_why = openvino_wanted(row.profile)
    if ov and not host_matches(row.profile)[0]:
        ov, ov_why = False, "this host is not the target's ISA, so OpenVINO's INT8 numerics here are not the device's"
    if not ov:
        if row.profile.device.arch.lower() in ("x86_64", "amd64"):
            sel.progress.say(f"{sel.label}: OpenVINO not tried: {ov_why}")
        return
    for what, precision, record, data in files:
        entry = {"what": f"{what}+openvino", "timed_where": sel.where}
        t0 = time.monotonic()
        with captured_stderr() as cap:
            try:
                m = measuring.measure(data, "onnx", sel.ctx, _OV_NUMERICS, per_sample=precision == "dynamic",
                                      threads=sel.threads, backend="openvino")
            except Exception as e:  # OpenVINO cannot read or compile this graph: recorded, not hidden
                entry.update(backend="openvino", error=error_line(e, cap), meets=False, bytes=len(data))
                sel.progress.say(f"{sel.label}: candidate {entry['what']}: failed ({entry['error'][:100]})")
                arts.append((entry, None))
                continue
        art = _artifact(sel, entry, data, m, record, precision, _OV_NUMERICS, t0)
        art.runtime = sel.runtime("openvino")
        arts.append((entry, art))


def _time_here(timed, arts, threads: int) -> None:
    samples: Dict[int, List[float]] = {id(a): [] for _, a in timed}
    for _ in range(ROUNDS):                    # alternate: drift and load hit every candidate alike
        for e, a in timed:
            samples[id(a)].append(_p50(a, threads))
    for e, a in arts:
        e["p50_ms"] = _median(samples[id(a)]) if a is not None and id(a) in samples else None
        e["threads"] = threads


def _ship(sel: _Selection, arts, timed, chosen: Union[Artifact, Failure]) -> Artifact:
    """The lowest p50 wins; the others go beside it; the table and manifest get every entry."""
    winner_entry, winner = min(timed, key=lambda ea: ea[0]["p50_ms"])
    for e, _ in arts:
        e["chosen"] = e is winner_entry
    best_float = min((e["p50_ms"] for e, a in timed if a.precision == "float32"), default=None)
    winner.candidates = [e for e, _ in arts]
    if isinstance(chosen, Failure):
        winner.rescue = chosen.rescue
        winner.notes.append(f"the profile's build missed the floor even after the rescue ladder ({chosen.reason}); "
                            f"--select fastest ships {winner_entry['what']}, the fastest candidate that meets it")
    else:
        winner.rescue, winner.rescued_by = chosen.rescue, chosen.rescued_by
    winner.alternatives = [(_slug(e["what"]), a) for e, a in timed if a is not winner]
    sel.progress.say(f"{sel.label}: fastest: {winner_entry['what']} on {winner_entry['backend']} at p50 "
                     f"{winner_entry['p50_ms']:.3f} ms ({winner_entry['threads']} thread(s))"
                     + (f", {best_float / winner_entry['p50_ms']:.2f}x the best float32" if best_float else ""))
    return winner


_OV_NUMERICS = numerics.Numerics("host", "OpenVINO's own kernels on this host, which has the target's ISA: "
                                         "what a bundle run on OpenVINO computes")


def _artifact(sel: _Selection, entry: Dict[str, Any], data: bytes, m, record: Dict[str, Any],
              precision: str, num, t0: float) -> Artifact:
    """A measured candidate: its entry filled (backend, size, fidelity, floor) and its Artifact."""
    misses = validate.floor_misses(m.metrics, sel.recipe.floor)
    entry.update(backend=m.backend.split()[0], bytes=len(data), top1_agreement=m.metrics.get("top1_agreement"),
                 snr_db=primary_snr(m.metrics), meets=not misses, misses=misses,
                 seconds=round(time.monotonic() - t0, 2))
    return Artifact(sel.row.fmt, data, sel.float_bytes, m.metrics, m.float_ops, m.inputs, m.outputs, m.golden,
                    0.0, record, precision, measuring.numerics_record(num, m), m.backend)


def _median(xs: List[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _time_on_device(device, bundle_for, timed, label: str, progress: Progress):
    """Each candidate written as a bundle and profiled on the device, in alternating rounds; a
    candidate the device cannot run (e.g. no OpenVINO there) is recorded and left out."""
    import tempfile

    from edgekit.errors import EdgekitError

    samples: Dict[int, List[float]] = {id(a): [] for _, a in timed}
    with tempfile.TemporaryDirectory(prefix="edgekit-sel-") as d:
        dirs = {}
        for i, (e, a) in enumerate(timed):
            dirs[id(a)] = Path(d) / f"candidate-{i}"
            bundle_for(a, dirs[id(a)])
        for _ in range(ROUNDS):
            for e, a in timed:
                if "error" in e:
                    continue
                try:
                    # only a backend the manifest asks for must match (load() follows it on the device);
                    # otherwise the device runs the format on whichever backend it has (tflite-runtime on a Pi)
                    p50, e["threads"] = device.p50(dirs[id(a)], (a.runtime or {}).get("backend"))
                except EdgekitError as ex:
                    e.update(error=f"timing on {device.device.name}: {ex}", p50_ms=None)
                    progress.say(f"{label}: candidate {e['what']}: not timed ({e['error'][:120]})")
                    continue
                samples[id(a)].append(p50)
    ok = [(e, a) for e, a in timed if "error" not in e]
    for e, a in ok:
        e["p50_ms"] = _median(samples[id(a)])
    return ok


def _p50(art: Artifact, threads: int) -> float:
    """p50 of the inference call, the artifact loaded on the backend it would run on (art.runtime)."""
    import tempfile
    from pathlib import Path

    from edgekit.bundle import MODEL_FILES
    from edgekit.runtime import load

    with tempfile.TemporaryDirectory(prefix="edgekit-sel-") as d:
        p = Path(d) / MODEL_FILES[art.fmt]
        p.write_bytes(art.data)
        m = load(p, threads=threads, providers=["CPUExecutionProvider"],
                 backend=(art.runtime or {}).get("backend"))
        return m.benchmark(runs=RUNS, warmup=10, end_to_end=False)["latency"]["p50_ms"]


def _choose_threads(sel: _Selection, winner: Artifact) -> None:
    """The winner timed at 1, 2, 4 ... threads up to the ceiling (alternating rounds), and the count
    chosen by runtime.threadprobe's rule recorded in its manifest (`runtime.threads`, with the figures
    in `runtime.threads_choice`), which load() takes instead of probing."""
    from edgekit.runtime import threadprobe

    tried = threadprobe.candidates(sel.threads)
    rt = dict(winner.runtime or {})
    if len(tried) > 1:
        samples: Dict[int, List[float]] = {t: [] for t in tried}
        for _ in range(ROUNDS):
            for t in tried:
                samples[t].append(_p50(winner, t))
        p50 = {t: _median(v) for t, v in samples.items()}
        chosen = threadprobe.pick(p50)
        rt["threads"] = chosen
        rt["threads_choice"] = {"threads": chosen, "tried": tried,
                                "p50_ms": {str(t): round(v, 6) for t, v in p50.items()},
                                "where": sel.where, "why": threadprobe.explain(p50, chosen),
                                **threadprobe.machine()}   # applied only on a machine of this kind (measured_here)
        sel.progress.say(f"{sel.label}: threads: {rt['threads_choice']['why']}")
    winner.runtime = rt


def _slug(what: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(.*?\)", "", what.lower())).strip("-")
