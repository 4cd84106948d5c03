"""--select fastest: real candidates built, validated, timed where this host has the target's ISA."""

import json

import pytest

from edgekit.bundle import read_bundle
from edgekit.convert import Calibration, ConvertRecipe, convert
from edgekit.convert.numerics import this_host
from edgekit.runtime import load
from edgekit.runtime.check import golden_check


def _x86_target_like_this_host() -> str:
    return "x86-avx512-vnni" if this_host().exact_int8 else "x86-avx2"


@pytest.fixture(scope="module")
def selected(digits, tmp_path_factory):
    model, calib, val = digits
    out = tmp_path_factory.mktemp("fastest")
    target = _x86_target_like_this_host()
    r = convert(ConvertRecipe(str(model), (target,), calibration=Calibration(str(calib)), validation=str(val),
                              formats=("onnx",), select="fastest", compat_check="off"), str(out))
    return r, target, out


def test_fastest_is_the_lowest_p50_among_candidates_that_meet_the_floor(selected):
    r, target, out = selected
    main = r.bundles[0]
    assert main.path.name == f"digits-{target}"
    cands = main.artifact.candidates
    kinds = {c["what"].split(" (")[0] for c in cands}
    assert {"QOperator", "dynamic", "float32"} <= kinds and any(k.startswith("profile") for k in kinds)
    timed = [c for c in cands if c.get("meets")]
    assert len(timed) >= 3 and all(c["p50_ms"] > 0 for c in timed)
    winner = next(c for c in cands if c["chosen"])
    assert winner["p50_ms"] == min(c["p50_ms"] for c in timed)
    assert "timed here" in winner["timed_where"]
    # each ONNX file is also tried on OpenVINO (an x86 target, openvino installed by the dev extra):
    # measured through OpenVINO, held to the floor, timed in the same rounds
    assert all(c["backend"] in ("onnxruntime", "openvino") for c in cands)
    ov = {c["what"]: c for c in cands if c["backend"] == "openvino"}
    ort = [c for c in cands if c["backend"] == "onnxruntime" and "error" not in c]
    assert {c["what"] + "+openvino" for c in ort} == set(ov)
    ov_profile = next(c for w, c in ov.items() if w.startswith("profile"))
    assert ov_profile["meets"] and ov_profile["p50_ms"] > 0 and ov_profile["snr_db"] > 0
    assert ov_profile["bytes"] == next(c for c in ort if c["what"].startswith("profile"))["bytes"]
    # the winner's manifest names the backend it was timed on, and load() runs it there
    assert main.artifact.runtime["backend"] == winner["backend"]
    assert load(main.path).backend == winner["backend"]
    # the others are written beside the winner, each a complete bundle that passes its golden check
    beside = [b for b in r.bundles[1:] if b.ok]
    assert len(beside) == len(timed) - 1
    for b in [main] + beside:
        assert b.path.name.startswith(f"digits-{target}")
        assert golden_check(load(b.path, providers=["CPUExecutionProvider"]))["ok"]
    m = read_bundle(main.path).manifest
    assert m["candidates"] == json.loads(json.dumps(cands)) and m["recipe"]["select"] == "fastest"
    assert m["runtime"]["backend"] == winner["backend"]
    # the winner timed again at 1, 2 ... threads up to the count the candidates ran with: the count
    # chosen by the rule is recorded, and load() takes it instead of probing
    from edgekit.runtime import threadprobe

    tc = m["runtime"].get("threads_choice")
    if winner["threads"] == 1:
        assert tc is None and m["runtime"]["threads"] == 1
    else:
        p50 = {int(t): v for t, v in tc["p50_ms"].items()}
        assert tc["tried"] == sorted(p50) == threadprobe.candidates(winner["threads"])
        assert m["runtime"]["threads"] == tc["threads"] == threadprobe.pick(p50) and "timed here" in tc["where"]
        got = load(main.path)
        assert (got.threads, got.threads_chosen_by) == (tc["threads"], "manifest")


def test_a_bundle_timed_on_openvino_loads_on_openvino(selected, monkeypatch):
    """Written beside the winner or as it: the profile's build on OpenVINO prefers OpenVINO; without
    openvino it runs on ONNX Runtime and says why."""
    import sys

    r, target, out = selected
    on_ov = [b for b in r.bundles if b.ok and b.artifact.runtime["backend"] == "openvino"]
    assert on_ov, "no OpenVINO candidate met the floor"
    b = on_ov[0]
    m = read_bundle(b.path).manifest
    assert m["runtime"]["backend"] == "openvino" and m["runtime"]["hints"]["PERFORMANCE_HINT"] == "LATENCY"
    assert "OpenVINO" in m["validation"]["numerics"]["why"] and m["golden"]["made_with"].startswith("openvino")
    got = load(b.path)
    assert (got.backend, got.backend_chosen_by, got.backend_note) == ("openvino", "manifest", None)
    assert golden_check(got)["ok"]
    assert load(b.path, backend="onnxruntime").backend == "onnxruntime"   # an explicit backend wins
    monkeypatch.setitem(sys.modules, "openvino", None)                    # openvino hidden
    with pytest.warns(RuntimeWarning, match="prefers openvino"):
        fell = load(b.path)
    assert fell.backend == "onnxruntime" and fell.backend_chosen_by == "default"
    assert fell.backend_note.startswith("the manifest prefers openvino, not used here: openvino cannot be imported")
    assert fell.backend_note.endswith("running on onnxruntime")
    assert fell.benchmark(runs=3, warmup=1)["backend_note"] == fell.backend_note
    assert golden_check(fell)["ok"]


def test_float_is_picked_where_float_is_fastest(digits, tmp_path, monkeypatch):
    """The choice itself, with the clock replaced: float32 measured fastest -> the float model ships."""
    from edgekit.convert import select

    speeds = {"float32": 0.5}
    monkeypatch.setattr(select, "_p50", lambda art, threads: speeds.get(art.precision, 2.0))
    model, calib, val = digits
    r = convert(ConvertRecipe(str(model), (_x86_target_like_this_host(),), calibration=Calibration(str(calib)),
                              validation=str(val), formats=("onnx",), select="fastest", compat_check="off"),
                str(tmp_path / "o"))
    main = r.bundles[0]
    assert main.artifact.precision == "float32"
    assert read_bundle(main.path).manifest["model"]["precision"] == "float32"
    assert golden_check(load(main.path))["ok"]


def test_nothing_is_timed_on_a_host_of_another_isa(digits, tmp_path):
    model, calib, val = digits
    r = convert(ConvertRecipe(str(model), ("rpi4",), calibration=Calibration(str(calib)), validation=str(val),
                              formats=("tflite",), select="fastest", compat_check="off"), str(tmp_path / "o"))
    (b,) = r.bundles
    assert b.artifact.precision == "int8" and len(b.artifact.candidates) == 1
    assert "is not rpi4's ISA" in b.artifact.candidates[0]["timed_where"]
    assert b.artifact.candidates[0]["p50_ms"] is None


def test_float_ships_when_no_int8_build_meets_the_floor(digits, tmp_path):
    """A floor no 8-bit build reaches (60 dB, no ladder): the profile's build fails, the other
    candidates are still built and judged, and float32, the one that meets it, ships, saying why."""
    from edgekit.convert import Floor, Search

    model, calib, val = digits
    r = convert(ConvertRecipe(str(model), (_x86_target_like_this_host(),), calibration=Calibration(str(calib)),
                              validation=str(val), formats=("tflite",), select="fastest", compat_check="off",
                              floor=Floor(min_snr_db=60.0), search=Search(rescue=False)), str(tmp_path / "o"))
    (main, *beside) = r.bundles
    assert not r.failed and main.artifact.precision == "float32"
    cands = main.artifact.candidates
    profile = next(c for c in cands if c["what"].startswith("profile"))
    assert not profile["meets"] and "60" in profile["misses"][0] and not profile["chosen"]
    assert all(not c["meets"] for c in cands if c["what"] != "float32")
    assert any("missed the floor even after the rescue ladder" in n for n in main.artifact.notes)
    assert golden_check(load(main.path))["ok"] and not [b for b in beside if b.ok]
