"""edgekit report: the SVG builders alone, the reader's units, and the whole page in real headless Chromium.

The browser test builds a real report (the digits conversion for every target, a mixed-precision
conversion that keeps layers in float, two bundles benchmarked here, one profiled on a lab device
over SSH), opens it in Debian's Chromium over the DevTools protocol and checks: no console error,
no network request, every chart in the DOM with its marks and a non-empty rendered box; then it
saves a screenshot.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgekit.report import collect as col
from edgekit.report import svg

CHROMIUM = Path("/usr/bin/chromium")
SVG_NS = "{http://www.w3.org/2000/svg}"


# --- the SVG builders (no browser) -------------------------------------------------------

def _marks(svg_text, kind=None):
    root = ET.fromstring(svg_text)  # well-formed XML, or this raises
    out = [e for e in root.iter() if "mark" in (e.get("class") or "").split()]
    return [e for e in out if kind is None or kind in e.get("class").split()]


def _texts(svg_text, cls=None):
    root = ET.fromstring(svg_text)
    return [e.text for e in root.iter(f"{SVG_NS}text") if cls is None or e.get("class") == cls]


def test_ticks():
    assert svg.nice_ticks(0, 10) == [0, 2, 4, 6, 8, 10]
    t = svg.nice_ticks(0.9841, 0.9962)
    assert t[0] <= 0.9841 and t[-1] >= 0.9962 and len(t) <= 8
    assert all(round(b - a, 9) == round(t[1] - t[0], 9) for a, b in zip(t, t[1:]))
    assert svg.log_ticks(0.1, 50) == [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]
    wide = svg.log_ticks(1e-15, 10)
    assert len(wide) <= 8 and wide[-1] == 10 and all(math.log10(v) == round(math.log10(v)) for v in wide)
    a = svg.Axis.fit([0.984, 0.996], 300, 0)
    assert all(a.lo <= t <= a.hi for t in a.ticks()) and a(a.lo) == 300 and a(a.hi) == 0
    assert svg.Axis.fit([0.1, 0.3], 0, 100).lo >= 0  # latencies: the axis does not go below zero
    with pytest.raises(ValueError):
        svg.log_ticks(0, 1)


def test_scatter_one_marker_per_point_with_legend_and_labels():
    pts = [svg.Point(158.2, 0.992, "rpi4", "tflite", "a"), svg.Point(168.3, 0.994, "rpi4", "onnx", "b"),
           svg.Point(171.4, 0.9859, "jetson <orin> & co", "onnx", "c"),
           svg.Point(float("nan"), 0.9, "x", "tflite", "not drawn")]
    s = svg.scatter(pts, title="accuracy vs size", x_label="model file size (KiB)",
                    y_label="accuracy (%)", y_percent=True, chart_id="c1", series_title="target",
                    shape_title="format")
    assert len(_marks(s, "point")) == 3
    texts = _texts(s)
    assert "model file size (KiB)" in texts and "accuracy (%)" in texts and "accuracy vs size" in texts
    assert "jetson <orin> & co" in texts and {"target", "format", "tflite", "onnx"} <= set(texts)
    ticks = [float(t) for t in _texts(s, "tick")]
    assert any(98 < t <= 100 for t in ticks), ticks  # fractions shown in percent
    tips = [e.find(f"{SVG_NS}title").text for e in _marks(s)]
    assert tips == ["a", "b", "c"]
    empty = svg.scatter([], title="t", x_label="x", y_label="y")
    assert not _marks(empty) and "no data" in _texts(empty)


def test_histogram_counts_every_sample_once():
    samples = [0.1 + 0.001 * (i % 17) for i in range(300)] + [5.0, 7.5]  # two far outliers
    s = svg.histogram(samples, title="h", x_label="latency (ms)")
    bars = _marks(s, "bar")
    counts = [int(re.search(r": (\d+) runs", b.find(f"{SVG_NS}title").text).group(1)) for b in bars]
    assert sum(counts) == len(samples)
    assert "2 slower" in " ".join(_texts(s))        # the outliers are said, not hidden
    heights = [float(b.get("height")) for b in bars]
    assert max(heights) > 50                         # not squeezed flat by the outliers
    assert "latency (ms)" in _texts(s) and "runs" in _texts(s)


def test_cdf_is_a_monotone_step_per_series():
    s = svg.cdf([("a", [3.0, 1.0, 2.0]), ("b", [10.0, 100.0, 30.0]), ("empty", [])], title="cdf",
                x_label="latency (ms)")
    lines = _marks(s, "line")
    assert len(lines) == 2 and "(log scale)" in " ".join(_texts(s))  # 1..100 ms: log axis
    for line in lines:
        ys = [float(v) for v in re.findall(r"V([-\d.]+)", line.get("d"))]
        assert ys == sorted(ys, reverse=True)  # pixel y falls as the fraction rises


def test_hbars_highlight_what_was_kept():
    items = [("fc1 · FULLY_CONNECTED", 8.0, True), ("conv1", 1e-6, False), ("pool", 1e-15, False)]
    s = svg.hbars(items, title="sensitivity", x_label="error")
    bars = _marks(s, "bar")
    assert len(bars) == 3 and "(log scale)" in " ".join(_texts(s))
    assert [b.get("fill") for b in bars] == [svg.PALETTE[3], svg.PALETTE[0], svg.PALETTE[0]]
    assert float(bars[0].get("width")) > float(bars[1].get("width")) > float(bars[2].get("width"))


# --- the reader: one unit per figure whatever the file's vintage ----------------------------

def test_reader_units_across_schema_versions():
    old = {"top1_agreement": 99.4, "accuracy_float": 99.2, "accuracy_int8": 98.59, "accuracy_drop": 0.6}
    new = {"top1_agreement": 0.994, "accuracy_float": 0.992, "accuracy_quant": 0.9859,
           "accuracy_drop_points": 0.6}
    for v, schema in ((old, None), (old, 1), (new, None), (new, 2)):
        pct = col.percent_units(v, schema)
        assert col.fraction(v, "top1_agreement", pct) == pytest.approx(0.994)
        assert col._accuracy_quant(v, pct) == pytest.approx(0.9859)
    # an agreement of exactly 1 is 100% in schema 2 and 1% in schema 1; the schema decides
    assert col.fraction({"top1_agreement": 1.0}, "top1_agreement", col.percent_units({}, 2)) == 1.0
    assert col.fraction({"top1_agreement": 1.0}, "top1_agreement", col.percent_units({}, 1)) == 0.01
    assert col.fraction({"top1_agreement_pct": 50}, "top1_agreement") == 0.5
    assert col.fraction({"top1_agreement_fraction": 0.5}, "top1_agreement") == 0.5


def test_reader_matches_runs_and_reports_what_it_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_ROLLOUTS", str(tmp_path / "no-rollouts"))
    build = tmp_path / "build"
    for key, target, fmt in (("m-rpi4", "rpi4", "tflite"), ("m-rpi4-onnx", "rpi4", "onnx")):
        (build / key).mkdir(parents=True)
        (build / key / "manifest.json").write_text(json.dumps(
            {"schema": 2, "name": "m", "target": {"name": target}, "model": {"format": fmt, "bytes": 1000},
             "validation": {"top1_agreement": 0.99}, "compatibility": []}))
    run = {"model": "/somewhere/releases/abc123", "bundle": "m", "target": "rpi4", "format": "onnx",
           "device": "pi-1", "latency": {"p50_ms": 2.0, "count": 3}, "samples_ns": [1e6, 2e6, 3e6]}
    (build / "profiles").mkdir()
    (build / "profiles" / "a.json").write_text(json.dumps(run))
    (build / "profiles" / "b.json").write_text(json.dumps(dict(run, target="rpi5")))
    (build / "profiles" / "broken.json").write_text("{")
    data = col.collect(build)
    (m,) = data.models
    b = next(b for b in m.bundles if b.key == "m-rpi4-onnx")
    assert [r.device for r in b.runs] == ["pi-1"] and b.p50("pi-1") == 2.0 and b.runs[0].samples_ms == [1, 2, 3]
    assert b.agreement == 0.99 and b.compatibility == [] and m.devices == ["pi-1"]
    assert [r.target for r in data.unmatched_runs] == ["rpi5"]
    assert [Path(f).name for f, _ in data.skipped] == ["broken.json"]
    with pytest.raises(col.ReportError, match="no convert report"):
        col.collect(tmp_path / "build" / "profiles")
    (one,) = col.collect(build / "m-rpi4-onnx", [build / "profiles"]).models  # a single bundle directory
    assert [b.key for b in one.bundles] == ["m-rpi4-onnx"] and one.bundles[0].p50("pi-1") == 2.0
    from edgekit.report import write_report

    assert write_report(build / "m-rpi4-onnx") == build / "m-rpi4-onnx.report.html"  # not inside the bundle

    # a staged rollout's record (edgekit deploy --canary/--batches keeps them as <id>.json)
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    (rollouts / "r-20261122-1.json").write_text(json.dumps(
        {"id": "r-20261122-1", "model": "m", "state": "aborted", "created": "2026-11-22T10:00:00Z",
         "bundle": str(build), "plan": {}, "abort": {"batch": "canary", "failed": 1, "of": 1},
         "batches": [{"label": "canary", "state": "failed"}, {"label": "50%", "state": "pending"}],
         "devices": {"a": {"state": "reverted"}, "b": {"state": "pending"}, "c": {"state": "pending"}}}))
    from edgekit.report.render import render

    data = col.collect(build, rollouts=[rollouts])
    assert [r["id"] for r in data.rollouts] == ["r-20261122-1"]
    monkeypatch.setenv("EDGEKIT_ROLLOUTS", str(rollouts))  # by default: edgekit deploy's, of this build's models
    assert [r["id"] for r in col.collect(build).rollouts] == ["r-20261122-1"]
    assert col.collect(build, rollouts=[]).rollouts == []
    html = render(data)
    assert "canary (failed) → 50% (pending)" in html and "pending: 2, reverted: 1" in html
    assert "batch canary: 1 of 1 failed" in html


def test_prune_and_distill_records_are_shown_with_their_model(tmp_path):
    """`edgekit prune` / `distill` leave <model>.prune.json / .distill.json beside the saved model."""
    from edgekit.report.render import render

    build = tmp_path / "build"
    (build / "m-rpi4").mkdir(parents=True)
    (build / "m-rpi4" / "manifest.json").write_text(json.dumps(
        {"schema": 2, "name": "m", "target": {"name": "rpi4"}, "model": {"format": "tflite", "bytes": 10}}))
    fig = {"params": 1000, "flops": 2e6, "tflite_bytes": 4096, "gzip_bytes": 2048, "zero_weights": 0.0,
           "accuracy": 98.5, "p50_ms": 0.25}
    (build / "m.prune.json").write_text(json.dumps({"method": "structured", "before": fig,
                                                    "after": dict(fig, params=500, p50_ms=0.125)}))
    (build / "m.distill.json").write_text(json.dumps({"teacher": fig, "student": dict(fig, params=250)}))
    data = col.collect(build, rollouts=[])
    assert sorted(r["_kind"] for r in data.models[0].optimize) == ["distill", "prune"]
    html = render(data)
    assert "prune (m.prune.json)" in html and "distill (m.distill.json)" in html
    assert html.count("<td>after</td>") == 1 and html.count("<td>student</td>") == 1


def _llm_manifest(target, precision, **recipe):
    """A language-model bundle's manifest as convert.llm writes it (the fields the report reads)."""
    from edgekit.convert.llm import LLMBuildOptions

    opts = dataclasses.asdict(LLMBuildOptions(precision=precision, **recipe))
    return {"schema": 2, "kind": "llm", "format": "onnx-genai", "name": "tiny", "created": "2026-11-01T09:00:00Z",
            "target": {"name": target}, "model": {"dir": "model", "files": {}, "bytes": 123_456_789},
            "recipe": dict(opts, wide_layers=[]), "llm": {"bytes_per_token": 99_999_999, "kv_bytes_per_token": 4096,
                                                          "context_default": 2048},
            "fidelity": {"ppl_float": 10.0, "ppl": 10.2, "ppl_increase": 0.02, "kl_mean": 0.01,
                         "top1_agreement": 0.97, "meets": True},
            "rescue": [{"rung": "profile", "what": "old build", "meets": True}]}


def _row(html, label):
    """The summary table row whose first cell is `label`."""
    m = re.search(r"<tr[^>]*>\s*<td[^>]*>" + re.escape(label) + r"</td>(.*?)</tr>", html, re.S)
    assert m, label
    return m.group(1)


def test_failed_llm_row_takes_nothing_from_an_old_bundle_at_its_path(tmp_path):
    """A FAILED row wrote nothing; the bundle an earlier run left at its path is not merged into it (its size,
    bytes per token and recipe beside the new failure's fidelity): the failed row keeps its own figures only,
    and the old bundle is an entry of its own, flagged STALE, which takes the benchmark of that directory."""
    from edgekit.report.render import render

    build = tmp_path / "build"
    old = build / "tiny-rpi5-int4"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps(_llm_manifest("rpi5", "int4")))
    (build / "tiny.convert.json").write_text(json.dumps({
        "name": "tiny", "kind": "llm", "source": {"path": "/m/tiny", "sha256": "ab" * 32},
        "bundles": [{"path": str(old), "target": "rpi5", "format": "onnx-genai", "precision": "int4",
                     "status": "failed", "bytes": None, "bytes_per_token": None, "recipe": None,
                     "fidelity": {"ppl_float": 10.0, "ppl": 14.0, "ppl_increase": 0.4, "kl_mean": 0.3,
                                  "top1_agreement": 0.7},
                     "rescue": [{"rung": "profile", "what": "new build", "meets": False, "misses": ["KL"]}],
                     "failure": {"stage": "fidelity", "reason": "below the floor: KL 0.3 > 0.1"}}]}))
    (build / "bench").mkdir()
    (build / "bench" / "old.json").write_text(json.dumps({
        "kind": "llm", "model": str(old), "bundle": "tiny", "target": "rpi5", "precision": "int4",
        "decode_tok_s": 42.0, "prefill_tok_s": 400.0, "ttft_ms": 12.0}))
    data = col.collect(build, rollouts=[])
    (m,) = data.models
    failed, stale = m.bundles
    assert failed.status == "failed" and failed.failure.startswith("fidelity: below the floor")
    assert failed.bytes is None and failed.llm["bytes_per_token"] is None and failed.llm["recipe"] == {}
    assert failed.llm["fidelity"]["kl_mean"] == 0.3 and failed.agreement == 0.7
    assert [s["what"] for s in failed.rescue] == ["new build"] and failed.llm_runs == []
    assert stale.status == "stale" and "2026-11-01T09:00:00Z" in stale.stale and stale.label.endswith("(stale)")
    assert stale.bytes == 123_456_789 and stale.llm["bytes_per_token"] == 99_999_999
    assert stale.precision == "int4" and stale.llm["fidelity"]["kl_mean"] == 0.01
    assert [r["decode_tok_s"] for r in stale.llm_runs] == [42.0] and not data.skipped
    html = render(data)
    row = _row(html, "tiny-rpi5-int4")
    assert "FAILED" in row and "117.74" not in row and "95.37" not in row and "block 32" not in row
    row = _row(html, "tiny-rpi5-int4 (stale)")
    assert "STALE" in row and "117.74" in row and "95.37" in row and "block 32" in row

    # a CNN row the same way: a failed row's size is not the old artifact's
    cnn = tmp_path / "cnn"
    (cnn / "m-rpi4").mkdir(parents=True)
    (cnn / "m-rpi4" / "manifest.json").write_text(json.dumps(
        {"schema": 2, "name": "m", "target": {"name": "rpi4"}, "model": {"format": "tflite", "bytes": 5000},
         "validation": {"top1_agreement": 0.99}}))
    (cnn / "m.convert.json").write_text(json.dumps({"name": "m", "bundles": [
        {"path": str(cnn / "m-rpi4"), "target": "rpi4", "format": "tflite", "status": "failed",
         "failure": {"stage": "validation", "reason": "below the floor"}}]}))
    (m,) = col.collect(cnn, rollouts=[]).models
    assert [(b.status, b.bytes, b.agreement) for b in m.bundles] == [("failed", None, None), ("stale", 5000, 0.99)]


def test_llm_recipe_column_shows_what_applies_to_the_precision(tmp_path):
    """An fp32 / fp16 build quantizes nothing: no block size, accuracy level, algo or lm_head (defaults the
    builder never used); a quantized build's column is LLMBuildOptions.describe() but the precision, the INT8
    ladder's fp32 MatMuls and fp16 scales included."""
    from edgekit.convert.llm import LLMBuildOptions
    from edgekit.report.render import llm_recipe, render

    build = tmp_path / "build"
    cases = {"tiny-x86-avx2-fp32": _llm_manifest("x86-avx2", "fp32"),
             "tiny-jetson-fp16": _llm_manifest("jetson", "fp16", execution_provider="cuda"),
             "tiny-rpi5-int4": _llm_manifest("rpi5", "int4", int8_matmuls=("a", "b")),
             "tiny-rpi4-int8": _llm_manifest("rpi4", "int8", fp32_matmuls=("c",), block_size=64)}
    for key, man in cases.items():
        (build / key).mkdir(parents=True)
        (build / key / "manifest.json").write_text(json.dumps(man))
    html = render(col.collect(build, rollouts=[]))
    assert "no quantization (cpu)" in _row(html, "tiny-x86-avx2-fp32")
    assert "no quantization (cuda)" in _row(html, "tiny-jetson-fp16")
    for key in ("tiny-x86-avx2-fp32", "tiny-jetson-fp16"):
        row = _row(html, key)
        assert "block" not in row and "accuracy_level" not in row and "k_quant" not in row and "lm_head" not in row
    assert ("block 32, accuracy_level 4, k_quant, lm_head int8, 2 measured MatMuls int8, int8 symmetric, "
            "fp16 scales") in _row(html, "tiny-rpi5-int4")    # no llm.int8_nodes in this manifest: no blocks said
    # with the manifest's 8-bit nodes, the blocks they were written at
    assert "int8 symmetric block 128/64, fp16" in llm_recipe(dataclasses.asdict(LLMBuildOptions("int4")),
                                                              {"64": 3, "128": 1})
    row = _row(html, "tiny-rpi4-int8")
    assert "block 64, accuracy_level 4, k_quant, 1 measured MatMuls fp32, int8 symmetric, fp16 scales" in row
    assert "lm_head" not in row
    # the column says what describe() says, for each kind of build the ladder makes
    for o in (LLMBuildOptions("int4"), LLMBuildOptions("int4", lm_head_int8=False, half_scales=False),
              LLMBuildOptions("int4", llama_mixed=True, int8_layers=(0, 3), int8_symmetric=False),
              LLMBuildOptions("int4", algo="gptq", head_block=64, block_size=128),
              LLMBuildOptions("int4", execution_provider="cuda"), LLMBuildOptions("int8", fp32_matmuls=("x", "y")),
              LLMBuildOptions("int8", execution_provider="cuda", block_size=128)):
        # (describe() states the 8-bit blocks' rule; the column says the blocks a manifest records, none here)
        want = o.describe()[len(o.precision) + 1:].replace(" block 64 (lm_head 128 where its K allows)", "")
        assert llm_recipe(dataclasses.asdict(o)) == want, o
    for o in (LLMBuildOptions("fp32"), LLMBuildOptions("fp16", execution_provider="cuda")):
        assert llm_recipe(dataclasses.asdict(o)) == f"no quantization ({o.execution_provider})"


def test_hand_edited_llm_manifest_with_wrong_types_renders_empty_marks(tmp_path):
    """A manifest edited by hand (a figure "x", a section "oops" or 5, a list field 5, a byte count "x") is
    rendered with the empty mark where a figure cannot be read, not a ValueError / TypeError from the renderer."""
    from edgekit.report.render import _num, render

    cases = {"tiny-rpi5-int4": dict(fidelity={"ppl": "x", "ppl_float": "y", "ppl_increase": "z", "kl_mean": True,
                                              "top1_agreement": "high"}),
             "tiny-rpi4-int4": dict(recipe="oops", fidelity=5, llm={"bytes_per_token": "x", "int8_nodes": 5}),
             "tiny-jetson-int4": dict(recipe=5, fidelity="oops", llm="oops"),
             "tiny-x86-avx2-int4": dict(recipe=dict(_llm_manifest("x", "int4")["recipe"], int8_layers=5,
                                                    int8_matmuls=5, fp32_matmuls=True),
                                        llm={"int8_nodes": {"blocks": 5}})}
    for key, edits in cases.items():
        man = dict(_llm_manifest(key.split("-", 1)[1].rsplit("-", 1)[0], "int4"), **edits)
        (tmp_path / key).mkdir()
        (tmp_path / key / "manifest.json").write_text(json.dumps(man))
    (tmp_path / "tiny.convert.json").write_text(json.dumps({"name": "tiny", "kind": "llm", "bundles": [
        {"path": str(tmp_path / "tiny-rpi4-int4"), "target": "rpi4", "format": "onnx-genai", "precision": "int4",
         "bytes": "x", "recipe": "oops", "fidelity": ["x"]}]}))
    data = col.collect(tmp_path, rollouts=[])
    html = render(data)
    assert "– → –" in _row(html, "tiny-rpi5-int4")
    assert [b.llm["recipe"] for b in data.models[0].bundles if b.key == "tiny-jetson-int4"] == [{}]
    assert "block 32, accuracy_level 4" in _row(html, "tiny-x86-avx2-int4")
    assert [_num(v) for v in ("x", True, [], None, float("nan"), 10 ** 400, 2.5)] == ["–"] * 6 + ["2.5"]


def test_llm_select_fastest_candidates_are_their_own_table_and_the_ladder_does_not_claim_the_bundle(tmp_path):
    """A --select fastest bundle: its timed candidates are shown (what, decode tok/s, where timed, meets, chosen),
    the Speed section does not say "Not measured", and the profile rung it did not ship is not presented as its
    build."""
    from edgekit.convert.llm import LLMBuildOptions
    from edgekit.report.render import render

    def cand(block, tok_s, chosen=False):
        opts = dataclasses.asdict(LLMBuildOptions("int4", block_size=block))
        return {"rung": "select", "what": f"int4 block {block}", "options": opts, "ppl_increase": 0.001,
                "kl_mean": 0.001, "top1_agreement": 0.97, "bytes": 600_000, "misses": [], "meets": True,
                "timed": "decode tok/s on this x86_64 host, 2 thread(s)", "decode_tok_s": tok_s,
                **({"chosen": True} if chosen else {})}

    man = _llm_manifest("x86-avx2", "int4", block_size=128)
    man["candidates"] = [cand(32, 7506.9), cand(128, 7773.3, chosen=True)]
    man["rescue"] = [dict(man["candidates"][0], rung="profile", what="int4 block 32")]
    del man["rescue"][0]["decode_tok_s"], man["rescue"][0]["timed"]
    (tmp_path / "tiny-x86-avx2-int4").mkdir()
    (tmp_path / "tiny-x86-avx2-int4" / "manifest.json").write_text(json.dumps(man))
    data = col.collect(tmp_path, rollouts=[])
    assert [c["decode_tok_s"] for c in data.models[0].bundles[0].candidates] == [7506.9, 7773.3]
    html = render(data)
    speed = html[html.index("<h3>Speed</h3>"):html.index("<h3>Rescue ladder</h3>")]
    assert "Not measured" not in speed and "--select fastest candidates" in speed
    rows = re.findall(r"<tr><td>tiny-x86-avx2-int4</td><td>int4 block (\d+)</td>(.*?)</tr>", speed, re.S)
    assert [r[0] for r in rows] == ["32", "128"]
    assert "7,507" in rows[0][1] and "shipped" not in rows[0][1] and "on this x86_64 host" in rows[0][1]
    assert "7,773" in rows[1][1] and "shipped" in rows[1][1] and ">yes<" in rows[1][1]
    ladder = html[html.index("<h3>Rescue ladder</h3>"):]
    row = re.search(r"<td>profile</td>.*?</tr>", ladder, re.S).group(0)
    assert "not shipped: --select fastest shipped int4 block 128" in row


# --- the whole page in Chromium --------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium: installed here (as root, apt-get) when missing. CI runs as root; a machine
    where it cannot be installed fails this test rather than skipping it."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.fail("Chromium is missing and cannot be installed here (needs root and apt-get): "
                        "apt-get install chromium")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq"]
        r = subprocess.run([*apt, "install", "-y", "chromium"], capture_output=True, text=True, env=env,
                           timeout=1200)
        if r.returncode != 0:  # stale package lists: update once and retry
            subprocess.run([*apt, "update"], capture_output=True, text=True, env=env, timeout=600)
            r = subprocess.run([*apt, "install", "-y", "chromium"], capture_output=True, text=True, env=env,
                               timeout=1200)
        if r.returncode != 0 or not CHROMIUM.exists():
            pytest.fail(f"apt-get install chromium failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return CHROMIUM


class DevTools:
    """Headless Chromium driven over the DevTools protocol (one page, one websocket)."""

    def __init__(self, exe: Path, profile_dir: Path, width: int = 1280, height: int = 2000):
        from websockets.sync.client import connect

        self.log = open(profile_dir.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            [str(exe), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--disable-dev-shm-usage",  # containers: a small /dev/shm crashes tabs
             f"--user-data-dir={profile_dir}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT)
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"Chromium did not start: {(profile_dir.parent / 'chromium.log').read_text()[-800:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self.ws = connect(f"ws://127.0.0.1:{port}{port_file.read_text().splitlines()[1]}", max_size=None,
                          open_timeout=30)
        self.next_id, self.events, self.session = 0, [], None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method, timeout=60, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def evaluate(self, js):
        r = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"page script failed: {r['exceptionDetails']}")
        return r["result"]["value"]

    def problems(self):
        """Console errors and warnings, uncaught exceptions, log entries at warning or above."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log {p['entry']['level']}: {p['entry']['text']} ({p['entry'].get('url')})")
        return out

    def requests(self):
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self):
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


PAGE_FACTS = """(() => {
  const charts = [...document.querySelectorAll('figure.chart')].map(f => {
    const s = f.querySelector('svg'); const b = s.getBBox(); const r = s.getBoundingClientRect();
    return {id: f.dataset.chart, kind: s.dataset.kind, marks: f.querySelectorAll('.mark').length,
            bbox: [b.width, b.height], box: [r.width, r.height],
            axisLabels: [...s.querySelectorAll('.axis-label')].map(t => t.textContent),
            legend: [...s.querySelectorAll('.legend text')].map(t => t.textContent),
            title: s.querySelector('.chart-title').textContent};
  });
  const summaries = [...document.querySelectorAll('section.model')].map(s => ({
    id: s.id, rows: s.querySelectorAll('table.summary tbody tr').length,
    headers: [...s.querySelectorAll('table.summary th')].map(t => t.textContent)}));
  return {title: document.title, charts, summaries, scrollHeight: document.documentElement.scrollHeight};
})()"""


@pytest.fixture
def report_inputs(digits_build, digits, lab, cli, tmp_path_factory):
    """A build directory as a user has it after convert (two models, one with mixed precision),
    `edgekit bench --out` of two bundles here, and `edgekit profile` of one on a lab device."""
    from test_mixed import make_sensitive

    from edgekit.bundle import write_json_atomic
    from edgekit.runtime import load

    base = tmp_path_factory.mktemp("report")
    build = base / "build"
    shutil.copytree(Path(digits_build.report_path).parent, build)
    model, calib, val = digits
    sens = make_sensitive(model, base / "sensitive.keras")
    r = cli("convert", sens, "-t", "rpi4", "--format", "tflite", "--calib", calib, "--val", val,
            "--max-accuracy-drop", 1, "--search-first", "--compat-check", "venv", "--out", build, "--report", "-q")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert f"html report: {build / 'report.html'}" in r.stdout and (build / "report.html").is_file()
    benched = ["digits-rpi4", "digits-x86-avx2"]
    for key in benched:
        write_json_atomic(build / "bench" / f"{key}.json", load(build / key).benchmark(runs=100, warmup=10))
    profiles = base / "profiles"
    r = cli("profile", build / "digits-x86-avx2", "--device", "x86-box", "--runs", 100, "--warmup", 10,
            "--save-dir", profiles, "--inventory", lab.inventory, "--report")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert "html report:" in r.stdout and len(list((profiles / "x86-box").glob("*.json"))) == 1
    return build, profiles, benched


def test_report_in_headless_chromium(report_inputs, chromium, cli, tmp_path):
    build, profiles, benched = report_inputs
    out = tmp_path / "report.html"
    r = cli("report", build, "--profiles", profiles, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)
    html = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing to fetch
    data = col.collect(build, [profiles])
    models = {m.name: m for m in data.models}
    assert set(models) == {"digits", "sensitive"} and not data.unmatched_runs

    browser = DevTools(chromium, tmp_path / "chromium-profile")
    try:
        browser.call("Page.navigate", url=out.as_uri())
        browser.wait_for("Page.loadEventFired")
        facts = browser.evaluate(PAGE_FACTS)
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        problems, requests = browser.problems(), browser.requests()
    finally:
        browser.close()
    assert problems == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    charts = {c["id"]: c for c in facts["charts"]}
    for c in facts["charts"]:  # every chart rendered, titled, labelled
        assert c["bbox"][0] > 100 and c["bbox"][1] > 100 and c["box"][0] > 100, c
        assert c["title"] and (c["kind"] == "bars" or len(c["axisLabels"]) == 2), c
        assert c["legend"] or c["kind"] == "histogram", c

    dg = models["digits"]
    written = [b for b in dg.bundles if b.bytes]
    assert {s["id"]: s["rows"] for s in facts["summaries"]} == {"model-digits": len(dg.bundles),
                                                                 "model-sensitive": 1}
    assert "p50 ms on x86-box" in facts["summaries"][0]["headers"]
    assert charts["digits-fidelity-size"]["marks"] == len(written) == len(dg.bundles) > 10
    timed_here = {b.key for b in dg.bundles if b.p50(col.HERE) is not None}  # benched, or timed by convert
    assert set(benched) <= timed_here and charts["digits-fidelity-p50-here"]["marks"] == len(timed_here)
    assert charts["digits-fidelity-p50-x86-box"]["marks"] == 1
    assert charts["digits-cdf-here"]["marks"] == len(benched) and charts["digits-cdf-x86-box"]["marks"] == 1
    assert sorted(charts["digits-cdf-here"]["legend"]) == benched
    for key in benched:
        assert charts[f"digits-hist-{key}-here"]["marks"] >= 5
    assert charts["digits-hist-digits-x86-avx2-x86-box"]["marks"] >= 5
    assert "digits-hist-digits-rpi4-x86-box" not in charts  # not measured there: not drawn

    (sb,) = models["sensitive"].bundles
    assert sb.mixed["met"] and sb.p50("here") is not None   # convert's own timing of the kept artifact
    sens = charts["sensitive-sensitivity-sensitive-rpi4"]
    scores = [s["score"] for s in sb.mixed["sensitivity"]]
    assert sens["marks"] == len([v for v in scores if isinstance(v, (int, float)) and math.isfinite(v) and v > 0])
    assert sens["marks"] >= 3
    assert {"kept in float", "quantized"} <= set(sens["legend"])
    assert charts["sensitive-fidelity-p50-here"]["marks"] == 1

    png = tmp_path / "report.png"
    png.write_bytes(shot)
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        assert im.size == (1280, 2000)
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 20  # not a blank page
    print(f"screenshot: {png}")
    shots = os.environ.get("EDGEKIT_REPORT_SCREENSHOT")
    if shots:  # where a human (or the README) wants it
        shutil.copy(png, shots)
