"""ONNX artifacts declare only the opsets their graph uses, at versions the target's oldest runtime loads.

onnx >= 1.20 and ONNX Runtime's optimizer stamp domains nobody uses at their newest version (ai.onnx.ml 5
with onnx 1.23), which ONNX Runtime 1.16.3 (x86-avx2's min_runtime) refuses to load."""

import numpy as np
import pytest

from edgekit.bundle import read_bundle
from edgekit.convert import Calibration, ConvertRecipe, Floor, convert
from edgekit.convert import onnx as onnx_conv


def _paddle_like(path, opset=11):
    """A small classifier as Paddle2ONNX writes one: opset 11, IR 6, Conv/BN/Relu, GAP, Gemm, Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, shape, scale=0.3):
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["fl"]),
             helper.make_node("Gemm", ["fl", "wf", "bf"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1)]
    inits = [init("w1", (8, 3, 3, 3)), init("b1", (8,)), numpy_helper.from_array(np.ones(8, np.float32), "g"),
             init("be", (8,)), init("mu", (8,)),
             numpy_helper.from_array(np.abs(rng.normal(1, 0.1, 8)).astype(np.float32), "var"),
             init("w2", (16, 8, 3, 3)), init("b2", (16,)), init("wf", (4, 16)), init("bf", (4,))]
    g = helper.make_graph(nodes, "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 64])],
                          [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="PaddlePaddle")
    m.ir_version = 6
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _imports(path):
    import onnx

    m = onnx.load(str(path))
    return {o.domain: o.version for o in m.opset_import}, m.ir_version


def test_unused_domains_dropped_and_used_ones_at_their_oldest_equivalent():
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 5)])
    plain.ir_version = 10
    out = onnx.load_from_string(onnx_conv.tidy_opsets(plain.SerializeToString()))
    assert {o.domain: o.version for o in out.opset_import} == {"": 17}
    assert out.ir_version == 8                        # what opset 17 needs; ONNX Runtime 1.16 reads <= 9

    # an ML op that exists unchanged since ai.onnx.ml 1: declared at 5, written at 1
    ml = helper.make_model(helper.make_graph([helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml",
                                                               norm="L2")], "g", [x], [y]),
                           opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 5)])
    out = onnx_conv.tidy_opsets(ml.SerializeToString())
    assert onnx_conv.opset_imports(out) == {"": 17, "ai.onnx.ml": 1}
    assert onnx_conv.ops_needing(out, "ai.onnx.ml", 1) == []
    # an op whose definition changed at ai.onnx.ml 4 (LabelEncoder) keeps 4, and is named as what needs it
    le = helper.make_model(helper.make_graph(
        [helper.make_node("LabelEncoder", ["x"], ["y"], domain="ai.onnx.ml", keys_floats=[1.0], values_floats=[2.0])],
        "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 5)])
    out = onnx_conv.tidy_opsets(le.SerializeToString())
    assert onnx_conv.opset_imports(out) == {"": 17, "ai.onnx.ml": 4}
    assert onnx_conv.ops_needing(out, "ai.onnx.ml", 3) == ["LabelEncoder (ai.onnx.ml 4)"]


@pytest.mark.parametrize("precision", ["int8", "dynamic"])
def test_paddle_classifier_for_x86_loads_in_onnxruntime_1_16(tmp_path, precision):
    """The compatibility check runs the artifact in ONNX Runtime 1.16.3 (a cached venv): it refused the
    quantized graph for its ai.onnx.ml 5 import before the imports were tidied."""
    _paddle_like(tmp_path / "cls.onnx")
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).uniform(-1, 1, (40, 3, 48, 64)).astype(np.float32))
    recipe = ConvertRecipe(str(tmp_path / "cls.onnx"), ["x86-avx2"], formats=("onnx",), precision=precision,
                           calibration=Calibration(str(tmp_path / "calib.npy")), compat_check="venv",
                           floor=Floor(min_snr_db=5.0, min_agreement=0.5))
    res = convert(recipe, str(tmp_path / "out"))
    assert not res.failed, res.failed
    (b,) = res.bundles
    imports, ir = _imports(b.path / "model.onnx")
    assert set(imports) <= {"", "com.microsoft"} and imports[""] == 17, imports
    assert ir <= 9
    compat = read_bundle(b.path).manifest["compatibility"]
    assert [(c["backend_version"], c["ok"]) for c in compat] == [("1.16.3", True)], compat


def test_a_runtime_refusing_an_opset_is_told_which_op_needs_it(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgekit.convert import compat

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    le = helper.make_model(helper.make_graph(
        [helper.make_node("LabelEncoder", ["x"], ["y"], domain="ai.onnx.ml", keys_floats=[1.0], values_floats=[2.0])],
        "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 4)])
    onnx.save(le, str(tmp_path / "model.onnx"))
    error = ("[ONNXRuntimeError] : 1 : FAIL : Load model failed: ... Opset 4 is under development ... Current "
             "official support for domain ai.onnx.ml is till opset 3.")
    said = compat._explain(error, ["onnxruntime==1.16.3"], tmp_path / "model.onnx")
    assert said == ("onnxruntime==1.16.3 reads ai.onnx.ml up to opset 3; newer opset needed by: "
                    "LabelEncoder (ai.onnx.ml 4)"), said
