"""`edgekit convert`: options -> ConvertRecipe -> convert(); --recipe rebuilds from a manifest."""

from __future__ import annotations

import json

import click

from edgekit.cli.group import cli
from edgekit.cli.common import _device_timer, _html_report, _inventory_opt, _trust_opt


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
              help="NAME=1x3x224x224: fix the dimensions a source leaves dynamic "
                   "(default: the calibration data's sample shape, batch 1).")
@click.option("--out", "-o", default="build", show_default=True, type=click.Path())
@click.option("--name", help="Bundle name (default: the model file's stem).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["tflite", "onnx"]),
              help="Only these formats (default: every format the target lists).")
@click.option("--precision", type=click.Choice(["int8", "int16x8", "fp16", "dynamic", "int4", "fp32"]), default="int8",
              show_default=True, help="int16x8: 16-bit activations, 8-bit weights; fp16: GPU targets; dynamic: "
              "INT8 weights, activations quantized at run time (transformers on CPUs). Language models (a Hugging "
              "Face folder): int4, int8, fp16 (GPU), fp32; default: the profile's [llm] precision.")
@click.option("--min-snr", type=float, default=20.0, show_default=True,
              help="Fidelity floor: output SNR against the float model, dB.")
@click.option("--min-agreement", type=float, default=0.90, show_default=True,
              help="Fidelity floor: top-1 agreement with the float model (a fraction, 0..1).")
@click.option("--max-accuracy-drop", type=float,
              help="Also a floor: accuracy points lost (with labels; else points of top-1 agreement).")
@click.option("--max-ppl-increase", type=float, help="Language models: fidelity floor, perplexity increase over "
              "float as a fraction (default 0.10 = +10%, INT8 0.01); --min-agreement is teacher-forced top-1 (default "
              "0.80, INT8 0.90).")
@click.option("--max-kl", type=float, help="Language models: fidelity floor, mean KL divergence of the next-token "
              "distributions from float's, nats (default 0.10, INT8 0.01).")
@click.option("--max-mb", type=float, help="Language models: the bundle's model size at most this many MB (10^6 "
              "bytes); an INT4 build then fills it with the decoder MatMuls measured most sensitive at INT8 (the best "
              "fidelity that fits, not the smallest build meeting the floor); its builds store their scales fp16 (the "
              "smallest file; 6-14% more memory on the device than the default fp32).")
@click.option("--algo", type=click.Choice(["k_quant", "rtn", "default", "awq", "gptq", "awq_gptq"]),
              help="Language models: the INT4 weights' rounding (default: the profile's, k_quant). awq / gptq / "
              "awq_gptq calibrate on the float model's own text (minutes for a 135M model); INT4 only (refused with "
              "--precision int8, fp16 or fp32).")
@click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]),
              help="Language models: the quantized weights' block (weights sharing one scale; default: the "
              "profile's, 32), INT4's and an INT8 row's (whose int8 activations go per block too); refused at fp16 / "
              "fp32. Larger blocks are smaller and decode faster on x86 (MLAS pays per block) at some fidelity "
              "(docs/llm.md, 'Larger blocks'); below the floor the ladder puts MatMuls at INT8 as at any block.")
@click.option("--val-tokens", type=int, default=1024, show_default=True,
              help="Language models: at most this many tokens of the --val text are measured.")
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
                   "fastest as OUT/<name>-<target>, the others beside it. A language model: build the candidate "
                   "recipes (INT4 block sizes and accuracy levels, INT8), time the decode speed of those meeting "
                   "the floor, and write only the fastest, as OUT/<name>-<target>-<precision>: it may be INT8 "
                   "even where int4 was asked (the candidates and their figures are in its manifest and the table).")
@click.option("--device", "device_name", help="With --select fastest: time the candidates of this device's target "
              "on the device itself (over SSH, as edgekit profile) instead of here.")
@_inventory_opt
@_trust_opt
@click.option("--compat-check", type=click.Choice(["auto", "venv", "emulated", "off", "accept-crash"]),
              default="auto", show_default=True, help="Check each artifact in the oldest runtime its target runs "
              "(runtime.min_runtime): emulated arm64 root when built, else a cached venv. accept-crash: as auto, "
              "but write an artifact whose crash under emulation cannot be attributed (recorded in the manifest). "
              "Language models for arm64 CPU targets: their golden check by onnxruntime-genai on ARM's kernels in "
              "the emulated root (auto: where python -m edgekit.lab.emulated build --llm built it; emulated: "
              "built on first use); venv and off record them unchecked; accept-crash is refused.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--report", "html_report", is_flag=True, help="Also write OUT/report.html (edgekit report OUT).")
@click.pass_context
def convert(ctx, model, target_names, recipe_path, calib, calib_random, calib_samples, preprocess, val,
            input_shapes, out, name, formats, precision, min_snr, min_agreement, max_accuracy_drop, max_ppl_increase,
            max_kl, max_mb, algo, block_size, val_tokens, no_rescue, no_mixed_precision, search_budget, search_first,
            select, device_name, inventory, trust_new_host, compat_check, as_json, quiet, html_report):
    """Convert MODEL (.keras, .h5, SavedModel dir, .onnx) into a validated INT8 bundle per target.

    Every artifact must meet the fidelity floor (--min-snr, --min-agreement, --max-accuracy-drop);
    below it convert walks a rescue ladder, and an artifact that still misses is not written
    (its row says FAILED and why; the others are written; exit status 1)."""
    from edgekit.cli import llm_convert

    snapshot = llm_convert.hub_snapshot(model)   # a hub cache repository folder: its refs/main snapshot
    if snapshot != model:
        if not quiet:
            click.echo(f"{model}: a Hugging Face cache repository; converting its snapshot {snapshot}", err=True)
        model = ctx.params["model"] = snapshot
    if llm_convert.is_language_model(model):   # a Hugging Face causal LM folder: the LLM bundle path
        return llm_convert.convert_language_model(ctx, ctx.params)
    llm_convert.refuse_broken_hf_folder(model)   # a config.json that makes it neither: said before anything else
    llm_convert.refuse_llm_recipe(recipe_path)   # a language model's bundle: not an image recipe's field complaint
    llm_convert.refuse_llm_precision(model, precision)
    llm_convert.refuse_llm_options(ctx, model)
    from edgekit.convert import convert as run_convert
    from edgekit.errors import BudgetMissed
    from edgekit.progress import Progress

    recipe = _recipe(ctx, model, target_names, recipe_path)
    progress = Progress(enabled=not quiet)
    timer = _device_timer(recipe, device_name, inventory, trust_new_host, quiet) if device_name else None
    try:
        result = run_convert(recipe, out, progress=progress, device=timer)
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
                      first=pick("search_first", se.first if se else False), rungs=se.rungs if se else ()),
        compat_check=pick("compat_check", base.compat_check if base else "auto"),
        select=pick("select", base.select if base else "profile"),
        input_shapes=shapes,
    )
