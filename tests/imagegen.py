"""Natural-image test inputs without a dataset download: random crops of the two photographs
scikit-learn ships (sklearn.datasets.load_sample_images), resized to the model's input."""

import numpy as np


def natural_patches(n, seed, size, scale=1.0):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    imgs = [np.asarray(i) for i in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = imgs[k % len(imgs)]
        s = int(rng.integers(max(48, size), 200))
        y0, x0 = int(rng.integers(0, im.shape[0] - s)), int(rng.integers(0, im.shape[1] - s))
        crop = Image.fromarray(im[y0:y0 + s, x0:x0 + s]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop, np.float32) * scale)
    return np.stack(out)


def recognised(probs, threshold=0.6):
    """Inputs on which the float model commits to a class (top-1 probability >= threshold)."""
    return np.sort(probs, axis=1)[:, -1] >= threshold
