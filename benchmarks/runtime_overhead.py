"""The runtime's overhead: `load(bundle)(x)` (float in, float out) against the best bare
interpreter loop, side by side in one run.

For each bundle (ResNet-8 and MobileNetV2, the rpi4 INT8 TFLite and the x86-avx2 INT8 ONNX
bundles made by `edgekit convert`; the x86-avx2 bundle on ONNX Runtime and, where openvino is
installed, on OpenVINO) and each thread count (1, 2):

    bare      the backend's own API, written the fastest way, doing the same work as
              model(x): float in, float out. TFLite (an int8-io bundle): quantize x
              (rint(x / scale) + zero point, clipped, cast: the converter's arithmetic),
              set_tensor + invoke + get_tensor, dequantize ((q - zero point) * scale),
              every call, the constants made once beforehand. ONNX Runtime (a QDQ bundle
              takes and gives float): InferenceSession.run (intra-op threads set, inter-op 1)
    edgekit   model = load(bundle, threads=t); model(x) with float x: quantize, shape
              checks, run, dequantize, every call

Until this version the bare TFLite loop quantized its input once, before the clock, and
returned the raw int8 output: it did less work than model(x), and that difference
(quantize + dequantize, about 10 us a call on this machine) was counted as the runtime's
overhead (+4.4-5.4% on ResNet-8's int8-io bundle).

and `load(bundle)` with no threads= (the default: the count runtime.threadprobe measures fastest,
at most the profile's count clamped to the CPUs this process may use) against the best bare
loop of any thread count.

Rounds alternate bare / edgekit (A B A B ...) so drift on a shared machine hits both; a
round's figure is p50 over --runs calls; the overhead is the median over rounds of
p50(edgekit) / p50(bare).

On a loaded machine the A/B figure swings by more than the 3% it is meant to resolve, so a
paired figure is measured too: inside each edgekit call, the time spent in the backend
(set inputs, invoke, get outputs) is clocked apart from the whole call; the call's own
cost is the median of (call - backend) over all calls. The bare loop's own cost (its
quantize and dequantize, outside set_tensor .. get_tensor) is clocked the same way, and
the paired overhead is the difference of the two costs over the bare loop's p50. Both the
whole call and its backend part see the same moment's load, so their difference does not
carry it.

    python benchmarks/runtime_overhead.py [--models resnet8,mobilenetv2] [--rounds 9] [--runs 100]
        [--work DIR] [--out benchmarks/results/runtime_overhead.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import ROOT, Workdir, cpu_kind, default_work, say, write_result  # noqa: E402

LIMIT = 1.03


def bare_loop(bundle: Path, fmt: str, threads: int, x: np.ndarray, spec, backend: Optional[str] = None):
    """A closure running one inference with the backend's own API, fastest form."""
    model_file = next(bundle.glob("model.*"))
    if backend == "openvino":
        return _bare_openvino(model_file, threads, x)
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        from edgekit.runtime import load

        it = Interpreter(model_path=str(model_file), num_threads=threads)
        it.allocate_tensors()
        i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        out_spec = load(bundle, threads=threads).outputs[0]
        assert spec.quantized and out_spec.quantized, "the TFLite bundles measured here are int8-io"
        set_tensor, invoke, get_tensor = it.set_tensor, it.invoke, it.get_tensor
        rint, divide, f32 = np.rint, np.divide, np.float32
        q_dtype = np.dtype(spec.dtype)
        lo, hi = f32(np.iinfo(q_dtype).min), f32(np.iinfo(q_dtype).max)
        s_in, zp_in = f32(spec.scale[0]), f32(spec.zero_point[0])
        s_out, zp_out = f32(out_spec.scale[0]), f32(out_spec.zero_point[0])
        try:
            clip = np._core.umath.clip   # the ufunc: np.clip's Python wrapper costs more than the clipping
        except AttributeError:
            clip = np.core.umath.clip

        def run():
            q = rint(divide(x, s_in, dtype=f32))   # round half to even, as the converter does
            q += zp_in
            clip(q, lo, hi, out=q)
            set_tensor(i, q.astype(q_dtype))
            invoke()
            y = get_tensor(o).astype(f32)
            y -= zp_out
            y *= s_out
            return y

        def clocked(inner_ns):
            """run(), its backend part (set_tensor .. get_tensor) clocked into inner_ns."""
            q = rint(divide(x, s_in, dtype=f32))
            q += zp_in
            clip(q, lo, hi, out=q)
            q = q.astype(q_dtype)
            t0 = time.perf_counter_ns()
            set_tensor(i, q)
            invoke()
            y = get_tensor(o)
            inner_ns.append(time.perf_counter_ns() - t0)
            y = y.astype(f32)
            y -= zp_out
            y *= s_out
            return y
        # the same work gives the same numbers as model(x)
        np.testing.assert_array_equal(run(), load(bundle, threads=threads)(x))
        run.clocked = clocked
        return run
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: spec.quantize(x)}
    sess_run = sess.run

    def run():
        return sess_run(None, feed)[0]

    def clocked(inner_ns):
        t0 = time.perf_counter_ns()
        y = sess_run(None, feed)[0]
        inner_ns.append(time.perf_counter_ns() - t0)
        return y
    run.clocked = clocked
    return run


def _bare_openvino(model_file: Path, threads: int, x: np.ndarray):
    """OpenVINO's own API: compiled for x's shape with the runtime's settings (latency hint, one
    stream, INFERENCE_NUM_THREADS), one infer request; the QDQ bundle takes and gives float."""
    import openvino as ov

    from edgekit.runtime.openvino import OpenVinoBackend

    core = ov.Core()
    model = core.read_model(str(model_file))
    model.reshape({0: ov.PartialShape(list(x.shape))})
    compiled = core.compile_model(model, "CPU", dict(OpenVinoBackend.DEFAULT_CONFIG, INFERENCE_NUM_THREADS=threads))
    req = compiled.create_infer_request()
    tensor = ov.Tensor(x, shared_memory=True)

    def run():
        req.set_input_tensor(0, tensor)
        req.infer()
        return req.get_output_tensor(0).data.copy()

    def clocked(inner_ns):
        t0 = time.perf_counter_ns()
        y = run()
        inner_ns.append(time.perf_counter_ns() - t0)
        return y
    run.clocked = clocked
    return run


class _Clocked:
    """Wraps a backend: clocks set_inputs .. get_outputs inside each call."""

    def __init__(self, impl):
        self._impl = impl
        self.inner_ns = []
        self._t0 = 0

    def __getattr__(self, name):
        return getattr(self._impl, name)

    def set_inputs(self, arrays):
        self._t0 = time.perf_counter_ns()
        self._impl.set_inputs(arrays)

    def invoke(self):
        self._impl.invoke()

    def get_outputs(self):
        out = self._impl.get_outputs()
        self.inner_ns.append(time.perf_counter_ns() - self._t0)
        return out

    def run1(self, a):  # model(x)'s steady-state path
        t0 = time.perf_counter_ns()
        out = self._impl.run1(a)
        self.inner_ns.append(time.perf_counter_ns() - t0)
        return out


def paired_cost_us(m, x, runs: int) -> float:
    """Median over calls of (whole model(x) call - its backend part), microseconds."""
    clocked = _Clocked(m._impl)
    m._impl = clocked
    m._fast = (None, None, None)   # the steady-state path is made again, around the clocked backend
    try:
        total = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            m(x)
            total.append(time.perf_counter_ns() - t0)
    finally:
        m._impl = clocked._impl
        m._fast = (None, None, None)
    return float(np.median(np.subtract(total, clocked.inner_ns))) / 1e3


def bare_cost_us(bare, runs: int) -> float:
    """The bare loop's own cost the same way: median of (whole call - its backend part)."""
    total, inner = [], []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        bare.clocked(inner)
        total.append(time.perf_counter_ns() - t0)
    return float(np.median(np.subtract(total, inner))) / 1e3


def p50_ms(fn, runs: int) -> float:
    clock = time.perf_counter_ns
    s = []
    for _ in range(runs):
        t0 = clock()
        fn()
        s.append(clock() - t0)
    return float(np.percentile(s, 50)) / 1e6


def measure(pairs, rounds: int, runs: int):
    """pairs: {label: (bare fn, edgekit fn)} -> per label lists of round p50s, interleaved."""
    res = {k: {"bare": [], "edgekit": []} for k in pairs}
    for fb, fe in pairs.values():
        for _ in range(max(10, runs // 5)):  # warm-up
            fb()
            fe()
    for r in range(rounds):
        for k, (fb, fe) in pairs.items():
            res[k]["bare"].append(p50_ms(fb, runs))
            res[k]["edgekit"].append(p50_ms(fe, runs))
        say(f"  round {r + 1}/{rounds}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet8,mobilenetv2")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--work", type=Path, default=default_work())
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime_overhead.json")
    a = ap.parse_args()
    from edgekit.runtime import load
    from edgekit.runtime.bench import conditions
    from edgekit.runtime.threads import cpu_budget
    from edgekit.table import render

    rows, table = [], []
    for name in a.models.split(","):
        w = Workdir(a.work, name)
        bundles = w.bundles()
        x = w.inputs("val")[:1]
        runs_of = [(f"{name}-rpi4", None), (f"{name}-x86-avx2", None)]
        if find_spec("openvino") is not None:
            runs_of.append((f"{name}-x86-avx2", "openvino"))
        for bname, backend in runs_of:
            if bname not in bundles:   # convert runs with --no-rescue here: below the floor, not written
                say(f"{bname}: not written by edgekit convert (missed the fidelity floor): skipped")
                continue
            b = bundles[bname]
            default = load(b, backend=backend)
            fmt = default.format
            say(f"{bname}: {fmt} ({default.backend}), default threads {default.threads} "
                f"(profile {default.threads_requested})")
            pairs, models = {}, {}
            for t in (1, 2):
                m = models[t] = load(b, threads=t, backend=backend)
                pairs[t] = (bare_loop(b, fmt, t, x, m.inputs[0], backend), lambda m=m: m(x))
            models["default"] = default
            pairs["default"] = (pairs[default.threads][0] if default.threads in (1, 2)
                                else bare_loop(b, fmt, default.threads, x, default.inputs[0], backend),
                                lambda: default(x))
            res = measure(pairs, a.rounds, a.runs)
            cost, bare_cost = {}, {}
            for t in pairs:   # alternating, like the rounds
                for _ in range(a.rounds):
                    cost.setdefault(t, []).append(paired_cost_us(models[t], x, a.runs))
                    bare_cost.setdefault(t, []).append(bare_cost_us(pairs[t][0], a.runs))
            cost = {t: float(np.median(v)) for t, v in cost.items()}
            bare_cost = {t: float(np.median(v)) for t, v in bare_cost.items()}
            best_bare = min(float(np.median(res[t]["bare"])) for t in (1, 2))
            for t, r in res.items():
                bare = float(np.median(r["bare"])) if t != "default" else best_bare
                ek = float(np.median(r["edgekit"]))
                ratios = [e / b_ for e, b_ in zip(r["edgekit"], r["bare"])]
                ratio = float(np.median(ratios)) if t != "default" else ek / best_bare
                row = {"model": name, "bundle": bname, "format": fmt, "backend": default.backend,
                       "threads": t if t != "default" else default.threads,
                       "threads_requested": None if t != "default" else default.threads_requested,
                       "default_threads": t == "default", "bare_p50_ms": bare, "edgekit_p50_ms": ek,
                       "ratio": ratio, "within_3pct": ratio <= LIMIT,
                       "call_cost_us": cost[t], "bare_cost_us": bare_cost[t],
                       "paired_ratio": 1 + (cost[t] - bare_cost[t]) / 1e3 / bare,
                       "paired_within_3pct": 1 + (cost[t] - bare_cost[t]) / 1e3 / bare <= LIMIT,
                       "bare_round_p50_ms": r["bare"], "edgekit_round_p50_ms": r["edgekit"]}
                rows.append(row)
                table.append([bname, f"{default.backend}", "default " + str(default.threads) if t == "default"
                              else t, bare, ek, f"{(ratio - 1) * 100:+.1f}%", cost[t], bare_cost[t],
                              f"{(row['paired_ratio'] - 1) * 100:+.2f}%",
                              "ok" if row["paired_within_3pct"] else "OVER"])
    cond = conditions()
    out = {"benchmark": "runtime_overhead", "method": __doc__, "rounds": a.rounds, "runs": a.runs,
           "cpu": cpu_kind(), "cpu_budget": cpu_budget(), "conditions": cond, "rows": rows}
    write_result(a.out, out)
    print(render(["bundle", "backend", "threads", "bare p50 ms", "load()(x) p50 ms", "A/B overhead",
                  "call cost us", "bare cost us", "paired overhead", "<=3%"], table))
    print(f"{cond['cpu_model']} ({cpu_kind()['kind']}), load average {cond['loadavg']}; "
          f"{a.rounds} alternating rounds x {a.runs} runs; default = best bare of 1 and 2 threads. "
          f"JSON: {a.out}")


if __name__ == "__main__":
    main()
