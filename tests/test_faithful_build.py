"""The more faithful build ships when it costs nothing (convert.faithful): on x86 without VNNI the
profile's u8 x 7-bit weights against u8 x u8 (uint8 weights), fidelity and speed on the target
weighed by the rule, both recorded in the manifest."""

from __future__ import annotations

import pytest

from edgekit.bundle import read_bundle
from edgekit.convert import Calibration, ConvertRecipe, convert
from edgekit.runtime import load
from edgekit.runtime.check import golden_check


def test_the_rule():
    from edgekit.convert.faithful import SPEED_SLACK, pick

    shipped = {"snr_db": 22.1, "top1_agreement": 0.90, "meets": True}
    better = {"snr_db": 32.5, "top1_agreement": 0.99, "meets": True, "speed_ratio": 1.03}
    assert pick(shipped, [better]) is better
    assert pick(shipped, [dict(better, speed_ratio=1 + SPEED_SLACK + 0.01)]) is None   # not about the same speed
    assert pick(shipped, [dict(better, speed_ratio=None)]) is None      # its speed on the target is not known
    assert pick(shipped, [dict(better, meets=False)]) is None           # below the floor
    assert pick(shipped, [dict(better, top1_agreement=0.89)]) is None   # agrees less often
    assert pick(shipped, [dict(better, snr_db=22.0)]) is None
    assert pick(shipped, [dict(better, snr_db=30.0), better, dict(better, snr_db=40.0, speed_ratio=1.2)]) is better
    assert pick({"snr_db": 10.0, "top1_agreement": None, "meets": True},
                [dict(better, top1_agreement=None)])["snr_db"] == 32.5   # not a classifier: SNR alone


def test_rivals_only_where_the_target_has_no_exact_int8():
    """u8 x u8 is weighed against u8 x 7-bit builds for x86 without VNNI, with the shipped build's
    calibration and the profile's; never for targets whose integer kernels are exact anyway."""
    import dataclasses
    from types import SimpleNamespace

    from edgekit.convert.faithful import alternatives
    from edgekit.targets import load_target

    def rivals(name, **shipped):
        t = load_target(name)
        row = SimpleNamespace(fmt="onnx", build=t.onnx, profile=t)
        return [(b.weight_type, b.reduce_range, b.calibration)
                for _, b in alternatives(row, dict(dataclasses.asdict(t.onnx), **shipped))]

    assert rivals("x86-avx2") == [("uint8", False, "minmax")]
    assert rivals("x86-avx2", calibration="percentile") == [("uint8", False, "percentile"), ("uint8", False, "minmax")]
    assert rivals("x86-avx2", activation_type="int16", reduce_range=False) == []   # the 16-bit rung: no rival
    assert rivals("x86-avx512-vnni") == [] and rivals("rpi4") == []


@pytest.fixture(scope="module")
def residual_cnn(tmp_path_factory):
    """A depthwise / BatchNorm / residual CNN on the digits with sensor noise (so that many validation
    samples sit near a decision boundary), 1988 labelled validation samples: the committed model, since
    training it anew gives another model on another CPU (tests/residualcnn.py)."""
    from residualcnn import residual_fixture

    return residual_fixture(tmp_path_factory.mktemp("residual"))


def test_x86_avx2_onnx_of_a_residual_cnn_keeps_accuracy(residual_cnn, tmp_path, monkeypatch):
    """The profile's u8 x 7-bit build meets the floor and loses accuracy (half a point here); u8 x u8 keeps
    it at about the same speed on the target, so it ships; the VNNI target's build has no such rival.
    Speed comes from the profile's own measurement (+3%) on every host: timed live on an AVX2 CI machine, a
    noisy run could read u8 x u8 past the 5% slack (the timed path is the rule's, tested in test_the_rule)."""
    from edgekit.convert import select

    monkeypatch.setattr(select, "host_matches", lambda profile: (False, "the test uses the profile's figure"))
    model, calib, val = residual_cnn
    r = convert(ConvertRecipe(str(model), ("x86-avx2", "x86-avx512-vnni"), calibration=Calibration(str(calib)),
                              validation=str(val), formats=("onnx",), compat_check="off"), str(tmp_path / "o"))
    avx2 = next(b for b in r.bundles if b.target == "x86-avx2")
    assert avx2.ok, avx2.failure
    m = avx2.artifact.metrics
    assert m["accuracy_drop_points"] <= 0.5, m
    man = read_bundle(avx2.path).manifest
    f = man["faithful"]
    profile, *others = f["candidates"]
    assert (profile["weight_type"], profile["reduce_range"], profile["shipped"]) == ("int8", True, False)
    shipped = next(c for c in others if c["shipped"])
    assert (shipped["weight_type"], shipped["reduce_range"]) == ("uint8", False)
    assert man["model"]["build"]["weight_type"] == "uint8" and not man["model"]["build"]["reduce_range"]
    assert shipped["snr_db"] > profile["snr_db"] + 3 and shipped["top1_agreement"] >= profile["top1_agreement"]
    assert shipped["accuracy_drop_points"] == pytest.approx(m["accuracy_drop_points"])
    assert profile["meets"] and shipped["meets"] and shipped["speed_ratio"] <= 1.05
    assert shipped["speed_source"] == "x86-avx2 profile: onnx.uint8_weights_cost_pct"
    assert "shipped uint8 weights" in f["why"] and "more faithful at the same speed?" in r.table()
    assert any("slower on a VNNI CPU" in n for n in man["validation"]["notes"])
    assert golden_check(load(avx2.path))["ok"]
    vnni = next(b for b in r.bundles if b.target == "x86-avx512-vnni")
    assert vnni.ok and vnni.artifact.faithful is None          # exact int8 there: the profile's build stays
    assert read_bundle(vnni.path).manifest["model"]["build"]["weight_type"] == "int8"
