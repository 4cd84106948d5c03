"""python -m edgekit.serve PATH... : the inference server on a device (argparse only, no click).

Exit status: 0 stopped cleanly, 2 a usage problem (one line on stderr; --debug for a traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from edgekit.errors import EdgekitError


def stream_interval(v) -> "float | None":
    """--stream-interval-ms: milliseconds, or "auto" (None)."""
    if v is None or (isinstance(v, str) and v.strip().lower() == "auto"):
        return None
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{v!r} is not a number of milliseconds or 'auto'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="bundle directory, .tflite/.onnx file, deployed model dir, or device root (with models/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' (or set EDGEKIT_SERVE_TOKEN / --token-file)")
    p.add_argument("--token-file", default=None, help="read the token from this file")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument("--max-concurrency", type=int, default=1, help="inferences running at once (default 1)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond it 503 (default 64)")
    p.add_argument("--max-batch", type=int, default=1, help="dynamic batching up to N samples (default 1: off)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="wait this long to fill a batch (default 2)")
    p.add_argument("--inline-ms", type=float, default=2.0,
                   help="run inferences shorter than this on the server's loop thread (default 2; 0: never)")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit (default 64 MiB)")
    p.add_argument("--threads", type=int, default=None, help="backend threads (default: the target's)")
    p.add_argument("--backend", default=None, help="litert, tflite-runtime, tensorflow, onnxruntime")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks of `current`")
    p.add_argument("--no-check", action="store_true", help="skip the golden check when loading a release")
    p.add_argument("--pid-file", default=None,
                   help="write the server's pid here (for --stop/--status; those default to "
                        "~/.edgekit/serve/serve.pid, where deploy --serve starts it)")
    p.add_argument("--stop", action="store_true", help="stop the server named by --pid-file, then exit")
    p.add_argument("--status", action="store_true",
                   help="print the state of the server named by --pid-file (JSON), then exit")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--max-sequences", type=int, default=8,
                   help="language models: sequences decoded together, one read of the weights per step (default 8)")
    p.add_argument("--kv-cache-mb", type=float, default=None,
                   help="language models: KV-cache memory for all sequences (default: each can fill the context)")
    p.add_argument("--log-prompts", action="store_true",
                   help="log prompts and generated text (by default only token counts are logged)")
    p.add_argument("--stream-interval-ms", type=stream_interval, default=None, metavar="MS|auto",
                   help="language models: write a stream at most this often; pieces that come faster are sent "
                        "together, each still its own event (default auto: 20 when the model's threads take "
                        "every CPU, else 0; 0: one write per token)")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="HTTP parser: auto (default) uses httptools (and uvloop) when installed, else h11")


def config_from(args) -> "object":
    from edgekit.serve.server import TOKEN_ENV, ServeConfig, ServeError

    token = args.token
    if args.token_file:
        try:
            token = open(args.token_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise ServeError(f"cannot read --token-file {args.token_file}: {e.strerror}") from None
    token = token or os.environ.get(TOKEN_ENV) or None
    try:
        interval = stream_interval(getattr(args, "stream_interval_ms", None))
    except ValueError as e:
        raise ServeError(f"--stream-interval-ms: {e}") from None
    return ServeConfig(host=args.host, port=args.port, token=token, insecure=args.insecure,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, max_concurrency=args.max_concurrency,
                       max_queue=args.max_queue, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                       inline_ms=args.inline_ms,
                       max_body_mb=args.max_body_mb, threads=args.threads, backend=args.backend,
                       poll_interval=args.poll_interval, check=not args.no_check, pid_file=args.pid_file,
                       access_log=args.access_log, http=getattr(args, "http", "auto"),
                       max_sequences=getattr(args, "max_sequences", 8), kv_cache_mb=getattr(args, "kv_cache_mb", None),
                       log_prompts=getattr(args, "log_prompts", False),
                       stream_interval_ms=interval)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgekit.serve",
                                description="Open Inference Protocol v2 server for edgekit bundles")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        from edgekit.serve.pidfile import DEFAULT_PID_FILE, ServeError, state, stop

        if (args.status or args.stop) and not args.pid_file:
            args.pid_file = os.path.expanduser(DEFAULT_PID_FILE)

        if args.status:
            import json

            print(json.dumps(state(args.pid_file)))
            return 0
        if args.stop:
            print(f"stopped the server (pid {stop(args.pid_file)})")
            return 0
        if not args.paths:
            raise ServeError("give at least one bundle directory, model file or device root to serve")
        from edgekit.serve.server import serve

        setup_logging()
        serve(args.paths, config_from(args), say=lambda t: print(t, file=sys.stderr, flush=True))
        return 0
    except EdgekitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
