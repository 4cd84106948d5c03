"""What pruning and distillation share: training data, the loss, and the before/after figures."""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from edgekit.convert.data import Dataset, load_dataset
from edgekit.errors import DataError, SourceModelError


def load_keras(path: str):
    """A Keras 3 model (.keras or a Keras-3-loadable .h5): these tools rebuild and train it."""
    from edgekit.convert.native import import_keras_quietly

    keras = import_keras_quietly()

    p = Path(path)
    if not p.exists():
        raise SourceModelError("model file not found", path=str(p))
    if not p.is_file() or p.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise SourceModelError("give a Keras model file (.keras, or .h5 that Keras 3 loads)", path=str(p))
    try:
        return keras.models.load_model(str(p), compile=False)
    except Exception as e:
        raise SourceModelError(f"Keras 3 cannot load it: {str(e).splitlines()[0][:200]}", path=str(p),
                               hint="pruning and distillation work on Keras 3 models") from None


def specs(model):
    from edgekit.runtime.spec import TensorSpec

    return [TensorSpec(t.name.split(":")[0] if hasattr(t, "name") else f"input_{i}",
                       tuple(-1 if d is None else int(d) for d in t.shape), "float32")
            for i, t in enumerate(model.inputs)]


def training_data(model, data: str, val: Optional[str]) -> Tuple[Dataset, Dataset]:
    """Labelled training data, and validation data (given, or the last 20% held out)."""
    sp = specs(model)
    # Keras input names may carry suffixes; single-input models take any single array
    ds = load_dataset(data, sp, what="training")
    if ds.labels is None:
        raise DataError("training data needs labels (an array named 'labels' in the .npz)", path=data)
    if val is not None:
        vs = load_dataset(val, sp, what="validation")
        if vs.labels is None:
            raise DataError("validation data needs labels", path=val)
        return ds, vs
    n_val = max(1, len(ds) // 5)
    return ds.take(slice(0, len(ds) - n_val)), ds.take(slice(len(ds) - n_val, len(ds)))


def _x(model, ds: Dataset):
    xs = list(ds.inputs.values())
    return xs[0] if len(model.inputs) == 1 else xs


def outputs_probabilities(model) -> bool:
    last = [layer for layer in model.layers if type(layer).__name__ != "FakeQuant"][-1]
    act = getattr(last, "activation", None)
    return getattr(act, "__name__", "") == "softmax" or type(last).__name__ == "Softmax"


def compile_for(model, lr: float):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model)),
                  metrics=["accuracy"])


def accuracy(model, ds: Dataset) -> float:
    pred = model.predict(_x(model, ds), verbose=0, batch_size=256)
    if isinstance(pred, list):
        pred = pred[0]
    return float((pred.argmax(-1) == ds.labels).mean() * 100.0)


def figures(model, val: Dataset, runs: int = 200) -> Dict[str, Any]:
    """Parameters, FLOPs, float TFLite size (and gzipped: what zeros buy), accuracy, local p50."""
    from edgekit.convert.sources import float_tflite
    from edgekit.optimize.surgery import count
    from edgekit.runtime import load

    data = float_tflite(model)
    with tempfile.TemporaryDirectory(prefix="edgekit-opt-") as d:
        p = Path(d) / "m.tflite"
        p.write_bytes(data)
        m = load(p, threads=1)
        rep = m.benchmark(runs=runs, warmup=20, end_to_end=False)
    c = count(model)
    weights = np.concatenate([w.ravel() for w in model.get_weights()]) if model.get_weights() else np.zeros(1)
    return {"params": c["params"], "flops": c["flops"], "tflite_bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 9)), "zero_weights": float((weights == 0).mean()),
            "accuracy": accuracy(model, val), "p50_ms": rep["latency"]["p50_ms"], "noisy": rep["noisy"]}


def save(model, out: str) -> Path:
    p = Path(out)
    if p.suffix != ".keras":
        raise DataError(f"--out must end in .keras, not {p.suffix or '(none)'}", path=out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, p)
    return p
