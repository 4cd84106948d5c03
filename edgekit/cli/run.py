"""`edgekit run` and `edgekit bench`: a model here, once or timed."""

from __future__ import annotations

import json

import click

from edgekit.cli import cli


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
