"""Train a small CNN on scikit-learn's bundled digits set (8x8 grey images, 10 classes).

Seconds on a laptop CPU, no download. Writes:
    <out>/digits.keras     the float Keras 3 model
    <out>/calib.npz        calibration inputs ('image')
    <out>/train.npz        the training inputs with their labels (for prune / distill)
    <out>/val.npz          validation inputs and labels ('image', 'labels'), never trained on

    python examples/digits.py --out work/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]   # (1797, 8, 8, 1) in [0, 1]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def build_model(width: float = 1.0):
    import keras

    c1, c2, dense = int(32 * width), int(64 * width), int(128 * width)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(c1, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.Conv2D(c2, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(dense, activation="relu", name="fc1")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inp, out, name="digits_cnn")


def train(out_dir: Path, epochs: int = 15, seed: int = 0) -> Path:
    from edgekit.convert.native import import_keras_quietly

    keras = import_keras_quietly()     # TensorFlow's start-up lines ignore TF_CPP_MIN_LOG_LEVEL

    keras.utils.set_random_seed(seed)
    (xt, yt), (xv, yv) = digits_data(seed)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(xt, yt, epochs=epochs, batch_size=32, verbose=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "digits.keras"
    model.save(path)
    np.savez(out_dir / "calib.npz", image=xt)
    np.savez(out_dir / "train.npz", image=xt, labels=yt)
    np.savez(out_dir / "val.npz", image=xv, labels=yv)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="work", help="output directory")
    ap.add_argument("--epochs", type=int, default=15)
    a = ap.parse_args()
    print(train(Path(a.out), a.epochs))
