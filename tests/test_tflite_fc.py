"""The multi-row FULLY_CONNECTED rewrite on the host (no emulation): same outputs, bit for bit,
at batch 1 and above; recorded in the model's metadata; one-row FCs and a second pass untouched."""

import numpy as np

from edgekit.convert.tflite_fc import FORM, rewrite, rewrites_of


def _int8(model, shape, work):
    import tensorflow as tf

    model.export(str(work / "sm"), verbose=False)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(work / "sm"))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    conv.representative_dataset = lambda: ([rng.normal(size=(1, *shape)).astype(np.float32)] for _ in range(16))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


def _run(data, x):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(d["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _ops(data):
    from ai_edge_litert.interpreter import Interpreter

    return [op["op_name"] for op in Interpreter(model_content=data)._get_ops_details() if op["op_name"] != "DELEGATE"]


def test_rank3_dense_and_einsum_become_1x1_convolutions(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    x = keras.Input((32, 16))
    h = L.EinsumDense("abc,cd->abd", (32, 12), activation="relu")(x)      # FULLY_CONNECTED, keep_num_dims
    y = L.Dense(4)(L.Flatten()(L.Dense(8, bias_initializer="random_normal")(h)))  # reshape -> 2-D FC; then one row
    plain = _int8(keras.Model(x, y), (32, 16), tmp_path)
    fixed, recs = rewrite(plain)
    assert [r["rows"] for r in recs if r["rewritten"]] == [32, 32] and all(r["as"] == FORM for r in recs
                                                                           if r["rewritten"])
    assert [r["kept_because"] for r in recs if not r["rewritten"]] == ["one row"]
    assert rewrites_of(fixed) == recs and rewrites_of(plain) == []
    assert _ops(fixed).count("FULLY_CONNECTED") == 1 and _ops(fixed).count("CONV_2D") == 2
    for batch in (1, 3):
        q = np.random.default_rng(batch).integers(-128, 128, size=(batch, 32, 16)).astype(np.int8)
        np.testing.assert_array_equal(_run(plain, q), _run(fixed, q))
    assert rewrite(fixed)[0] == fixed                          # a second pass finds nothing to do


def test_flatten_dense_at_batch_one_is_left_alone(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    plain = _int8(keras.Sequential([keras.Input((12, 12, 2)), L.Conv2D(8, 3, activation="relu"), L.Flatten(),
                                    L.Dense(4)]), (12, 12, 2), tmp_path)
    assert rewrite(plain) == (plain, [])
