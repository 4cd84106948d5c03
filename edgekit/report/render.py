"""ReportData -> one self-contained HTML page (inline CSS and SVG; no script, no network).

A Content-Security-Policy forbids every external resource, so a chart that tried to load
anything would fail loudly in the browser's console instead of quietly needing a network.
"""

from __future__ import annotations

import math
import re
import time
from html import escape
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import edgekit
from edgekit.report import svg
from edgekit.report.collect import HERE, BundleInfo, ModelInfo, ReportData, Run, fraction

CSS = """
.wide{overflow-x:auto;max-width:100%}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px 32px;color:#222;
 max-width:1500px;line-height:1.4}
h1{font-size:24px;margin:0 0 4px} h4{font-size:14px;margin:16px 0 4px}
h2{font-size:20px;margin:32px 0 8px;border-bottom:2px solid #0072B2;
 padding-bottom:4px} h3{font-size:16px;margin:22px 0 6px}
p.meta,p.note{color:#555;font-size:13px;margin:4px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f6f9;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecea} span.bad{color:#b3261e;font-weight:600} span.ok{color:#1b7a3d}
span.muted{color:#888}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure.chart{width:min-content;margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:4px;background:#fff}
figure.chart figcaption{font-size:12px;color:#555;padding:2px 4px}
.grid{display:grid;gap:10px;align-items:start}
.grid .rowhead{font-size:13px;font-weight:600;align-self:center}
.grid .note{font-size:13px;color:#888;align-self:center;text-align:center}
.grid .colhead{font-size:13px;font-weight:600;text-align:center}
code{font-size:12px;background:#f4f4f4;padding:0 3px}
table.conditions td:nth-child(12){min-width:200px;font-size:12px} table.conditions td:nth-child(13){white-space:nowrap}
table.summary td:nth-child(-n+4),table.summary td:nth-child(8),table.conditions td:first-child{white-space:nowrap}
@media print{figure.chart{break-inside:avoid}}
"""

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _id(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(p for p in parts if p)).strip("-")


def _isnum(v: Any) -> bool:
    """A finite number (not a bool): what a figure read from a hand-edited manifest may not be ("x", true, [])."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:   # an int past float's range (JSON allows 1e400 written as digits)
        return False


def _num(v: Optional[float], fmt: str = "{:.3g}", empty: str = "–") -> str:
    """A figure, or `empty` for one missing or not a finite number."""
    return fmt.format(v) if _isnum(v) else empty


def _pct(v: Optional[float], digits: int = 2) -> str:
    return f"{v * 100:.{digits}f}" if _isnum(v) else "–"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "", numeric: Sequence[int] = (),
          bad_rows: Sequence[int] = ()) -> str:
    """An HTML table; cells are text (escaped) or Markup (HTML as is); rows in `bad_rows` shaded."""
    out = [f'<div class="wide"><table class="{cls}"><thead><tr>' + "".join(f"<th>{escape(h)}</th>" for h in headers)
           + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            text = v.html if isinstance(v, Markup) else escape("–" if v is None else str(v))
            cells.append(f'<td class="num">{text}</td>' if j in numeric else f"<td>{text}</td>")
        out.append(f'<tr{" class=bad" if i in bad_rows else ""}>' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


class Markup:
    def __init__(self, html: str):
        self.html = html


def figure(svg_text: str, chart_id: str, caption: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="chart" id="fig-{chart_id}" data-chart="{chart_id}">{svg_text}{cap}</figure>'


def _short_device(run: Run) -> str:
    return run.device if run.device != HERE else f"here ({run.conditions.get('hostname') or 'this machine'})"


def _fidelity(m: ModelInfo):
    """(value of a bundle in 0..1, axis label, what it is): accuracy with labels, else agreement."""
    if m.has_labels:
        return (lambda b: b.accuracy_quant), "accuracy of the converted model (%)", "accuracy"
    return (lambda b: b.agreement), "top-1 agreement with the float model (%)", "top-1 agreement"


def _budget(b: BundleInfo) -> Markup:
    if b.failure:
        return Markup(f'<span class="bad">FAILED</span> {escape(b.failure)}')
    if b.stale:
        return Markup(f'<span class="bad">STALE</span> {escape(b.stale)}')
    rescued = f" (rescued: {escape(str(b.rescued_by))})" if b.rescued_by else ""
    if b.within_budget is None:
        if b.status == "written":  # convert writes a bundle only when it meets the floor
            return Markup(f'<span class="ok">ok</span>{rescued}')
        return Markup('<span class="muted">–</span>')
    return Markup(f'<span class="ok">ok</span>{rescued}' if b.within_budget else '<span class="bad">MISSED</span>')


def summary(m: ModelInfo) -> str:
    devices = m.devices
    numerics = any(b.numerics for b in m.bundles)  # where fidelity was measured, when convert says
    headers = ["bundle", "target", "format", "precision", "KiB", "× float", "top-1 agree %",
               "accuracy % float → conv." if m.has_labels else "accuracy %", "SNR dB", "ops left in float"] \
        + (["numerics"] if numerics else []) + ["result"] \
        + [f"p50 ms {'here' if d == HERE else 'on ' + d}" for d in devices]
    rows, bad = [], []
    for i, b in enumerate(m.bundles):
        acc = (f"{_pct(b.accuracy_float)} → {_pct(b.accuracy_quant)}"
               if b.accuracy_quant is not None else "–")
        ratio = b.bytes / b.float_bytes if b.bytes and b.float_bytes else None
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(b.float_ops.items())) or "none"
        cells = [b.label, b.target, b.fmt, b.precision, _num(b.bytes / 1024 if b.bytes else None, "{:.1f}"),
                 _num(ratio, "{:.2f}"), _pct(b.agreement), acc, _num(b.snr_db, "{:.1f}"), ops] \
            + ([b.numerics or "–"] if numerics else []) + [_budget(b)]
        for d in devices:
            p = b.p50(d)
            src = "" if not (d == HERE and p is not None and not any(r.device == HERE for r in b.runs)) \
                else " (convert)"
            cells.append(_num(p, "{:.4g}") + src)
        rows.append(cells)
        if b.failure or b.stale or b.within_budget is False or any(c.get("checked") and c.get("ok") is False
                                                        for c in b.compatibility or []):
            bad.append(i)
    first_p50 = len(headers) - len(devices)
    return table(headers, rows, cls="summary", numeric=[4, 5, 6, 8] + list(range(first_p50, len(headers))),
                 bad_rows=bad)


def _point(b: BundleInfo, x: Optional[float], y: Optional[float], what: str, xunit: str) -> Optional[svg.Point]:
    if x is None or y is None:
        return None
    return svg.Point(x, y, b.target, b.fmt, tip=f"{b.label} ({b.precision}): {what} {y * 100:.2f}%, {x:.4g} {xunit}")


def tradeoff_charts(m: ModelInfo) -> str:
    value, ylabel, what = _fidelity(m)
    parts = []
    keys = dict(series_title="target", shape_title="format", series_order=[b.target for b in m.bundles],
                shape_order=["tflite", "onnx", *(b.fmt for b in m.bundles)])
    cid = _id(m.name, "fidelity-size")
    pts = [p for b in m.bundles if (p := _point(b, b.bytes / 1024 if b.bytes else None, value(b), what, "KiB"))]
    parts.append(figure(svg.scatter(pts, title=f"{what} vs size", x_label="model file size (KiB)",
                                    y_label=ylabel, y_percent=True, chart_id=cid, **keys),
                        cid, f"One point per bundle ({len(pts)}). Targets that share a build sit side by side."))
    for d in m.devices or [HERE]:
        cid = _id(m.name, "fidelity-p50", d)
        pts = [p for b in m.bundles if (p := _point(b, b.p50(d), value(b), what, "ms"))]
        where = "here" if d == HERE else f"on {d}"
        ms = [p.x for p in pts]
        parts.append(figure(svg.scatter(pts, title=f"{what} vs p50 latency {where}",
                                        x_label=f"p50 latency {where} (ms)", y_label=ylabel, y_percent=True,
                                        x_log=bool(ms) and min(ms) > 0 and max(ms) / min(ms) > 20,
                                        chart_id=cid, **keys),
                            cid, f"One point per bundle measured {where} ({len(pts)} of {len(m.bundles)})."
                            + ("" if pts else " Nothing measured: `edgekit bench BUNDLE --out "
                                              "BUILD/bench/NAME.json` or `edgekit profile`.")))
    return '<div class="charts">' + "".join(parts) + "</div>"


def latency_section(m: ModelInfo) -> str:
    measured = [b for b in m.bundles if any(r.samples_ms for r in b.runs)]
    if not measured:
        return ('<p class="note">No latency distributions: no benchmark or profile JSON with raw samples was '
                'found for this model (<code>edgekit bench BUNDLE --out BUILD/bench/NAME.json</code>, '
                '<code>edgekit profile BUNDLE --device D --save-dir BUILD/profiles</code>, or '
                '<code>--profiles DIR</code>).</p>')
    devices = [d for d in m.devices if any(r.device == d and r.samples_ms for b in measured for r in b.runs)]
    parts = ['<div class="charts">']
    for d in devices:
        series, cols, dashes = [], [], []
        for b in measured:
            r = _latest(b, d)
            if r is not None:
                series.append((b.label, r.samples_ms))
                cols.append(_target_colour(m, b))
                dashes.append("5 3" if b.fmt == "onnx" else "")
        cid = _id(m.name, "cdf", d)
        where = "here" if d == HERE else f"on {d}"
        parts.append(figure(svg.cdf(series, title=f"latency distribution {where} (CDF)",
                                    x_label="inference latency (ms)", chart_id=cid, colours=cols,
                                    dashes=dashes), cid,
                            "Each line: every timed run of one bundle (warm-up discarded), inference call alone; "
                            "colour: its target, as above; dashed: ONNX."))
    parts.append("</div>")
    parts.append("<h3>Histograms per bundle and device</h3>")
    where = {b.label: [d for d in devices if (r := _latest(b, d)) is not None and r.samples_ms] for b in measured}
    multi = [b for b in measured if len(where[b.label]) > 1]
    if multi:  # measured on several machines: one row per bundle, one column per machine, side by side
        cols = [d for d in devices if any(d in where[b.label] for b in multi)]
        grid = [f'<div class="grid" style="grid-template-columns:max-content repeat({len(cols)},max-content)">'
                '<div></div>']
        grid += [f'<div class="colhead">{escape("here" if d == HERE else d)}</div>' for d in cols]
        for b in multi:
            grid.append(f'<div class="rowhead">{escape(b.label)}</div>')
            for d in cols:
                r = _latest(b, d)
                if d not in where[b.label]:
                    grid.append('<div class="note">not measured there</div>')
                    continue
                noisy = " · NOISY" if r.noisy else ""
                grid.append(figure(_hist(m, measured, b, r, f"{len(r.samples_ms)} runs, p50 {r.p50_ms:.3g} ms{noisy}"),
                                   _id(m.name, "hist", b.label, d)))
        parts.append("".join(grid) + "</div>")
    for d in devices:  # the rest: per machine, wrapping
        alone = [b for b in measured if where[b.label] == [d]]
        if not alone:
            continue
        if multi or len(devices) > 1:
            parts.append(f"<h4>measured {'here' if d == HERE else 'on ' + escape(d)} only</h4>")
        parts.append('<div class="charts">')
        for b in alone:
            r = _latest(b, d)
            parts.append(figure(_hist(m, measured, b, r, b.label), _id(m.name, "hist", b.label, d),
                                f"{len(r.samples_ms)} runs {'here' if d == HERE else 'on ' + d}, p50 {r.p50_ms:.3g} ms"
                                + (" · NOISY: " + "; ".join(r.noise_reasons) if r.noisy else "")))
        parts.append("</div>")
    return "".join(parts)


def _hist(m: ModelInfo, measured: List[BundleInfo], b: BundleInfo, r: Run, title: str) -> str:
    return svg.histogram(r.samples_ms, title=title, x_label="inference latency (ms)",
                         chart_id=_id(m.name, "hist", b.label, r.device), col=_target_colour(m, b))


def _target_colour(m: ModelInfo, b: BundleInfo) -> str:
    """The colour of a bundle's target, the same in every chart of the model."""
    return svg.colour(list(dict.fromkeys(x.target for x in m.bundles)).index(b.target))


def _latest(b: BundleInfo, device: str) -> Optional[Run]:
    rs = [r for r in b.runs if r.device == device]
    return sorted(rs, key=lambda r: r.timestamp or "")[-1] if rs else None


def conditions_table(m: ModelInfo) -> str:
    runs = [(b, r) for b in m.bundles for r in sorted(b.runs, key=lambda r: (r.device, r.timestamp or ""))]
    if not runs:
        return '<p class="note">No measurements.</p>'
    rows = []
    for b, r in runs:
        c = r.conditions
        load = c.get("loadavg")
        temp = c.get("temperature_c")
        cpu = " · ".join(str(x) for x in (c.get("board") or c.get("cpu_model"),
                                          f"{c['cpu_count']} cores" if c.get("cpu_count") else None) if x)
        rows.append([b.label, Markup(f"{escape(_short_device(r))}<br><span class=muted>{escape(cpu)}</span>"),
                     Markup(f"{escape(r.backend)}<br><span class=muted>{escape(str(r.threads))} threads</span>"),
                     c.get("governor") or "–", _num(temp, "{:.1f}"),
                     c.get("throttled") or "–", _num(load[0] if isinstance(load, list) and load else None, "{:.2f}"),
                     r.stats.get("count"), _num(r.p50_ms, "{:.4g}"), _num(r.stats.get("p99_ms"), "{:.4g}"),
                     _num(r.stats.get("cv"), "{:.3f}"),
                     Markup('<span class="bad">noisy</span>: ' + escape("; ".join(r.noise_reasons))
                            if r.noisy else '<span class="ok">no</span>'),
                     Markup(f'<span title="{escape(r.file)}">{escape((r.timestamp or "?")[:19].replace("T", " "))}'
                            f'<br><span class="muted">{escape(Path(r.file).name)}</span></span>')])
    return table(["bundle", "device", "backend", "governor", "temp °C", "throttled", "load (1 min)", "runs",
                  "p50 ms", "p99 ms", "CV", "noisy?", "when (file)"], rows,
                 numeric=[4, 6, 7, 8, 9, 10], cls="conditions")


def mixed_section(m: ModelInfo) -> str:
    seen, parts = set(), []
    for b in m.bundles:
        mp = b.mixed
        if not isinstance(mp, dict):
            continue
        sens = mp.get("sensitivity") or []
        key = (b.fmt, tuple(s.get("layer") for s in sens), tuple(mp.get("float_layers") or []))
        if key in seen:  # targets sharing a build share one search
            continue
        seen.add(key)
        kept = set(mp.get("float_layers") or []) if mp.get("met") else set()
        items = [(str(s.get("layer") or s.get("node")) + (f" · {s['op']}" if s.get("op") else ""), s.get("score"),
                  s.get("layer") in kept) for s in sens]
        cid = _id(m.name, "sensitivity", b.label)
        chosen = ", ".join(sorted(kept)) if kept else "none (full INT8 kept)"
        parts.append(f"<h4>{escape(b.label)} ({escape(b.fmt)})</h4>")
        parts.append(f'<p class="note">{escape(_criterion(mp))}; kept in float: <b>{escape(chosen)}</b>; search: '
                     f'{escape(str(mp.get("stopped") or "–"))}.</p>')
        parts.append('<div class="charts">' + figure(
            svg.hbars(items, title=f"per-layer sensitivity, {b.label}", x_label="error when the layer is "
                      "quantized (larger: more damage; the converter's per-layer measure)", chart_id=cid),
            cid, "Sorted as measured, most sensitive first; red: layers mixed precision kept in float.") + "</div>")
        full = mp.get("full_int8") or {}
        rows = [["(full INT8)", _num(_drop(full), "{:.2f}"), _num((full.get("bytes") or 0) / 1024 or None,
                                                                          "{:.1f}"),
                 _num(full.get("p50_ms"), "{:.4g}"), "no"]]
        for st in mp.get("steps") or []:
            rows.append([", ".join(st.get("float_layers") or []), _num(_drop(st), "{:.2f}"),
                         _num((st.get("bytes") or 0) / 1024 or None, "{:.1f}"), _num(st.get("p50_ms"), "{:.4g}"),
                         "yes" if st.get("meets_budget") else (f"failed: {st['error']}" if st.get("error")
                                                               else "no")])
        parts.append(table(["kept in float", "drop (points)", "KiB", "p50 ms here", "meets budget"], rows,
                           numeric=[1, 2, 3]))
    for b in m.bundles:
        if b.rescue:
            rows = [[st.get("rung"), st.get("what"), _pct(fraction(st, "top1_agreement", False)),
                     _num(st.get("snr_db"), "{:.1f}"), _num((st.get("bytes") or 0) / 1024 or None, "{:.1f}"),
                     "yes" if st.get("meets") else (st.get("error") or "no" + (
                         f" ({'; '.join(map(str, st['misses']))})" if st.get("misses") else ""))] for st in b.rescue]
            parts.append(f"<h4>rescue ladder of {escape(b.label)} ({escape(b.fmt)})</h4>"
                         + table(["rung", "what", "top-1 agree %", "SNR dB", "KiB", "meets floor"], rows,
                                 numeric=[2, 3, 4]))
    if not parts:
        return ('<p class="note">No mixed-precision search or rescue ran for this model (it runs when full INT8 misses '
                '<code>--max-accuracy-drop</code>).</p>')
    return "".join(parts)


def _criterion(mp: Dict[str, Any]) -> str:
    """What the mixed-precision search had to meet: a budget in points (older records) or a floor."""
    budget = mp.get("budget_points", mp.get("max_drop_points"))
    if budget is not None:
        return f"budget {budget} points of {mp.get('metric') or 'accuracy'}"
    fl = mp.get("floor")
    if isinstance(fl, dict):
        parts = []
        if fl.get("min_snr_db") is not None:
            parts.append(f"SNR ≥ {fl['min_snr_db']:g} dB")
        if fl.get("min_agreement") is not None:
            parts.append(f"top-1 agreement ≥ {100 * fl['min_agreement']:g}%")
        if fl.get("max_accuracy_drop") is not None:
            parts.append(f"accuracy drop ≤ {fl['max_accuracy_drop']:g} points")
        return "floor: " + ", ".join(parts)
    return "budget not recorded"


def _drop(st: Dict[str, Any]) -> Optional[float]:
    return next((st[k] for k in ("drop_points", "accuracy_drop_points", "drop") if st.get(k) is not None), None)


def _compat_result(c: Dict[str, Any], ok: str) -> Markup:
    """A compatibility record's result cell: not checked (why), `ok`, or FAILS (the error)."""
    if not c.get("checked"):
        return Markup(f'<span class="muted">not checked</span>: {escape(str(c.get("reason") or ""))}')
    if c.get("ok"):
        return Markup(f'<span class="ok">{escape(ok)}</span>')
    return Markup(f'<span class="bad">FAILS</span>: {escape(str(c.get("error") or ""))}')


def compat_section(m: ModelInfo) -> str:
    rows, bad = [], []
    for b in m.bundles:
        none = ("the profile names no oldest runtime for this format" if b.compatibility is not None
                else "no compatibility record in the manifest")
        for c in b.compatibility or [{"checked": False, "reason": none}]:
            outs = c.get("outputs") or {}
            fig = "; ".join(f"{k}: SNR {_num(v.get('snr_db'), '{:.1f}')} dB, top-1 "
                            f"{_num(v.get('top1_agreement'), '{:.3g}')}" for k, v in outs.items()
                            if isinstance(v, dict))
            res = _compat_result(c, "loads and matches")
            if c.get("checked") and not c.get("ok"):
                bad.append(len(rows))
            rows.append([b.label, " + ".join(c.get("requirements") or []), c.get("where") or "–", res,
                         c.get("backend") or "–", fig or "–", _num(c.get("seconds"), "{:.1f}")])
    return table(["bundle", "oldest runtime of the target", "where checked", "result", "backend",
                  "vs golden", "seconds"], rows, numeric=[6], bad_rows=bad)


def optimize_section(m: ModelInfo) -> str:
    parts = []
    for rec in m.optimize:
        kind = rec["_kind"]
        if kind == "qat" and isinstance(rec.get("bundles"), list):
            rows = [[Path(str(b.get("bundle"))).name, b.get("format"), _num((b.get("bytes") or 0) / 1024 or None,
                                                                             "{:.1f}"),
                     _num(b.get("ptq_accuracy"), "{:.2f}"), _num(b.get("qat_accuracy"), "{:.2f}"),
                     _num(b.get("ptq_drop"), "{:.2f}"), _num(b.get("qat_drop"), "{:.2f}")] for b in rec["bundles"]]
            parts.append(f"<h3>quantization-aware training ({escape(Path(rec['_file']).name)})</h3>"
                         + table(["bundle", "format", "KiB", "PTQ acc %", "QAT acc %", "PTQ drop", "QAT drop"],
                                 rows, numeric=[2, 3, 4, 5, 6]))
        if rec.get("kind") == "causal-lm":  # a language model's distillation or factorization
            parts.append(lm_optimize_section(rec, kind))
            continue
        pairs = [(a, b) for a, b in (("before", "after"), ("teacher", "student")) if isinstance(rec.get(a), dict)
                 and isinstance(rec.get(b), dict)]
        if kind == "factorize":
            parts.append(factorize_layers(rec))
        for a, b in pairs:
            rows = [[lab, f.get("params"), _num((f.get("flops") or 0) / 1e6 or None, "{:.3g}"),
                     _num((f.get("tflite_bytes") or 0) / 1024 or None, "{:.1f}"),
                     _num((f.get("gzip_bytes") or 0) / 1024 or None, "{:.1f}"), _num(f.get("accuracy"), "{:.2f}"),
                     _num(f.get("p50_ms"), "{:.4g}")] for lab, f in ((a, rec[a]), (b, rec[b]))]
            parts.append(f"<h3>{escape(kind)} ({escape(Path(rec['_file']).name)})</h3>"
                         + table(["", "params", "MFLOPs", "float KiB", "gzip KiB", "accuracy %", "p50 ms here"],
                                 rows, numeric=[1, 2, 3, 4, 5, 6]))
    return "".join(parts)


def factorize_layers(rec: Dict[str, Any]) -> str:
    """`edgekit factorize`: per layer rank, parameters and FLOPs before/after, output error; and the
    converted bundles' latency before/after."""
    rows = [[r.get("layer"), f"{r['rank']}/{r.get('full_rank')}" if r.get("rank") else "–", r.get("params_before"),
             r.get("params_after"), _num((r.get("flops_before") or 0) / 1e6 or None, "{:.3g}"),
             _num((r.get("flops_after") or 0) / 1e6 or None, "{:.3g}"), _num(r.get("output_rel_err"), "{:.3g}"),
             r.get("note") or ""] for r in rec.get("layers") or [] if isinstance(r, dict)]
    out = (f"<h3>low-rank factorization, {escape(str(rec.get('rule', '')))} "
           f"({escape(Path(rec['_file']).name)})</h3>"
           + table(["layer", "rank", "params", "params after", "MFLOPs", "MFLOPs after", "output rel. error", "note"],
                   rows, numeric=[2, 3, 4, 5, 6]))
    bundles = [b for b in rec.get("bundles") or [] if isinstance(b, dict)]
    if bundles:
        out += table(["target", "format", "p50 ms before", "p50 ms after", "speed-up", "KiB before", "KiB after"],
                     [[b.get("target"), b.get("format"), _num(b.get("before_p50_ms"), "{:.4g}"),
                       _num(b.get("after_p50_ms"), "{:.4g}"), _num(b.get("speedup"), "{:.3g}"),
                       _num((b.get("before_bytes") or 0) / 1024 or None, "{:.1f}"),
                       _num((b.get("after_bytes") or 0) / 1024 or None, "{:.1f}")] for b in bundles],
                     numeric=[2, 3, 4, 5, 6])
    return out


def lm_optimize_section(rec: Dict[str, Any], kind: str) -> str:
    """A causal LM's distillation (teacher / student / baseline) or factorization (before / after) on
    held-out text: perplexity, KL to the reference, top-1 agreement, parameters, INT4 decode speed."""
    i4 = rec.get("int4") if isinstance(rec.get("int4"), dict) else {}
    who = ("teacher", "student", "baseline") if kind == "distill" else ("before", "after_cut", "after")
    rows = []
    for w in who:
        r = rec.get(w)
        if not isinstance(r, dict):
            continue
        h = r.get("heldout") if isinstance(r.get("heldout"), dict) else r
        speed = (i4.get({"before": "original", "after": "factorized"}.get(w, w)) or {}).get("decode_tok_s")
        rows.append([w.replace("_", " "), _num((r.get("params") or 0) / 1e6 or None, "{:.4g}"),
                     _num(h.get("ppl"), "{:.4g}"), _num(h.get("kl"), "{:.3g}"), _pct(h.get("top1_agreement")),
                     r.get("tokens") or "–", _num(speed, "{:.4g}")])
    title = "distillation" if kind == "distill" else f"low-rank factorization, {rec.get('rule', '')}"
    out = (f"<h3>language model {escape(title)} ({escape(Path(rec['_file']).name)})</h3>"
           + table(["", "M params", "held-out ppl", "KL to reference", "top-1 agreement", "tokens trained",
                    "INT4 decode tok/s"], rows, numeric=[1, 2, 3, 4, 5, 6]))
    notes = [f"held-out text: {rec.get('heldout_text')}"]
    if isinstance(rec.get("ppl_reduction_vs_baseline"), (int, float)):
        notes.append(f"perplexity {rec['ppl_reduction_vs_baseline']:.1%} lower than the same student trained "
                     "without the teacher")
    if i4 and not i4.get("measured"):
        notes.append(f"INT4 decode speed not measured: {i4.get('why', '')}")
    if rec.get("note"):
        notes.append(str(rec["note"]))
    out += "".join(f'<p class="note">{escape(n)}</p>' for n in notes)
    if kind == "factorize":
        out += factorize_layers(rec)
    return out


def rollouts_section(rollouts: List[Dict[str, Any]]) -> str:
    """Staged rollouts' records (`edgekit deploy` with --canary/--batches): one row each, with its
    devices counted by state and the abort, if any."""
    rows, bad = [], []
    for r in sorted(rollouts, key=lambda r: str(r.get("created") or r.get("started") or "")):
        devs = r.get("devices") or {}
        states: Dict[str, int] = {}
        for d in (devs.values() if isinstance(devs, dict) else devs):
            s = (d.get("state") or d.get("status")) if isinstance(d, dict) else d
            states[str(s)] = states.get(str(s), 0) + 1
        batches = r.get("batches") if isinstance(r.get("batches"), list) else []
        ab = r.get("abort")
        abort = (f"batch {ab.get('batch')}: {ab.get('failed')} of {ab.get('of')} failed" if isinstance(ab, dict)
                 else "–")
        if isinstance(ab, dict) or str(r.get("state")) in ("aborted", "failed"):
            bad.append(len(rows))
        rows.append([r.get("id") or Path(r["_file"]).name.split(".")[0], r.get("model") or "–",
                     Path(str(r.get("bundle"))).name if r.get("bundle") else "–", r.get("state") or "–",
                     " → ".join(f"{b.get('label', i)} ({b.get('state', '?')})" for i, b in enumerate(batches)
                                if isinstance(b, dict)) or "–",
                     ", ".join(f"{k}: {v}" for k, v in sorted(states.items())) or "–", abort,
                     str(r.get("created") or r.get("started") or "–")[:19].replace("T", " ")])
    return table(["rollout", "model", "bundle", "state", "batches", "devices by state", "abort", "created"], rows,
                 bad_rows=bad)


def _mib(v: Optional[float]) -> str:
    return _num(v / 2 ** 20 if _isnum(v) and v else None, "{:.2f}")


def _rate(v: Optional[float]) -> str:
    """tok/s and the like: whole numbers with separators from 100 up."""
    return _num(v, "{:,.0f}" if _isnum(v) and v >= 100 else "{:.3g}")


def _latest_llm(b: BundleInfo, device: str) -> Optional[Dict[str, Any]]:
    mine = [r for r in b.llm_runs if r.get("device") == device]
    return sorted(mine, key=lambda r: str(r.get("timestamp") or ""))[-1] if mine else None


def _ppl(f: Dict[str, Any]) -> str:
    if f.get("ppl") is None:
        return "–"
    inc = f.get("ppl_increase")
    return f"{_num(f.get('ppl_float'), '{:.4g}')} → {_num(f.get('ppl'), '{:.4g}')}" + (
        f" ({inc * 100:+.1f}%)" if _isnum(inc) else "")


CALIBRATED_ALGOS = ("awq", "gptq", "awq_gptq")   # convert.llm_gptq.ALGOS (not imported: the report is stdlib only)


def llm_recipe(r: Dict[str, Any], int8_blocks: Optional[Dict[str, int]] = None) -> str:
    """What a language-model build did, from its recorded options (LLMBuildOptions' fields, as the manifest's and
    the convert record's `recipe` hold them): convert.llm.LLMBuildOptions.describe()'s words but the precision (its
    own column), so only what applies to the precision: an fp32 / fp16 build quantizes nothing (its block size,
    accuracy level, algo and lm_head fields are defaults the builder never used). A field an older manifest lacks
    is left out, not assumed. int8_blocks: the manifest's llm.int8_nodes blocks ({block: nodes}), the blocks an
    INT4 build's 8-bit nodes were written at; without it, the rule describe() states."""
    if not r:
        return "–"
    precision, ep = r.get("precision"), r.get("execution_provider") or "cpu"
    if precision not in ("int4", "int8"):
        return f"no quantization ({ep})"
    parts = [f"block {r['block_size']}" if r.get("block_size") else None,
             f"accuracy_level {r['accuracy_level']}" if r.get("accuracy_level") is not None else None, r.get("algo")]
    int4 = precision == "int4"
    if int4:
        if r.get("lm_head_int8") is not None:
            parts.append("lm_head " + ("int8" if r["lm_head_int8"] else "int4"))
        if r.get("llama_mixed"):
            parts.append("llama.cpp's mixed layers int8")
        if isinstance(r.get("int8_layers"), (list, tuple)) and r["int8_layers"]:
            parts.append(f"layers {','.join(map(str, r['int8_layers']))} int8")
        if isinstance(r.get("int8_matmuls"), (list, tuple)) and r["int8_matmuls"]:
            parts.append(f"{len(r['int8_matmuls'])} measured MatMuls int8")
    if isinstance(r.get("fp32_matmuls"), (list, tuple)) and r["fp32_matmuls"]:
        parts.append(f"{len(r['fp32_matmuls'])} measured MatMuls fp32")
    if r.get("head_block") and r.get("algo") in CALIBRATED_ALGOS and int4:
        parts.append(f"lm_head block {r['head_block']}")
    cpu = ep == "cpu"
    if r.get("int8_symmetric") and cpu:        # LLMBuildOptions.int8_blocks
        blocks = sorted({int(k) for k in int8_blocks or {} if str(k).isdigit()}, reverse=True)
        # the blocks the manifest records; none where it does not (older converters wrote the lm_head at 64 where
        # this one writes 128: a rule stated here would be a guess about that build)
        parts.append("int8 symmetric" + (f" block {'/'.join(map(str, blocks))}" if blocks and int4 else ""))
    if r.get("half_scales") and cpu:           # LLMBuildOptions.fp16_scales
        parts.append("fp16 scales")
    return ", ".join(str(x) for x in parts if x) or "–"


def llm_summary(m: ModelInfo) -> str:
    """One row per language-model bundle: size, bytes read per token, fidelity, result, speed per device."""
    devices = m.llm_devices
    headers = ["bundle", "target", "precision", "recipe", "MiB", "MiB read / token", "perplexity float → quant.",
               "KL mean", "top-1 agree %", "result"]
    for d in devices:
        where = "here" if d == HERE else f"on {d}"
        headers += [f"TTFT ms {where}", f"prefill tok/s {where}", f"decode tok/s {where}",
                    f"peak RSS MiB {where}"]
    rows, bad = [], []
    for i, b in enumerate(m.bundles):
        f, r = b.llm["fidelity"], b.llm["recipe"]
        recipe = llm_recipe(dict(r, precision=r.get("precision") or b.precision) if r else r, b.llm.get("int8_blocks"))
        cells = [b.label, b.target, b.precision, recipe, _mib(b.bytes), _mib(b.llm.get("bytes_per_token")), _ppl(f),
                 _num(f.get("kl_mean"), "{:.3g}"), _pct(b.agreement), _budget(b)]
        for d in devices:
            run = _latest_llm(b, d)
            cells += [_num((run or {}).get("ttft_ms"), "{:.4g}"), _rate((run or {}).get("prefill_tok_s")),
                      _rate((run or {}).get("decode_tok_s")), _num((run or {}).get("peak_rss_mb"), "{:.4g}")]
        rows.append(cells)
        if b.failure or b.stale:
            bad.append(i)
    return table(headers, rows, cls="summary", numeric=[4, 5, 7, 8] + list(range(10, len(headers))), bad_rows=bad)


def llm_speed(m: ModelInfo) -> str:
    """Every LanguageModel.benchmark() report found, with its conditions."""
    rows, noisy = [], []
    for b in m.bundles:
        for r in sorted(b.llm_runs, key=lambda x: (str(x.get("device")), str(x.get("timestamp") or ""))):
            c = r.get("conditions") or {}
            tok = r.get("decode_token_ms") or {}
            load = c.get("loadavg")
            if r.get("noisy"):
                noisy.append(len(rows))
            rows.append([b.label, "here" if r["device"] == HERE else r["device"],
                         f"{r.get('backend', '')} {r.get('backend_version', '')}".strip(), r.get("threads"),
                         f"{r.get('prompt_tokens')} + {r.get('new_tokens')}", r.get("runs"),
                         _num(r.get("load_ms"), "{:.4g}"), _num(r.get("ttft_ms"), "{:.4g}"),
                         _rate(r.get("prefill_tok_s")), _rate(r.get("decode_tok_s")),
                         _num(tok.get("p99_ms"), "{:.3g}"), _num(r.get("peak_rss_mb"), "{:.4g}"),
                         _num(r["rss_growth_mb"] / r["memory_bound_mb"] if r.get("rss_growth_mb")
                              and r.get("memory_bound_mb") else None, "{:.2f}"),
                         f"{c.get('cpu_model') or '?'} ({c.get('machine') or '?'}), load "
                         f"{_num(load[0] if load else None, '{:.2f}')}",
                         Markup('<span class="bad">NOISY</span> ' + escape("; ".join(r.get("noise_reasons") or [])))
                         if r.get("noisy") else Markup('<span class="ok">ok</span>')])
    if not rows:
        timed = any(c.get("decode_tok_s") is not None for b in m.bundles for c in b.candidates)
        return ('<p class="note">' + ("No benchmark report (convert timed the --select fastest candidates' decode "
                                      "speed: below); for the full figures, " if timed else "Not measured: ")
                + '<code>edgekit bench BUNDLE --out BUILD/bench/NAME.json</code> here, '
                'or <code>edgekit profile BUNDLE --device D --save-dir BUILD/profiles</code> on a device.</p>')
    return table(["bundle", "device", "engine", "threads", "prompt + new tokens", "runs", "load ms", "TTFT ms",
                  "prefill tok/s", "decode tok/s", "token p99 ms", "peak RSS MiB", "RSS growth / (weights + KV)",
                  "machine", "run"], rows, cls="llmspeed", numeric=[3, 5, 6, 7, 8, 9, 10, 11, 12],
                 bad_rows=noisy) + (
        '<p class="note">p50 over the timed runs (greedy, end of sequence held off so every run decodes all its '
        'tokens); TTFT = prefill + the first token; peak RSS is the process\'s high-water mark, its growth what '
        'loading and generating added to the process (ONNX Runtime\'s libraries included).</p>')


def _shipped(b: BundleInfo) -> Optional[Dict[str, Any]]:
    """The --select fastest candidate a bundle shipped (None: it shipped no candidate: no --select fastest)."""
    return next((c for c in b.candidates if c.get("chosen")), None)


def llm_candidates(m: ModelInfo) -> str:
    """--select fastest's candidates of each language-model bundle: what, decode speed and where it was timed,
    fidelity, size, whether it meets the floor, which one shipped."""
    rows, bad = [], []
    for b in m.bundles:
        for c in b.candidates:
            if c.get("meets") is False or c.get("error"):
                bad.append(len(rows))
            inc = c.get("ppl_increase")
            rows.append([b.label, c.get("what", ""), _rate(c.get("decode_tok_s")), c.get("timed") or "–",
                         "–" if inc is None else f"{inc * 100:+.1f}%", _num(c.get("kl_mean"), "{:.3g}"),
                         _pct(c.get("top1_agreement")), _mib(c.get("bytes")),
                         "yes" if c.get("meets") else (c.get("error") or "; ".join(
                             str(x) for x in c.get("misses") or []) or "no"),
                         Markup('<span class="ok">shipped</span>') if c.get("chosen") else ""])
    if not rows:
        return ""
    return ("<h3>--select fastest candidates</h3>" + table(
        ["bundle", "candidate", "decode tok/s", "where timed", "perplexity +", "KL mean", "top-1 agree %", "MiB",
         "meets floor", "chosen"], rows, cls="candidates", numeric=[2, 4, 5, 6, 7], bad_rows=bad)
        + '<p class="note">convert built each candidate, measured its fidelity like any rung and timed the '
          'decode speed of those meeting the floor; the fastest is the bundle (only it is written).</p>')


def llm_ladder(m: ModelInfo) -> str:
    rows, bad = [], []
    for b in m.bundles:
        shipped = _shipped(b)
        for st in b.rescue:
            if st.get("meets") is False or st.get("error"):
                bad.append(len(rows))
            inc = st.get("ppl_increase")
            floor = st.get("error") or ("; ".join(str(x) for x in st.get("misses") or []) or
                                        ("meets" if st.get("meets") else "–"))
            if shipped is not None and st.get("options") != shipped.get("options"):
                floor += f"; not shipped: --select fastest shipped {shipped.get('what', '?')}"
            rows.append([b.label, st.get("rung", "?"), st.get("what", ""), "–" if st.get("ppl") is None else
                         f"{st['ppl']:.4g}" + ("" if inc is None else f" ({inc * 100:+.1f}%)"),
                         _num(st.get("kl_mean"), "{:.3g}"),
                         _pct(st.get("top1_agreement")), _mib(st.get("bytes")), floor])
    if not rows:
        return '<p class="note">No rescue ladder recorded.</p>'
    return table(["bundle", "rung", "build", "perplexity", "KL mean", "top-1 agree %", "MiB", "floor"], rows,
                 numeric=[4, 5, 6], bad_rows=bad)


def llm_compat(m: ModelInfo) -> str:
    """An arm64 bundle's golden check on ARM's kernels (convert.compat.check_llm), one row per record."""
    rows, bad = [], []
    for b in m.bundles:
        for c in b.compatibility or []:
            res = _compat_result(c, "matches")
            if c.get("checked") and not c.get("ok"):
                bad.append(len(rows))
            same = {True: "same", False: "differs", None: "–"}[c.get("text_matches_golden")]
            rows.append([b.label, " + ".join(c.get("requirements") or []), c.get("where") or "–", res,
                         _pct(c.get("top1_agreement")), _num(c.get("snr_db"), "{:.1f}"), same,
                         _num(c.get("seconds"), "{:.1f}")])
    if not rows:
        return ""
    return ("<h3>On the target's kernels</h3>" + table(
        ["bundle", "engine", "where checked", "result", "top-1 agree %", "logit SNR dB", "generation vs golden",
         "seconds"], rows, numeric=[4, 5, 7], bad_rows=bad)
        + '<p class="note">The golden check (teacher-forced top-1 agreement with the converting machine, the SNR '
          'of the logits at the golden top-K ids, a short greedy generation) run by the same engine version on '
          'ARM\'s kernels.</p>')


def llm_model_section(m: ModelInfo) -> str:
    sid = _id("model", m.name)
    out = [f'<section class="model" id="{sid}"><h2>{escape(m.name)} <span class="muted">(language model)</span></h2>']
    src = m.source
    if src:
        out.append(f'<p class="meta">source {escape(str(src.get("path") or ""))} '
                   f'({escape(str(src.get("architecture") or src.get("kind") or "?"))}, sha256 '
                   f'{escape(str(src.get("sha256") or "")[:12])})</p>')
    texts = {str(b.llm["fidelity"].get("text")) for b in m.bundles if b.llm["fidelity"].get("text")}
    for t in sorted(texts):
        out.append(f'<p class="meta">fidelity measured on: {escape(t)}</p>')
    out.append("<h3>Bundles</h3>" + llm_summary(m))
    out.append('<p class="note">Perplexity, mean KL divergence of the next-token distributions and top-1 agreement '
               'are teacher-forced against the float model (llama.cpp\'s perplexity --kl-divergence figures); '
               'MiB read / token is what one decoded token reads (the weights but the embedding rows), the '
               'memory-bandwidth bound of decoding.</p>')
    cid = _id(m.name, "llm-fidelity-size")
    pts = [p for b in m.bundles if (p := _point(b, b.bytes / 2 ** 20 if b.bytes else None, b.agreement,
                                                   "top-1 agreement", "MiB"))]
    if pts:
        out.append('<div class="charts">' + figure(svg.scatter(
            pts, title="top-1 agreement vs size", x_label="model size (MiB)",
            y_label="top-1 agreement with the float model (%)", y_percent=True, chart_id=cid,
            series_title="target", shape_title="format"), cid, f"One point per bundle ({len(pts)}).") + "</div>")
    out.append("<h3>Speed</h3>" + llm_speed(m))
    out.append(llm_candidates(m))
    out.append("<h3>Rescue ladder</h3>" + llm_ladder(m))
    out.append(llm_compat(m))
    out.append("</section>")
    return "".join(out)


def model_section(m: ModelInfo) -> str:
    if m.is_llm:
        return llm_model_section(m)
    src, cal = m.source, m.calibration
    meta = []
    if src:
        meta.append(f"source {escape(str(src.get('path') or ''))} ({escape(str(src.get('kind') or '?'))}, "
                    f"sha256 {escape(str(src.get('sha256') or '')[:12])})")
    if cal:
        meta.append(f"calibration: {escape(str(cal.get('samples', '?')))} samples from "
                    f"{escape(str(cal.get('source', '?')))}; validation: "
                    f"{escape(str(cal.get('validation_samples', '?')))} samples from "
                    f"{escape(str(cal.get('validation_source', '?')))}"
                    + ("" if cal.get("labels") else " (no labels: agreement, not accuracy)"))
        if cal.get("random"):
            meta.append('<span class="bad">random calibration data: the accuracy figures mean nothing</span>')
    if m.max_accuracy_drop is not None:
        meta.append(f"budget: --max-accuracy-drop {escape(str(m.max_accuracy_drop))}")
    sid = _id("model", m.name)
    out = [f'<section class="model" id="{sid}"><h2>{escape(m.name)}</h2>']
    out += [f'<p class="meta">{x}</p>' for x in meta]
    out.append("<h3>Bundles</h3>" + summary(m))
    out.append('<p class="note">Fidelity is measured against the float model on the validation data, in the '
               'numerics recorded in each manifest; p50 "here" is this machine\'s, not the target\'s.</p>')
    out.append("<h3>Fidelity against size and speed</h3>" + tradeoff_charts(m))
    out.append("<h3>Latency distributions</h3>" + latency_section(m))
    out.append("<h3>Measurement conditions</h3>" + conditions_table(m))
    out.append("<h3>Mixed precision: per-layer sensitivity</h3>" + mixed_section(m))
    out.append("<h3>Compatibility with each target's oldest runtime</h3>" + compat_section(m))
    opt = optimize_section(m)
    if opt:
        out.append("<h3>Making it fit: pruning, distillation, factorization, QAT</h3>" + opt)
    out.append("</section>")
    return "".join(out)


def render(data: ReportData) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = [f"<h1>edgekit report</h1><p class=\"meta\">{escape(str(Path(data.build_dir)))} · "
            f"{len(data.models)} model(s), {sum(len(m.bundles) for m in data.models)} bundle(s), "
            f"{sum(len(b.runs) + len(b.llm_runs) for m in data.models for b in m.bundles)} latency measurement(s) · "
            f"edgekit {escape(edgekit.__version__)} · {when}</p>"]
    if len(data.models) > 1:
        body.append("<p class=\"meta\">" + " · ".join(f'<a href="#{_id("model", m.name)}">{escape(m.name)}</a>'
                                                     for m in data.models) + "</p>")
    body += [model_section(m) for m in data.models]
    if data.rollouts:
        body.append('<section id="rollouts"><h2>Rollouts</h2>' + rollouts_section(data.rollouts) + "</section>")
    if data.unmatched_runs or data.skipped:
        rows = [[Path(r.file).name, r.device, f"{r.model} {r.target} {r.fmt}", "no bundle of this build matches"]
                for r in data.unmatched_runs]
        rows += [[Path(f).name, "–", "–", why] for f, why in data.skipped]
        body.append('<section id="not-shown"><h2>Files not shown</h2>'
                    + table(["file", "device", "bundle", "why"], rows) + "</section>")
    title = "edgekit report: " + ", ".join(m.name for m in data.models)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>" + "".join(body)
            + "</body></html>\n")
