"""Making models fit: `edgekit prune`, `distill`, `qat`."""

from __future__ import annotations

import json

import click

from edgekit.cli import cli
from edgekit.cli.render import distill_text, prune_text, qat_table


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
    click.echo(prune_text(res, method, sparsity, epochs))


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
    click.echo(distill_text(res, temperature, alpha, epochs, baseline))


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
            click.echo(json.dumps(res, indent=2) if as_json else qat_table(res))
        raise
    click.echo(json.dumps(res, indent=2, default=str) if as_json else qat_table(res))


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
