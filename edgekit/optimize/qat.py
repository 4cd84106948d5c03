"""Quantization-aware training for Keras 3 models: `edgekit qat`.

Why our own: tensorflow-model-optimization 0.8 (its quantize_model) rejects Keras 3 models
("`to_quantize` can only either be a keras Sequential or Functional model"): it checks for
tf_keras classes. The logic QAT needs is small, and here it follows the converters exactly:

1. BatchNormalization after a Conv2D / DepthwiseConv2D / Dense (its only consumer) is folded
   into that layer's weights, as the converters fold it.
2. The model is cloned with fake quantization where INT8 models quantize
   (edgekit.convert.fakequant): weights per output channel; activations at the model inputs and
   after every layer that computes new values. A ReLU/ReLU6 (or folded BatchNorm) right after a
   layer is part of it (the converters fuse it), so the point moves past it; a softmax or
   sigmoid inside a layer gets a point before it as well (the converters quantize both
   tensors). Max pooling, reshapes and dropout keep their input's quantization; an average
   pooling's output is requantized onto its input's range (the converters keep that scale).
3. Ranges: min/max calibration lets a few outliers take the whole range (the failure that
   mixed precision works around by keeping layers in float). Each range starts instead at the
   clip that minimizes the error of the model's outputs on calibration data, point by point in
   graph order with the earlier points already quantized.
4. Weights and ranges then train together on the labelled data (Adam, learning rate decaying to
   zero on a cosine): straight-through gradients (TF's FakeQuant ops; a range moves by the
   gradient of what it clips).
5. The trained model is saved with its weights on the INT8 grid and its FakeQuant layers;
   `edgekit convert` reads it (the learned ranges become the INT8 ranges in both formats).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from edgekit.errors import DataError, SourceModelError

FOLLOWERS = {"BatchNormalization", "Activation", "ReLU"}
KEEP_QUANTIZATION = {"MaxPooling2D", "MaxPooling1D", "AveragePooling2D", "AveragePooling1D",
                     "GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling1D",
                     "GlobalMaxPooling1D", "Flatten", "Reshape", "Dropout", "SpatialDropout2D",
                     "GaussianNoise", "ZeroPadding2D", "Cropping2D", "UpSampling2D", "InputLayer"}
FOLDS_INTO = {"Conv2D", "DepthwiseConv2D", "Dense"}
AVERAGES = {"AveragePooling2D", "AveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling1D"}
FUSABLE = ("relu", "relu6", "linear")
CANDIDATES = 24


def _cls(layer) -> str:
    return type(layer).__name__


def _fusable_activation(layer) -> bool:
    """ReLU / ReLU6 / linear: the converters fuse these into the op before them."""
    k = _cls(layer)
    if k == "ReLU":
        return (not getattr(layer, "negative_slope", 0)) and not getattr(layer, "threshold", 0) \
            and getattr(layer, "max_value", None) in (None, 6.0, 6)
    if k == "Activation":
        return getattr(layer.activation, "__name__", "") in FUSABLE
    return False


def _producers(model) -> Dict[str, List]:
    out: Dict[str, List] = {}
    for layer in model.layers:
        srcs = []
        for node in getattr(layer, "_inbound_nodes", []):
            for t in getattr(node, "input_tensors", []):
                if t._keras_history.operation not in srcs:
                    srcs.append(t._keras_history.operation)
        out[layer.name] = srcs
    return out


def analyse(model) -> Dict[str, Any]:
    """Which BatchNorms fold, and after which layers a fake-quantization point goes."""
    from edgekit.optimize.surgery import _consumers

    model = _functional(model)
    for layer in model.layers:
        if hasattr(layer, "layers") and _cls(layer) not in ("InputLayer",):
            raise SourceModelError(f"layer {layer.name} is a nested model; QAT needs a flat model",
                                   hint="rebuild it as one functional model")
    consumers, producers = _consumers(model), _producers(model)
    outputs = {t._keras_history.operation.name for t in model.outputs}

    def only_consumer(layer) -> Optional[Any]:
        c = consumers[layer.name]
        return c[0] if len(c) == 1 and layer.name not in outputs else None

    folded: Dict[str, str] = {}   # BatchNorm name -> the layer it folds into
    for layer in model.layers:
        if _cls(layer) == "BatchNormalization" and len(producers[layer.name]) == 1:
            p = producers[layer.name][0]
            axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
            linear = getattr(getattr(p, "activation", None), "__name__", "linear") == "linear"
            if _cls(p) in FOLDS_INTO and linear and only_consumer(p) is layer \
                    and axis in (-1, len(layer.input.shape) - 1):
                folded[layer.name] = p.name   # (after an activation it would not be the same function)

    def fused(layer) -> bool:   # computed inside the op before it
        if layer.name in folded:
            return True
        if not _fusable_activation(layer) or len(producers[layer.name]) != 1:
            return False
        p = producers[layer.name][0]
        return only_consumer(p) is layer and _cls(p) not in KEEP_QUANTIZATION

    points = []
    for layer in model.layers:
        k = _cls(layer)
        if k in KEEP_QUANTIZATION:
            continue
        nxt = only_consumer(layer)
        if nxt is not None and fused(nxt):
            continue   # the point moves past the fused follower
        points.append(layer.name)
    return {"folded": folded, "points": points}


def _fold(bn, layer_weights: List[np.ndarray], depthwise: bool) -> List[np.ndarray]:
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    beta = bn.beta.numpy() if bn.center else 0.0
    s = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    kernel = layer_weights[0]
    bias = layer_weights[1] if len(layer_weights) > 1 else np.zeros(s.shape, np.float32)
    if depthwise:
        kernel = kernel * s.reshape(kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * s
    bias = (bias - bn.moving_mean.numpy()) * s + beta
    return [kernel.astype(np.float32), np.asarray(bias, np.float32)]


def _functional(model):
    """A Sequential model as the functional graph it already holds (no layer called again)."""
    import keras

    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def quantized_model(model, weight_levels: int = 127):
    """A clone of `model` with BatchNorm folded and fake quantization in place (all points off
    until calibrated), weights on a grid of `weight_levels` steps each side of zero (127: INT8;
    64: ONNX Runtime's reduce_range). Returns (qmodel, plan)."""
    import keras

    from edgekit.convert import fakequant as fq

    model = _functional(model)
    info = analyse(model)
    folded, points = info["folded"], set(info["points"])
    fold_target = {v: k for k, v in folded.items()}
    quantized_inputs: Dict[int, Any] = {}

    split: Dict[str, Any] = {}   # layer -> its activation, applied after a point of its own

    def clone_function(layer):
        k = _cls(layer)
        if k in fq.QUANTIZED:
            cfg = layer.get_config()
            if layer.name in fold_target:
                cfg["use_bias"] = True
            cfg["weight_levels"] = weight_levels
            act = getattr(layer.activation, "__name__", "linear")
            if act not in FUSABLE:  # softmax, sigmoid...: the converters quantize the tensor before it too
                split[layer.name] = cfg["activation"]
                cfg["activation"] = "linear"
            return fq.QUANTIZED[k].from_config(cfg)
        return layer.__class__.from_config(layer.get_config())

    def upstream_point(t) -> Optional[str]:
        op = t._keras_history.operation
        while not isinstance(op, fq.FakeQuant):
            if _cls(op) not in KEEP_QUANTIZATION or _cls(op) == "InputLayer":
                return None
            t = op.input
            op = t._keras_history.operation
        return op.name

    def quantize_input(t):
        if _cls(t._keras_history.operation) != "InputLayer":
            return t
        if id(t) not in quantized_inputs:
            quantized_inputs[id(t)] = fq.FakeQuant(name=f"fq_{t._keras_history.operation.name}",
                                                    at_input=True)(t)
        return quantized_inputs[id(t)]

    def call_function(layer, *args, **kwargs):
        args = keras.tree.map_structure(
            lambda t: quantize_input(t) if isinstance(t, keras.KerasTensor) else t, args)
        out = args[0] if layer.name in folded else layer(*args, **kwargs)
        if layer.name in split:
            out = fq.FakeQuant(name=f"fq_{layer.name}_pre")(out)
            out = keras.layers.Activation(split[layer.name], name=f"{layer.name}_activation")(out)
        if layer.name in points:
            out = fq.FakeQuant(name=f"fq_{layer.name}")(out)
        elif _cls(layer) in AVERAGES and isinstance(args[0], keras.KerasTensor):
            source = upstream_point(args[0])
            if source is not None:
                out = fq.FakeQuant(name=f"fq_{layer.name}", same_as=source)(out)
        return out

    q = keras.models.clone_model(model, clone_function=clone_function, call_function=call_function)
    for layer in model.layers:
        if layer.name in folded or not layer.weights:
            continue
        w = layer.get_weights()
        if layer.name in fold_target:
            w = _fold(model.get_layer(fold_target[layer.name]), w, _cls(layer) == "DepthwiseConv2D")
        q.get_layer(layer.name).set_weights(w)
    for layer in q.layers:
        if isinstance(layer, fq.FakeQuant):
            layer.on.assign(0.0)
    return q, dict(info, fake_quant=[layer.name for layer in q.layers if isinstance(layer, fq.FakeQuant)],
                   weight_levels=weight_levels)


def weight_levels_for(profiles, formats=None) -> int:
    """The coarsest weight grid among the builds: 64 when an ONNX build uses reduce_range
    (7-bit weights), else 127. Trained on the coarser grid, the finer builds only round each
    weight by at most half their own step, as post-training quantization always does."""
    for p in profiles:
        if "onnx" in p.formats and (not formats or "onnx" in formats) and p.onnx.reduce_range:
            return 64
    return 127


def _outputs(model, x) -> List[np.ndarray]:
    out = model.predict(x, verbose=0, batch_size=256)
    return out if isinstance(out, list) else [out]


def calibrate(q, reference, x, say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Each point's range: the clip of its observed [min, max] (scaled 1/1000 ... 1) that
    minimizes the model outputs' error (each output's MSE over its variance), in graph order."""
    import keras

    from edgekit.convert import fakequant as fq

    ref = _outputs(reference, x)
    var = [max(float(r.var()), 1e-12) for r in ref]
    fqs = [layer for layer in q.layers if isinstance(layer, fq.FakeQuant)]
    probe = keras.Model(q.inputs, [layer.output for layer in fqs])
    chosen = []
    for i, layer in enumerate(fqs):
        if layer.same_as:
            src = q.get_layer(layer.same_as)
            layer.lo.assign(src.lo)
            layer.hi.assign(src.hi)
            layer.on.assign(1.0)
            continue
        acts = probe.predict(x, verbose=0, batch_size=256)
        a = acts[i] if isinstance(acts, list) else acts
        lo0, hi0 = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
        if hi0 - lo0 < 1e-8:
            hi0 = lo0 + 1e-6
        layer.on.assign(1.0)
        best = None
        for f in np.geomspace(1e-3, 1.0, CANDIDATES):
            layer.lo.assign(lo0 * f)
            layer.hi.assign(hi0 * f)
            err = sum(float(((o - r) ** 2).mean()) / v for o, r, v in zip(_outputs(q, x), ref, var))
            if best is None or err < best[0] * (1 - 1e-9):
                best = (err, f)
        layer.lo.assign(lo0 * best[1])
        layer.hi.assign(hi0 * best[1])
        chosen.append({"point": layer.name, "observed": [lo0, hi0], "range": [lo0 * best[1], hi0 * best[1]],
                       "clip": float(best[1]), "output_error": best[0]})
        say(f"  {layer.name}: range [{lo0 * best[1]:.4g}, {hi0 * best[1]:.4g}] of observed "
            f"[{lo0:.4g}, {hi0:.4g}] (relative output error {best[0]:.3g})")
    return chosen


def train(q, train_ds, epochs: int, lr: float, ranges_trainable: bool = True,
          say: Callable[[str], None] = print, teacher=None) -> List[Dict[str, float]]:
    """teacher: match this (float) model's outputs (KL divergence at T=1) instead of the labels:
    what to do when the labels are the float model's own predictions on data it was not trained
    on (ResNet-8 on natural crops here: hard labels there pull the model away from itself)."""
    import keras

    from edgekit.convert import fakequant as fq
    from edgekit.optimize import common

    for layer in q.layers:
        if isinstance(layer, fq.FakeQuant):
            layer.lo.trainable = layer.hi.trainable = ranges_trainable and not layer.same_as
    steps = max(1, epochs * int(np.ceil(len(train_ds) / 32)))
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps)  # fine-tuning: decay to 0
    if teacher is not None:
        from edgekit.optimize.distill import make_distiller

        trainer = make_distiller(q, teacher, temperature=1.0, alpha=0.0)
        trainer.compile(optimizer=keras.optimizers.Adam(schedule))
    else:
        common.compile_for(q, schedule)
        trainer = q
    history: List[Dict[str, float]] = []

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            history.append({k: float(v) for k, v in logs.items()})
            acc = f", accuracy {100 * logs['accuracy']:.2f}% (fake-quantized)" if "accuracy" in logs else ""
            say(f"  epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.4f}{acc}")

    trainer.fit(common._x(q, train_ds), train_ds.labels, epochs=epochs, batch_size=32, verbose=0,
                callbacks=[Report()])
    fq.bake(q)
    return history


def qat(model_path: str, data: str, targets: List[str], out: str, *, val: Optional[str] = None,
        epochs: int = 3, lr: float = 1e-4, calib_samples: int = 256, ranges_trainable: bool = True,
        max_accuracy_drop: Optional[float] = None, formats=None, compat_check: str = "auto", seed: int = 0,
        distill: bool = False,
        say: Callable[[str], None] = print, progress=None) -> Dict[str, Any]:
    """Fine-tune `model_path` with fake quantization, save it, convert it for `targets`, and
    convert the original the plain post-training way too, for the comparison."""
    import tempfile
    from pathlib import Path

    from edgekit.bundle import check_name, write_json_atomic
    from edgekit.convert import Calibration, ConvertRecipe, Floor, InMemoryData, Search, convert
    from edgekit.errors import BudgetMissed, EdgekitError
    from edgekit.optimize import common
    from edgekit.targets import load_target

    if epochs < 0:
        raise DataError(f"--epochs must be >= 0, not {epochs}")
    if not lr > 0:
        raise DataError(f"--lr must be positive, not {lr}")
    if calib_samples < 1:
        raise DataError(f"--calib-samples must be at least 1, not {calib_samples}")
    if not targets:
        raise EdgekitError("no target given", hint="add --target NAME (see `edgekit targets list`)")
    profiles = [load_target(t) for t in targets]
    for p in profiles:
        if not (p.tflite.per_channel and p.onnx.per_channel):
            raise EdgekitError(f"target {p.name} quantizes weights per tensor; QAT here trains per-channel weights",
                               hint="use a target with per_channel = true")
    levels = weight_levels_for(profiles, formats)
    model = common.load_keras(model_path)   # imports keras quietly; fakequant after it
    import keras

    from edgekit.convert import fakequant as fq

    train_ds, val_ds = common.training_data(model, data, val)
    name = check_name(Path(model_path).stem + "-qat")
    n_cal = min(calib_samples, len(train_ds))
    keras.utils.set_random_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    float_acc = common.accuracy(model, val_ds)
    say(f"original float model: {float_acc:.2f}% on {len(val_ds)} validation samples")

    q, plan = quantized_model(model, levels)
    say(f"fake quantization at {len(plan['fake_quant'])} points, weights on a {levels}-step grid"
        + (" (an ONNX build uses reduce_range)" if levels != 127 else "")
        + (f"; BatchNorm folded: {', '.join(plan['folded'])}" if plan["folded"] else ""))
    calib_x = common._x(q, train_ds.take(slice(0, n_cal)))
    say(f"calibrating ranges on {n_cal} training samples")
    ranges = calibrate(q, model, calib_x, say)
    start_acc = common.accuracy(q, val_ds)
    say(f"fake-quantized, calibrated, before training: {start_acc:.2f}%")
    if epochs:
        say(f"training {epochs} epoch(s) at lr {lr} on {len(train_ds)} samples"
            + (", matching the original's outputs" if distill else ""))
        history = train(q, train_ds, epochs, lr, ranges_trainable, say, teacher=model if distill else None)
    else:
        history = []
        fq.bake(q)
    qat_acc = common.accuracy(q, val_ds)
    say(f"fake-quantized, trained: {qat_acc:.2f}%")
    train_s = time.monotonic() - t0
    model_out = common.save(q, str(out_dir / f"{name}.keras"))

    mem = InMemoryData(train_ds.take(slice(0, n_cal)), val_ds)     # in memory: no files in between
    calibration = Calibration(path=str(data), samples=n_cal)
    say("converting the QAT model")
    res = convert(ConvertRecipe(str(model_out), tuple(targets), calibration=calibration, name=name,
                                formats=tuple(formats or ()), compat_check=compat_check,
                                search=Search(rescue=False)), str(out_dir), progress=progress, data=mem)
    say("converting the original the post-training way (for comparison; not kept)")
    with tempfile.TemporaryDirectory(prefix="edgekit-qat-") as d:
        ptq = convert(ConvertRecipe(model_path, tuple(targets), calibration=calibration,
                                    formats=tuple(formats or ()), compat_check="off",
                                    floor=Floor(min_snr_db=-100.0, min_agreement=0.0),
                                    search=Search(rescue=False)), str(Path(d) / "ptq"), data=mem)
    rows = _compare(res, ptq, float_acc, max_accuracy_drop)
    result = {"model": str(model_path), "qat_model": str(model_out), "float_accuracy": float_acc,
              "calibrated_accuracy": start_acc, "trained_accuracy": qat_acc, "epochs": epochs, "lr": lr,
              "distill": distill, "ranges_trainable": ranges_trainable, "seconds": train_s, "plan": plan,
              "ranges": ranges, "history": history, "bundles": rows, "max_accuracy_drop": max_accuracy_drop,
              "validation_samples": len(val_ds)}
    report = out_dir / f"{name}.qat.json"
    write_json_atomic(report, dict(result, report=str(report)))
    result["report"] = str(report)
    missed = [r for r in rows if r["within_budget"] is False]
    if missed:
        worst = max(missed, key=lambda r: r["qat_drop"])
        raise BudgetMissed(f"{len(missed)} QAT bundle(s) miss --max-accuracy-drop {max_accuracy_drop}: worst "
                           f"{Path(worst['bundle']).name} drops {worst['qat_drop']:.2f} points",
                           hint=f"report written to {report}; more --epochs, or keep sensitive layers in "
                                "float: edgekit convert --max-accuracy-drop (mixed precision)")
    return result


def _compare(qat_result, ptq_result, float_acc: float, budget: Optional[float]) -> List[Dict[str, Any]]:
    """Each QAT bundle beside the post-training INT8 bundle of the original for the same build."""
    ptq_by = {(b.target, b.fmt): b for b in ptq_result.bundles}
    rows = []
    for b in qat_result.bundles:
        qa, pa = (None if r.artifact.metrics.get("accuracy_quant") is None else
                  100.0 * r.artifact.metrics["accuracy_quant"] for r in (b, ptq_by[(b.target, b.fmt)]))
        rows.append({"bundle": str(b.path), "target": b.target, "format": b.fmt, "bytes": len(b.artifact.data),
                     "float_ops": b.artifact.float_ops, "ptq_accuracy": pa, "qat_accuracy": qa,
                     "ptq_drop": None if pa is None else float_acc - pa,
                     "qat_drop": None if qa is None else float_acc - qa,
                     "within_budget": None if budget is None or qa is None else float_acc - qa <= budget})
    return rows


__all__ = ["analyse", "quantized_model", "weight_levels_for", "calibrate", "train", "qat"]
