"""Making models fit: `edgekit prune`, `distill`, `factorize`, `qat`."""

from __future__ import annotations

import json

import click

from edgekit.cli.group import cli
from edgekit.cli.render import distill_lm_text, distill_text, factorize_text, prune_text, qat_table


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
@click.option("--teacher", required=True, type=click.Path(),
              help="A Keras model file, or a causal LM's Hugging Face folder.")
@click.option("--student", type=click.Path(),
              help="A student model file / folder; or derive one with --width / --layers.")
@click.option("--width", type=float, help="Student = the teacher's architecture this many times as wide "
              "(LM: its MLPs, keeping the most active units).")
@click.option("--layers", type=int, help="LM: student = this many of the teacher's decoder layers.")
@click.option("--layer-pick", type=click.Choice(["spread", "first"]), default="spread", show_default=True,
              help="LM: which layers --layers keeps: spread evenly from the first to the last, or the first N.")
@click.option("--init", "init", type=click.Choice(["teacher", "random"]), default="teacher", show_default=True,
              help="LM: a derived student starts from the teacher's weights, or from scratch.")
@click.option("--data", required=True, type=click.Path(),
              help="Training data: .npz with inputs and 'labels' (Keras); .txt/.jsonl file or directory (LM).")
@click.option("--val", type=click.Path(), help="Validation data (default: held out from --data).")
@click.option("--prompts", type=click.Path(), help="LM: prompts (.txt/.jsonl); the student also learns the "
              "teacher's greedy answers to them.")
@click.option("--temperature", type=float, help="Softening temperature [Keras 4, LM 1].")
@click.option("--alpha", type=float, help="Weight of the hard-label / text loss [0.5].")
@click.option("--divergence", type=click.Choice(["forward", "reverse", "jsd"]), default="forward", show_default=True,
              help="LM: KL(teacher||student), KL(student||teacher) or their Jensen-Shannon.")
@click.option("--on-policy", type=float, default=0.0, show_default=True,
              help="LM: fraction of steps trained on the student's own samples, scored by the teacher (GKD).")
@click.option("--epochs", type=int, help="Training epochs [Keras 20, LM 1].")
@click.option("--max-steps", type=int, help="LM: stop after this many steps.")
@click.option("--lr", type=float, help="Learning rate [Keras 1e-3, LM 3e-4].")
@click.option("--seq-len", type=int, default=128, show_default=True, help="LM: tokens per training block.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="LM: blocks per step.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="LM: length of teacher answers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", help="LM: torch device (default: cuda when present, else cpu).")
@click.option("--resume", is_flag=True, help="LM: continue from the checkpoint beside --out.")
@click.option("--save-every", type=int, default=200, show_default=True, help="LM: steps between checkpoints.")
@click.option("--int4-target", help="LM: convert teacher and student to INT4 for this target and measure "
              "their decode speed here.")
@click.option("--baseline", is_flag=True, help="Also train the same student without the teacher, to compare.")
@click.option("--out", "-o", type=click.Path(), help="Where to save the student (.keras, or a folder for an LM).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def distill(teacher, student, width, layers, layer_pick, init, data, val, prompts, temperature, alpha, divergence,
            on_policy, epochs, max_steps, lr, seq_len, batch_size, max_new_tokens, seed, device, resume, save_every,
            int4_target, baseline, out, as_json, quiet):
    """Distill TEACHER into a smaller student; accuracy (or perplexity), size and latency of both.

    A Keras teacher: KL to its softened outputs + cross-entropy on labels. A causal LM (Hugging Face
    folder): forward/reverse KL on softened next-token distributions + cross-entropy on the text,
    optionally on the student's own samples (--on-policy) and on the teacher's answers (--prompts);
    the student is a Hugging Face folder that `edgekit convert` takes.
    """
    from edgekit.optimize.lm import is_hf_folder

    say = (lambda t: None) if quiet else (lambda t: click.echo(t, err=True))
    if is_hf_folder(teacher):
        from edgekit.optimize.distill_lm import LMDistillConfig, distill_lm
        from edgekit.progress import Progress

        cfg = LMDistillConfig(teacher=teacher, data=data, student=student, layers=layers, width=width,
                              layer_pick=layer_pick, init=init, val=val, prompts=prompts,
                              temperature=1.0 if temperature is None else temperature,
                              alpha=0.5 if alpha is None else alpha, divergence=divergence, on_policy=on_policy,
                              epochs=1 if epochs is None else epochs, max_steps=max_steps,
                              batch_size=batch_size, seq_len=seq_len, lr=3e-4 if lr is None else lr,
                              max_new_tokens=max_new_tokens, seed=seed, baseline=baseline, device=device,
                              save_every=save_every)
        res = distill_lm(cfg, out or _beside_dir(teacher, "student"), resume=resume, say=say,
                         progress=Progress(enabled=not quiet), int4_target=int4_target)
        _record_beside(res, "distill")
        click.echo(json.dumps(res, indent=2, default=str) if as_json else distill_lm_text(res))
        return
    if layers is not None or prompts or on_policy or resume or int4_target:
        raise click.UsageError("--layers, --prompts, --on-policy, --resume and --int4-target are for language "
                               "models: give the teacher as a Hugging Face folder (a directory with config.json)")
    from edgekit.optimize.distill import distill as run_distill

    temperature = 4.0 if temperature is None else temperature
    alpha = 0.5 if alpha is None else alpha
    epochs = 20 if epochs is None else epochs
    res = run_distill(teacher, data, student_path=student, width=width, temperature=temperature, alpha=alpha,
                      epochs=epochs, lr=1e-3 if lr is None else lr, val=val, out=out or _beside(teacher, "student"),
                      baseline=baseline, seed=seed, say=say)
    _record_beside(res, "distill")
    if as_json:
        click.echo(json.dumps(res, indent=2, default=str))
        return
    click.echo(distill_text(res, temperature, alpha, epochs, baseline))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--rank-ratio", type=float, help="Rank = this fraction of min(rows, cols) of each layer's matrix.")
@click.option("--energy", type=float, help="Per layer, the smallest rank keeping this fraction of the squared "
              "singular values (e.g. 0.9).")
@click.option("--params-budget", type=float, help="The whole model keeps at most this fraction of its parameters.")
@click.option("--flops-budget", type=float, help="The whole model keeps at most this fraction of its FLOPs.")
@click.option("--data", required=True, type=click.Path(),
              help="Keras / .pt2: .npz with inputs and 'labels'; LM: .txt/.jsonl file or directory.")
@click.option("--val", type=click.Path(), help="Validation data (default: held out from --data).")
@click.option("--epochs", type=int, default=0, show_default=True, help="Fine-tuning epochs after the cut.")
@click.option("--max-steps", type=int, help="LM: stop fine-tuning after this many steps.")
@click.option("--lr", type=float, help="Fine-tuning learning rate [Keras 1e-3, LM 1e-4].")
@click.option("--distill", is_flag=True, help="Keras: fine-tune against the original's outputs too "
              "(an LM is always fine-tuned against the original).")
@click.option("--include-output", is_flag=True, help="Keras / .pt2: factorize the output layer too.")
@click.option("--skip", multiple=True, help="Keras / .pt2: a layer to leave alone (repeat).")
@click.option("--scope", type=click.Choice(["mlp", "attention", "all"]), default="mlp", show_default=True,
              help="LM: which projections of the decoder layers.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="LM: tokens per block.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="LM: blocks per step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--target", "-t", "target_names", multiple=True,
              help="Convert before and after for this target (Keras: INT8; LM: INT4) and time both here.")
@click.option("--out", "-o", type=click.Path(), help="Where to save the result (.keras, or a folder for an LM).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def factorize(model, rank_ratio, energy, params_budget, flops_budget, data, val, epochs, max_steps, lr, distill,
              include_output, skip, scope, seq_len, batch_size, seed, target_names, out, as_json, quiet):
    """Low-rank factorization: MODEL's Dense/Linear (and convolution) layers become two thinner ones.

    MODEL is a Keras model file, a torch.export program (.pt2: its linear layers), or a causal LM's
    Hugging Face folder (its decoder's linear layers; the factors are saved beside the weights and
    `edgekit convert` builds them as two MatMuls each); for an nn.Module (convolutions, fine-tuning)
    use edgekit.optimize.factorize.factorize_module in Python. Per layer: rank,
    parameters and FLOPs before/after, output error; whole model: size, accuracy or perplexity, and with
    --target the converted bundle's latency before/after. Layers where it does not pay are left alone.
    """
    from pathlib import Path

    from edgekit.optimize.factorize import RankRule
    from edgekit.optimize.lm import is_hf_folder

    say = (lambda t: None) if quiet else (lambda t: click.echo(t, err=True))
    if model.lower().endswith((".pt", ".pth", ".ptl", ".jit")):
        raise click.UsageError(f"{model}: a TorchScript file cannot be rewritten layer by layer; save the model with "
                               "torch.export.save(torch.export.export(module, (example,)), 'net.pt2') and give that, "
                               "or factorize the nn.Module in Python with edgekit.optimize.factorize."
                               "factorize_module(module, RankRule(rank_ratio=0.25), (example,))")
    is_program = model.lower().endswith(".pt2")
    if is_program and (epochs or target_names or distill):
        raise click.UsageError(f"{model}: a torch.export program is factorized without fine-tuning or bundles here "
                               "(--epochs/--distill/--target); fine-tune the nn.Module in Python (factorize_module), "
                               "convert the result with edgekit convert")
    if rank_ratio is None and energy is None and params_budget is None and flops_budget is None:
        rank_ratio = 0.25
    rule = RankRule(rank_ratio=rank_ratio, energy=energy, params_budget=params_budget, flops_budget=flops_budget)
    if is_program:
        from edgekit.optimize.factorize import factorize_program

        res = factorize_program(model, rule, data, val=val, skip=skip, include_output=include_output,
                                out=out or str(Path(model).with_name(f"{Path(model).stem}-lowrank.pt2")), say=say)
    elif is_hf_folder(model):
        from edgekit.optimize.factorize_lm import factorize_lm
        from edgekit.progress import Progress

        if len(target_names) > 1:
            raise click.UsageError("an LM is converted for one --target")
        res = factorize_lm(model, rule, data, val=val, scope=scope, epochs=epochs, max_steps=max_steps,
                           lr=1e-4 if lr is None else lr, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           out=out or _beside_dir(model, "lowrank"),
                           int4_target=target_names[0] if target_names else None, say=say,
                           progress=Progress(enabled=not quiet))
    else:
        from edgekit.optimize.factorize import factorize_keras

        res = factorize_keras(model, rule, data, val=val, epochs=epochs, lr=1e-3 if lr is None else lr,
                              distill=distill, include_output=include_output, skip=skip,
                              out=out or _beside(model, "lowrank"), targets=target_names, say=say)
    _record_beside(res, "factorize")
    click.echo(json.dumps(res, indent=2, default=str) if as_json else factorize_text(res))


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
        saved = Path(res["saved"])  # a model file's suffix gives way; a folder (an LM) keeps its whole name
        p = saved.with_name(f"{saved.name}.{kind}.json") if saved.is_dir() else saved.with_suffix(f".{kind}.json")
        write_json_atomic(p, res)
        click.echo(f"record: {p}", err=True)


def _beside_dir(folder: str, what: str) -> str:
    from pathlib import Path

    p = Path(folder.rstrip("/"))
    return str(p.with_name(f"{p.name}-{what}"))


def _beside(model: str, what: str) -> str:
    from pathlib import Path

    p = Path(model)
    return str(p.with_name(f"{p.stem}-{what}.keras"))
