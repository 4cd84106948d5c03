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


def gelu_tanh():
    """keras.activations.gelu(approximate=True) (BERT's and GPT-2's tanh GELU) as a registered Keras
    function, so a model using it saves and loads as .keras."""
    import keras

    @keras.saving.register_keras_serializable(package="seqmodels", name="gelu_tanh")
    def gelu_tanh(x):
        return keras.activations.gelu(x, approximate=True)

    return gelu_tanh


def encoder(d_model: int = 32, heads: int = 2, ff: int = 64, blocks: int = 1, gelu: str = "exact"):
    """Dense embedding, MultiHeadAttention (softmax inside), residual adds, LayerNormalization, a GELU
    feed-forward (gelu="exact": erf GELU; "tanh": the tanh approximation), global average pooling, logits."""
    import keras
    from keras import layers

    act = "gelu" if gelu == "exact" else gelu_tanh()
    inp = keras.Input((TOKENS, SYMBOLS), name="tokens")
    h = layers.Dense(d_model, name="embed")(inp)
    for i in range(blocks):
        a = layers.MultiHeadAttention(heads, d_model // heads, name=f"mha{i}")(h, h)
        h = layers.LayerNormalization(name=f"ln{i}a")(layers.Add()([h, a]))
        f = layers.Dense(ff, activation=act, name=f"ff{i}a")(h)
        f = layers.Dense(d_model, name=f"ff{i}b")(f)
        h = layers.LayerNormalization(name=f"ln{i}b")(layers.Add()([h, f]))
    p = layers.GlobalAveragePooling1D(name="pool")(h)
    p = layers.Dense(32, activation=act, name="head")(p)
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


def with_tanh_gelu(model_path: Path, out_path: Path) -> Path:
    """The trained encoder with its GELUs replaced by the tanh approximation, same weights (the two
    differ by < 1e-3 on any input, so the task is solved as well): no second training."""
    import keras

    trained = keras.models.load_model(model_path)
    m = encoder(gelu="tanh")
    m.set_weights(trained.get_weights())
    m.save(out_path)
    return out_path
