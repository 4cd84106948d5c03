"""Small Keras sequence models trained here in seconds on a task with a real signal.

The task: 32 tokens, each one of 8 symbols (one-hot); the label is the symbol among 0-3 that occurs
most often (ties broken towards the lower symbol). A model has to look at every token and count:
attention and pooling can, a bag of local features cannot do it exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENS, SYMBOLS, CLASSES = 32, 8, 4


def sequences(n: int, seed: int):
    rng = np.random.default_rng(seed)
    sym = rng.integers(0, SYMBOLS, size=(n, TOKENS))
    x = np.eye(SYMBOLS, dtype=np.float32)[sym]
    counts = np.stack([(sym == k).sum(1) for k in range(CLASSES)], 1)
    return x, counts.argmax(1).astype(np.int64)


def encoder(d_model: int = 32, heads: int = 2, ff: int = 64, blocks: int = 1):
    """Dense embedding, MultiHeadAttention (softmax inside), residual adds, LayerNormalization, a GELU
    feed-forward (exact erf GELU), global average pooling, logits."""
    import keras
    from keras import layers

    inp = keras.Input((TOKENS, SYMBOLS), name="tokens")
    h = layers.Dense(d_model, name="embed")(inp)
    for i in range(blocks):
        a = layers.MultiHeadAttention(heads, d_model // heads, name=f"mha{i}")(h, h)
        h = layers.LayerNormalization(name=f"ln{i}a")(layers.Add()([h, a]))
        f = layers.Dense(ff, activation="gelu", name=f"ff{i}a")(h)      # exact (erf) GELU
        f = layers.Dense(d_model, name=f"ff{i}b")(f)
        h = layers.LayerNormalization(name=f"ln{i}b")(layers.Add()([h, f]))
    p = layers.GlobalAveragePooling1D(name="pool")(h)
    p = layers.Dense(32, activation="gelu", name="head")(p)
    out = layers.Dense(CLASSES, name="logits")(p)
    return keras.Model(inp, out, name="encoder")


def train_encoder(d: Path, epochs: int = 12, seed: int = 0) -> Path:
    """Train, save d/encoder.keras, d/calib.npz (inputs), d/val.npz (inputs + labels)."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = sequences(3000, seed)
    xv, yv = sequences(500, seed + 1)
    m = encoder()
    m.compile(optimizer=keras.optimizers.Adam(3e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    m.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "encoder.keras"
    m.save(path)
    np.savez(d / "calib.npz", tokens=x[:300])
    np.savez(d / "val.npz", tokens=xv, labels=yv)
    return path
