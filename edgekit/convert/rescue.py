"""The rescue ladder: what convert tries, in order, when a profile's build misses the fidelity floor.

Each rung is a complete artifact, measured like any other (same validation data, the target's
numerics), and recorded; the first that meets the floor is shipped, and the report says which.

1. ranges: activation ranges chosen per tensor by the error they cause in the model's outputs,
   built by the format's own quantizer with those ranges: ONNX (convert.ranges: ONNX Runtime's
   quantizer with TensorQuantOverrides), TFLite (convert.tflite_ranges: the converter's
   calibrated model with edited min/max, then TensorFlow's MLIR quantizer), 8-bit static builds.
2. calibration: ONNX Runtime's percentile (99.999%) and entropy calibration.
3. scheme: per-tensor instead of per-channel weights (both formats); symmetric instead of
   asymmetric INT8 activations where the profile allows (ONNX); on x86 without VNNI, uint8
   weights (u8 x u8: exact there, full 8-bit weights instead of 7, slower kernels). Never a
   scheme that would saturate on the target (u8 x 7-bit or u8 x u8 on x86 without VNNI).
4. float for the worst layers (mixed precision): the sensitivity search of convert.mixed with the
   floor as its budget (a few float layers usually run faster than a whole 16-bit model). TFLite:
   where rung 1's ranges helped but missed, the candidates are first built on those ranges (fewer
   layers need float: ResNet-8 2 instead of 6), and if none meets the floor, from the profile's
   calibration (ranges chosen for an all-INT8 model can hurt once a layer is float).
5. 16-bit activations, 8-bit weights (TFLite 16x8, ONNX 16-bit QDQ), whole model.
Still below the floor: a Failure with the reason, the worst layers and every step.
The first rung that meets the floor is not the last word: convert.faithful then weighs it (as it
weighs an unrescued build) against the more faithful builds of about its speed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from edgekit.convert import measure as measuring
from edgekit.convert import numerics, validate
from edgekit.convert.build import convert_once, error_line, float_onnx_for, precision_of
from edgekit.convert.native import captured_stderr
from edgekit.convert.result import Artifact, Failure
from edgekit.convert.validate import primary_snr
from edgekit.progress import Progress


def _step(rung: str, what: str, metrics: Optional[Dict[str, Any]] = None, data: bytes = b"",
          meets: bool = False, error: Optional[str] = None, seconds: float = 0.0, floor=None,
          **extra) -> Dict[str, Any]:
    """One rung's record (JSON-ready): what was tried, its figures, whether it met the floor."""
    d = {"rung": rung, "what": what, "meets": meets, "seconds": round(seconds, 2), "error": error}
    if metrics is not None:
        d.update(top1_agreement=metrics.get("top1_agreement"), snr_db=primary_snr(metrics),
                 accuracy_drop_points=metrics.get("accuracy_drop_points"), bytes=len(data),
                 misses=validate.floor_misses(metrics, floor) if floor is not None else None)
    d.update(extra)
    return d


def _variants(row, source) -> List[Tuple[str, str, Any]]:
    """(rung, description, build) for rungs 2-4, in order; only builds the target can run well."""
    b = row.build
    out: List[Tuple[str, str, Any]] = []
    if row.fmt == "onnx" and not b.fp16 and not b.dynamic and b.activation_type in ("int8", "uint8"):
        for method in ("percentile", "entropy"):
            if method != b.calibration:
                out.append(("calibration", f"{method} calibration", dataclasses.replace(b, calibration=method)))
        if b.per_channel:
            out.append(("scheme", "per-tensor weights", dataclasses.replace(b, per_channel=False)))
        if (b.activation_type == "uint8" and b.weight_type == "int8" and b.reduce_range
                and not numerics.target_exact_int8(row.profile)):
            # x86 without VNNI: u8 x u8 runs on widening 16-bit madds (exact, slower than VPMADDUBSW) and gives
            # the weights their 8th bit back (digits CNN 32.9 -> 36.7 dB, detector 29.9 -> 32.3, encoder 33.1 -> 35.8)
            out.append(("scheme", "uint8 weights (u8 x u8: exact without VNNI, full 8-bit weights)",
                        dataclasses.replace(b, weight_type="uint8", reduce_range=False)))
        if b.activation_type == "int8" and not b.symmetric_activations:
            out.append(("scheme", "symmetric activations", dataclasses.replace(b, symmetric_activations=True)))
        elif b.activation_type == "int8" and b.symmetric_activations and not row.profile.onnx.symmetric_activations:
            out.append(("scheme", "asymmetric activations", dataclasses.replace(b, symmetric_activations=False)))
        # 16-bit QDQ runs as dequantize -> float op (no u8 x s8 kernel to saturate): full-range weights
        out.append(("16-bit", "16-bit activations, 8-bit weights",
                    dataclasses.replace(b, activation_type="int16", symmetric_activations=False, reduce_range=False)))
    elif row.fmt == "tflite" and b.activations == "int8":
        if b.per_channel:
            out.append(("scheme", "per-tensor weights", dataclasses.replace(b, per_channel=False)))
        out.append(("16-bit", "16-bit activations, 8-bit weights", dataclasses.replace(b, activations="int16")))
    return out


class _Ladder:
    """One artifact's walk up the ladder: the steps so far, the best candidate, the time left."""

    def __init__(self, row, recipe, source, calib, ctx: measuring.Context, float_onnx: Dict[int, bytes],
                 plain: Artifact, progress: Progress):
        self.row, self.recipe, self.source, self.calib, self.ctx = row, recipe, source, calib, ctx
        self.float_onnx, self.plain, self.progress = float_onnx, plain, progress
        self.floor = recipe.floor
        self.deadline = time.monotonic() + recipe.search.seconds
        self.label = f"[{row.profile.name}] {row.fmt}"
        self.steps = [_step("profile", "the profile's build (min/max calibration)", plain.metrics, plain.data,
                            floor=self.floor)]
        self.best: Tuple[tuple, Artifact] = (validate.score(plain.metrics), plain)
        self.worst: List[str] = []
        self.tflite_base: Optional[Tuple[bytes, Dict[str, Tuple[float, float]]]] = None   # ranges that helped

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def attempt(self, rung: str, what: str, make: Callable[[], bytes], build, extra=None) -> Optional[Artifact]:
        """Build, measure and judge one candidate; the artifact if it meets the floor."""

        if self.out_of_time():
            self.steps.append(_step(rung, what, error=f"not tried: search budget of "
                                                      f"{self.recipe.search.seconds:.0f} s spent"))
            return None
        t0, row = time.monotonic(), self.row
        num = numerics.for_onnx(row.profile, build) if row.fmt == "onnx" else row.numerics
        with captured_stderr() as cap:
            try:
                data = make()
                m = measuring.measure(data, row.fmt, self.ctx, num)
            except Exception as e:  # a rung the converter cannot build is recorded, and the ladder goes on
                self.steps.append(_step(rung, what, error=error_line(e, cap), seconds=time.monotonic() - t0))
                self.progress.say(f"{self.label}: rescue: {what}: failed ({self.steps[-1]['error'][:120]})")
                return None
        misses = validate.floor_misses(m.metrics, self.floor)
        self.steps.append(_step(rung, what, m.metrics, data, meets=not misses, seconds=time.monotonic() - t0,
                                floor=self.floor, **(extra or {})))
        self.progress.say(f"{self.label}: rescue: {what}: " + ("meets the floor" if not misses else "; ".join(misses)))
        art = Artifact(row.fmt, data, self.plain.float_bytes, m.metrics, m.float_ops, m.inputs, m.outputs, m.golden,
                       0.0, dataclasses.asdict(build), precision_of(build),
                       measuring.numerics_record(num, m), m.backend)
        if validate.score(m.metrics) > self.best[0]:
            self.best = (validate.score(m.metrics), art)
        return None if misses else self.shipped(art, what)

    def shipped(self, art: Artifact, what: str) -> Artifact:
        art.rescue, art.rescued_by = self.steps, what
        return art

    def ranges(self) -> Optional[Artifact]:
        """Rung 1: activation ranges by output error (ONNX, 8-bit static)."""

        b = self.row.build
        if self.row.fmt == "tflite":
            return self.tflite_ranges()
        if b.fp16 or b.dynamic or b.activation_type not in ("int8", "uint8"):
            return None
        from edgekit.convert import onnx as onnx_conv
        from edgekit.convert import ranges

        f = float_onnx_for(self.source, b.opset, self.float_onnx)
        with captured_stderr():
            chosen = ranges.choose(self.plain.data, onnx_conv.preprocess(f), self.calib,
                                   seconds=max(5.0, 0.4 * (self.deadline - time.monotonic())),
                                   say=self.progress.say)
        search = {k: v for k, v in chosen.items() if k != "overrides"}
        if not chosen["overrides"]:
            self.steps.append(_step("ranges", "ranges by output error", error="no clip lowered the output error",
                                    search=search))
            return None
        overrides = dict(self.source.input_ranges, **chosen["overrides"])
        return self.attempt("ranges", f"ranges by output error ({len(chosen['overrides'])} tensors clipped)",
                            lambda: onnx_conv.quantize(f, self.calib, b, range_overrides=overrides), b,
                            {"search": search})

    def tflite_ranges(self) -> Optional[Artifact]:
        """Rung 1 for TFLite: the calibrated model's min/max chosen by output error, then TensorFlow's
        MLIR quantizer in the profile's scheme (convert.tflite_ranges)."""
        from edgekit.convert import tflite_ranges as tr

        b = self.row.build
        if not tr.supported(b) or self.source.saved_model is None:
            return None
        what = "ranges by output error"
        if self.out_of_time():
            self.steps.append(_step("ranges", what, error="not tried: search budget spent"))
            return None
        t0 = time.monotonic()
        with captured_stderr() as cap:
            try:
                calibrated = tr.calibrate(self.source.saved_model, self.calib, b)
                chosen = tr.choose(calibrated, self.calib, b,
                                   seconds=max(5.0, 0.4 * (self.deadline - time.monotonic())), say=self.progress.say)
            except Exception as e:  # the search cannot run on this model: recorded, and the ladder goes on
                self.steps.append(_step("ranges", what, error=error_line(e, cap),
                                        seconds=time.monotonic() - t0))
                return None
        search = {k: v for k, v in chosen.items() if k != "ranges"}
        search["seconds"] = round(time.monotonic() - t0, 2)
        if not chosen["ranges"]:
            self.steps.append(_step("ranges", what, error="no clip lowered the output error", search=search,
                                    seconds=time.monotonic() - t0))
            return None
        search["ranges"] = {k: [round(v[0], 6), round(v[1], 6)] for k, v in chosen["ranges"].items()}
        best = self.best[1]
        got = self.attempt("ranges", f"{what} ({len(chosen['ranges'])} tensors clipped)",
                           lambda: tr.build_with(self.source.saved_model, calibrated, b, chosen["ranges"]), b,
                           {"search": search})
        if got is None and self.best[1] is not best:       # missed, but better than the profile's build:
            self.tflite_base = (calibrated, chosen["ranges"])   # the float-layers rung starts from these ranges
        return got

    def variant(self, rung: str, what: str, build) -> Optional[Artifact]:
        """Rungs 2, 3 and 5: another build of the whole model."""

        return self.attempt(rung, what, lambda: convert_once(self.source, self.row.fmt, build, self.calib,
                                                              self.float_onnx)[0], build)

    def float_layers(self) -> Optional[Artifact]:
        """Rung 4: the worst layers in float (mixed precision, the floor as its budget)."""
        if not self.recipe.search.mixed_precision or self.plain.precision != "int8":
            return None
        # TFLite: first on the ranges rung 1 chose (fewer float layers where they help); ranges chosen for
        # an all-INT8 model can hurt once a layer is float, so then again from the profile's calibration
        for base in ([self.tflite_base, None] if self.tflite_base else [None]):
            on = " (on the ranges chosen by output error)" if base else ""
            if self.out_of_time():
                self.steps.append(_step("float layers", f"mixed precision{on}",
                                        error="not tried: search budget spent"))
                return None
            found = _mixed(self.row, self.recipe, self.source, self.calib, self.ctx, self.float_onnx, self.plain,
                           self.progress, self.deadline, base)
            self.worst = found["worst"]
            kept = ", ".join(found["record"]["float_layers"] or []) or "none met the floor"
            self.steps.append(_step("float layers", f"mixed precision{on}: {kept}", found["chosen_metrics"],
                                    found["chosen_data"] or b"", meets=found["chosen"] is not None, floor=self.floor,
                                    tried=len(found["record"]["steps"])))
            if found["chosen"] is not None:
                found["chosen"].mixed = found["record"]
                return self.shipped(found["chosen"], "float for the worst layers")
        return None

    def failure(self) -> Failure:
        art = self.best[1]
        misses = validate.floor_misses(art.metrics, self.floor)
        return Failure("fidelity floor",
                       f"{'; '.join(misses)} even after the rescue ladder (best: {steps_best(self.steps)})",
                       hint="see the report's rescue steps; try edgekit qat, a larger --search-budget, or lower "
                            "--min-snr / --min-agreement if the figures are acceptable",
                       worst_layers=self.worst, rescue=self.steps, metrics=art.metrics)


def ladder(row, recipe, source, calib, ctx: measuring.Context, float_onnx: Dict[int, bytes], plain: Artifact,
           progress: Progress):
    """Artifact (rescued) or Failure (nothing met the floor): the rungs in order, first success wins."""
    walk = _Ladder(row, recipe, source, calib, ctx, float_onnx, plain, progress)
    variants = _variants(row, source)
    rungs = [("ranges", walk.ranges)]
    rungs += [(v[0], lambda v=v: walk.variant(*v)) for v in variants if v[0] != "16-bit"]
    rungs += [("float layers", walk.float_layers)]
    rungs += [(v[0], lambda v=v: walk.variant(*v)) for v in variants if v[0] == "16-bit"]   # slowest on most runtimes
    only = recipe.search.rungs
    for name, rung in rungs:
        if only and name not in only:
            continue
        got = rung()
        if got is not None:
            return got
    return walk.failure()


def steps_best(steps: List[Dict[str, Any]]) -> str:
    measured = [s for s in steps if s.get("top1_agreement") is not None or s.get("snr_db") is not None]
    if not measured:
        return "none measured"
    s = max(measured, key=lambda s: ((s.get("top1_agreement") if s.get("top1_agreement") is not None else 1.0),
                                     s.get("snr_db") or -1e9))
    agree = s.get("top1_agreement")
    return f"{s['what']}: " + (f"agreement {100 * agree:.1f}%, " if agree is not None else "") + \
        f"SNR {s['snr_db']:.1f} dB"


def _mixed(row, recipe, source, calib, ctx, float_onnx, plain: Artifact, progress: Progress,
           deadline: float, tflite_base=None) -> Dict[str, Any]:
    from edgekit.convert import mixed as mp
    from edgekit.convert import onnx as onnx_conv

    floor = recipe.floor
    with captured_stderr():
        if row.fmt == "tflite":
            layers = mp.tflite_sensitivity(source.saved_model, calib, source.layer_names)
        else:
            layers = mp.onnx_sensitivity(float_onnx_for(source, row.build.opset, float_onnx),
                                         plain.data, calib, source.layer_names)

    def make(nodes):
        with captured_stderr():
            if row.fmt == "tflite" and tflite_base is not None:   # the chosen ranges, these nodes in float
                from edgekit.convert import tflite_ranges as tr

                return tr.build_with(source.saved_model, tflite_base[0], row.build, tflite_base[1], float_nodes=nodes)
            if row.fmt == "tflite":
                return mp.tflite_with_float(source.saved_model, calib, nodes)
            return onnx_conv.quantize(float_onnx[row.build.opset], calib, row.build, nodes_to_exclude=nodes,
                                      range_overrides=source.input_ranges)

    measured: Dict[int, measuring.Measured] = {}

    def evaluate(data):
        m = measuring.measure(data, row.fmt, ctx, row.numerics, timing_runs=30)
        measured[id(data)] = m
        return {"metrics": m.metrics, "p50_ms": m.p50_ms}

    def judge(metrics):
        return (not validate.floor_misses(metrics, floor), validate.budget_drop(metrics))

    res = mp.search(layers, make, evaluate, judge, max(1.0, deadline - time.monotonic()), recipe.search.first,
                    progress.say)
    chosen = res["chosen"]
    record = {
        "floor": dataclasses.asdict(floor),
        "sensitivity": [{"layer": lay.source, "node": lay.node, "op": lay.op, "score": lay.sensitivity}
                        for lay in layers],
        "full_int8": {"bytes": len(plain.data), "drop": validate.budget_drop(plain.metrics)},
        "steps": [c.summary() for c in res["tried"]], "stopped": res["stopped"],
        "float_layers": [lay.source for lay in chosen.float_layers] if chosen else None,
        "met": chosen is not None,
    }
    art = None
    if chosen is not None:
        m = measured[id(chosen.data)]
        art = Artifact(row.fmt, chosen.data, plain.float_bytes, m.metrics, m.float_ops, m.inputs, m.outputs,
                       m.golden, 0.0, plain.build, plain.precision,
                       measuring.numerics_record(row.numerics, m), m.backend)
        progress.say(f"[{row.profile.name}] {row.fmt}: kept in float: {', '.join(record['float_layers'])}")
    return {"chosen": art, "record": record, "worst": [lay.source for lay in layers[:5]],
            "chosen_metrics": chosen.metrics if chosen else None, "chosen_data": chosen.data if chosen else None}
