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

@cli.command()
@click.argument("model", type=click.Path())
@click.option("--target", "-t", "target_names", multiple=True, required=True,
              help="Target profile name or .toml path; repeat for several.")
@click.option("--calib", type=click.Path(), help=".npy, .npz (keyed by input name) or image folder.")
@click.option("--calib-random", is_flag=True,
              help="Calibrate on random data (smoke tests only: accuracy figures mean nothing).")
@click.option("--calib-samples", type=int, default=200, show_default=True)
@click.option("--preprocess", help="For an image folder: resize=HxW,scale=1/255,mean=..,std=..,layout=nhwc.")
@click.option("--val", type=click.Path(), help="Validation data (.npz with 'labels' for accuracy). "
              "Default: the last 20% of the calibration data, held out.")
@click.option("--out", "-o", default="build", show_default=True, type=click.Path())
@click.option("--name", help="Bundle name (default: the model file's stem).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["tflite", "onnx"]),
              help="Only these formats (default: every format the target lists).")
@click.option("--max-accuracy-drop", type=float,
              help="Budget in points (accuracy with labels, else top-1 agreement); a miss exits 1.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def convert(model, target_names, calib, calib_random, calib_samples, preprocess, val, out, name,
            formats, max_accuracy_drop, as_json, quiet):
    """Convert MODEL (.keras, .h5, SavedModel dir, .onnx) into an INT8 bundle per target."""
    from edgekit.convert import convert as run_convert
    from edgekit.errors import BudgetMissed
    from edgekit.progress import Progress

    progress = Progress(enabled=not quiet)
    try:
        result = run_convert(model, target_names, out, calib=calib, val=val, preprocess=preprocess,
                             calib_samples=calib_samples, random_calibration=calib_random,
                             max_accuracy_drop=max_accuracy_drop, name=name,
                             formats=list(formats) or None, progress=progress)
    except BudgetMissed:
        _print_report(out, name or _stem(model), as_json)
        raise
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        click.echo(result.table())
        click.echo(f"report: {result.report_path}")


def _stem(model: str) -> str:
    from pathlib import Path

    return Path(model).stem or Path(model).name


def _print_report(out: str, name: str, as_json: bool) -> None:
    from pathlib import Path

    p = Path(out) / f"{name}.convert.json"
    if p.is_file():
        data = json.loads(p.read_text())
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            from edgekit.table import render

            click.echo(render(["bundle", "format", "top-1 agree %", "acc drop", "budget"],
                              [[Path(b["path"]).name, b["format"], b["validation"]["top1_agreement"],
                                b["validation"]["accuracy_drop"],
                                {None: "-", True: "ok", False: "MISSED"}[b["within_budget"]]]
                               for b in data["bundles"]]))


# --- run / bench ---------------------------------------------------------------

_backend_opt = click.option("--backend", type=click.Choice(
    ["litert", "tflite-runtime", "tensorflow", "onnxruntime"]), help="Force a backend.")


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


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="edgekit", standalone_mode=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
