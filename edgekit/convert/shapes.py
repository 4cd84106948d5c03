"""Input shapes the user already gave: where a source leaves an input dimension unknown (a
TorchScript program that records no shapes, an ONNX graph with dynamic H and W, a Keras input of
None), the calibration data fixes it: one sample's shape, batch 1. `--input-shape` overrides it;
a source refuses only when neither says.

The data is read for its shapes only here (.npy / .npz array headers, the `resize=` of an image
folder's --preprocess); load_dataset checks it in full later against the shapes chosen.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgekit.convert.data import LABEL_KEYS, Preprocess

Shape = Tuple[int, ...]      # -1 where unknown


@dataclass(frozen=True)
class DataShapes:
    """The shapes the calibration data holds: by array name (None: the data's one array)."""

    arrays: Mapping[Optional[str], Shape]
    per_sample: bool           # True: each shape is one sample's (images); False: the first axis may be samples
    where: str                 # what the shapes come from, for the notes: "the calibration data calib.npy"

    def _array(self, name: str, n_inputs: int) -> Optional[Shape]:
        if name in self.arrays:
            return self.arrays[name]
        if n_inputs == 1 and len(self.arrays) == 1:
            return next(iter(self.arrays.values()))
        return None

    def complete(self, name: str, model_shape: Sequence[int], n_inputs: int) -> Optional[Shape]:
        """The model's shape for `name` with its unknown dimensions from the data and batch 1, or
        None where the data says nothing about it (no array for it, another rank). `model_shape`
        is () where the source records no shape at all. Known dimensions stay the model's (a
        mismatch is the data check's to report)."""
        arr = self._array(name, n_inputs)
        if arr is None:
            return None
        model_shape = tuple(int(d) for d in model_shape)
        if self.per_sample or (model_shape and len(arr) == len(model_shape) - 1):
            sample = tuple(arr)          # one sample without its batch axis
        else:
            sample = tuple(arr[1:])
        if not model_shape:
            return (1,) + sample if sample else None
        if len(sample) != len(model_shape) - 1:
            return None
        filled = tuple(s if d == -1 else d for d, s in zip(model_shape[1:], sample))
        if any(d < 1 for d in filled):
            return None
        return (1 if model_shape[0] == -1 else model_shape[0],) + filled


def peek(path: Optional[str], preprocess: Optional[str] = None) -> Optional[DataShapes]:
    """The shapes in a calibration file or image folder, read from the array headers; None where
    they cannot be told (an image folder without resize=, an unreadable file: load_dataset says
    why later, naming the file)."""
    if path is None:
        return None
    p = Path(path)
    where = f"the calibration data {p.name}"
    if p.is_dir():
        pre = Preprocess.parse(preprocess or "")
        if not pre.size:
            return None
        h, w = pre.size
        c = 1 if pre.color == "gray" else 3
        shape = (c, h, w) if pre.layout == "nchw" else (h, w, c)
        return DataShapes({None: shape}, True, f"the images in {p.name}/ after --preprocess resize={h}x{w}")
    try:
        if p.suffix == ".npy":
            return DataShapes({None: tuple(np.load(p, mmap_mode="r", allow_pickle=False).shape)}, False, where)
        if p.suffix == ".npz":
            arrays: Dict[Optional[str], Shape] = {}
            with zipfile.ZipFile(p) as z:
                for member in z.namelist():
                    key = member[:-4] if member.endswith(".npy") else member
                    if key in LABEL_KEYS:
                        continue
                    with z.open(member) as f:
                        major, _ = np.lib.format.read_magic(f)
                        header = (np.lib.format.read_array_header_1_0 if major == 1
                                  else np.lib.format.read_array_header_2_0)(f)
                    arrays[key] = tuple(header[0])
            return DataShapes(arrays, False, where) if arrays else None
    except (OSError, ValueError, zipfile.BadZipFile):   # load_dataset reports the file's problem in full
        return None
    return None


def from_arrays(inputs: Mapping[str, np.ndarray], where: str) -> DataShapes:
    """Calibration data handed over in memory (edgekit qat, prune)."""
    return DataShapes({k: tuple(v.shape) for k, v in inputs.items()}, False, where)


def of_calibration(recipe, data=None) -> Optional[DataShapes]:
    """The shapes of a recipe's calibration data (or of `data`, an InMemoryData); None for random data."""
    if data is not None:
        return from_arrays(data.calibration.inputs, f"the calibration data ({data.calibration.source})")
    if recipe.calibration.random:
        return None
    return peek(recipe.calibration.path, recipe.calibration.preprocess)


def dims(shape: Sequence[int]) -> str:
    return "x".join("?" if d == -1 else str(d) for d in shape)


def note(taken: Mapping[str, Shape], data: DataShapes, scope: str = "") -> str:
    """The line the source notes (every manifest), the progress output and the convert table carry."""
    what = ", ".join(f"{k}={dims(v)}" for k, v in taken.items())
    return (f"input shape{'s' if len(taken) > 1 else ''} {what} taken from {data.where} (batch 1)"
            + (f" {scope}" if scope else "") + "; --input-shape overrides")


def record(taken: Mapping[str, Shape], data: DataShapes, applies_to: str = "every artifact",
           scope: str = "") -> Dict[str, object]:
    """The source record's `shapes_from_data` (manifest and report)."""
    return {"inputs": {k: list(v) for k, v in taken.items()}, "from": data.where, "applies_to": applies_to,
            "override": "--input-shape NAME=1x3x224x224", "note": note(taken, data, scope)}


def needs_data(model_shape: Sequence[int]) -> bool:
    """Whether the source leaves a dimension beyond the batch unknown (or records no shape)."""
    return not model_shape or any(d == -1 for d in list(model_shape)[1:])
