"""ConvertRecipe: everything that decides an artifact, validated once, saved in every manifest.

    recipe = ConvertRecipe(model="model.keras", targets=("rpi4", "x86-avx2"),
                           calibration=Calibration("calib.npz"), validation="val.npz")
    result = convert(recipe, out="build")

`edgekit convert --recipe build/model-rpi4/manifest.json` rebuilds from a manifest's recipe.
Frozen and checked in `__post_init__` (the pattern of targets.py): an impossible combination
cannot be built, and each bad field names itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from edgekit.errors import RecipeError

PRECISIONS = ("int8", "int16x8", "fp16", "dynamic")
FORMATS = ("tflite", "onnx")
COMPAT_MODES = ("auto", "venv", "emulated", "off", "accept-crash")
SELECT = ("profile", "fastest")


def _bad(fld: str, message: str, hint: Optional[str] = None) -> RecipeError:
    return RecipeError(f"recipe field {fld}: {message}", field=fld, hint=hint)


def _number(fld: str, v: Any, lo: float, hi: float = float("inf")) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(fld, f"must be a number, not {type(v).__name__}")
    if not lo <= float(v) <= hi:
        raise _bad(fld, f"{v} is outside [{lo}, {hi}]")
    return float(v)


@dataclass(frozen=True)
class Calibration:
    """Calibration data: a .npy / .npz / image folder, or random data (smoke tests only)."""

    path: Optional[str] = None
    samples: int = 200
    preprocess: Optional[str] = None      # image folders: resize=..,scale=..,mean=..,std=..,layout=..
    random: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise _bad("calibration.samples", f"must be a whole number >= 1, not {self.samples!r}")
        if self.path is not None and self.random:
            raise _bad("calibration", "give --calib or --calib-random, not both")
        if self.preprocess is not None:
            from edgekit.convert.data import Preprocess

            Preprocess.parse(self.preprocess)     # raises DataError naming the bad key


@dataclass(frozen=True)
class Floor:
    """What every artifact must meet on the validation data, or it is not written."""

    min_snr_db: float = 20.0
    min_agreement: float = 0.90            # top-1 agreement with the float model, a fraction 0..1
    max_accuracy_drop: Optional[float] = None   # percentage points, with labels (else of agreement)

    def __post_init__(self) -> None:
        _number("floor.min_snr_db", self.min_snr_db, -100.0, 200.0)
        _number("floor.min_agreement", self.min_agreement, 0.0, 1.0)
        if self.max_accuracy_drop is not None:
            _number("floor.max_accuracy_drop", self.max_accuracy_drop, 0.0, 100.0)


# The rescue ladder's rungs, in the order they are tried (16-bit last: the slowest build on most runtimes)
RUNGS = ("ranges", "calibration", "scheme", "float layers", "16-bit")


@dataclass(frozen=True)
class Search:
    """What convert may try when the profile's plain build misses the floor."""

    rescue: bool = True                    # the rescue ladder (ranges, schemes, 16-bit, float layers)
    mixed_precision: bool = True           # the last rung: layers kept in float
    seconds: float = 300.0                 # time budget per artifact
    first: bool = False                    # mixed precision: stop at the first result that meets the floor
    rungs: Tuple[str, ...] = ()            # only these rungs of the ladder (default: every rung, in ladder order)

    def __post_init__(self) -> None:
        _number("search.seconds", self.seconds, 0.0)
        rungs = (self.rungs,) if isinstance(self.rungs, str) else tuple(self.rungs or ())
        for r in rungs:
            if r not in RUNGS:
                raise _bad("search.rungs", f"unknown rung {r!r}", hint="one of: " + ", ".join(RUNGS))
        object.__setattr__(self, "rungs", tuple(dict.fromkeys(rungs)))


@dataclass(frozen=True)
class ConvertRecipe:
    model: str
    targets: Tuple[str, ...]
    calibration: Calibration = field(default_factory=lambda: Calibration(random=True))
    validation: Optional[str] = None       # default: the last 20% of the calibration data, held out
    formats: Tuple[str, ...] = ()          # default: every format each target lists
    precision: str = "int8"
    name: Optional[str] = None
    floor: Floor = field(default_factory=Floor)
    search: Search = field(default_factory=Search)
    compat_check: str = "auto"
    select: str = "profile"                # fastest: build candidates, time them, keep the fastest
    input_shapes: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()   # fixes dims a source leaves dynamic

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.model, str) or not self.model:
            raise _bad("model", "must be a path")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets or ())
        if not targets:
            raise RecipeError("no target given", field="targets",
                              hint="add --target NAME (see `edgekit targets list`)")
        set_(self, "targets", tuple(dict.fromkeys(str(t) for t in targets)))
        formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats or ())
        for f in formats:
            if f not in FORMATS:
                raise _bad("formats", f"unknown format {f!r}", hint="tflite or onnx")
        set_(self, "formats", tuple(dict.fromkeys(formats)))
        if self.precision not in PRECISIONS:
            raise _bad("precision", f"unknown precision {self.precision!r}", hint="one of " + ", ".join(PRECISIONS))
        if self.compat_check not in COMPAT_MODES:
            raise _bad("compat_check", f"unknown mode {self.compat_check!r}", hint="one of " + ", ".join(COMPAT_MODES))
        if self.select not in SELECT:
            raise _bad("select", f"unknown choice {self.select!r}", hint="one of " + ", ".join(SELECT))
        from edgekit.targets import load_target

        for t in self.targets:       # unknown targets and bad profile files, named, before anything else
            load_target(t)
        if isinstance(self.calibration, str):
            set_(self, "calibration", Calibration(self.calibration))
        if not isinstance(self.calibration, Calibration):
            raise _bad("calibration", "must be a Calibration")
        if self.calibration.path is None and not self.calibration.random:
            raise RecipeError("no calibration data", field="calibration.path",
                              hint="give --calib data.npz (or an image folder); --calib-random only for a "
                                   "smoke test: its accuracy figures mean nothing")
        if not isinstance(self.floor, Floor):
            raise _bad("floor", "must be a Floor")
        if not isinstance(self.search, Search):
            raise _bad("search", "must be a Search")
        if self.name is not None:
            from edgekit.bundle import check_name

            check_name(self.name)
        shapes = dict(self.input_shapes) if not isinstance(self.input_shapes, Mapping) else self.input_shapes
        norm = []
        for k, dims in shapes.items():
            if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
                raise _bad("input_shapes", f"{k}: dimensions must be positive whole numbers, not {list(dims)}")
            norm.append((str(k), tuple(int(d) for d in dims)))
        set_(self, "input_shapes", tuple(norm))

    # -- derived -------------------------------------------------------------
    @property
    def bundle_name(self) -> str:
        from edgekit.bundle import check_name
        from edgekit.convert.hf_config import hub_name

        p = Path(self.model)
        if p.is_dir() and hub_name(p) != p.resolve().name:   # a hub cache download: its repository's name
            return self.name or check_name(hub_name(p))
        return self.name or check_name(p.stem or p.name)

    def replace(self, **changes) -> "ConvertRecipe":
        return dataclasses.replace(self, **changes)

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["formats"] = list(self.formats)
        d["input_shapes"] = {k: list(v) for k, v in self.input_shapes}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "recipe") -> "ConvertRecipe":
        if not isinstance(d, Mapping):
            raise RecipeError(f"{where}: a recipe must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"{where}: unknown recipe field {unknown[0]!r}", field=unknown[0],
                              hint="fields: " + ", ".join(sorted(known)))
        kw = dict(d)
        for key, typ in (("calibration", Calibration), ("floor", Floor), ("search", Search)):
            if key in kw and isinstance(kw[key], Mapping):
                sub = {f.name for f in dataclasses.fields(typ)}
                bad = sorted(set(kw[key]) - sub)
                if bad:
                    raise RecipeError(f"{where}: unknown field {key}.{bad[0]!r}", field=f"{key}.{bad[0]}",
                                      hint=f"{key} fields: " + ", ".join(sorted(sub)))
                kw[key] = typ(**kw[key])
        if "input_shapes" in kw and isinstance(kw["input_shapes"], Mapping):
            kw["input_shapes"] = tuple((k, tuple(v)) for k, v in kw["input_shapes"].items())
        try:
            return cls(**kw)
        except TypeError as e:
            raise RecipeError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str) -> "ConvertRecipe":
        """A recipe .json, or a bundle's manifest.json (its `recipe`), or a bundle directory."""
        p = Path(path)
        if p.is_dir():
            p = p / "manifest.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError("recipe not found", path=str(path),
                              hint="give a recipe .json, a bundle's manifest.json or a bundle directory") from None
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise RecipeError(f"cannot read the recipe ({e})", path=str(path)) from None
        if isinstance(data, dict) and "schema" in data and "recipe" in data:
            data = data["recipe"]
            if not data:
                raise RecipeError("this manifest holds no recipe (made by an older edgekit)", path=str(path),
                                  hint="convert again with the original options")
        return cls.from_dict(data, where=str(path))
