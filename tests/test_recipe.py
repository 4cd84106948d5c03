"""ConvertRecipe, Manifest and the numerics decision: pure logic, no TensorFlow, seconds."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from edgekit.bundle import SCHEMA_VERSION, Manifest
from edgekit.convert.numerics import Host, for_onnx, saturation_safe
from edgekit.convert.recipe import Calibration, ConvertRecipe, Floor, Search
from edgekit.convert.validate import budget_drop, floor_misses
from edgekit.errors import BundleError, EdgekitError, RecipeError
from edgekit.targets import load_target


def test_recipe_round_trips_and_normalises():
    r = ConvertRecipe("m.keras", ["rpi4", "rpi4", "x86-avx2"], calibration="c.npz", formats=["onnx"],
                      floor=Floor(min_snr_db=25, min_agreement=0.95, max_accuracy_drop=1.0),
                      search=Search(seconds=30, first=True, rungs=["float layers", "16-bit"]), input_shapes={"x": (1, 3, 8, 8)})
    assert r.targets == ("rpi4", "x86-avx2") and r.formats == ("onnx",)
    assert r.calibration == Calibration("c.npz") and r.search.rungs == ("float layers", "16-bit")
    d = json.loads(json.dumps(r.to_dict()))
    assert ConvertRecipe.from_dict(d) == r
    assert r.bundle_name == "m"


@pytest.mark.parametrize("fields, field", [
    (dict(targets=[]), "targets"),
    (dict(precision="int4"), "precision"),
    (dict(formats=["tflite", "coreml"]), "formats"),
    (dict(compat_check="maybe"), "compat_check"),
    (dict(select="slowest"), "select"),
    (dict(floor={"min_agreement": 1.5}), "floor.min_agreement"),
    (dict(floor={"min_snr_db": "high"}), "floor.min_snr_db"),
    (dict(search={"seconds": -1}), "search.seconds"),
    (dict(search={"rungs": ["ranges", "float-layers"]}), "search.rungs"),
    (dict(calibration={"samples": 0, "random": True}), "calibration.samples"),
    (dict(calibration={"path": None}), "calibration.path"),
    (dict(calibration={"path": "c.npz", "random": True}), "calibration"),
    (dict(input_shapes={"x": [1, 0]}), "input_shapes"),
    (dict(colour="red"), "colour"),
])
def test_each_bad_field_names_itself(fields, field):
    base = dict(model="m.keras", targets=["rpi4"], calibration={"path": "c.npz"})
    base.update(fields)
    with pytest.raises(RecipeError) as e:
        ConvertRecipe.from_dict(base)
    assert e.value.field == field
    assert field.split(".")[-1] in str(e.value) or field == "calibration.path"


def test_recipe_from_a_file_rejects_unknown_fields(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"model": "m.keras", "targets": ["rpi4"], "calibration": {"path": "c.npz"},
                             "floor": {"min_snr": 3}}))
    with pytest.raises(RecipeError, match=r"unknown field floor\.'min_snr'"):
        ConvertRecipe.load(str(p))
    with pytest.raises(RecipeError, match="recipe not found"):
        ConvertRecipe.load(str(tmp_path / "nope.json"))


def test_manifest_reads_schema_1_in_todays_units():
    v1 = {"schema": 1, "name": "m", "target": {"name": "rpi4"}, "model": {"file": "model.tflite"},
          "inputs": [], "outputs": [], "surprise": {"kept": True},
          "validation": {"top1_agreement": 97.5, "accuracy_float": 99.0, "accuracy_int8": 98.0,
                         "accuracy_drop": 1.0, "int8_bytes": 10}}
    m = Manifest.from_dict(v1)
    assert m.schema == SCHEMA_VERSION
    assert m.validation["top1_agreement"] == pytest.approx(0.975)
    assert m.validation["accuracy_quant"] == pytest.approx(0.98) and m.validation["accuracy_drop_points"] == 1.0
    assert m.to_dict()["surprise"] == {"kept": True}
    with pytest.raises(BundleError, match="newer than this edgekit"):
        Manifest.from_dict(dict(v1, schema=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="lacks 'inputs'"):
        Manifest.from_dict({k: v for k, v in v1.items() if k != "inputs"})


def test_floor_misses_name_each_shortfall():
    m = {"outputs": {"y": {"snr_db": 12.0}}, "top1_agreement": 0.8, "accuracy_drop_points": 3.0}
    misses = floor_misses(m, Floor(max_accuracy_drop=1.0))
    assert len(misses) == 3 and "SNR 12.0 dB < 20" in misses[0] and "80.0% < 90%" in misses[1]
    ok = {"outputs": {"y": {"snr_db": 30.0}}, "top1_agreement": 0.99, "accuracy_drop_points": None}
    assert floor_misses(ok, Floor()) == [] and budget_drop(ok) == pytest.approx(1.0)


VNNI = Host("x86_64", frozenset({"avx2", "avx512_vnni"}))
AVX2 = Host("x86_64", frozenset({"avx2", "fma"}))
ARM = Host("aarch64", frozenset({"asimd"}))


@pytest.mark.parametrize("host, target, mode", [
    (AVX2, "rpi4", "reference"),            # S8S8 would saturate here; the Pi computes exactly
    (AVX2, "jetson-orin", "reference"),
    (AVX2, "x86-avx512-vnni", "reference"),  # U8S8 full range saturates here, not with VNNI
    (AVX2, "x86-avx2", "host"),             # U8 x 7-bit weights: cannot saturate
    (VNNI, "rpi4", "host"), (VNNI, "x86-avx2", "host"), (VNNI, "jetson-orin", "host"),
    (ARM, "rpi4", "host"), (ARM, "x86-avx512-vnni", "host"),
])
def test_numerics_follow_host_and_target(host, target, mode):
    t = load_target(target)
    assert for_onnx(t, t.onnx, host).mode == mode


def test_a_profile_that_saturates_on_its_own_target_is_warned_about():
    import dataclasses

    t = load_target("x86-avx2")
    s8 = dataclasses.replace(t.onnx, activation_type="int8", reduce_range=False)
    assert saturation_safe(t.onnx) and not saturation_safe(s8)
    n = for_onnx(t, s8, VNNI)
    assert n.mode == "reference" and "can saturate there" in n.warning


def test_recipe_errors_are_one_line_exit_2(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "edgekit.cli", "convert", "--recipe", str(p)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read the recipe" in r.stderr, r.stderr
    assert issubclass(RecipeError, EdgekitError)
    assert ROOT.is_dir()


def test_mixed_precision_search_keeps_the_smallest_set_that_meets_the_floor():
    """The search alone, with a stand-in converter: a candidate meets the floor when 'b' and 'c' are in
    float ('a' is sensitive by the numbers but harmless); the result is exactly {b, c}."""
    from edgekit.convert.mixed import Layer, search

    layers = [Layer(["a"], "Conv", "a", 9.0), Layer(["b"], "Conv", "b", 8.0), Layer(["c"], "Gemm", "c", 7.0),
              Layer(["d"], "Conv", "d", 1.0)]

    def make(nodes):
        return b"x" * (100 + 50 * len(nodes))

    seen = []

    def evaluate(data):
        seen.append(len(data))
        return {"metrics": {"data": data}, "p50_ms": 1.0}

    def judge_for(nodes_in_float):
        return lambda m: ({"b", "c"} <= nodes_in_float(m), 0.0)

    current = {}

    def make_tracking(nodes):
        current["nodes"] = set(nodes)
        return make(nodes)

    res = search(layers, make_tracking, evaluate, judge_for(lambda m: current["nodes"]), 60.0, False, lambda t: None)
    assert [lay.source for lay in res["chosen"].float_layers] == ["b", "c"]
    first = search(layers, make_tracking, evaluate, judge_for(lambda m: current["nodes"]), 60.0, True,
                   lambda t: None)
    assert {lay.source for lay in first["chosen"].float_layers} == {"a", "b", "c"}
    assert "first candidate" in first["stopped"]
    none = search(layers, make_tracking, evaluate, judge_for(lambda m: current["nodes"]), 0.0, False,
                  lambda t: None)
    assert none["chosen"] is None and none["stopped"].startswith("search budget of 0 s spent")
