"""`edgekit run`, `edgekit bench` and `edgekit chat`: a model here, once or timed; a language model's answer,
figures, or an interactive chat."""

from __future__ import annotations

import gc
import json

import click

from edgekit.cli.group import cli


_backend_opt = click.option("--backend", type=click.Choice(
    ["litert", "tflite-runtime", "tensorflow", "onnxruntime", "openvino"]), help="Force a backend.")


def _generation_opts(f):
    """Generation options of a language model (runtime.llm), shared by run and chat."""
    for opt in reversed([
        click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Language model: "
                     "tokens to generate at most."),
        click.option("--temperature", type=float, help="0: greedy.  [default: the model's generation_config]"),
        click.option("--top-p", type=float, help="[default: the model's generation_config, else 1]"),
        click.option("--top-k", type=int, help="0: no limit.  [default: the model's generation_config, else 0]"),
        click.option("--seed", type=int, help="Sampling seed (the same seed, the same text)."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
        click.option("--repetition-penalty", type=float, help="[default: the model's generation_config, else 1]"),
        click.option("--system", help="Language model: a system message."),
    ]):
        f = opt(f)
    return f


_context_opt = click.option("--context", type=int, help="Language model: the context in tokens (the prompt and "
                           "reply's room, the KV cache's length), at most the bundle's longest.  [default: the "
                           "bundle's, its profile's llm.context_default]")


def _set_context(m, context, path) -> None:
    """--context on the loaded model: a language model's lm.context (its setter refuses more than max_context)."""
    if context is None:
        return
    if getattr(m, "kind", None) != "llm":
        raise click.UsageError(f"--context is for language models; {path} is not one")
    m.context = context


def _refuse_context_for_others(context, paths) -> None:
    """--context with several models: every one a language model (runtime.llm.is_llm: an LLM bundle or an ONNX
    Runtime GenAI folder), said before any is loaded or benchmarked. A missing path, or a manifest that cannot be
    read, is left to the load, which names what is wrong with it."""
    if context is None:
        return
    from pathlib import Path

    from edgekit.runtime.llm import MANIFEST, is_llm

    for path in paths:
        p = Path(path)
        if not p.exists() or is_llm(p):
            continue
        if (p / MANIFEST).is_file():
            try:
                if not isinstance(json.loads((p / MANIFEST).read_text(encoding="utf-8")), dict):
                    continue
            except (OSError, ValueError, UnicodeDecodeError):
                continue
        raise click.UsageError(f"--context is for language models; {path} is not one")


def _check_counts(**given) -> None:
    """Counts given as options, each at least its lowest (option name: (value, lowest)): one line naming the option,
    before anything is loaded."""
    from edgekit.errors import EdgekitError

    for name, (value, lowest) in given.items():
        if value is not None and value < lowest:
            raise EdgekitError(f"--{name.replace('_', '-')} must be at least {lowest} (got {value})")


def _check_threads(threads) -> None:
    """--threads: at least 1, at most runtime.threads.MAX_THREADS_PER_CPU per usable CPU, said before the load."""
    if threads is not None:
        from edgekit.runtime.threads import check_threads

        check_threads(threads)


def _check_out(out) -> None:
    """--out: a file that can be written (not a directory; its folder, or the nearest one above that exists since
    the missing ones are made, a writable directory), said before anything is loaded or measured."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    p = Path(out)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(p))
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    with tempfile.TemporaryFile(dir=folder):   # a real write, as the report's will be (mode, ACLs, a read-only mount)
        pass


def _check_models(paths) -> None:
    """Every MODEL of `edgekit bench`, before any is loaded or benchmarked: what a load refuses at once (a missing
    path, a manifest that cannot be read, a model file missing or of the wrong size: a truncated copy), so the
    second bundle's damage is said before the first one's minutes of measuring, not after them. A language
    model's files are hashed by its own load, as before (not twice); an image model's bundle, small, here."""
    from pathlib import Path

    from edgekit.bundle import read_bundle
    from edgekit.errors import BundleError
    from edgekit.runtime.llm import GENAI_CONFIG, MANIFEST, llm_manifest, verify_files

    for path in paths:
        p = Path(path)
        if p.is_dir():
            manifest = llm_manifest(p)
            if manifest is not None:
                verify_files(p, manifest, hash_files=False)
            elif (p / MANIFEST).is_file() or not (p / GENAI_CONFIG).is_file():
                read_bundle(p, verify=True)
        elif not p.is_file():
            raise BundleError("no such file or bundle directory", path=str(p))
        elif p.suffix.lower() not in (".tflite", ".onnx"):
            raise BundleError("not a model edgekit can run", path=str(p),
                              hint="give a bundle directory, a .tflite or an .onnx file")


def _gen(lm, max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty):
    """The generation options given, over the model's own defaults (lm.generation_defaults)."""
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
    return dict(lm.generation_defaults, **{k: v for k, v in given.items() if v is not None},
                max_new_tokens=max_new_tokens, seed=seed, stop=list(stop) or None)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--input", "-i", "input_path", type=click.Path(),
              help=".npy (one input) or .npz keyed by input name.")
@click.option("--prompt", "-p", help="Language model: the prompt; the answer streams (the bundle's chat "
                                     "template applied).")
@click.option("--no-template", is_flag=True, help="Language model: continue the prompt as plain text.")
@click.option("--raw", is_flag=True, help="Integer tensors in and out, no (de)quantization.")
@_backend_opt
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="Outputs as JSON (a language model: its figures, the answer "
                                                      "among them; the answer streams to stderr).")
@_generation_opts
@_context_opt
def run(model, input_path, prompt, no_template, raw, backend, threads, as_json, max_new_tokens, temperature,
        top_p, top_k, seed, stop, repetition_penalty, system, context):
    """Run MODEL (bundle, .tflite or .onnx) once and print its (float) outputs; for a language-model bundle,
    stream the answer to --prompt."""
    import numpy as np

    from edgekit.runtime import load
    from edgekit.runtime.__main__ import read_inputs

    _check_threads(threads)
    m = load(model, backend=backend, threads=threads)
    _set_context(m, context, model)
    if getattr(m, "kind", None) == "llm":
        import sys

        from edgekit.runtime.__main__ import stream_answer

        if prompt is None:
            raise click.UsageError(f"{model} is a language model: give --prompt TEXT")
        try:   # with --json, stdout is the JSON alone (a pipe to jq): the answer streams to stderr
            stats = stream_answer(m, prompt, system, not no_template,
                                  _gen(m, max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty),
                                  out=sys.stderr if as_json else None)
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130)
        if as_json:
            click.echo(json.dumps({k: v for k, v in stats.items() if k != "token_ids"}))
        return
    if input_path is None:
        raise click.UsageError("give --input FILE (.npy or .npz); --prompt is for language models")
    out = m.run(**read_inputs(input_path, [s.name for s in m.inputs]), raw=raw)
    if as_json:
        click.echo(json.dumps({k: v.tolist() for k, v in out.items()}))
        return
    with np.printoptions(precision=5, suppress=True, threshold=200):
        for k, v in out.items():
            click.echo(f"{k} {v.dtype}{list(v.shape)}:\n{v}")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--runs", type=int, help="Timed runs  [default: 200; a language model: 3]")
@click.option("--warmup", type=int, help="Warm-up runs  [default: 20; a language model: 1]")
@click.option("--prompt-tokens", type=int, default=128, show_default=True, help="Language model: prompt length.")
@click.option("--new-tokens", type=int, default=128, show_default=True, help="Language model: tokens generated.")
@_backend_opt
@click.option("--threads", type=int)
@click.option("--json", "as_json", is_flag=True, help="The full report (raw samples included).")
@click.option("--out", type=click.Path(), help="Also save the JSON report to this file.")
@_context_opt
def bench(models, runs, warmup, prompt_tokens, new_tokens, backend, threads, as_json, out, context):
    """Measure latency of one or more MODELS here (load, first run, warm-up, timed runs); a language model:
    load time, time to first token, prefill and decode tok/s (p50 over runs), peak RSS."""
    from edgekit.bundle import write_json_atomic
    from edgekit.runtime import load
    from edgekit.runtime.llmbench import llm_bench_table
    from edgekit.runtime.llmopts import reset_peak_rss
    from edgekit.runtime.report import bench_table

    _check_counts(runs=(runs, 1), warmup=(warmup, 0), prompt_tokens=(prompt_tokens, 1), new_tokens=(new_tokens, 2))
    _check_threads(threads)
    if out:
        _check_out(out)
    _refuse_context_for_others(context, models)
    _check_models(models)
    reports = []
    m = None
    for i, path in enumerate(models):
        if i:   # the previous model is freed and the high-water mark reset: each load and peak is its own
            m = None
            gc.collect()
            reset_peak_rss()
        m = load(path, backend=backend, threads=threads)
        _set_context(m, context, path)
        if getattr(m, "kind", None) == "llm":
            r, w = (3 if runs is None else runs), (1 if warmup is None else warmup)
            click.echo(f"benchmarking {path}: {w} warm-up + {r} timed runs of {prompt_tokens} prompt + "
                       f"{new_tokens} new tokens ({m.backend} {m.backend_version}, {m.threads} threads)", err=True)
            reports.append(m.benchmark(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=r, warmup=w))
            continue
        r, w = (200 if runs is None else runs), (20 if warmup is None else warmup)
        click.echo(f"benchmarking {path}: {w} warm-up + {r} timed runs "
                   f"({m.backend} {m.backend_version})", err=True)
        reports.append(m.benchmark(runs=r, warmup=w))
    data = reports[0] if len(reports) == 1 else reports
    if out:
        write_json_atomic(out, data)
    if as_json:
        click.echo(json.dumps(data))
        return
    lms = [r for r in reports if r.get("kind") == "llm"]
    others = [r for r in reports if r.get("kind") != "llm"]
    click.echo("\n\n".join(t for t in (bench_table(others) if others else "",
                                         llm_bench_table(lms) if lms else "") if t))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--threads", type=int)
@click.option("--verbose", "-v", is_flag=True, help="Figures after each reply (tokens, TTFT, tok/s).")
@_generation_opts
@_context_opt
def chat(model, threads, verbose, max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty,
         system, context):
    """Chat with a language-model bundle in the terminal: each line a message, the reply streamed, the
    history kept (its KV cache too). /reset forgets it, /exit or Ctrl-D leaves, Ctrl-C stops a reply."""
    from edgekit.runtime import load
    from edgekit.runtime.llmchat import chat_loop

    _check_threads(threads)
    m = load(model, threads=threads)
    if getattr(m, "kind", None) != "llm":
        raise click.UsageError(f"{model} is not a language model (chat needs an LLM bundle)")
    _set_context(m, context, model)
    chat_loop(m, system=system, verbose=verbose,
              options=_gen(m, max_new_tokens, temperature, top_p, top_k, seed, stop, repetition_penalty))
