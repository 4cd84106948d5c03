"""Pruning for Keras 3 models.

- structured (default): whole filters/units with the smallest L1 norm go; the model is
  rebuilt with fewer channels (fewer parameters and FLOPs: faster everywhere), then fine-tuned.
- magnitude (unstructured): the smallest weights are zeroed on a polynomial schedule during
  fine-tuning and kept at zero; the model keeps its shape, it compresses (gzip/zip), it is not faster.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np

from edgekit.errors import DataError
from edgekit.optimize import common, surgery


def structured(model, sparsity: float):
    keep = {name: surgery.l1_keep(model.get_layer(name), sparsity) for name in surgery.prunable_layers(model)}
    if not keep:
        raise DataError("no layer of this model can lose channels (every Conv/Dense output feeds an "
                        "Add/Concatenate or the model output)")
    return surgery.rebuild(model, keep), {k: int(len(v)) for k, v in keep.items()}


def _magnitude_callback(model, target: float, total_steps: int):
    import keras

    kernels = [w for w in model.weights if w.path.endswith("kernel")]

    class Magnitude(keras.callbacks.Callback):
        """Polynomial schedule (Zhu & Gupta): s_t = target * (1 - (1 - t/T)^3); masks re-applied
        after every batch so pruned weights stay zero."""

        def __init__(self):
            super().__init__()
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            frac = min(1.0, self.step / max(1, int(0.8 * total_steps)))
            s = target * (1.0 - (1.0 - frac) ** 3)
            for k in kernels:
                w = np.asarray(k.numpy())
                n = int(s * w.size)
                if n:
                    thr = np.partition(np.abs(w).ravel(), n - 1)[n - 1]
                    w = np.where(np.abs(w) <= thr, 0.0, w).astype(w.dtype)
                    k.assign(w)

    return Magnitude()


def prune(model_path: str, data: str, *, sparsity: float = 0.5, method: str = "structured",
          epochs: int = 5, lr: float = 1e-3, val: Optional[str] = None, out: Optional[str] = None,
          distill: bool = False, say: Callable[[str], None] = print, runs: int = 200) -> Dict[str, Any]:
    """`distill`: fine-tune against the original model's softened outputs (it is the teacher)
    as well as the labels, which recovers more than the labels alone when they are few or noisy."""
    if not 0.0 < sparsity < 1.0:
        raise DataError(f"--sparsity must be between 0 and 1 (exclusive), not {sparsity}")
    if method not in ("structured", "magnitude"):
        raise DataError(f"--method must be structured or magnitude, not {method!r}")
    if epochs < 0:
        raise DataError(f"--epochs must be >= 0, not {epochs}")
    model = common.load_keras(model_path)
    train, val_ds = common.training_data(model, data, val)
    say(f"measuring the original model ({len(val_ds)} validation samples)")
    before = common.figures(model, val_ds, runs)
    if method == "structured":
        pruned, kept = structured(model, sparsity)
        say("structured: " + ", ".join(f"{k} {model.get_layer(k).get_weights()[0].shape[-1]}->{v}"
                                       for k, v in kept.items()))
        callbacks = []
    else:
        import keras

        pruned, kept = keras.models.clone_model(model), {}
        pruned.set_weights(model.get_weights())
        steps = epochs * int(np.ceil(len(train) / 32))
        callbacks = [_magnitude_callback(pruned, sparsity, steps)]
    after_cut = common.accuracy(pruned, val_ds)
    if epochs:
        say(f"fine-tuning {epochs} epoch(s) on {len(train)} samples"
            + (" with the original as teacher" if distill else ""))
        if distill:
            import keras

            from edgekit.optimize.distill import make_distiller

            trainer = make_distiller(pruned, model, temperature=4.0, alpha=0.5)
            trainer.compile(optimizer=keras.optimizers.Adam(lr))
        else:
            common.compile_for(pruned, lr)
            trainer = pruned
        trainer.fit(common._x(pruned, train), train.labels, epochs=epochs, batch_size=32, verbose=0,
                    callbacks=callbacks)
    if method == "magnitude":  # the last schedule step: exactly the target sparsity
        cb = _magnitude_callback(pruned, sparsity, 1)
        cb.step = 10
        cb.on_train_batch_end(0)
    after = common.figures(pruned, val_ds, runs)
    saved = common.save(pruned, out) if out else None
    return {"method": method, "sparsity": sparsity, "epochs": epochs, "distill": distill, "kept_channels": kept,
            "before": before, "after": after, "accuracy_right_after_cut": after_cut,
            "ratios": {"params": after["params"] / before["params"], "flops": after["flops"] / before["flops"],
                       "p50": after["p50_ms"] / before["p50_ms"], "gzip": after["gzip_bytes"] / before["gzip_bytes"]},
            "accuracy_drop": before["accuracy"] - after["accuracy"], "saved": str(saved) if saved else None}
