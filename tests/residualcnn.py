"""A depthwise / BatchNorm / residual CNN trained in seconds on scikit-learn's digits with sensor
noise (Gaussian, sigma 0.3), so that many validation samples sit near a decision boundary and a
quantized build's fidelity shows in its accuracy. Used by tests/test_faithful_build.py and
benchmarks/faithful_schemes.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def train_residual(d: Path, seed: int = 7):
    """(model .keras, calib.npz, val.npz): 2600 noisy training images, 1988 labelled validation ones."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from keras import layers

    from digits import digits_data

    keras.utils.set_random_seed(seed)
    (xt, yt), (xv, yv) = digits_data(seed)
    rng = np.random.default_rng(seed)
    xt = np.concatenate([xt + rng.normal(0, 0.3, xt.shape) for _ in range(2)]).astype(np.float32)
    yt = np.concatenate([yt, yt])
    xv = np.concatenate([xv + rng.normal(0, 0.3, xv.shape) for _ in range(4)]).astype(np.float32)
    yv = np.concatenate([yv] * 4)
    inp = keras.Input((8, 8, 1), name="image")
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(12, 3, padding="same", use_bias=False)(inp)))
    for _ in range(2):
        r = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)
        r = layers.ReLU()(layers.BatchNormalization()(r))
        r = layers.BatchNormalization()(layers.Conv2D(12, 1, use_bias=False)(r))
        h = layers.ReLU()(layers.Add()([h, r]))
    h = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(24, 3, strides=2, padding="same")(h)))
    out = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(h))
    m = keras.Model(inp, out)
    m.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    m.fit(xt, yt, epochs=30, batch_size=32, verbose=0)
    d.mkdir(parents=True, exist_ok=True)
    m.save(d / "residual.keras")
    np.savez(d / "calib.npz", image=xt[:300])
    np.savez(d / "val.npz", image=xv, labels=yv)
    return d / "residual.keras", d / "calib.npz", d / "val.npz"
