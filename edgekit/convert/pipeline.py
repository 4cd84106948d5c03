"""convert(): source -> calibration -> per-target artifacts -> validation -> bundles.

Everything the user can get wrong (targets, paths, data shapes) is checked
before the first conversion. Targets that ask for the same build share one
artifact (converted and validated once). Each bundle is written atomically;
a budget miss still writes every bundle and the report, then raises BudgetMissed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import edgekit
from edgekit.bundle import MODEL_FILES, check_name, write_bundle, write_json_atomic
from edgekit.convert import validate
from edgekit.convert.data import Dataset, load_dataset, random_dataset
from edgekit.convert.native import captured_stderr
from edgekit.convert.sources import Source, detect_kind, load_source
from edgekit.errors import BudgetMissed, ConversionError, DataError, EdgekitError
from edgekit.progress import Progress
from edgekit.runtime import load as load_model
from edgekit.runtime.check import MIN_SNR_DB, MIN_TOP1
from edgekit.table import render
from edgekit.targets import TargetProfile, load_target

GOLDEN_SAMPLES = 8
HELD_OUT = 0.2


@dataclass
class Artifact:
    fmt: str
    data: bytes
    float_bytes: int
    metrics: Dict[str, Any]
    float_ops: Dict[str, int]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    golden: Dict[str, np.ndarray]
    seconds: float
    build: Dict[str, Any]
    golden_backend: str = ""
    mixed: Optional[Dict[str, Any]] = None


@dataclass
class BundleResult:
    target: str
    fmt: str
    path: Path
    artifact: Artifact
    within_budget: Optional[bool]


@dataclass
class ConvertResult:
    name: str
    source: Dict[str, Any]
    calibration: Dict[str, Any]
    bundles: List[BundleResult] = field(default_factory=list)
    report_path: Optional[Path] = None
    max_accuracy_drop: Optional[float] = None
    precision: str = "int8"

    @property
    def missed(self) -> List[BundleResult]:
        return [b for b in self.bundles if b.within_budget is False]

    def table(self) -> str:
        rows = []
        for b in self.bundles:
            a, m = b.artifact, b.artifact.metrics
            acc = (f"{m['accuracy_float']:.1f}→{m['accuracy_int8']:.1f}"
                   if m.get("accuracy_int8") is not None else "-")
            snr = m["outputs"][m["primary_output"]]["snr_db"]
            rows.append([b.path.name, b.fmt, len(a.data) / 1024, len(a.data) / a.float_bytes,
                         m["top1_agreement"], acc, snr,
                         m["outputs"][m["primary_output"]]["max_abs_err"],
                         ", ".join(f"{k}×{v}" for k, v in sorted(a.float_ops.items())) or "none",
                         {None: "-", True: "ok", False: "MISSED"}[b.within_budget]])
        title = f"{self.name}: float vs {self.precision.upper()} on {self.calibration['validation_samples']} " \
                f"validation samples ({self.calibration['validation_source']})"
        text = render(["bundle", "format", "KiB", "size×", "top-1 agree %", "acc % f→q", "SNR dB",
                       "max |err|", "float ops", "budget"], rows, title=title)
        seen = set()
        for b in self.bundles:
            mp = b.artifact.mixed
            if not mp or id(b.artifact) in seen:
                continue
            seen.add(id(b.artifact))
            full = mp["full_int8"]
            rows = [["(full INT8)", full["drop"], full["bytes"] / 1024, full["p50_ms"], "no"]]
            rows += [[", ".join(st["float_layers"]), st["drop"], st["bytes"] / 1024, st["p50_ms"],
                      "yes" if st["meets_budget"] else ("failed" if st["error"] else "no")] for st in mp["steps"]]
            text += "\n\n" + render(["kept in float", "drop (points)", "KiB", "p50 ms here", "meets"], rows,
                                     title=f"mixed precision for {b.path.name} ({b.fmt}): budget {mp['budget_points']} "
                                           f"points of {mp['metric']}; chosen: "
                                           + (", ".join(mp["float_layers"]) if mp["met"] else "none met")
                                           + f" ({mp['stopped']})")
        if self.calibration.get("random"):
            text += "\nWARNING: random calibration data: the accuracy figures above mean nothing."
        return text

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "calibration": self.calibration,
            "max_accuracy_drop": self.max_accuracy_drop,
            "bundles": [{"path": str(b.path), "target": b.target, "format": b.fmt,
                         "bytes": len(b.artifact.data), "float_bytes": b.artifact.float_bytes,
                         "validation": b.artifact.metrics, "float_ops": b.artifact.float_ops,
                         "within_budget": b.within_budget, "seconds": b.artifact.seconds,
                         "mixed_precision": b.artifact.mixed}
                        for b in self.bundles],
        }


PRECISIONS = ("int8", "int16x8", "fp16")


def with_precision(t: TargetProfile, precision: str) -> TargetProfile:
    """The profile's builds at another precision: int16x8 (16-bit activations, 8-bit weights, a
    rung between INT8 and float) or fp16 (GPU targets: profiles with onnx.fp16_allowed)."""
    import dataclasses

    if precision not in PRECISIONS:
        raise EdgekitError(f"unknown precision {precision!r}", hint="one of " + ", ".join(PRECISIONS))
    if precision == "int8":
        return t
    if precision == "int16x8":
        return dataclasses.replace(t, tflite=dataclasses.replace(t.tflite, activations="int16"),
                                   onnx=dataclasses.replace(t.onnx, activation_type="int16"))
    if not t.onnx.fp16_allowed:
        raise EdgekitError(f"target {t.name} has no FP16 path (onnx.fp16_allowed is false)",
                           hint="--precision fp16 is for GPU targets (jetson-orin, jetson-nano); "
                                "use int8 or int16x8 here")
    return dataclasses.replace(t, tflite=dataclasses.replace(t.tflite, activations="float16", io_type="float32"),
                               onnx=dataclasses.replace(t.onnx, fp16=True))


def _plan(kind: str, profiles: Sequence[TargetProfile], formats: Optional[Sequence[str]]):
    """(profile, format, bundle suffix) for every artifact to write; errors before any work."""
    plan: List[Tuple[TargetProfile, str, str]] = []
    for t in profiles:
        fmts = [f for f in t.formats if not formats or f in formats]
        if kind == "onnx":
            if "tflite" in fmts and formats and "tflite" in formats:
                raise ConversionError("TFLite from an ONNX source is not available yet",
                                      target=t.name,
                                      hint="convert from the Keras/SavedModel source, or ask for "
                                           "--format onnx")
            fmts = [f for f in fmts if f == "onnx"]
            if not fmts:
                raise ConversionError("this target builds only TFLite, and TFLite from an ONNX "
                                      "source is not available yet", target=t.name,
                                      hint="convert from the Keras/SavedModel source, or pick a "
                                           "target whose formats include onnx")
        if not fmts:
            raise ConversionError(f"builds {list(t.formats)}, none of the requested "
                                  f"{list(formats or [])}", target=t.name)
        for i, f in enumerate(fmts):
            plan.append((t, f, "" if i == 0 else f"-{f}"))
    return plan


def _data_summary(ds: Dataset) -> Dict[str, Any]:
    return {k: {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
                "std": float(v.std())} for k, v in ds.inputs.items()}


def _feeds(model, ds_inputs: Dict[str, np.ndarray], ref_names: List[str]) -> Dict[str, np.ndarray]:
    """Feed by name; where the artifact renamed inputs, by position in the reference's order."""
    names = [s.name for s in model.inputs]
    if set(names) == set(ds_inputs):
        return {n: ds_inputs[n] for n in names}
    return {n: ds_inputs[r] for n, r in zip(names, ref_names)}


def _by_ref_names(out: Dict[str, np.ndarray], model, ref_out_names: List[str]):
    names = [s.name for s in model.outputs]
    if set(names) == set(ref_out_names):
        return out
    return {r: out[n] for n, r in zip(names, ref_out_names)}


def convert(model: str, targets: Sequence[str], out: str, *, calib: Optional[str] = None,
            val: Optional[str] = None, preprocess: Optional[str] = None,
            calib_samples: int = 200, random_calibration: bool = False,
            max_accuracy_drop: Optional[float] = None, name: Optional[str] = None,
            formats: Optional[Sequence[str]] = None, compat_check: str = "auto",
            mixed_precision: bool = True, search_budget: float = 300.0, search_first: bool = False,
            precision: str = "int8",
            progress: Optional[Progress] = None) -> ConvertResult:
    progress = progress or Progress(enabled=False)
    if not targets:
        raise EdgekitError("no target given", hint="add --target NAME (see `edgekit targets list`)")
    profiles = [with_precision(load_target(t), precision) for t in dict.fromkeys(targets)]
    kind = detect_kind(Path(model))
    plan = _plan(kind, profiles, formats)
    name = check_name(name or Path(model).stem or Path(model).name)
    if calib is None and not random_calibration:
        raise DataError("no calibration data", hint="give --calib data.npz (or an image folder); "
                        "--calib-random only for a smoke test: its accuracy figures mean nothing")
    if calib is not None and random_calibration:
        raise DataError("give --calib or --calib-random, not both")
    for p, what in ((calib, "calibration"), (val, "validation")):
        if p is not None and not Path(p).exists():
            raise DataError(f"{what} data not found", path=p)
    if calib_samples < 1:
        raise DataError(f"--calib-samples must be at least 1, not {calib_samples}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgekitError(f"{out}: exists and is not a directory", hint="choose another --out")

    with tempfile.TemporaryDirectory(prefix="edgekit-convert-") as wd:
        progress.say(f"reading {model}")
        source = load_source(model, Path(wd))
        if source.qat and precision != "int8":
            raise EdgekitError(f"a quantization-aware trained model converts to INT8 only, not {precision}",
                               hint="drop --precision, or convert the model from before `edgekit qat`")
        reference = load_model(source.reference_path)
        specs = reference.inputs
        ref_in = [s.name for s in specs]
        ref_out = [s.name for s in reference.outputs]

        calib_ds, val_ds, cal_info = _datasets(specs, calib, val, preprocess, calib_samples,
                                               random_calibration)
        progress.say(f"calibration: {len(calib_ds)} samples from {cal_info['source']}; "
                     f"validation: {len(val_ds)} samples from {cal_info['validation_source']}")
        ref_outputs = reference.run(**val_ds.inputs)
        ctx = _Ctx(val_ds, ref_outputs, ref_in, ref_out)
        if source.qat and max_accuracy_drop is not None and mixed_precision:
            progress.say("quantization-aware trained model: no mixed-precision search (its ranges were "
                         "trained for full INT8)")
        mixed = None if (max_accuracy_drop is None or not mixed_precision or source.qat) else {
            "max_drop": max_accuracy_drop, "seconds": search_budget, "first": search_first}

        result = ConvertResult(name, {"path": str(source.path), "kind": source.kind,
                                      "sha256": source.sha256, "bytes": source.bytes,
                                      "notes": source.notes, "qat": source.qat}, cal_info,
                               max_accuracy_drop=max_accuracy_drop, precision=precision)
        cache: Dict[Tuple[str, Any], Artifact] = {}
        compat_cache: Dict = {}
        float_onnx: Dict[int, bytes] = {}
        for t, fmt, suffix in plan:
            build = t.tflite if fmt == "tflite" else t.onnx
            key = (fmt, build)
            if key not in cache:
                progress.say(f"[{t.name}] {fmt}: converting")
                cache[key] = _build(source, fmt, build, calib_ds, ctx, float_onnx, progress, t.name, mixed)
            else:
                progress.say(f"[{t.name}] {fmt}: same build as an earlier target, reused")
            art = cache[key]
            drop = validate.budget_drop(art.metrics)
            ok = None if max_accuracy_drop is None or drop is None else drop <= max_accuracy_drop
            dest = out_dir / f"{name}-{t.name}{suffix}"
            manifest = _manifest(name, t, art, result, max_accuracy_drop, ok)

            def compat_check_tmp(tmp: Path, t=t, fmt=fmt, art=art) -> None:
                from edgekit.convert import compat

                records = compat.check(tmp, t, fmt, compat_check, compat_cache,
                                       hashlib.sha256(art.data).hexdigest())
                for r in records:
                    if r.get("checked", True) and "where" in r:
                        progress.say(f"[{t.name}] {fmt}: loads and matches in {' + '.join(r['requirements'])} "
                                     f"({r['where']})")
                m = json.loads((tmp / "manifest.json").read_text())
                m["compatibility"] = records
                write_json_atomic(tmp / "manifest.json", m)

            write_bundle(dest, fmt=fmt, model_bytes=art.data, manifest=manifest, golden=art.golden,
                         check=compat_check_tmp)
            result.bundles.append(BundleResult(t.name, fmt, dest, art, ok))
        result.report_path = out_dir / f"{name}.convert.json"
        write_json_atomic(result.report_path, result.to_dict())
    if result.missed:
        worst = max(result.missed, key=lambda b: validate.budget_drop(b.artifact.metrics))
        raise BudgetMissed(f"{len(result.missed)} bundle(s) miss --max-accuracy-drop "
                           f"{max_accuracy_drop}: worst {worst.path.name} drops "
                           f"{validate.budget_drop(worst.artifact.metrics):.2f} points",
                           hint=f"report written to {result.report_path}; "
                                + ("quantization-aware training (edgekit qat) may recover it in full INT8"
                                   if (mixed_precision or source.qat) else
                                   "allow mixed precision (drop --no-mixed-precision), or try edgekit qat"))
    return result


def _datasets(specs, calib, val, preprocess, calib_samples, random_calibration):
    if random_calibration:
        calib_ds = random_dataset(specs, calib_samples, seed=0)
        val_ds = random_dataset(specs, max(8, min(64, calib_samples)), seed=1)
        info = {"source": "random", "random": True, "validation_source": "random",
                "note": "random calibration: accuracy figures mean nothing"}
    else:
        full = load_dataset(calib, specs, what="calibration", preprocess=preprocess)
        info = {"source": str(calib), "random": False}
        if val is not None:
            val_ds = load_dataset(val, specs, what="validation", preprocess=preprocess)
            calib_ds = full.take(slice(0, calib_samples))
            info["validation_source"] = str(val)
        elif len(full) >= 10:
            n_val = max(1, int(round(len(full) * HELD_OUT)))
            val_ds = full.take(slice(len(full) - n_val, len(full)))
            calib_ds = full.take(slice(0, min(calib_samples, len(full) - n_val)))
            info["validation_source"] = f"held-out last {n_val} of {calib}"
        else:
            calib_ds, val_ds = full.take(slice(0, calib_samples)), full
            info["validation_source"] = f"{calib} (too few samples to hold any out: same data)"
    info.update(samples=len(calib_ds), validation_samples=len(val_ds),
                ranges=_data_summary(calib_ds), labels=val_ds.labels is not None)
    return calib_ds, val_ds, info


class _Ctx:
    """What every artifact of one conversion is measured against."""

    def __init__(self, val: Dataset, ref_outputs, ref_in: List[str], ref_out: List[str]):
        self.val, self.ref_outputs, self.ref_in, self.ref_out = val, ref_outputs, ref_in, ref_out


def _measure(data: bytes, fmt: str, ctx: _Ctx, timing_runs: int = 0) -> Dict[str, Any]:
    """Load an artifact with the runtime; validation metrics, float ops, I/O, golden data."""
    from edgekit.convert import onnx as onnx_conv
    from edgekit.convert import tflite as tflite_conv

    with tempfile.TemporaryDirectory(prefix="edgekit-art-") as d:
        path = Path(d) / MODEL_FILES[fmt]
        path.write_bytes(data)
        q = load_model(path, providers=["CPUExecutionProvider"])
        got = _by_ref_names(q.run(**_feeds(q, ctx.val.inputs, ctx.ref_in)), q, ctx.ref_out)
        metrics = validate.compare(ctx.ref_outputs, got, ctx.ref_out, ctx.val.labels)
        n = min(GOLDEN_SAMPLES, len(ctx.val))
        g_in = _feeds(q, ctx.val.take(slice(0, n)).inputs, ctx.ref_in)
        g_out = q.run(**g_in)
        golden = {f"input:{k}": v for k, v in g_in.items()}
        golden.update({f"output:{k}": v for k, v in g_out.items()})
        p50 = _p50(q, timing_runs) if timing_runs else None
        return {"metrics": metrics, "golden": golden, "p50_ms": p50,
                "float_ops": tflite_conv.float_ops(path) if fmt == "tflite" else onnx_conv.float_ops(data),
                "inputs": [s.to_dict() for s in q.inputs], "outputs": [s.to_dict() for s in q.outputs],
                "golden_backend": f"{q.backend} {q.backend_version} on {platform.machine()}"}


def _p50(model, runs: int) -> float:
    return model.benchmark(runs=runs, warmup=10, end_to_end=False)["latency"]["p50_ms"]


def _build(source: Source, fmt: str, build, calib: Dataset, ctx: _Ctx, float_onnx: Dict[int, bytes],
           progress: Progress, target: str, mixed: Optional[Dict[str, Any]] = None) -> Artifact:
    from edgekit.convert import onnx as onnx_conv
    from edgekit.convert import tflite as tflite_conv

    t0 = time.monotonic()
    tick = progress.ticker(f"[{target}] calibrating", " samples")
    with captured_stderr() as cap:
        try:
            if fmt == "tflite":
                data = tflite_conv.to_tflite(source.saved_model, calib, build, tick)
                float_bytes = len(source.float_tflite)
            else:
                if build.opset not in float_onnx:
                    float_onnx[build.opset] = (
                        onnx_conv.saved_model_to_onnx(source.onnx_saved_model or source.saved_model,
                                                      build.opset)
                        if source.is_tf else onnx_conv.adapt_opset(source.onnx_bytes, build.opset))
                float_bytes = len(float_onnx[build.opset])
                data = (onnx_conv.to_fp16(float_onnx[build.opset]) if build.fp16 else
                        onnx_conv.quantize(float_onnx[build.opset], calib, build, tick,
                                           range_overrides=source.input_ranges))
        except EdgekitError:
            raise
        except Exception as e:
            native = "; ".join(cap.tail(3))
            raise ConversionError(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                  + (f" [{native}]" if native else ""),
                                  target=target, stage=f"{fmt} conversion") from None
    m = _measure(data, fmt, ctx)
    record = None
    drop = validate.budget_drop(m["metrics"])
    if mixed is not None and drop is not None and drop > mixed["max_drop"]:
        progress.say(f"[{target}] {fmt}: full INT8 drops {drop:.2f} points > {mixed['max_drop']}: "
                     "searching for layers to keep in float")
        found = _mixed_search(source, fmt, build, calib, ctx, float_onnx, data, m, mixed, progress, target)
        record = found["record"]
        if found["chosen"] is not None:
            data = found["chosen"].data
            m = _measure(data, fmt, ctx)
    import dataclasses

    art = Artifact(fmt, data, float_bytes, m["metrics"], m["float_ops"], m["inputs"], m["outputs"],
                   m["golden"], time.monotonic() - t0, dataclasses.asdict(build))
    art.golden_backend = m["golden_backend"]
    art.mixed = record
    return art


def _mixed_search(source: Source, fmt: str, build, calib: Dataset, ctx: _Ctx, float_onnx: Dict[int, bytes],
                  int8_data: bytes, int8_measured: Dict[str, Any], mixed: Dict[str, Any], progress: Progress,
                  target: str) -> Dict[str, Any]:
    from edgekit.convert import mixed as mp
    from edgekit.convert import onnx as onnx_conv

    with captured_stderr():
        if fmt == "tflite":
            layers = mp.tflite_sensitivity(source.saved_model, calib, source.layer_names)
        else:
            layers = mp.onnx_sensitivity(float_onnx[build.opset], int8_data, calib, source.layer_names)

    def make(nodes):
        with captured_stderr():
            if fmt == "tflite":
                return mp.tflite_with_float(source.saved_model, calib, nodes)
            return onnx_conv.quantize(float_onnx[build.opset], calib, build, nodes_to_exclude=nodes)

    def evaluate(data):
        return _measure(data, fmt, ctx, timing_runs=50)

    with tempfile.TemporaryDirectory(prefix="edgekit-art-") as d:  # full INT8 is measured; time it alike
        path = Path(d) / MODEL_FILES[fmt]
        path.write_bytes(int8_data)
        full = dict(int8_measured, p50_ms=_p50(load_model(path, providers=["CPUExecutionProvider"]), 50))
    res = mp.search(layers, make, evaluate, validate.budget_drop, mixed["max_drop"], mixed["seconds"],
                    mixed["first"], progress.say)
    chosen = res["chosen"]
    record = {
        "budget_points": mixed["max_drop"], "metric": "accuracy" if ctx.val.labels is not None else "top-1 agreement",
        "sensitivity": [{"layer": lay.source, "node": lay.node, "op": lay.op, "score": lay.sensitivity}
                        for lay in layers],
        "full_int8": {"bytes": len(int8_data), "drop": validate.budget_drop(full["metrics"]),
                      "p50_ms": full["p50_ms"]},
        "steps": [c.summary() for c in res["tried"]], "stopped": res["stopped"],
        "float_layers": [lay.source for lay in chosen.float_layers] if chosen else None,
        "met": chosen is not None,
    }
    if chosen is not None:
        progress.say(f"[{target}] {fmt}: kept in float: {', '.join(record['float_layers'])} "
                     f"(drop {chosen.drop:.2f}, {len(chosen.data) / 1024:.1f} KiB)")
    else:
        progress.say(f"[{target}] {fmt}: no candidate met the budget ({res['stopped']}); full INT8 kept")
    return {"chosen": chosen, "record": record}


def _precision(art: Artifact) -> str:
    b = art.build
    if b.get("fp16") or b.get("activations") == "float16":
        return "fp16"
    if b.get("activations") == "int16" or b.get("activation_type") == "int16":
        return "int16x8"
    return "int8"


def _manifest(name: str, t: TargetProfile, art: Artifact, result: ConvertResult,
              budget: Optional[float], ok: Optional[bool]) -> Dict[str, Any]:
    return {
        "name": name,
        "edgekit_version": edgekit.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": t.to_dict(),
        "model": {"precision": _precision(art) + ("+float" if art.mixed and art.mixed.get("met") else ""),
                  "build": art.build},
        "inputs": art.inputs,
        "outputs": art.outputs,
        "source": result.source,
        "calibration": result.calibration,
        "validation": dict(art.metrics, float_bytes=art.float_bytes, int8_bytes=len(art.data),
                           size_ratio=len(art.data) / art.float_bytes, float_ops=art.float_ops,
                           max_accuracy_drop=budget, within_budget=ok,
                           reference="float32 TFLite of the source (no quantization)"
                           if result.source["kind"] != "onnx" else "the source ONNX model, float32"),
        "mixed_precision": art.mixed,
        "golden": {"file": "golden.npz", "samples": int(next(iter(art.golden.values())).shape[0]),
                   "made_with": art.golden_backend, "min_snr_db": MIN_SNR_DB,
                   "min_top1_agreement": MIN_TOP1},
    }
