"""The `edgekit` command. The only module that imports everything; nothing imports it.

A user's mistake: one line on stderr, exit 2 (no traceback unless --debug).
A validation that misses its budget: exit 1, report still written.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from edgekit import __version__
from edgekit.errors import EdgekitError


class _Group(click.Group):
    """Turns EdgekitError into one clear line and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgekit")
@click.option("--debug", is_flag=True, help="Show tracebacks and native library output.")
@click.pass_context
def cli(ctx, debug):
    """Take a trained model to edge devices: convert, run, measure."""
    import os

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:
        os.environ["EDGEKIT_DEBUG"] = "1"


# --- targets -----------------------------------------------------------------

@cli.group()
def targets():
    """Target profiles: what each device class is, and what gets built for it."""


@targets.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON for machines.")
def targets_list(as_json):
    """Every shipped profile, one line each."""
    from edgekit.table import render
    from edgekit.targets import all_targets

    profiles = all_targets()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    click.echo(render(["target", "arch", "cpu", "cores", "accelerator", "formats", "onnx scheme"],
                      [[p.name, p.device.arch, p.device.cpu, p.device.cores, p.device.accelerator,
                        ",".join(p.formats), _scheme(p)] for p in profiles]))


def _scheme(p) -> str:
    if "onnx" not in p.formats:
        return "-"
    o = p.onnx
    s = f"{o.quant_format.upper()} {'S' if o.activation_type == 'int8' else 'U'}8" \
        f"{'S' if o.weight_type == 'int8' else 'U'}8"
    if o.per_channel:
        s += " per-channel"
    if o.reduce_range:
        s += " reduce_range"
    if o.symmetric_activations:
        s += " symmetric"
    return s


@targets.command("show")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="JSON for machines.")
def targets_show(target, as_json):
    """A profile and the reason for each hardware-driven choice (TARGET: name or .toml path)."""
    import dataclasses

    from edgekit.targets import load_target

    p = load_target(target)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  (from {p.source})")
    sections = [("device", p.device), ("build", {"formats": p.formats}), ("tflite", p.tflite),
                ("onnx", p.onnx), ("runtime", p.runtime)]
    for sec, obj in sections:
        click.echo(f"\n[{sec}]")
        items = obj.items() if isinstance(obj, dict) else dataclasses.asdict(obj).items()
        for k, v in items:
            if isinstance(v, (list, tuple)):
                v = ", ".join(map(str, v)) if k != "limitations" else ""
            why = p.reason(f"{sec}.{k}")
            click.echo(f"  {k:<22} {v}")
            if k == "limitations":
                for lim in getattr(obj, "limitations", ()):
                    click.echo(f"      - {lim}")
            if why:
                click.echo(f"      why: {why}")


# --- convert -----------------------------------------------------------------

def _input_shapes(values):
    shapes = {}
    for v in values:
        name, sep, dims = v.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise click.BadParameter(f"{v!r}: expected NAME=1x3x224x224", param_hint="--input-shape")
        shapes[name] = shape
    return tuple(shapes.items())


@cli.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--target", "-t", "target_names", multiple=True,
              help="Target profile name or .toml path; repeat for several.")
@click.option("--recipe", "recipe_path", type=click.Path(),
              help="Rebuild from a recipe: a bundle directory, its manifest.json, or a recipe .json "
                   "(options given here override it).")
@click.option("--calib", type=click.Path(), help=".npy, .npz (keyed by input name) or image folder.")
@click.option("--calib-random", is_flag=True,
              help="Calibrate on random data (smoke tests only: accuracy figures mean nothing).")
@click.option("--calib-samples", type=int, default=200, show_default=True)
@click.option("--preprocess", help="For an image folder: resize=HxW,scale=1/255,mean=..,std=..,layout=nhwc.")
@click.option("--val", type=click.Path(), help="Validation data (.npz with 'labels' for accuracy). "
              "Default: the last 20% of the calibration data, held out.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="NAME=1x3x224x224: fix the dimensions a source leaves dynamic.")
@click.option("--out", "-o", default="build", show_default=True, type=click.Path())
@click.option("--name", help="Bundle name (default: the model file's stem).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["tflite", "onnx"]),
              help="Only these formats (default: every format the target lists).")
@click.option("--precision", type=click.Choice(["int8", "int16x8", "fp16", "dynamic"]), default="int8",
              show_default=True, help="int16x8: 16-bit activations, 8-bit weights; fp16: GPU targets; dynamic: "
              "INT8 weights, activations quantized at run time (transformers on CPUs).")
@click.option("--min-snr", type=float, default=20.0, show_default=True,
              help="Fidelity floor: output SNR against the float model, dB.")
@click.option("--min-agreement", type=float, default=0.90, show_default=True,
              help="Fidelity floor: top-1 agreement with the float model (a fraction, 0..1).")
@click.option("--max-accuracy-drop", type=float,
              help="Also a floor: accuracy points lost (with labels; else points of top-1 agreement).")
@click.option("--no-rescue", is_flag=True, help="Below the floor, fail the artifact instead of trying the "
              "rescue ladder (other ranges and schemes, 16-bit activations, float layers).")
@click.option("--no-mixed-precision", is_flag=True, help="The rescue ladder never keeps layers in float.")
@click.option("--search-budget", type=float, default=300.0, show_default=True,
              help="Seconds the rescue ladder may take per artifact.")
@click.option("--search-first", is_flag=True,
              help="Mixed precision: keep the first result that meets the floor (default: the smallest, "
                   "then fastest, of those tried).")
@click.option("--select", "select", type=click.Choice(["profile", "fastest"]), default="profile", show_default=True,
              help="fastest: also build the schemes worth trying on the target's ISA, dynamic and float; "
                   "time those that meet the floor here (when this host has the target's ISA) and ship the "
                   "fastest as OUT/<name>-<target>, the others beside it.")
@click.option("--compat-check", type=click.Choice(["auto", "venv", "emulated", "off", "accept-crash"]),
              default="auto", show_default=True, help="Check each artifact in the oldest runtime its target runs "
              "(runtime.min_runtime): emulated arm64 root when built, else a cached venv. accept-crash: as auto, "
              "but write an artifact whose crash under emulation cannot be attributed (recorded in the manifest).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--report", "html_report", is_flag=True, help="Also write OUT/report.html (edgekit report OUT).")
@click.pass_context
def convert(ctx, model, target_names, recipe_path, calib, calib_random, calib_samples, preprocess, val,
            input_shapes, out, name, formats, precision, min_snr, min_agreement, max_accuracy_drop, no_rescue,
            no_mixed_precision, search_budget, search_first, select, compat_check, as_json, quiet, html_report):
    """Convert MODEL (.keras, .h5, SavedModel dir, .onnx) into a validated INT8 bundle per target.

    Every artifact must meet the fidelity floor (--min-snr, --min-agreement, --max-accuracy-drop);
    below it convert walks a rescue ladder, and an artifact that still misses is not written
    (its row says FAILED and why; the others are written; exit status 1)."""
    from edgekit.convert import convert as run_convert
    from edgekit.errors import BudgetMissed
    from edgekit.progress import Progress

    recipe = _recipe(ctx, model, target_names, recipe_path)
    progress = Progress(enabled=not quiet)
    try:
        result = run_convert(recipe, out, progress=progress)
    except BudgetMissed as e:
        if e.result is not None:
            click.echo(json.dumps(e.result.to_dict(), indent=2, default=str) if as_json else e.result.table())
        if html_report:
            _html_report(out, err=True)
        raise
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(result.table())
        click.echo(f"report: {result.report_path}  log: {result.log_path}")
    if html_report:
        _html_report(out, err=as_json)


def _recipe(ctx, model, target_names, recipe_path):
    """The ConvertRecipe from the options, or from --recipe with the options given here on top."""
    from click.core import ParameterSource

    from edgekit.convert.recipe import Calibration, ConvertRecipe, Floor, Search

    p = ctx.params
    given = {k for k in p if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if recipe_path is None and (not model or not target_names):
        raise click.UsageError("give MODEL and at least one --target (or --recipe BUNDLE_OR_JSON)")
    base = ConvertRecipe.load(recipe_path) if recipe_path else None

    def pick(key, current):
        return p[key] if (base is None or key in given) else current

    cal_b = base.calibration if base else None
    cal_random = pick("calib_random", cal_b.random if cal_b else False)
    cal_path = pick("calib", cal_b.path if cal_b else None)
    if base is not None and "calib" in given and "calib_random" not in given:
        cal_random = False
    calibration = Calibration(path=cal_path, samples=pick("calib_samples",
                              cal_b.samples if cal_b else 200), preprocess=pick("preprocess",
                              cal_b.preprocess if cal_b else None), random=cal_random)
    fl = base.floor if base else None
    se = base.search if base else None
    shapes = _input_shapes(p["input_shapes"]) if (base is None or "input_shapes" in given) else base.input_shapes
    return ConvertRecipe(
        model=model or base.model,
        targets=tuple(target_names) if target_names else base.targets,
        calibration=calibration,
        validation=pick("val", base.validation if base else None),
        formats=tuple(p["formats"]) if (base is None or "formats" in given) else base.formats,
        precision=pick("precision", base.precision if base else "int8"),
        name=pick("name", base.name if base else None),
        floor=Floor(min_snr_db=pick("min_snr", fl.min_snr_db if fl else 20.0),
                    min_agreement=pick("min_agreement", fl.min_agreement if fl else 0.9),
                    max_accuracy_drop=pick("max_accuracy_drop", fl.max_accuracy_drop if fl else None)),
        search=Search(rescue=not p["no_rescue"] if (base is None or "no_rescue" in given) else se.rescue,
                      mixed_precision=(not p["no_mixed_precision"] if (base is None or "no_mixed_precision" in given)
                                       else se.mixed_precision),
                      seconds=pick("search_budget", se.seconds if se else 300.0),
                      first=pick("search_first", se.first if se else False)),
        compat_check=pick("compat_check", base.compat_check if base else "auto"),
        select=pick("select", base.select if base else "profile"),
        input_shapes=shapes,
    )


# --- run / bench ---------------------------------------------------------------

_backend_opt = click.option("--backend", type=click.Choice(
    ["litert", "tflite-runtime", "tensorflow", "onnxruntime", "openvino"]), help="Force a backend.")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--input", "-i", "input_path", required=True, type=click.Path(),
              help=".npy (one input) or .npz keyed by input name.")
@click.option("--raw", is_flag=True, help="Integer tensors in and out, no (de)quantization.")
@_backend_opt
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True)
def run(model, input_path, raw, backend, threads, as_json):
    """Run MODEL (bundle, .tflite or .onnx) once and print its (float) outputs."""
    import numpy as np

    from edgekit.runtime import load
    from edgekit.runtime.__main__ import read_inputs

    m = load(model, backend=backend, threads=threads)
    out = m.run(**read_inputs(input_path, [s.name for s in m.inputs]), raw=raw)
    if as_json:
        click.echo(json.dumps({k: v.tolist() for k, v in out.items()}))
        return
    with np.printoptions(precision=5, suppress=True, threshold=200):
        for k, v in out.items():
            click.echo(f"{k} {v.dtype}{list(v.shape)}:\n{v}")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--runs", type=int, default=200, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@_backend_opt
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="The full report (raw samples included).")
@click.option("--out", type=click.Path(), help="Also save the JSON report to this file.")
def bench(models, runs, warmup, backend, threads, as_json, out):
    """Measure latency of one or more MODELS here (load, first run, warm-up, timed runs)."""
    from edgekit.bundle import write_json_atomic
    from edgekit.runtime import load
    from edgekit.runtime.report import bench_table

    reports = []
    for path in models:
        m = load(path, backend=backend, threads=threads)
        click.echo(f"benchmarking {path}: {warmup} warm-up + {runs} timed runs "
                   f"({m.backend} {m.backend_version})", err=True)
        reports.append(m.benchmark(runs=runs, warmup=warmup))
    data = reports[0] if len(reports) == 1 else reports
    if out:
        write_json_atomic(out, data)
    click.echo(json.dumps(data) if as_json else bench_table(reports))


# --- making models fit: prune, distill, qat -----------------------------------------------

def _before_after(rows, title):
    from edgekit.table import render

    return render(["", "params", "MFLOPs", "float KiB", "gzip KiB", "zeros", "accuracy %", "p50 ms here"],
                  [[label, f["params"], f["flops"] / 1e6, f["tflite_bytes"] / 1024, f["gzip_bytes"] / 1024,
                    f["zero_weights"], f["accuracy"], f["p50_ms"]] for label, f in rows], title=title)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Training data: .npz with inputs and 'labels'.")
@click.option("--val", type=click.Path(), help="Validation .npz with labels (default: last 20% of --data).")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Fraction of channels/weights removed.")
@click.option("--method", type=click.Choice(["structured", "magnitude"]), default="structured", show_default=True,
              help="structured: fewer filters, a smaller and faster model; magnitude: zeroed weights, compresses.")
@click.option("--epochs", type=int, default=5, show_default=True, help="Fine-tuning epochs.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--distill", is_flag=True, help="Fine-tune against the original's softened outputs too.")
@click.option("--out", "-o", type=click.Path(), help="Where to save the pruned model (.keras).")
@click.option("--json", "as_json", is_flag=True)
def prune(model, data, val, sparsity, method, epochs, lr, distill, out, as_json):
    """Prune MODEL (Keras 3) and fine-tune it; parameters, FLOPs, size, accuracy, latency before/after."""
    from edgekit.optimize.prune import prune as run_prune

    res = run_prune(model, data, sparsity=sparsity, method=method, epochs=epochs, lr=lr, val=val,
                    out=out or _beside(model, "pruned"), distill=distill, say=lambda t: click.echo(t, err=True))
    _record_beside(res, "prune")
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
        return
    click.echo(_before_after([("before", res["before"]), ("after", res["after"])],
                             f"{method} pruning, sparsity {sparsity}, {epochs} epoch(s) of fine-tuning"))
    r = res["ratios"]
    click.echo(f"params x{r['params']:.3f}, FLOPs x{r['flops']:.3f}, p50 x{r['p50']:.3f}, gzip x{r['gzip']:.3f}; "
               f"accuracy drop {res['accuracy_drop']:.2f} points; saved {res['saved']}")


@cli.command()
@click.option("--teacher", required=True, type=click.Path())
@click.option("--student", type=click.Path(), help="A student model file; or derive one with --width.")
@click.option("--width", type=float, help="Student = the teacher's architecture this many times as wide.")
@click.option("--data", required=True, type=click.Path(), help="Training data: .npz with inputs and 'labels'.")
@click.option("--val", type=click.Path())
@click.option("--temperature", type=float, default=4.0, show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Weight of the hard-label loss.")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--baseline", is_flag=True, help="Also train the same student without the teacher, to compare.")
@click.option("--out", "-o", type=click.Path(), help="Where to save the student (.keras).")
@click.option("--json", "as_json", is_flag=True)
def distill(teacher, student, width, data, val, temperature, alpha, epochs, lr, baseline, out, as_json):
    """Distill TEACHER into a smaller student; accuracy, size and latency of both."""
    from edgekit.optimize.distill import distill as run_distill

    res = run_distill(teacher, data, student_path=student, width=width, temperature=temperature, alpha=alpha,
                      epochs=epochs, lr=lr, val=val, out=out or _beside(teacher, "student"), baseline=baseline,
                      say=lambda t: click.echo(t, err=True))
    _record_beside(res, "distill")
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
        return
    click.echo(_before_after([("teacher", res["teacher"]), ("student", res["student"])],
                             f"distillation, T={temperature}, alpha={alpha}, {epochs} epoch(s)"))
    if baseline:
        click.echo(f"same student without the teacher: {res['student_without_teacher']['accuracy']:.2f}% "
                   f"(gain from the teacher {res['gain_from_teacher']:+.2f} points)")
    click.echo(f"saved {res['saved']}; convert it like any model: edgekit convert {res['saved']} -t ...")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Training data: .npz with inputs and 'labels'.")
@click.option("--val", type=click.Path(), help="Validation .npz with labels (default: last 20% of --data).")
@click.option("--target", "-t", "target_names", multiple=True, required=True,
              help="Target profile name or .toml path; repeat for several.")
@click.option("--format", "formats", multiple=True, type=click.Choice(["tflite", "onnx"]),
              help="Only these formats (default: every format the target lists).")
@click.option("--epochs", type=int, default=3, show_default=True, help="Fine-tuning epochs (0: calibrate only).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Start of a cosine decay to 0.")
@click.option("--calib-samples", type=int, default=256, show_default=True,
              help="Training samples the starting ranges are chosen on.")
@click.option("--fixed-ranges", is_flag=True, help="Train the weights only; keep the calibrated ranges.")
@click.option("--distill", is_flag=True, help="Match the original's outputs (KL) instead of the labels: for "
              "labels that are the float model's own predictions on data unlike its training set.")
@click.option("--max-accuracy-drop", type=float,
              help="Budget in points below the original float model's accuracy; a miss exits 1.")
@click.option("--compat-check", type=click.Choice(["auto", "venv", "emulated", "off", "accept-crash"]), default="auto",
              show_default=True, help="As for convert.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", default="build", show_default=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def qat(model, data, val, target_names, formats, epochs, lr, calib_samples, fixed_ranges, distill,
        max_accuracy_drop, compat_check, seed, out, as_json, quiet):
    """Quantization-aware training: fine-tune MODEL (Keras 3) with fake quantization, then convert it.

    For when post-training INT8 misses the budget and mixed precision would keep layers in float.
    Writes the trained model (OUT/<name>-qat.keras), a bundle per target, and a report comparing
    each bundle with the post-training INT8 of the original.
    """
    from pathlib import Path

    from edgekit.errors import BudgetMissed
    from edgekit.optimize.qat import qat as run_qat
    from edgekit.progress import Progress

    say = (lambda t: None) if quiet else (lambda t: click.echo(t, err=True))
    try:
        res = run_qat(model, data, list(target_names), out, val=val, epochs=epochs, lr=lr,
                      calib_samples=calib_samples, ranges_trainable=not fixed_ranges,
                      max_accuracy_drop=max_accuracy_drop, formats=list(formats) or None,
                      compat_check=compat_check, seed=seed, distill=distill, say=say,
                      progress=Progress(enabled=not quiet))
    except BudgetMissed:
        p = Path(out) / f"{Path(model).stem}-qat.qat.json"
        if p.is_file():
            res = json.loads(p.read_text())
            click.echo(json.dumps(res, indent=2) if as_json else _qat_table(res))
        raise
    click.echo(json.dumps(res, indent=2, default=str) if as_json else _qat_table(res))


def _qat_table(res) -> str:
    from pathlib import Path

    from edgekit.table import render

    rows = [[Path(b["bundle"]).name, b["format"], b["bytes"] / 1024,
             ", ".join(f"{k}×{v}" for k, v in sorted(b["float_ops"].items())) or "none",
             b["ptq_accuracy"], b["qat_accuracy"], b["ptq_drop"], b["qat_drop"],
             {None: "-", True: "ok", False: "MISSED"}[b["within_budget"]]] for b in res["bundles"]]
    text = render(["bundle", "format", "KiB", "float ops", "PTQ acc %", "QAT acc %", "PTQ drop", "QAT drop",
                   "budget"], rows,
                  title=f"QAT vs post-training INT8, against the float model's {res['float_accuracy']:.2f}% "
                        f"on {res['validation_samples']} validation samples")
    return text + (f"\nfake-quantized: {res['calibrated_accuracy']:.2f}% calibrated, {res['trained_accuracy']:.2f}% "
                   f"after {res['epochs']} epoch(s) ({res['seconds']:.1f} s); model {res['qat_model']}; "
                   f"report {res['report']}")


def _record_beside(res, kind):
    """The before/after record beside the saved model (<model>.<kind>.json), where `edgekit report`
    finds it when the model sits in the build directory."""
    from pathlib import Path

    from edgekit.bundle import write_json_atomic

    if res.get("saved"):
        p = Path(res["saved"]).with_suffix(f".{kind}.json")
        write_json_atomic(p, res)
        click.echo(f"record: {p}", err=True)


def _beside(model: str, what: str) -> str:
    from pathlib import Path

    p = Path(model)
    return str(p.with_name(f"{p.stem}-{what}.keras"))


# --- devices, deploy, status, rollback, profile ----------------------------------

_inventory_opt = click.option("--inventory", type=click.Path(), envvar="EDGEKIT_INVENTORY",
                              help="devices.toml (default: ./devices.toml, or $EDGEKIT_INVENTORY).")
_trust_opt = click.option("--trust-new-host", is_flag=True,
                          help="Accept and record an unknown host key (a changed key is always refused).")


def _select(inventory, device, group, all_devices):
    from edgekit.deploy.inventory import load_inventory

    inv = load_inventory(inventory)
    return inv, inv.select(device, group, all_devices)


def _options(inv, trust_new_host=False, keep=3, quiet=False):
    from edgekit.deploy.ops import Options
    from edgekit.progress import Progress

    ctx = click.get_current_context(silent=True)
    debug = bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("debug"))
    return Options(inv, trust_new_host=trust_new_host, keep=keep, progress=Progress(enabled=not quiet),
                   debug=debug)


def _finish(group, as_json, headers, row, title=""):
    """Print per-device results (table or JSON); exit 1 when any device failed."""
    from edgekit.table import render

    if as_json:
        click.echo(json.dumps([r.to_dict() for r in group.results], indent=2, default=str))
    else:
        click.echo(render(headers, [row(r) for r in group.results], title=title))
        for r in group.results:
            for w in r.warnings:
                click.echo(f"warning: {r.device}: {w}", err=True)
            if r.reason:
                click.echo(f"{r.device}: {r.reason}", err=True)
    if group.failed:
        raise click.exceptions.Exit(1)


@cli.group()
def device():
    """The devices in the inventory: add, list, info, setup; local and emulated devices."""


@device.command("add")
@click.argument("name")
@click.option("--host", required=True, help="Address, or a Host alias from ~/.ssh/config.")
@click.option("--port", type=int)
@click.option("--user")
@click.option("--key-file", type=click.Path())
@click.option("--target", help="The device's target profile (see `edgekit targets list`).")
@click.option("--root", default="~/.edgekit", show_default=True, help="Device directory for edgekit.")
@click.option("--python", "python_", default="python3", show_default=True, help="Python on the device.")
@click.option("--group", "groups", multiple=True, help="Group(s) for fleet commands.")
@click.option("--replace", is_flag=True, help="Overwrite a device of that name.")
@_inventory_opt
def device_add(name, host, port, user, key_file, target, root, python_, groups, replace, inventory):
    """Add a device to devices.toml (no passwords stored: keys or ssh-agent)."""
    from edgekit.deploy.inventory import Device, load_inventory
    from edgekit.targets import load_target

    if target:
        load_target(target)
    inv = load_inventory(inventory, must_exist=False)
    inv.add(Device(name=name, host=host, port=port, user=user, key_file=key_file, target=target,
                   root=root, python=python_, groups=tuple(groups)), replace_existing=replace)
    inv.save()
    click.echo(f"added {name} ({user + '@' if user else ''}{host}) to {inv.path}")


@device.command("list")
@_inventory_opt
@click.option("--json", "as_json", is_flag=True)
def device_list(inventory, as_json):
    """The devices in the inventory."""
    import dataclasses

    from edgekit.deploy.inventory import load_inventory
    from edgekit.table import render

    inv = load_inventory(inventory)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(d) for d in inv.devices.values()], indent=2))
        return
    click.echo(render(["device", "address", "target", "groups", "root", "python"],
                      [[d.name, d.address, d.target, ",".join(d.groups), d.root, d.python]
                       for d in inv.devices.values()]))


@device.group("local")
def device_local():
    """Devices on this machine (sshd in a network namespace; Linux, root): try deploy without a board."""


@device_local.command("up")
@click.argument("name", default="local")
@click.option("--target", help="The profile it stands in for (default: what `device info` suggests).")
@click.option("--python", "python_", help="Python for its runtime (default: this one).")
@click.option("--group", "groups", multiple=True)
@_inventory_opt
def device_local_up(name, target, python_, groups, inventory):
    """Start local device NAME and add it to the inventory (its host key to known_hosts)."""
    from edgekit.lab import local

    info = local.up(name, python_)
    inv, known = _add_started_device(inventory, name, info, target, groups, "local")
    click.echo(f"local device {name} is up at {info['host']} (root {info['root']}); "
               f"in {inv.path}, host key in {known}")


@device_local.command("down")
@click.argument("name", default="local")
@_inventory_opt
def device_local_down(name, inventory):
    """Stop local device NAME, remove its state and its inventory entry."""
    from edgekit.lab import local

    gone = local.down(name)
    _remove_started_device(inventory, name)
    click.echo(f"local device {name} {'removed' if gone else 'was not running'}")


@device_local.command("list")
def device_local_list():
    """Local devices on this machine."""
    from edgekit.lab import local
    from edgekit.table import render

    click.echo(render(["name", "address", "running", "python", "root"],
                      [[d["name"], d["address"], d["running"], d["python"], d["root"]]
                       for d in local.listing()]))


def _add_started_device(inventory, name, info, target, groups, default_group):
    """Add a device edgekit started here (local or emulated) to the inventory, its key to known_hosts."""
    from edgekit.deploy.inventory import Device, load_inventory

    inv = load_inventory(inventory, must_exist=False)
    known = _record_host_key(inv, info["host_key"])
    inv.add(Device(name=name, host=info["host"], user="root", key_file=info["key_file"], target=target,
                   root=info["root"], python=info["python"], groups=tuple(groups) or (default_group,)),
            replace_existing=True)
    inv.save()
    return inv, known


def _remove_started_device(inventory, name):
    from edgekit.deploy.inventory import load_inventory

    inv = load_inventory(inventory, must_exist=False)
    if name in inv.devices:
        inv.remove(name)
        inv.save()


def _record_host_key(inv, line):
    import os
    from pathlib import Path

    known = Path(os.path.expanduser(inv.known_hosts))
    known.parent.mkdir(parents=True, exist_ok=True)
    host = line.split(" ", 1)[0]
    lines = [ln for ln in (known.read_text().splitlines() if known.is_file() else []) if ln.split(" ", 1)[0] != host]
    known.write_text("\n".join(lines + [line]) + "\n")
    return known


@device.group("emulate")
def device_emulate():
    """An emulated arm64 Raspberry-Pi-OS-like device (Debian 12 arm64 under qemu; Linux, root)."""


@device_emulate.command("up")
@click.argument("name", default="emulated-pi")
@click.option("--target", default="rpi4", show_default=True, help="The profile it stands in for.")
@click.option("--group", "groups", multiple=True)
@_inventory_opt
def device_emulate_up(name, target, groups, inventory):
    """Build the arm64 root once (cached; minutes), start device NAME, add it to the inventory."""
    from edgekit.lab import emulated
    from edgekit.targets import load_target

    load_target(target)
    info = emulated.up(name, say=lambda t: click.echo(t, err=True))
    inv, known = _add_started_device(inventory, name, info, target, groups, "emulated")
    click.echo(f"emulated arm64 device {name} is up at {info['host']} (aarch64 under qemu; tflite-runtime "
               f"2.14, numpy<2); in {inv.path}, host key in {known}")


@device_emulate.command("down")
@click.argument("name", default="emulated-pi")
@_inventory_opt
def device_emulate_down(name, inventory):
    """Stop emulated device NAME and remove it from the inventory (the cached root stays)."""
    from edgekit.lab import emulated

    gone = emulated.down(name)
    _remove_started_device(inventory, name)
    click.echo(f"emulated device {name} {'removed' if gone else 'was not running'}")


@device_emulate.command("status")
@click.argument("name", default="emulated-pi")
@click.option("--json", "as_json", is_flag=True)
def device_emulate_status(name, as_json):
    """Whether the arm64 root is built (and how long it took), and whether NAME runs."""
    from edgekit.lab import emulated
    from edgekit.table import kv

    st = emulated.status(name)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    dev = st["device"] or {}
    click.echo(kv([("root built", st["root_built"]), ("root", st["root"]), ("recipe key", st["recipe_key"]),
                   ("build seconds", st["build_seconds"]), ("device", dev.get("name")),
                   ("address", dev.get("address")), ("running", dev.get("running"))]))


def _device_selection(f):
    f = click.option("--all", "all_devices", is_flag=True, help="Every device in the inventory.")(f)
    f = click.option("--group", "-g", help="A group of devices.")(f)
    return f


@device.command("info")
@click.argument("name", required=False)
@_device_selection
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
def device_info(name, group, all_devices, inventory, trust_new_host, as_json):
    """What a device is: arch, CPU, memory, OS, Python, backends; the profile that fits."""
    from edgekit.deploy import ops
    from edgekit.deploy.fleet import fan_out

    inv, devs = _select(inventory, name, group, all_devices)
    opts = _options(inv, trust_new_host)
    res = fan_out(devs, lambda d: ops.info(d, opts), debug=opts.debug)

    def row(r):
        f = r.data.get("facts", {})
        b = ", ".join(f"{k} {v.get('version')}" for k, v in f.get("backends", {}).items() if v.get("available"))
        return [r.device, f.get("arch"), f.get("cpu_model"), f.get("cores"), f.get("memory_mb"),
                f.get("os"), f.get("python"), b or "none", f.get("board") or f.get("l4t"),
                f.get("suggested_target"), r.status if not r.ok else "ok"]

    _finish(res, as_json, ["device", "arch", "cpu", "cores", "MB", "os", "python", "backends",
                           "board", "suggested", "result"], row)


@device.command("setup")
@click.argument("name", required=False)
@_device_selection
@_inventory_opt
@_trust_opt
@click.option("--parallel", type=int, default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def device_setup(name, group, all_devices, inventory, trust_new_host, parallel, as_json):
    """Push the edgekit runtime to the device(s) and check a backend is there."""
    from edgekit.deploy import ops
    from edgekit.deploy.fleet import fan_out

    inv, devs = _select(inventory, name, group, all_devices)
    opts = _options(inv, trust_new_host)
    res = fan_out(devs, lambda d: ops.setup(d, opts), parallel, debug=opts.debug)
    _finish(res, as_json, ["device", "runtime", "python", "backends", "result"],
            lambda r: [r.device, r.data.get("runtime"), r.data.get("python"),
                       ", ".join(f"{k} {v}" for k, v in (r.data.get("backends") or {}).items()),
                       r.status])


def _artifacts(path):
    """A bundle directory, or a convert output directory holding several bundles: each file hashed once."""
    from edgekit.deploy import artifact

    return artifact.load(path)


def _rollout_plan(canary, batches, batch_size, max_fail, timeout, offline, max_p50_ms, abort_rollback,
                  parallel, staged_default_fail):
    from edgekit.deploy.rollout import Plan, Share

    def pct(text, hint):
        try:
            v = float(str(text).rstrip("%"))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a percentage (e.g. 10%)", param_hint=hint) from None
        return v / 100

    return Plan(canary=Share.parse(canary, "--canary") if canary else None,
                stages=Share.parse_list(batches) if batches else (),
                batch_size=Share.parse(batch_size, "--batch-size") if batch_size else None,
                max_fail=pct(max_fail, "--max-fail") if max_fail is not None else staged_default_fail,
                offline=offline, abort_rollback=abort_rollback, timeout=timeout, parallel=parallel,
                max_p50_ms=max_p50_ms)


def _rollout_options(inv, plan, keep, trust_new_host=False, quiet=False):
    from edgekit.deploy.ops import Gate

    opts = _options(inv, trust_new_host, keep, quiet)
    if plan.timeout:
        opts.timeout = min(opts.timeout, plan.timeout)
        opts.command_timeout = plan.timeout
    if plan.max_p50_ms:
        opts.gate = Gate(plan.max_p50_ms, runs=plan.gate_runs)
    return opts


def _plan_table(plan, groups, labels):
    from edgekit.table import render

    return render(["batch", "devices", "names"], [[lab, len(g), ", ".join(g)] for lab, g in zip(labels, groups)],
                  title=f"rollout plan: max-fail {plan.max_fail * 100:g}% per batch, offline {plan.offline}, "
                        f"abort rolls back {plan.abort_rollback}"
                        + (f", p50 gate {plan.max_p50_ms:g} ms" if plan.max_p50_ms else ""))


def _rollout_rows(rec):
    return [[n, rec["batches"][d["batch"]]["label"], d["state"], d.get("bundle") or "-", (d.get("sha256") or "")[:12],
             (d.get("previous") or "-")[:12], (d.get("current") or "-")[:12],
             "-" if d.get("p50_ms") is None else f"{d['p50_ms']:.2f}", d.get("seconds")]
            for n, d in rec["devices"].items()]


_ROLLOUT_HEADERS = ["device", "batch", "result", "bundle", "release", "previous", "current", "p50 ms", "seconds"]


def _show_rollout(rec, as_json):
    from edgekit.deploy.rollout import summary
    from edgekit.table import render

    if as_json:
        click.echo(json.dumps(rec, indent=2, default=str))
    else:
        click.echo(render(["batch", "devices", "failed", "state", "started", "finished"],
                          [[b["label"], len(b["devices"]), b["failed"], b["state"], b["started"] or "-",
                            b["finished"] or "-"] for b in rec["batches"]], title=f"rollout {rec['id']}"))
        click.echo(render(_ROLLOUT_HEADERS, _rollout_rows(rec)))
        for n, d in rec["devices"].items():
            if d.get("reason"):
                click.echo(f"{n}: {d['reason']}", err=True)
    click.echo(summary(rec), err=True)


@cli.command()
@click.argument("bundle", type=click.Path(), required=False)
@click.option("--device", "-d", "device_name", help="One device from the inventory.")
@_device_selection
@click.option("--parallel", type=int, default=8, show_default=True, help="Devices at a time.")
@click.option("--keep", type=int, default=3, show_default=True, help="Releases kept per model.")
@click.option("--dry-run", is_flag=True, help="Print the plan and what would change on which device; touch nothing.")
@click.option("--canary", help="Staged rollout: first N devices (or P%) alone.")
@click.option("--batches", help="Then cumulative shares of the fleet, e.g. 10%,50%,100%.")
@click.option("--batch-size", help="Or batches of N devices (or P%) after the canary.")
@click.option("--max-fail", help="Abort when more than P% of a batch fails (staged default 0%).")
@click.option("--timeout", type=float, help="Seconds for any one step on a device (connect, upload, command).")
@click.option("--offline", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="An unreachable device fails (counts toward --max-fail) or is skipped (retried on --resume).")
@click.option("--max-p50-ms", type=float, help="Health gate: p50 latency measured on the device after the switch.")
@click.option("--abort-rollback", type=click.Choice(["batch", "all"]), default="batch", show_default=True,
              help="On abort, revert the failing batch, or every device this rollout switched.")
@click.option("--resume", "resume_id", help="Continue rollout ID after an abort or a crash of the controller.")
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def deploy(bundle, device_name, group, all_devices, parallel, keep, dry_run, canary, batches, batch_size, max_fail,
           timeout, offline, max_p50_ms, abort_rollback, resume_id, inventory, trust_new_host, as_json, quiet):
    """Deploy BUNDLE: upload, verify, switch atomically, health-check, roll back on failure.

    BUNDLE may also be a convert output directory: each device then gets the bundle built
    for its target profile, in a format a backend on the device runs. With --canary,
    --batches or --batch-size the devices are rolled out in stages, recorded so that
    --resume ID continues and `edgekit status --rollout ID` shows it."""
    from edgekit.deploy import ops
    from edgekit.deploy.fleet import fan_out
    from edgekit.deploy.rollout import Rollout

    if keep < 1:
        raise click.BadParameter("must be at least 1", param_hint="--keep")
    if resume_id:
        if bundle or device_name or group or all_devices:
            raise click.UsageError("--resume takes the bundle and devices from the rollout record; give neither")
        r = Rollout.resume(resume_id, lambda inv, plan, k: _rollout_options(inv, plan, k, trust_new_host,
                                                                               quiet or as_json))
        return _run_rollout(r, as_json, quiet)
    if not bundle:
        raise click.UsageError("give a BUNDLE (or --resume ID)")
    arts = _artifacts(bundle)
    inv, devs = _select(inventory, device_name, group, all_devices)
    staged = bool(canary or batches or batch_size or max_fail is not None)
    plan = _rollout_plan(canary, batches, batch_size, max_fail, timeout, offline, max_p50_ms, abort_rollback,
                         parallel, 0.0 if staged else 1.0)
    opts = _rollout_options(inv, plan, keep, trust_new_host, quiet or as_json)
    title = (f"deploy {arts[0].name}" + (f" ({arts[0].target}, {arts[0].format})" if len(arts) == 1
                                         else f" ({len(arts)} bundles)"))
    if dry_run:
        if staged and not as_json:
            groups = plan.batches([d.name for d in devs])
            click.echo(_plan_table(plan, groups, plan.labels(len(groups))))
        res = fan_out(devs, lambda d: ops.deploy(d, arts, opts, dry_run=True), parallel, debug=opts.debug)
        _finish(res, as_json, ["device", "result", "bundle", "release", "previous", "sent KiB", "backend",
                               "seconds"], _deploy_row, title="dry run: " + title)
        return
    if not staged:  # all at once, no record: one table row per device
        res = fan_out(devs, lambda d: ops.deploy(d, arts, opts), parallel, debug=opts.debug)
        for x in res.results:
            if x.offline and offline == "skip":
                x.status = "skipped-offline"
        _finish(res, as_json, ["device", "result", "bundle", "release", "previous", "sent KiB", "backend",
                               "seconds"], _deploy_row, title=title)
        return
    r = Rollout.create(plan, arts, devs, opts, inv.path, bundle)
    if not (quiet or as_json):
        click.echo(f"rollout {r.id}: {len(r.record['batches'])} batches; "
                   f"`edgekit deploy --resume {r.id}` continues it after an abort or a crash", err=True)
    _run_rollout(r, as_json)


def _deploy_row(r):
    return [r.device, r.status, r.data.get("bundle", "-"), (r.data.get("sha256") or "")[:12],
            (r.data.get("previous") or "-")[:12], r.data.get("bytes_sent", 0) / 1024, r.data.get("backend"),
            r.seconds]


def _run_rollout(r, as_json, quiet=False):
    say = r.opts.progress.say

    def event(kind, info):
        if kind == "batch":
            say(f"{info['batch']}: {len(info['devices'])} device(s): {', '.join(info['devices'])}")
        elif kind == "device":
            say(f"  {info['device']}: {info['state']}" + (f" ({info['reason']})" if info.get("reason") else ""))
        elif kind == "abort":
            reverting = ", ".join(info["reverting"]) or "none"
            say(f"abort at {info['batch']}: {info['failed']} failed; reverting {reverting}")

    r.on_event = event
    rec = r.run()
    _show_rollout(rec, as_json)
    if rec["state"] != "done":
        raise click.exceptions.Exit(1)


@cli.command()
@click.option("--device", "-d", "device_name", help="One device from the inventory.")
@_device_selection
@click.option("--model", help="Only this model.")
@click.option("--no-health", is_flag=True, help="Skip the golden health check of current releases.")
@click.option("--rollout", "rollout_id", help="Show rollout ID's record (plan, batches, devices) instead.")
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
def status(device_name, group, all_devices, model, no_health, rollout_id, inventory, trust_new_host, as_json):
    """Per device and model: current release, older ones, health (or a rollout's record)."""
    from edgekit.deploy import ops
    from edgekit.deploy.fleet import fan_out

    if rollout_id:
        from edgekit.deploy.rollout import read_record

        return _show_rollout(read_record(rollout_id), as_json)
    if not (device_name or group or all_devices):
        all_devices = True
    inv, devs = _select(inventory, device_name, group, all_devices)
    opts = _options(inv, trust_new_host)
    res = fan_out(devs, lambda d: ops.status(d, opts, model, health=not no_health), debug=opts.debug)
    if as_json:
        _finish(res, True, [], None)
        return
    from edgekit.table import render

    rows = []
    for r in res.results:
        if not r.data.get("models"):
            rows.append([r.device, "-", "-", "-", "-", r.reason or r.status])
        for name, m in (r.data.get("models") or {}).items():
            h = m.get("health") or {}
            older = [x["sha256"][:12] for x in m["releases"] if x["sha256"] != m.get("current")]
            rows.append([r.device, name, (m.get("current") or "-")[:12], ", ".join(older) or "-",
                         "ok" if h.get("ok") else ("-" if not h else "FAILED"),
                         h.get("backend", "")])
    click.echo(render(["device", "model", "current", "older releases", "health", "backend"], rows))
    for r in res.failed:
        click.echo(f"{r.device}: {r.reason}", err=True)
    if res.failed:
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("device_name")
@click.argument("model")
@click.option("--to", "to", help="A release sha256 (or a unique prefix) instead of the previous one.")
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
def rollback(device_name, model, to, inventory, trust_new_host, as_json):
    """Switch MODEL on DEVICE back to its previous release (or --to SHA)."""
    from edgekit.deploy import ops
    from edgekit.deploy.fleet import fan_out

    inv, devs = _select(inventory, device_name, None, False)
    opts = _options(inv, trust_new_host)
    res = fan_out(devs, lambda d: ops.rollback(d, model, opts, to), debug=opts.debug)
    _finish(res, as_json, ["device", "model", "was", "now", "health", "result"],
            lambda r: [r.device, model, (r.data.get("previous") or "-")[:12], (r.data.get("current") or "-")[:12],
                       "ok" if (r.data.get("health") or {}).get("ok") else "FAILED",
                       r.status if r.ok else r.reason or r.status])


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", "-d", "device_name", help="One device from the inventory.")
@_device_selection
@click.option("--runs", type=int, default=200, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--threads", type=int, help="Override the profile's thread count.")
@click.option("--parallel", type=int, default=1, show_default=True,
              help="Devices profiled at a time (1: no device disturbs another's figures).")
@click.option("--save-dir", default="profiles", show_default=True, type=click.Path(),
              help="Where the JSON reports are saved (<dir>/<device>/...).")
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
@click.option("--report", "html_report", is_flag=True,
              help="Also write the HTML report of the bundle's build directory with these profiles.")
def profile(bundle, device_name, group, all_devices, runs, warmup, threads, parallel, save_dir, inventory,
            trust_new_host, as_json, html_report):
    """Measure BUNDLE on the device(s) with the latency method; table, JSON saved under profiles/."""
    from edgekit.deploy import ops
    from edgekit.deploy.fleet import fan_out
    from edgekit.runtime.report import bench_table

    from edgekit.bundle import read_bundle
    from edgekit.deploy.artifact import prepare

    b = prepare(read_bundle(bundle, verify=False))
    inv, devs = _select(inventory, device_name, group, all_devices)
    opts = _options(inv, trust_new_host, quiet=as_json)
    res = fan_out(devs, lambda d: ops.profile(d, b, opts, runs, warmup, save_dir, threads), parallel,
                  debug=opts.debug)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in res.results], indent=2, default=str))
    else:
        reps = [r.data["report"] for r in res.succeeded]
        if reps:
            click.echo(bench_table(reps, label="device"))
        for r in res.results:
            for w in r.warnings:
                click.echo(f"warning: {r.device}: {w}", err=True)
            if r.data.get("saved"):
                click.echo(f"{r.device}: saved {r.data['saved']}")
        for r in res.failed:
            click.echo(f"{r.device}: {r.reason}", err=True)
    if html_report:
        from pathlib import Path

        _html_report(Path(bundle).resolve().parent, [save_dir], err=as_json)
    if res.failed:
        raise click.exceptions.Exit(1)


# --- serve ---------------------------------------------------------------------

@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; beyond loopback it needs --token or --insecure.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--token", help="Require 'Authorization: Bearer TOKEN' (or $EDGEKIT_SERVE_TOKEN, --token-file).")
@click.option("--token-file", type=click.Path(), help="Read the token from this file.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--tls-cert", type=click.Path())
@click.option("--tls-key", type=click.Path())
@click.option("--max-concurrency", type=int, default=1, show_default=True, help="Inferences running at once.")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Requests waiting; beyond it 503.")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Dynamic batching up to N samples.")
@click.option("--max-delay-ms", type=float, default=2.0, show_default=True, help="Wait this long to fill a batch.")
@click.option("--inline-ms", type=float, default=2.0, show_default=True,
              help="Run inferences shorter than this on the server's loop thread (0: never).")
@click.option("--max-body-mb", type=float, default=64.0, show_default=True, help="Request body limit.")
@click.option("--threads", type=int, help="Backend threads (default: the target profile's).")
@click.option("--backend", help="litert, tflite-runtime, tensorflow, onnxruntime")
@click.option("--poll-interval", type=float, default=1.0, show_default=True,
              help="Seconds between checks of a deployed model's `current`.")
@click.option("--no-check", is_flag=True, help="Skip the golden check when a release is loaded.")
@click.option("--pid-file", type=click.Path(), help="Write the server's pid here (for --stop).")
@click.option("--stop", is_flag=True,
              help="Stop the server started with --pid-file (default ~/.edgekit/serve/serve.pid), then exit.")
@click.option("--status", "show_status", is_flag=True,
              help="The state of the server started with --pid-file (default ~/.edgekit/serve/serve.pid), JSON.")
@click.option("--access-log", is_flag=True)
def serve(paths, stop, show_status, **opts):
    """Serve bundles over KServe's Open Inference Protocol v2 (HTTP/REST, binary tensors).

    PATHS: bundle directories, .tflite/.onnx files, or a device root (~/.edgekit: every deployed
    model, following its `current` release with a golden-checked hot swap)."""
    import argparse

    from edgekit.serve.__main__ import config_from, setup_logging
    from edgekit.serve.server import serve as run_server, stop as stop_server

    if show_status or stop:
        import os

        from edgekit.serve.pidfile import DEFAULT_PID_FILE, state

        pid_file = opts["pid_file"] or os.path.expanduser(DEFAULT_PID_FILE)
        if show_status:
            click.echo(json.dumps(state(pid_file)))
        else:
            click.echo(f"stopped the server (pid {stop_server(pid_file)})")
        return
    if not paths:
        raise click.UsageError("give at least one bundle directory, model file or device root to serve")
    opts["no_check"] = opts.get("no_check", False)
    config = config_from(argparse.Namespace(**opts))
    setup_logging()
    run_server(list(paths), config, say=lambda t: click.echo(t, err=True))


# --- report --------------------------------------------------------------------

@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--profiles", multiple=True, type=click.Path(),
              help="Directory (or JSON file) of latency reports: `edgekit profile --save-dir`, `edgekit bench "
                   "--out`; repeat for several. BUILD_DIR itself is always searched.")
@click.option("--rollouts", multiple=True, type=click.Path(),
              help="Directory of staged rollouts' records (default: this build's, from edgekit deploy's own).")
@click.option("--out", "-o", type=click.Path(), help="The HTML file (default: BUILD_DIR/report.html).")
def report(build_dir, profiles, rollouts, out):
    """One self-contained HTML page (inline SVG charts, no network) of what BUILD_DIR's conversion and
    the measurements of its bundles found: sizes, fidelity, latency here and on devices, per-layer
    sensitivity, compatibility, conditions."""
    from edgekit.report import write_report

    click.echo(str(write_report(build_dir, profiles, out, list(rollouts) or None)))


def _html_report(build_dir, profiles=(), err=False):
    from edgekit.report import write_report

    click.echo(f"html report: {write_report(build_dir, profiles)}", err=err)



@cli.group()
def export():
    """Hand a deploy to another tool: `export ansible`."""


@export.command("ansible")
@click.option("--group", "-g", required=True, help="The inventory group to deploy to.")
@click.option("--bundle", "bundle", required=True, type=click.Path(), help="A bundle, or a convert output directory.")
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory to write (inventory, playbook, role).")
@click.option("--canary", help="First N devices (or P%) alone (serial).")
@click.option("--batches", help="Then cumulative shares of the group, e.g. 10%,50%,100%.")
@click.option("--batch-size", help="Or batches of N devices (or P%).")
@click.option("--max-fail", help="max_fail_percentage per batch (staged default 0%).")
@click.option("--max-p50-ms", type=float, help="Health gate: p50 measured on the device after the switch.")
@click.option("--forks", type=int, default=50, show_default=True, help="Ansible forks (hosts at a time).")
@click.option("--keep", type=int, default=3, show_default=True, help="Releases kept per model.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_inventory_opt
@click.option("--json", "as_json", is_flag=True)
def export_ansible(group, bundle, out, canary, batches, batch_size, max_fail, max_p50_ms, forks, keep, force,
                   inventory, as_json):
    """Write an Ansible inventory (a group per target profile), playbook and role that do what
    `edgekit deploy` does, by calling the same device-side release code (`--check`: a dry run)."""
    from edgekit.deploy import ansible
    from edgekit.table import kv

    arts = _artifacts(bundle)
    inv, devs = _select(inventory, None, group, False)
    staged = bool(canary or batches or batch_size or max_fail is not None)
    plan = _rollout_plan(canary, batches, batch_size, max_fail, None, "fail", max_p50_ms, "batch", forks,
                         0.0 if staged else 1.0)
    res = ansible.export(inv, devs, arts, plan, out, group, keep=keep, force=force)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(kv([("directory", res["dir"]), ("hosts", res["hosts"]), ("serial", res["serial"]),
                   ("max_fail_percentage", res["max_fail_percentage"]),
                   ("targets", ", ".join(f"{k} ({v})" for k, v in res["targets"].items())),
                   ("bundles", ", ".join(res["bundles"])), ("run", ansible.run_hint(res["dir"])),
                   ("dry run", ansible.run_hint(res["dir"], check=True))]))

# `edgekit deploy --serve/--no-serve` and the serving state in `edgekit status`: added to those
# commands here (their options and a step after them), so the deploy code itself stays as it is.

def _bundle_model_name(path) -> Optional[str]:
    from pathlib import Path

    from edgekit.bundle import is_bundle, read_bundle

    p = Path(path)
    if is_bundle(p):
        return read_bundle(p, verify=False).name
    found = sorted(q for q in p.iterdir() if q.is_dir() and is_bundle(q)) if p.is_dir() else []
    return read_bundle(found[0], verify=False).name if found else None


def _serving_step(kw, enable, sopts):
    """After a deploy: serve its model on each device (gate: ready + a golden inference through
    the API; a failure puts `current` back) or, with --no-serve, stop the server."""
    from edgekit.deploy import serving
    from edgekit.deploy.fleet import DeviceResult, fan_out
    from edgekit.errors import DeviceError

    inv, devs = _select(kw["inventory"], kw["device_name"], kw["group"], kw["all_devices"])
    opts = _options(inv, kw["trust_new_host"], quiet=True)
    model = _bundle_model_name(kw["bundle"])

    def one(d):
        with opts.connect(d) as c:
            root = c.path(d.root).rstrip("/")
            if not enable:
                pid = serving.stop(c, root)["stopped"]
                return DeviceResult(d.name, "ok", data={"serving": f"stopped (pid {pid})" if pid else "not running"})
            cur, prev = serving.releases_of(c, root, model)
            if cur is None:
                return DeviceResult(d.name, "failed", reason=f"model {model} has no current release to serve")
            try:
                return DeviceResult(d.name, "ok", data=serving.ensure(c, root, sopts, model, cur))
            except DeviceError as e:
                serving.roll_back(c, root, model, prev)
                again = ""
                if prev:
                    try:
                        serving.ensure(c, root, sopts, model, prev)
                    except DeviceError as e2:
                        again = f"; the previous release does not serve either: {e2}"
                return DeviceResult(d.name, "rolled-back", data={"serving": "FAILED", "version": cur[:12]},
                                    reason=f"{e}; current is back at {(prev or 'none')[:12]}{again}")

    return fan_out(devs, one, kw.get("parallel") or 8)


def _add_serving(deploy_cmd, status_cmd):
    import functools

    deploy_cmd.params += [
        click.Option(["--serve/--no-serve"], default=None,
                     help="After deploying, run the inference API on the device (started or hot-swapped, "
                          "gated on ready + a golden inference through it; a failure rolls back) / stop it."),
        click.Option(["--serve-port"], type=int, default=8000, show_default=True),
        click.Option(["--serve-host"], default="127.0.0.1", show_default=True,
                     help="Beyond loopback the server needs --serve-token-file."),
        click.Option(["--serve-token-file"], help="A file ON THE DEVICE holding the bearer token.")]
    deploy_inner, status_inner = deploy_cmd.callback, status_cmd.callback

    @functools.wraps(deploy_inner)
    def deploy_then_serve(*a, serve=None, serve_port=8000, serve_host="127.0.0.1", serve_token_file=None, **kw):
        if serve is None or kw.get("dry_run") or not kw.get("bundle"):
            return deploy_inner(*a, **kw)
        from edgekit.deploy.serving import ServeOptions

        sopts = ServeOptions(port=serve_port, host=serve_host, token_file=serve_token_file)
        code = 0
        try:
            deploy_inner(*a, **kw)
        except click.exceptions.Exit as e:
            code = e.exit_code
        res = _serving_step(kw, serve, sopts)
        if kw.get("as_json"):
            click.echo(json.dumps({"serving": [r.to_dict() for r in res.results]}, indent=2, default=str))
        else:
            _finish_serving(res)
        if code or res.failed:
            raise click.exceptions.Exit(code or 1)

    @functools.wraps(status_inner)
    def status_and_serving(*a, **kw):
        code = 0
        try:
            status_inner(*a, **kw)
        except click.exceptions.Exit as e:
            code = e.exit_code
        if not kw.get("as_json") and not kw.get("rollout_id"):
            from edgekit.deploy import serving
            from edgekit.deploy.fleet import DeviceResult, fan_out

            inv, devs = _select(kw["inventory"], kw["device_name"], kw["group"],
                                kw["all_devices"] or not (kw["device_name"] or kw["group"]))
            opts = _options(inv, kw["trust_new_host"], quiet=True)

            def one(d):
                with opts.connect(d) as c:
                    st = serving.state(c, c.path(d.root).rstrip("/"))
                return DeviceResult(d.name, "ok", data={
                    "serving": "yes" if st["running"] else "no", "url": st.get("url") if st["running"] else None,
                    "pid": st.get("pid") if st["running"] else None})

            _finish_serving(fan_out(devs, one, 8))
        if code:
            raise click.exceptions.Exit(code)

    deploy_cmd.callback, status_cmd.callback = deploy_then_serve, status_and_serving


def _finish_serving(res):
    from edgekit.table import render

    click.echo(render(["device", "serving", "address", "version", "pid", "reason"],
                      [[r.device, r.data.get("serving", r.status), r.data.get("url") or "-",
                        r.data.get("version") or "-", r.data.get("pid") or "-", r.reason or ""]
                       for r in res.results], title="edgekit serve"))


_add_serving(deploy, status)


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="edgekit", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
