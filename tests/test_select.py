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
    # the others are written beside the winner, each a complete bundle that passes its golden check
    beside = [b for b in r.bundles[1:] if b.ok]
    assert len(beside) == len(timed) - 1
    for b in [main] + beside:
        assert b.path.name.startswith(f"digits-{target}")
        assert golden_check(load(b.path, providers=["CPUExecutionProvider"]))["ok"]
    m = read_bundle(main.path).manifest
    assert m["candidates"] == json.loads(json.dumps(cands)) and m["recipe"]["select"] == "fastest"


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
