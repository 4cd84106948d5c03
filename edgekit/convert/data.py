"""Calibration and validation data: .npy / .npz, or a folder of images with a preprocessing spec.

Every problem (shape, dtype, empty, NaN/Inf, missing input) is reported before
any conversion work starts, naming the file and the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from edgekit.errors import DataError
from edgekit.runtime.spec import TensorSpec

LABEL_KEYS = ("labels", "label", "y")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp")


@dataclass(frozen=True)
class Preprocess:
    """How to turn image files into a model input: resize, scale, mean/std, layout, color."""

    size: Optional[tuple] = None      # (height, width); default: the model's input size
    scale: float = 1.0 / 255.0
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    layout: str = "nhwc"
    color: str = "rgb"

    def __post_init__(self):
        if self.layout not in ("nhwc", "nchw"):
            raise DataError(f"preprocess layout must be nhwc or nchw, not {self.layout!r}")
        if self.color not in ("rgb", "bgr", "gray"):
            raise DataError(f"preprocess color must be rgb, bgr or gray, not {self.color!r}")
        if any(s == 0 for s in self.std):
            raise DataError("preprocess std must not be 0")

    @classmethod
    def parse(cls, text: str) -> "Preprocess":
        """'resize=32x32,scale=1/255,mean=0.5,std=0.5,layout=nhwc,color=rgb'."""
        kwargs = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            if "=" not in item:
                raise DataError(f"preprocess item {item!r} is not key=value",
                                hint="e.g. resize=32x32,scale=1/255,mean=0.5,std=0.5,layout=nhwc")
            k, v = (s.strip() for s in item.split("=", 1))
            try:
                if k == "resize":
                    h, w = v.lower().split("x")
                    kwargs["size"] = (int(h), int(w))
                elif k == "scale":
                    num, _, den = v.partition("/")
                    kwargs["scale"] = float(num) / (float(den) if den else 1.0)
                elif k in ("mean", "std"):
                    kwargs[k] = tuple(float(x) for x in v.split(":"))
                elif k in ("layout", "color"):
                    kwargs[k] = v.lower()
                else:
                    raise DataError(f"unknown preprocess key {k!r}",
                                    hint="keys: resize, scale, mean, std, layout, color")
            except ValueError:
                raise DataError(f"preprocess {k}={v!r} is not valid") from None
        return cls(**kwargs)


def _image_input(spec: TensorSpec, pre: Preprocess):
    shape = spec.shape
    if len(shape) != 4:
        raise DataError(f"an image folder needs a 4-D image input, the model's is {shape}",
                        tensor=spec.name)
    if pre.layout == "nhwc":
        h, w, c = shape[1], shape[2], shape[3]
    else:
        c, h, w = shape[1], shape[2], shape[3]
    if pre.size:
        h, w = pre.size
    if h < 1 or w < 1:
        raise DataError("the model's image size is dynamic", tensor=spec.name,
                        hint="give resize=HxW in --preprocess")
    return h, w, c


def load_images(folder: Path, spec: TensorSpec, pre: Preprocess, limit: Optional[int]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow", path=str(folder),
                        hint="pip install pillow") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError("no images found (looked for " + ", ".join(IMAGE_SUFFIXES) + ")",
                        path=str(folder))
    if limit:
        files = files[:limit]
    h, w, c = _image_input(spec, pre)
    mode = "L" if (pre.color == "gray" or c == 1) else "RGB"
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode).resize((w, h), Image.BILINEAR), dtype=np.float32)
        except OSError as e:
            raise DataError(f"cannot read image ({e})", path=str(f)) from None
        if arr.ndim == 2:
            arr = arr[..., None]
        if pre.color == "bgr":
            arr = arr[..., ::-1]
        arr = (arr * pre.scale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        out.append(arr.transpose(2, 0, 1) if pre.layout == "nchw" else arr)
    return np.stack(out).astype(np.float32)


@dataclass
class Dataset:
    """Model inputs (name -> array with a leading sample axis), optional labels, where from."""

    inputs: Dict[str, np.ndarray]
    labels: Optional[np.ndarray]
    source: str
    random: bool = False

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, idx) -> "Dataset":
        return Dataset({k: v[idx] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[idx], self.source, self.random)

    def sample(self, i: int) -> Dict[str, np.ndarray]:
        return {k: v[i:i + 1] for k, v in self.inputs.items()}


def random_dataset(specs: Sequence[TensorSpec], n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    inputs = {s.name: rng.standard_normal((n,) + tuple(1 if d < 0 else d for d in s.shape[1:]))
              .astype(np.float32) for s in specs}
    return Dataset(inputs, None, "random", random=True)


def load_dataset(path: str, specs: Sequence[TensorSpec], *, what: str,
                 preprocess: Optional[str] = None, limit: Optional[int] = None) -> Dataset:
    """Read and check data for the model inputs `specs`. `what`: 'calibration' or 'validation'."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} data not found", path=path,
                        hint="give a .npy, an .npz keyed by input name, or a folder of images")
    names = [s.name for s in specs]
    labels = None
    if p.is_dir():
        if len(specs) != 1:
            raise DataError(f"an image folder can feed a single-input model; this one has {names}",
                            path=path, hint="use an .npz keyed by input name")
        pre = Preprocess.parse(preprocess or "")
        arrays = {names[0]: load_images(p, specs[0], pre, limit)}
    elif p.suffix == ".npy":
        # validation data inherits the calibration's --preprocess, which only an image folder needs: a .npy of
        # validation samples beside a calibration folder holds model inputs already
        if preprocess and what != "validation":
            raise DataError("--preprocess applies to an image folder, not to .npy data", path=path)
        if len(specs) != 1:
            raise DataError(f"a .npy holds one array but the model has inputs {names}", path=path,
                            hint="use an .npz keyed by input name")
        arrays = {names[0]: _load_npy(p)}
    elif p.suffix == ".npz":
        arrays, labels = _load_npz(p, names)
    else:
        raise DataError(f"{what} data must be .npy, .npz or a folder of images", path=path)
    for s in specs:
        arrays[s.name] = _check_array(arrays[s.name], s, path, what)
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"inputs have different sample counts {counts}", path=path)
    n = next(iter(counts.values()))
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] > 1:
            labels = labels.argmax(axis=1)  # one-hot
        labels = labels.reshape(-1)
        if labels.shape[0] != n:
            raise DataError(f"{labels.shape[0]} labels for {n} samples", path=path)
        if not np.issubdtype(labels.dtype, np.integer):
            if not np.all(np.equal(np.mod(labels, 1), 0)):
                raise DataError("labels must be class indices (integers) or one-hot", path=path)
            labels = labels.astype(np.int64)
    ds = Dataset(arrays, labels, str(p))
    if limit and len(ds) > limit:
        ds = ds.take(slice(0, limit))
    return ds


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read .npy ({e})", path=str(p)) from None


def _load_npz(p: Path, names: List[str]):
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read .npz ({e})", path=str(p)) from None
    labels = None
    for k in LABEL_KEYS:
        if k in data:
            labels = data.pop(k)
            break
    if len(names) == 1 and names[0] not in data:
        if len(data) != 1:
            raise DataError(f"cannot tell which array is input '{names[0]}' (file has "
                            f"{sorted(data)})", path=str(p),
                            hint=f"name the array '{names[0]}' (and labels 'labels')")
        data = {names[0]: next(iter(data.values()))}
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(f"no array for input '{missing[0]}' (file has {sorted(data)}; the model's "
                        f"inputs are {names})", path=str(p))
    extra = [k for k in data if k not in names]
    if extra:
        raise DataError(f"array '{extra[0]}' matches no model input {names}", path=str(p),
                        hint="labels go under 'labels'")
    return {n: data[n] for n in names}, labels


def _check_array(a: np.ndarray, spec: TensorSpec, path: str, what: str) -> np.ndarray:
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise DataError(f"{what} data has dtype {a.dtype}, not numbers", path=path, tensor=spec.name)
    want = tuple(spec.shape)
    if a.ndim == len(want) - 1 and all(d in (-1, g) for d, g in zip(want[1:], a.shape)):
        a = a[None]  # a single sample without its batch axis
    if a.ndim != len(want) or any(d not in (-1, g) for d, g in zip(want[1:], a.shape[1:])):
        dims = ", ".join("N" if i == 0 else ("?" if d == -1 else str(d)) for i, d in enumerate(want))
        raise DataError(f"{what} data has shape {tuple(a.shape)}, the model takes ({dims}) "
                        "(first axis: samples)", path=path, tensor=spec.name)
    if a.shape[0] == 0:
        raise DataError(f"{what} data is empty (0 samples)", path=path, tensor=spec.name)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).reshape(a.shape[0], -1).any(axis=1).sum())
        raise DataError(f"{what} data contains NaN or Inf in {bad} of {a.shape[0]} samples",
                        path=path, tensor=spec.name, hint="clean or drop those samples")
    return a.astype(np.float32) if spec.dtype.startswith("float") or spec.quantized else a
