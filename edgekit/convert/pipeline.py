"""convert(recipe): plan -> read the source -> data -> build, validate, rescue -> bundles -> report.

Everything the user can get wrong (targets, paths, data shapes) is checked before the first
conversion. Targets that ask for the same build share one artifact (built and measured once).
Every artifact is measured in its target's numerics (convert.numerics) and must meet the
recipe's fidelity floor; below it the rescue ladder runs (convert.rescue). An artifact that
fails to convert, or still misses the floor, is a FAILED row with its reason, and is not
written; the others are. Each bundle is written atomically; the report is always written,
and BudgetMissed (exit 1) carries the whole result when a row failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import edgekit
from edgekit.bundle import write_bundle, write_json_atomic
from edgekit.convert import measure as measuring
from edgekit.convert import numerics, validate
from edgekit.convert import shapes as shaping
from edgekit.convert.build import convert_once, error_line, precision_of
from edgekit.convert.data import Dataset, load_dataset, random_dataset
from edgekit.convert.native import captured_stderr, logged_output
from edgekit.convert.recipe import ConvertRecipe
from edgekit.convert.result import Artifact, BundleResult, ConvertResult, Failure
from edgekit.convert.source import Source
from edgekit.convert.sources import detect_kind, load_source
from edgekit.errors import BudgetMissed, ConversionError, DataError, EdgekitError
from edgekit.progress import Progress
from edgekit.runtime import load as load_model
from edgekit.runtime.check import MIN_SNR_DB, MIN_TOP1
from edgekit.targets import TargetProfile, load_target

HELD_OUT = 0.2


@dataclass
class InMemoryData:
    """Calibration / validation data handed over in memory (qat, prune): no files in between."""

    calibration: Dataset
    validation: Optional[Dataset] = None


# --- 1. plan ------------------------------------------------------------------------------

def with_precision(t: TargetProfile, precision: str) -> TargetProfile:
    """The profile's builds at another precision: int16x8 (16-bit activations, 8-bit weights),
    fp16 (GPU targets: profiles with onnx.fp16_allowed), dynamic (weights INT8, activations
    quantized at run time)."""
    if precision == "int8":
        return t
    if precision == "int16x8":
        return dataclasses.replace(t, tflite=dataclasses.replace(t.tflite, activations="int16"),
                                   onnx=dataclasses.replace(t.onnx, activation_type="int16"))
    if precision == "dynamic":
        return dataclasses.replace(t, tflite=dataclasses.replace(t.tflite, activations="dynamic", io_type="float32"),
                                   onnx=dataclasses.replace(t.onnx, dynamic=True))
    if not t.onnx.fp16_allowed:
        raise EdgekitError(f"target {t.name} has no FP16 path (onnx.fp16_allowed is false)",
                           hint="--precision fp16 is for GPU targets (jetson-orin, jetson-nano); "
                                "use int8, int16x8 or dynamic here")
    return dataclasses.replace(t, tflite=dataclasses.replace(t.tflite, activations="float16", io_type="float32"),
                               onnx=dataclasses.replace(t.onnx, fp16=True))


@dataclass(frozen=True)
class Row:
    profile: TargetProfile
    fmt: str
    suffix: str

    @property
    def build(self):
        return self.profile.tflite if self.fmt == "tflite" else self.profile.onnx

    @property
    def numerics(self) -> numerics.Numerics:
        if self.fmt == "onnx":
            return numerics.for_onnx(self.profile, self.profile.onnx)
        return numerics.Numerics("host", "TFLite kernels of this host (ARM rounding differs within the "
                                         "golden check's tolerance; see the compatibility check)")

    @property
    def key(self) -> Tuple:
        return (self.fmt, self.build, self.numerics.mode)


def plan(recipe: ConvertRecipe) -> List[Row]:
    """(profile, format, bundle suffix) for every artifact to write; errors before any work."""
    detect_kind(Path(recipe.model))
    rows: List[Row] = []
    for name in recipe.targets:
        t = with_precision(load_target(name), recipe.precision)
        fmts = [f for f in t.formats if not recipe.formats or f in recipe.formats]
        if not fmts:
            raise ConversionError(f"builds {list(t.formats)}, none of the requested {list(recipe.formats)}",
                                  target=t.name)
        rows += [Row(t, f, "" if i == 0 else f"-{f}") for i, f in enumerate(fmts)]
    return rows


def _check_paths(recipe: ConvertRecipe, out: Path) -> None:
    for p, what in ((recipe.calibration.path, "calibration"), (recipe.validation, "validation")):
        if p is not None and not Path(p).exists():
            raise DataError(f"{what} data not found", path=p)
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out}: exists and is not a directory", hint="choose another --out")


# --- 2. data ---------------------------------------------------------------------------------

def _datasets(recipe: ConvertRecipe, specs, data: Optional[InMemoryData]):
    cal = recipe.calibration
    if data is not None:
        full, val_ds = data.calibration, data.validation
        info: Dict[str, Any] = {"source": full.source, "random": full.random}
    elif cal.random:
        full = random_dataset(specs, cal.samples, seed=0)
        val_ds = random_dataset(specs, max(8, min(64, cal.samples)), seed=1)
        info = {"source": "random", "random": True, "note": "random calibration: accuracy figures mean nothing"}
    else:
        full = load_dataset(cal.path, specs, what="calibration", preprocess=cal.preprocess)
        val_ds = (load_dataset(recipe.validation, specs, what="validation", preprocess=cal.preprocess)
                  if recipe.validation else None)
        info = {"source": str(cal.path), "random": False}
    if val_ds is not None:
        calib_ds = full.take(slice(0, cal.samples))
        info.setdefault("validation_source", val_ds.source if data is None or not recipe.validation
                        else str(recipe.validation))
        if recipe.validation:
            info["validation_source"] = str(recipe.validation)
    elif len(full) >= 10:
        n_val = max(1, int(round(len(full) * HELD_OUT)))
        val_ds = full.take(slice(len(full) - n_val, len(full)))
        calib_ds = full.take(slice(0, min(cal.samples, len(full) - n_val)))
        info["validation_source"] = f"held-out last {n_val} of {full.source}"
    else:
        calib_ds, val_ds = full.take(slice(0, cal.samples)), full
        info["validation_source"] = f"{full.source} (too few samples to hold any out: same data)"
    info.update(samples=len(calib_ds), validation_samples=len(val_ds), preprocess=cal.preprocess,
                ranges={k: {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
                            "std": float(v.std())} for k, v in calib_ds.inputs.items()},
                labels=val_ds.labels is not None)
    return calib_ds, val_ds, info


# --- 3. build, measure, rescue ----------------------------------------------------------------

def _hint_for(fmt: str, message: str) -> str:
    if "only supports" in message or "unsupported" in message.lower() or "not supported" in message.lower():
        return ("an op has no kernel at this precision: try --precision int8 or dynamic, or --format "
                + ("onnx" if fmt == "tflite" else "tflite"))
    if "Erfc" in message or "opset" in message.lower():
        return "export the model at a newer opset, or convert from the Keras/SavedModel source"
    return "see the log for the converter's own output; --debug shows the traceback"


def build_artifact(row: Row, recipe: ConvertRecipe, source: Source, calib: Dataset, ctx: measuring.Context,
                   float_onnx: Dict[int, bytes], progress: Progress) -> "Artifact | Failure":
    """The profile's build for a row, measured; below the floor, the rescue ladder."""
    from edgekit.convert import rescue

    t0 = time.monotonic()
    num = row.numerics
    label = f"[{row.profile.name}] {row.fmt}"
    tick = progress.ticker(f"{label}: calibrating", " samples")
    with captured_stderr() as cap:
        try:
            data, float_bytes = convert_once(source, row.fmt, row.build, calib, float_onnx, tick)
        except Exception as e:  # any converter failure is recorded as this row's reason, not hidden
            msg = error_line(e, cap)
            return Failure(f"{row.fmt} conversion", msg, hint=_hint_for(row.fmt, msg))
    with captured_stderr() as cap:
        try:
            m = measuring.measure(data, row.fmt, ctx, num, per_sample=precision_of(row.build) == "dynamic")
        except Exception as e:  # an artifact that does not run is this row's failure, recorded
            msg = error_line(e, cap)
            return Failure("validation", f"the {row.fmt} artifact does not run: {msg}", hint=_hint_for(row.fmt, msg))
    verdict = validate.floor_misses(m.metrics, recipe.floor)
    art = Artifact(row.fmt, data, float_bytes, m.metrics, m.float_ops, m.inputs, m.outputs, m.golden,
                   0.0, dataclasses.asdict(row.build), precision_of(row.build),
                   measuring.numerics_record(num, m), m.backend)
    if row.fmt == "onnx" and row.build.opset in float_onnx:
        from edgekit.convert.onnx import preprocess_note

        note = preprocess_note(float_onnx[row.build.opset])
        if note:
            art.notes.append(note)
    if verdict:
        progress.say(f"{label}: {'; '.join(verdict)}: below the floor")
        if not recipe.search.rescue:
            return Failure("fidelity floor", "; ".join(verdict),
                           hint="drop --no-rescue to let convert try the rescue ladder, or train with "
                                "quantization in the loop (edgekit qat)", metrics=m.metrics)
        outcome = rescue.ladder(row, recipe, source, calib, ctx, float_onnx, art, progress)
        if isinstance(outcome, Failure):
            return outcome
        art = outcome
    from edgekit.convert import faithful   # the more faithful build of about the same speed, if any

    art = faithful.more_faithful(row, recipe, source, calib, ctx, float_onnx, art, progress)
    art.seconds = time.monotonic() - t0
    return art


# --- 4. bundles -----------------------------------------------------------------------------------

def _manifest(recipe: ConvertRecipe, row: Row, art: Artifact, result: ConvertResult) -> Dict[str, Any]:
    from edgekit.bundle import Manifest

    return Manifest(
        name=result.name, edgekit_version=edgekit.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        target=row.profile.to_dict(),
        model={"precision": art.precision + ("+float" if art.mixed and art.mixed.get("met") else ""),
               "build": art.build, "rescued_by": art.rescued_by},
        inputs=art.inputs, outputs=art.outputs, source=result.source, calibration=result.calibration,
        validation=dict(art.metrics, float_bytes=art.float_bytes, quant_bytes=len(art.data), notes=art.notes,
                        size_ratio=len(art.data) / art.float_bytes, float_ops=art.float_ops,
                        floor=dataclasses.asdict(recipe.floor), numerics=art.numerics,
                        reference="the source model in float32 (" + result.source["kind"] + ")"),
        mixed_precision=art.mixed, rescue=art.rescue, candidates=art.candidates, runtime=art.runtime,
        faithful=art.faithful,
        golden={"file": "golden.npz", "samples": int(next(iter(art.golden.values())).shape[0]),
                "made_with": art.golden_backend, "numerics": art.numerics.get("mode"),
                "min_snr_db": MIN_SNR_DB, "min_top1_agreement": MIN_TOP1},
        recipe=recipe.to_dict(),
    ).to_dict()


def _write(row: Row, recipe: ConvertRecipe, art: Artifact, result: ConvertResult, dest: Path,
           compat_cache: Dict, progress: Progress) -> Optional[Failure]:
    from edgekit.bundle import Manifest
    from edgekit.convert import compat

    def check(tmp: Path) -> None:
        records = compat.check(tmp, row.profile, row.fmt, recipe.compat_check, compat_cache,
                               hashlib.sha256(art.data).hexdigest(),
                               reference=art.numerics.get("mode") == "reference")
        for r in records:
            if r.get("checked", True) and "where" in r:
                progress.say(f"[{row.profile.name}] {row.fmt}: {compat.describe(r)}")
        Manifest.update(tmp, compatibility=records)

    try:
        write_bundle(dest, fmt=row.fmt, model_bytes=art.data, manifest=_manifest(recipe, row, art, result),
                     golden=art.golden, check=check)
    except ConversionError as e:
        return Failure(e.stage or "bundle", e.message, hint=e.hint or "")
    return None


# --- the steps together -------------------------------------------------------------------------------

def convert(recipe: ConvertRecipe, out: str = "build", *, progress: Optional[Progress] = None,
            data: Optional[InMemoryData] = None, device=None) -> ConvertResult:
    """Build, validate and write a bundle per (target, format) of `recipe` under `out`.

    `device`: with recipe.select == "fastest", a timer for the candidates of the device's own target
    (deploy.timing.DeviceTimer; convert never imports deploy, the caller hands it in).

    Raises BudgetMissed (exit 1) after writing everything that passed when a row failed or missed
    the floor; EdgekitError (exit 2) for a user's mistake, before any work."""
    progress = progress or Progress(enabled=False)
    rows = plan(recipe)
    name = recipe.bundle_name
    out_dir = Path(out)
    _check_paths(recipe, out_dir)
    log_path = out_dir / f"{name}.convert.log"
    result: Optional[ConvertResult] = None
    with tempfile.TemporaryDirectory(prefix="edgekit-convert-") as wd:
        tmp_log = Path(wd) / "convert.log"     # moved to OUT once there is something to report
        tmp_log.write_text(f"edgekit {edgekit.__version__} convert {recipe.model} "
                           f"({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})\n")
        try:
            with logged_output(tmp_log):
                result = _run(recipe, rows, name, out_dir, Path(wd), log_path, progress, data, device)
        finally:
            if result is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp_log, log_path)
    if result.failed:
        worst = result.failed[0]
        raise BudgetMissed(f"{len(result.failed)} of {len(result.bundles)} artifact(s) not written: "
                           f"{worst.path.name}: {worst.failure.reason}", result=result,
                           hint=f"report {result.report_path}, log {log_path}; "
                                + (worst.failure.hint or "the other bundles were written"))
    return result


def convert_module(module, example_inputs, targets, out: str = "build", *, name: str,
                   progress: Optional[Progress] = None, **recipe_fields) -> ConvertResult:
    """convert() for a torch nn.Module: it is captured with torch.export, saved beside the bundles
    as `<out>/<name>.source.pt2` (what the recipe in each manifest names), and converted.
    Needs `edgekit[torch]`; torch itself is imported by convert.torch_source only."""
    from edgekit.convert import torch_source

    src = torch_source.save_module(module, example_inputs, Path(out) / f"{name}.source.pt2")
    recipe = ConvertRecipe(model=str(src), targets=tuple(targets), name=name, **recipe_fields)
    return convert(recipe, out, progress=progress)


def _older_ops(row: Row, recipe: ConvertRecipe, source: Source, calib: Dataset, ctx: measuring.Context,
               float_onnx: Dict[int, bytes], art: Artifact, failure: Failure, progress: Progress) -> Optional[Artifact]:
    """The target's oldest runtime lacks an op version the artifact uses: per-channel TFLite ops
    (FULLY_CONNECTED 12 in TF 2.21's dynamic range models, say) have older per-tensor versions.
    The per-tensor build, measured and held to the floor like any other, or None."""
    if row.fmt != "tflite" or not row.build.per_channel:
        return None
    from edgekit.convert.rescue import _step as rescue_step

    build = dataclasses.replace(row.build, per_channel=False)
    what = "per-tensor weights (older op versions)"
    progress.say(f"[{row.profile.name}] tflite: {failure.reason.split(': ', 2)[-1][:90]}; trying per-tensor weights")
    with captured_stderr() as cap:
        try:
            data, float_bytes = convert_once(source, "tflite", build, calib, float_onnx)
            m = measuring.measure(data, "tflite", ctx, row.numerics, per_sample=precision_of(build) == "dynamic")
        except Exception as e:  # recorded in the row's steps; the compatibility failure stands
            failure.rescue = list(failure.rescue) + [rescue_step("compatibility", what, error=error_line(e, cap))]
            return None
    misses = validate.floor_misses(m.metrics, recipe.floor)
    step = rescue_step("compatibility", what, m.metrics, data, meets=not misses, floor=recipe.floor)
    if misses:
        failure.rescue = list(failure.rescue) + [step]
        return None
    older = Artifact("tflite", data, float_bytes, m.metrics, m.float_ops, m.inputs, m.outputs, m.golden, art.seconds,
                     dataclasses.asdict(build), precision_of(build),
                     measuring.numerics_record(row.numerics, m), m.backend)
    older.rescue = list(art.rescue) + [step]
    older.rescued_by = step["what"]
    older.notes = list(art.notes) + [f"per-channel build refused by the target's oldest runtime: {failure.reason}"]
    return older


def _run(recipe: ConvertRecipe, rows: List[Row], name: str, out_dir: Path, wd: Path, log_path: Path,
         progress: Progress, data: Optional[InMemoryData], device=None) -> ConvertResult:
    progress.say(f"reading {recipe.model}")
    source = load_source(recipe.model, wd, input_shapes=dict(recipe.input_shapes),
                         needs_tflite=any(r.fmt == "tflite" for r in rows),
                         data=shaping.of_calibration(recipe, data))
    if source.shapes_from_data:
        progress.say(source.shapes_from_data["note"])
    if source.qat and recipe.precision != "int8":
        raise EdgekitError(f"a quantization-aware trained model converts to INT8 only, not {recipe.precision}",
                           hint="drop --precision, or convert the model from before `edgekit qat`")
    reference = load_model(source.reference_path)
    calib_ds, val_ds, cal_info = _datasets(recipe, reference.inputs, data)
    progress.say(f"calibration: {len(calib_ds)} samples from {cal_info['source']}; "
                 f"validation: {len(val_ds)} samples from {cal_info['validation_source']}")
    ctx = measuring.Context.make(reference, val_ds, source)
    result = ConvertResult(name, recipe.to_dict(), source.describe(), cal_info, log_path=log_path)
    built: Dict[Tuple, Any] = {}
    compat_cache: Dict = {}
    float_onnx: Dict[int, bytes] = {}
    for row in rows:
        dest = out_dir / f"{name}-{row.profile.name}{row.suffix}"
        if row.key not in built:
            progress.say(f"[{row.profile.name}] {row.fmt}: converting")
            built[row.key] = build_artifact(row, recipe, source, calib_ds, ctx, float_onnx, progress)
            if recipe.select == "fastest":     # a failed profile build too: dynamic or float may meet the floor
                from edgekit.convert import select

                def bundle_for(art, dest, row=row):
                    write_bundle(dest, fmt=row.fmt, model_bytes=art.data,
                                 manifest=_manifest(recipe, row, art, result), golden=art.golden)

                built[row.key] = select.fastest(row, recipe, source, calib_ds, ctx, float_onnx,
                                                built[row.key], progress, device, bundle_for)
        else:
            progress.say(f"[{row.profile.name}] {row.fmt}: same build as an earlier target, reused")
        outcome = built[row.key]
        failure = outcome if isinstance(outcome, Failure) else \
            _write(row, recipe, outcome, result, dest, compat_cache, progress)
        if failure is not None and failure.stage == "compatibility" and "is newer than" in failure.reason:
            older = _older_ops(row, recipe, source, calib_ds, ctx, float_onnx, outcome, failure, progress)
            if older is not None:
                failure = _write(row, recipe, older, result, dest, compat_cache, progress)
                if failure is None:
                    outcome = older
        if failure is not None:
            progress.say(f"[{row.profile.name}] {row.fmt}: FAILED ({failure.stage}): {failure.reason}")
            result.bundles.append(BundleResult(row.profile.name, row.fmt, dest, failure=failure))
            continue
        result.bundles.append(BundleResult(row.profile.name, row.fmt, dest, artifact=outcome))
        for slug, alt in outcome.alternatives:   # --select fastest: the others, kept beside the winner
            alt_dest = dest.with_name(f"{dest.name}-{slug}")
            alt_failure = _write(row, recipe, alt, result, alt_dest, compat_cache, progress)
            result.bundles.append(BundleResult(row.profile.name, row.fmt, alt_dest, artifact=alt,
                                               failure=alt_failure))
    result.report_path = out_dir / f"{name}.convert.json"
    write_json_atomic(result.report_path, result.to_dict())
    return result
