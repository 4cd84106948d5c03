"""python -m edgekit.runtime {run,bench,check,chat,facts}: the device side, argparse only.

A language-model bundle (runtime.llm): `run --prompt TEXT` streams the answer, `bench` measures TTFT and
prefill / decode tok/s, `check` is its golden health check, `chat` an interactive chat (runtime.llmchat).

Exit status: 0 fine, 1 a check failed, 2 a usage problem (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from edgekit.errors import DataError, EdgekitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgekit.runtime")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("model", help="bundle directory, .tflite or .onnx")
        sp.add_argument("--backend", default=None, help="litert, tflite-runtime, tensorflow, onnxruntime, openvino")
        sp.add_argument("--threads", type=int, default=None)
        sp.add_argument("--json", action="store_true", help="JSON on stdout")

    def generation(sp):
        sp.add_argument("--max-new-tokens", type=int, default=256)
        sp.add_argument("--temperature", type=float, default=None,
                        help="0: greedy (default: the model's generation_config)")
        sp.add_argument("--top-p", type=float, default=None)
        sp.add_argument("--top-k", type=int, default=None, help="0: no limit")
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--stop", action="append", default=None, help="stop before this text (repeatable)")
        sp.add_argument("--repetition-penalty", type=float, default=None)
        context(sp)

    def context(sp):
        sp.add_argument("--context", type=int, default=None,
                        help="language model: the context in tokens (prompt and reply), at most the bundle's longest "
                             "(default: the bundle's)")

    r = sub.add_parser("run", help="run once on an input file and print the float outputs; "
                                   "a language model: --prompt, the answer streamed")
    common(r)
    r.add_argument("--input", help=".npy (single input) or .npz keyed by input name")
    r.add_argument("--raw", action="store_true", help="integer tensors in and out")
    r.add_argument("--prompt", help="language model: the prompt (the chat template applied where the bundle has one)")
    r.add_argument("--system", help="language model: a system message")
    r.add_argument("--no-template", action="store_true", help="language model: continue the prompt as plain text")
    generation(r)
    b = sub.add_parser("bench", help="measure latency (the DESIGN.md method)")
    common(b)
    b.add_argument("--runs", type=int, default=None, help="timed runs (default 200; a language model 3)")
    b.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 20; a language model 1)")
    b.add_argument("--prompt-tokens", type=int, default=128, help="language model: prompt length")
    b.add_argument("--new-tokens", type=int, default=128, help="language model: tokens generated")
    b.add_argument("--no-end-to-end", action="store_true")
    b.add_argument("--out", default=None, help="also write the JSON report here")
    context(b)
    c = sub.add_parser("check", help="golden health check of a bundle")
    common(c)
    c.add_argument("--reference-numerics", action="store_true",
                   help="ONNX: run the QDQ graph as written (no fused integer kernels)")
    ch = sub.add_parser("chat", help="interactive chat with a language model (/reset, /exit; Ctrl-C stops a reply)")
    ch.add_argument("model", help="language-model bundle or ONNX Runtime GenAI folder")
    ch.add_argument("--threads", type=int, default=None)
    ch.add_argument("--system", help="a system message")
    ch.add_argument("--verbose", action="store_true", help="figures after each reply")
    generation(ch)
    sub.add_parser("facts", help="this machine: arch, CPU, memory, OS, backends (JSON)")
    rel = sub.add_parser("release", help="device side of deploy: status/activate/rollback/verify (JSON)")
    rel.add_argument("action", choices=["status", "activate", "store", "rollback", "revert", "verify", "clean"])
    rel.add_argument("--root", required=True, type=os.path.expanduser)
    rel.add_argument("--name")
    rel.add_argument("--sha")
    rel.add_argument("--incoming")
    rel.add_argument("--to")
    rel.add_argument("--keep", type=int, default=3)
    rel.add_argument("--no-check", action="store_true")
    rel.add_argument("--health", action="store_true")
    rel.add_argument("--clean-incoming", action="store_true",
                     help="with status: first remove the model's unfinished uploads")
    return p


def read_inputs(path: str, names: List[str]) -> dict:
    import numpy as np

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read input file ({e})", path=path,
                        hint="give a .npy array or an .npz keyed by input name") from None
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise DataError(f"a .npy holds one array but the model has inputs {names}", path=path,
                            hint="use an .npz keyed by input name")
        return {names[0]: data}
    with data:
        keys = list(data.files)
        if len(names) == 1 and len(keys) == 1:
            return {names[0]: data[keys[0]]}
        missing = [n for n in names if n not in keys]
        if missing:
            raise DataError(f"no array for input '{missing[0]}' (file has {keys})", path=path)
        return {n: data[n] for n in names}


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except EdgekitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:      # Ctrl-C while loading, probing threads or benchmarking
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:           # a path the user gave (--out a directory, a read-only folder): one line
        import errno

        path_errors = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
                       errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EXDEV}   # as edgekit's CLI
        if args.debug or not (e.filename or e.filename2) or e.errno not in path_errors:
            raise
        print(f"error: {e.filename2 or e.filename}: {e.strerror} (choose another path; --debug for the "
              "traceback)", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.cmd == "release":
        return _release(args)
    if args.cmd == "facts":
        from edgekit.runtime.facts import device_facts  # noqa: F811

        print(json.dumps(device_facts(), indent=2))
        return 0
    from edgekit.runtime import load

    model = load(args.model, backend=getattr(args, "backend", None), threads=args.threads,
                 reference_numerics=getattr(args, "reference_numerics", False))
    if getattr(model, "kind", None) == "llm":
        if getattr(args, "context", None) is not None:
            model.context = args.context   # more than the bundle's longest: a DataError (one line, exit 2)
        return _llm(args, model)
    if getattr(args, "context", None) is not None:
        raise DataError("--context is for language models", hint=f"{args.model} is not one")
    if args.cmd == "chat":
        raise DataError("chat needs a language-model bundle", hint=f"{args.model} is not one")
    if args.cmd == "run":
        if not args.input:
            raise DataError("run needs --input (a .npy or .npz file)", hint="--prompt is for language models")
        feeds = read_inputs(args.input, [s.name for s in model.inputs])
        out = model.run(**feeds, raw=args.raw)
        if args.json:
            print(json.dumps({k: v.tolist() for k, v in out.items()}))
        else:
            import numpy as np

            with np.printoptions(precision=5, suppress=True, threshold=200):
                for k, v in out.items():
                    print(f"{k} {v.dtype}{list(v.shape)}:\n{v}")
        return 0
    if args.cmd == "bench":
        from edgekit.bundle import write_json_atomic
        from edgekit.runtime.report import bench_table

        rep = model.benchmark(runs=200 if args.runs is None else args.runs,
                              warmup=20 if args.warmup is None else args.warmup,
                              end_to_end=not args.no_end_to_end)
        if args.out:
            write_json_atomic(args.out, rep)
        print(json.dumps(rep) if args.json else bench_table([rep]))
        return 0
    if args.cmd == "check":
        from edgekit.runtime.check import golden_check

        res = golden_check(model)
        res.update(backend=model.backend, backend_version=model.backend_version,
                   backend_preferred=model.backend_preferred, backend_note=model.backend_note)
        if args.json:
            print(json.dumps(res))
        else:
            for name, o in res["outputs"].items():
                print(f"{name}: SNR {o['snr_db']:.1f} dB (min {res['min_snr_db']}), top-1 agreement "
                      f"{o['top1_agreement']}, max difference {o['max_abs_err']:.6g}"
                      + (f" ({o['max_steps']} steps)" if o["max_steps"] is not None else "")
                      + f": {'ok' if o['ok'] else 'FAILED'}")
            if model.backend_note:
                print(f"note: {model.backend_note}")
        return 0 if res["ok"] else 1
    raise AssertionError(args.cmd)


def generation_options(args, lm) -> dict:
    """The options given, over the model's own sampling defaults (lm.generation_defaults)."""
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "repetition_penalty": args.repetition_penalty}
    return dict(lm.generation_defaults, **{k: v for k, v in given.items() if v is not None},
                max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop)


def stream_answer(lm, prompt: str, system: Optional[str], template: bool, options: dict, out=None) -> dict:
    """Stream the answer to `prompt` to `out` (stdout); the chat template applied where the bundle has one
    and `template`; an answer cut by max_new_tokens or the context says so on stderr. Returns the figures
    (lm.last)."""
    from edgekit.runtime.llmchat import cut_note

    out = out or sys.stdout
    if template and lm.has_chat_template:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        it = lm.chat(msgs, stream=True, **options)
    else:
        it = lm.generate(((system + "\n") if system else "") + prompt, stream=True, **options)
    try:
        for piece in it:
            out.write(piece)
            out.flush()
    finally:
        it.close()
    out.write("\n")
    out.flush()
    note = cut_note(lm.last, options.get("max_new_tokens"), lm.context)
    if note:
        print(note, file=sys.stderr, flush=True)
    return lm.last


def _llm(args, lm) -> int:
    if args.cmd == "run":
        if args.prompt is None:
            raise DataError("a language model runs on text: give --prompt", hint=f"{args.model} is a language model")
        try:   # with --json, stdout is the JSON alone: the answer streams to stderr
            stats = stream_answer(lm, args.prompt, args.system, not args.no_template, generation_options(args, lm),
                                  out=sys.stderr if args.json else None)
        except KeyboardInterrupt:
            return 130
        if args.json:
            print(json.dumps({k: v for k, v in stats.items() if k != "token_ids"}))
        return 0
    if args.cmd == "chat":
        from edgekit.runtime.llmchat import chat_loop

        return chat_loop(lm, system=args.system, options=generation_options(args, lm), verbose=args.verbose)
    if args.cmd == "bench":
        from edgekit.bundle import write_json_atomic
        from edgekit.runtime.llmbench import llm_bench_table

        rep = lm.benchmark(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                           runs=3 if args.runs is None else args.runs, warmup=1 if args.warmup is None else args.warmup)
        if args.out:
            write_json_atomic(args.out, rep)
        print(json.dumps(rep) if args.json else llm_bench_table([rep]))
        return 0
    if args.cmd == "check":
        from edgekit.runtime.llmcheck import describe

        res = lm.check()
        print(json.dumps(res) if args.json else describe(res))
        return 0 if res["ok"] else 1
    raise AssertionError(args.cmd)


def _release(args) -> int:
    from edgekit.runtime import releases as r

    if args.action != "status" and not args.name:
        raise DataError(f"release {args.action} needs --name")
    if args.action == "status":
        removed = r.clean_incoming(args.root, args.name) if args.clean_incoming and args.name else []
        out = r.status(args.root, args.name, health=args.health)
        out["removed_incoming"] = removed
        from edgekit.runtime.facts import installed_backends

        out["backends"] = installed_backends()
    elif args.action == "activate":
        out = r.activate(args.root, args.name, args.sha, incoming=args.incoming, keep=args.keep,
                         check=not args.no_check)
    elif args.action == "store":
        out = r.store(args.root, args.name, args.sha, args.incoming)
    elif args.action == "rollback":
        out = r.rollback(args.root, args.name, to=args.to, check=not args.no_check)
    elif args.action == "revert":
        out = r.revert(args.root, args.name, args.sha, None if args.to in (None, "none") else args.to)
    elif args.action == "verify":
        out = {"ok": r.verify(r.model_dir(args.root, args.name) / "releases" / args.sha, args.sha)}
    else:
        out = {"removed": r.clean_incoming(args.root, args.name)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
