"""Shapes the user already gave: where a source leaves an input dimension unknown, the calibration
data fixes it (one sample's shape, batch 1), the convert table and every manifest say so,
--input-shape overrides it, and a source is refused only when neither says (issue 20, item 2).

Tiny models made here: a TorchScript CNN that records no input shape, an ONNX classifier with
dynamic H and W (as Paddle exports them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.convert.recipe import Calibration, ConvertRecipe, Floor, Search
from edgekit.errors import SourceModelError

H, W = 24, 32
FLOOR = Floor(min_snr_db=15.0, min_agreement=0.5)     # tiny untrained nets: the shapes are what is tested


def _calib(path, n=16, shape=(3, H, W), seed=0):
    np.save(path, np.random.default_rng(seed).uniform(0.0, 1.0, (n,) + shape).astype(np.float32))
    return path


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


# --- the data's shapes ------------------------------------------------------------------------------------

def test_data_shapes_fill_only_the_unknown_dimensions(tmp_path):
    from edgekit.convert import shapes as shaping

    npy = _calib(tmp_path / "c.npy", n=5)
    d = shaping.peek(str(npy))
    assert d.complete("x", (-1, 3, -1, -1), 1) == (1, 3, H, W)      # dynamic H, W: from the data, batch 1
    assert d.complete("x", (), 1) == (1, 3, H, W)                   # no shape recorded: the data's sample
    assert d.complete("x", (-1, 3, -1), 1) is None                  # another rank: the data says nothing
    assert d.complete("x", (1, 3, -1, W), 1) == (1, 3, H, W)
    np.savez(tmp_path / "c.npz", a=np.zeros((4, 2, 7), np.float32), b=np.zeros((4, 5), np.float32),
             labels=np.zeros(4))
    z = shaping.peek(str(tmp_path / "c.npz"))
    assert dict(z.arrays) == {"a": (4, 2, 7), "b": (4, 5)}         # labels are not an input
    assert z.complete("a", (-1, -1, 7), 2) == (1, 2, 7) and z.complete("c", (-1, 3), 2) is None
    img = shaping.peek(str(tmp_path), "resize=20x30,layout=nchw")
    assert img.per_sample and img.complete("x", (-1, 3, -1, -1), 1) == (1, 3, 20, 30)
    assert shaping.peek(str(tmp_path)) is None                      # images without resize=: nothing fixed


# --- TorchScript without recorded shapes ----------------------------------------------------------------------

def _torchscript(path):
    import torch
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, H, W)), str(path))
    return path


def test_torchscript_without_shapes_converts_with_calib_alone(tmp_path, cli):
    from edgekit.convert import torch_source

    pt = _torchscript(tmp_path / "net.pt")
    assert torch_source.read_program(pt).input_shapes == [()]       # the program records no shape
    calib = _calib(tmp_path / "calib.npy")
    r = cli("convert", pt, "--target", "rpi4", "--format", "onnx", "--calib", calib, "--out", tmp_path / "out",
            "--no-rescue", "--compat-check", "off", "--min-snr", FLOOR.min_snr_db,
            "--min-agreement", FLOOR.min_agreement)
    assert r.exit_code == 0, r.output
    assert f"input shape input=1x3x{H}x{W} taken from the calibration data calib.npy (batch 1)" in r.output
    m = _manifest(tmp_path / "out" / "net-rpi4")
    assert m["inputs"][0]["shape"] == [1, 3, H, W]
    assert m["source"]["shapes_from_data"]["inputs"] == {"input": [1, 3, H, W]}
    assert any("taken from the calibration data" in n for n in m["source"]["notes"])


def test_torchscript_shapes_input_shape_overrides_and_neither_refuses(tmp_path):
    from edgekit.convert import shapes as shaping
    from edgekit.convert.sources import load_source

    pt = _torchscript(tmp_path / "net.pt")
    data = shaping.peek(str(_calib(tmp_path / "calib.npy")))
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    src = load_source(str(pt), tmp_path / "a", input_shapes={"input": (1, 3, 16, 16)}, needs_tflite=False, data=data)
    assert src.interface["inputs"] == {"input": [1, 3, 16, 16]} and not src.shapes_from_data
    with pytest.raises(SourceModelError, match="records no shape for input 'input'.*--input-shape input=.*--calib"):
        load_source(str(pt), tmp_path / "b", needs_tflite=False)      # random calibration: no data to say


# --- ONNX with dynamic H and W ------------------------------------------------------------------------------------

def _dynamic_onnx(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (5, 8)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "b2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def test_dynamic_hw_onnx_converts_to_both_formats_from_calibration_data(tmp_path):
    from edgekit.convert.pipeline import convert

    model = _dynamic_onnx(tmp_path / "cls.onnx")
    calib = _calib(tmp_path / "calib.npy")
    recipe = ConvertRecipe(model=str(model), targets=("rpi4",), calibration=Calibration(str(calib)),
                           compat_check="off", floor=FLOOR, search=Search(rescue=False))
    res = convert(recipe, str(tmp_path / "out"))
    assert not res.failed and {b.fmt for b in res.bundles} == {"tflite", "onnx"}
    assert "note: input shape x=1x3x24x32 taken from the calibration data calib.npy (batch 1) for the TFLite" \
        in res.table()
    for b in res.bundles:
        m = _manifest(b.path)
        rec = m["source"]["shapes_from_data"]
        assert rec["inputs"] == {"x": [1, 3, H, W]} and rec["applies_to"].startswith("the TFLite artifacts")
        shape = m["inputs"][0]["shape"]
        if b.fmt == "tflite":
            assert shape == [1, 3, H, W]                              # the source's NCHW interface, data's H, W
        else:
            assert shape[1] == 3 and shape[2:] != [H, W]              # the ONNX artifact keeps H and W dynamic


# --- Keras inputs of None ---------------------------------------------------------------------------------------------

def test_keras_none_dims_from_data_override_and_refusal(tmp_path):
    import keras
    from edgekit.convert import shapes as shaping
    from edgekit.convert.sources import load_source
    from edgekit.runtime import load

    inp = keras.Input((None, None, 3), name="img")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inp, out).save(tmp_path / "m.keras")
    data = shaping.peek(str(_calib(tmp_path / "calib.npy", shape=(H, W, 3))))
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    src = load_source(str(tmp_path / "m.keras"), tmp_path / "a", data=data)
    assert src.shapes_from_data["inputs"] == {"img": [1, H, W, 3]}
    assert tuple(load(src.reference_path).inputs[0].shape)[1:] == (H, W, 3)   # the float reference runs at it
    src = load_source(str(tmp_path / "m.keras"), tmp_path / "b", input_shapes={"img": (1, 16, 16, 3)}, data=data)
    assert tuple(load(src.reference_path).inputs[0].shape)[1:] == (16, 16, 3) and not src.shapes_from_data
    with pytest.raises(SourceModelError, match=r"'img' has dynamic dimensions \?x\?x\?x3.*--input-shape img=1x"
                                               r"<size>x<size>x3.*--calib"):
        load_source(str(tmp_path / "m.keras"), tmp_path / "c")
