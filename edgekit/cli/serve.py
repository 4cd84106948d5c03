"""`edgekit serve`, and `deploy --serve/--no-serve` with the serving state in `status`."""

from __future__ import annotations

import json
from typing import Optional

import click

from edgekit.cli.group import cli
from edgekit.cli.common import _options, _select
from edgekit.cli.deploy import deploy, status
from edgekit.cli.render import serving_table


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
@click.option("--max-sequences", type=int, default=8, show_default=True,
              help="Language models: sequences decoded together (one read of the weights per step).")
@click.option("--kv-cache-mb", type=float, help="Language models: KV-cache memory for all sequences "
                                                "(default: each sequence can fill the context).")
@click.option("--log-prompts", is_flag=True, help="Log prompts and generated text (default: token counts only).")
@click.option("--stream-interval-ms", default="auto", show_default=True, metavar="MS|auto",
              help="Language models: write a stream at most this often; pieces that come faster are sent "
                   "together, each still its own event (auto: 20 when the model's threads take every CPU, "
                   "else 0; 0: one write per token).")
def serve(paths, stop, show_status, **opts):
    """Serve bundles over KServe's Open Inference Protocol v2 (HTTP/REST, binary tensors), and
    language models also over the OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models) with continuous batching, on the same port.

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


# `edgekit deploy --serve/--no-serve` and the serving state in `edgekit status`: added to those
# commands here (their options and a step after them), so the deploy code itself stays as it is.

def _bundle_model_name(path) -> Optional[str]:
    from pathlib import Path

    from edgekit.bundle import is_bundle
    from edgekit.deploy.artifact import read   # a language model's manifest as well as the others'

    p = Path(path)
    if is_bundle(p):
        return read(p).name
    found = sorted(q for q in p.iterdir() if q.is_dir() and is_bundle(q)) if p.is_dir() else []
    return read(found[0]).name if found else None


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
                r = serving.stop(c, root)
                pid, unit = r["stopped"], r.get("unit")
                said = f"stopped (pid {pid})" if pid else "not running"
                return DeviceResult(d.name, "ok", data={"serving": said + (f"; unit {unit} removed" if unit else "")})
            cur, prev = serving.releases_of(c, root, model)
            if cur is None:
                return DeviceResult(d.name, "failed", reason=f"model {model} has no current release to serve")
            try:
                data = serving.ensure(c, root, sopts, model, cur)
                data["serving"] = f"{data['serving']} ({data['manager']})"  # systemd unit or supervised process
                return DeviceResult(d.name, "ok", data=data)
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
        click.Option(["--serve-token-file"], help="A file ON THE DEVICE holding the bearer token."),
        click.Option(["--serve-manager"], type=click.Choice(["auto", "systemd", "process"]), default="auto",
                     show_default=True, help="auto: a systemd unit where systemd runs (root, or a lingering "
                                             "user), else a supervised process with a pid file.")]
    deploy_inner, status_inner = deploy_cmd.callback, status_cmd.callback

    @functools.wraps(deploy_inner)
    def deploy_then_serve(*a, serve=None, serve_port=8000, serve_host="127.0.0.1", serve_token_file=None,
                          serve_manager="auto", **kw):
        if serve is None or kw.get("dry_run") or not kw.get("bundle"):
            return deploy_inner(*a, **kw)
        from edgekit.deploy.serving import ServeOptions

        sopts = ServeOptions(port=serve_port, host=serve_host, token_file=serve_token_file, manager=serve_manager)
        code = 0
        try:
            deploy_inner(*a, **kw)
        except click.exceptions.Exit as e:
            code = e.exit_code
        res = _serving_step(kw, serve, sopts)
        if kw.get("as_json"):
            click.echo(json.dumps({"serving": [r.to_dict() for r in res.results]}, indent=2, default=str))
        else:
            click.echo(serving_table(res.results))
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
                how = st.get("manager")  # systemd (a unit) or process (supervised, with a pid file)
                if st["running"]:
                    said = f"yes ({how})"
                else:
                    said = f"no (systemd unit {st.get('active_state')})" if how == "systemd" else "no"
                return DeviceResult(d.name, "ok", data={
                    "serving": said, "url": st.get("url") if st["running"] else None,
                    "pid": st.get("pid") if st["running"] else None})

            click.echo(serving_table(fan_out(devs, one, 8).results))
        if code:
            raise click.exceptions.Exit(code)

    deploy_cmd.callback, status_cmd.callback = deploy_then_serve, status_and_serving


_add_serving(deploy, status)
