"""`edgekit deploy` (all at once or a staged rollout), `status`, `rollback`, `profile`."""

from __future__ import annotations

import json

import click

from edgekit.cli.group import cli
from edgekit.cli.common import (_device_selection, _finish, _html_report, _inventory_opt, _on_devices, _options,
                                 _select, _trust_opt)
from edgekit.cli.render import (DEPLOY_HEADERS, ROLLBACK_HEADERS, deploy_row, plan_table, rollback_row,
                                rollout_tables, status_table)


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


def _rollout_options(inv, plan, keep, trust_new_host=False, quiet=False, force=False):
    from edgekit.deploy.ops import Gate

    opts = _options(inv, trust_new_host, keep, quiet)
    opts.force = force
    if plan.timeout:
        opts.timeout = min(opts.timeout, plan.timeout)
        opts.command_timeout = plan.timeout
    if plan.max_p50_ms:
        opts.gate = Gate(plan.max_p50_ms, runs=plan.gate_runs)
    return opts


def _show_rollout(rec, as_json):
    from edgekit.deploy.rollout import summary

    if as_json:
        click.echo(json.dumps(rec, indent=2, default=str))
    else:
        click.echo(rollout_tables(rec))
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
@click.option("--force", is_flag=True,
              help="Upload even when the model (and a language model's KV cache) does not fit the device's "
                   "available memory, or its disk looks too full.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress lines (the upload's bar: bytes, rate, ETA).")
def deploy(bundle, device_name, group, all_devices, parallel, keep, dry_run, canary, batches, batch_size, max_fail,
           timeout, offline, max_p50_ms, abort_rollback, resume_id, inventory, trust_new_host, force, as_json, quiet):
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
                                                                               quiet or as_json, force))
        return _run_rollout(r, as_json, quiet)
    if not bundle:
        raise click.UsageError("give a BUNDLE (or --resume ID)")
    arts = _artifacts(bundle)
    inv, devs = _select(inventory, device_name, group, all_devices)
    staged = bool(canary or batches or batch_size or max_fail is not None)
    plan = _rollout_plan(canary, batches, batch_size, max_fail, timeout, offline, max_p50_ms, abort_rollback,
                         parallel, 0.0 if staged else 1.0)
    opts = _rollout_options(inv, plan, keep, trust_new_host, quiet or as_json, force)
    title = (f"deploy {arts[0].name}" + (f" ({arts[0].target}, {arts[0].format})" if len(arts) == 1
                                         else f" ({len(arts)} bundles)"))
    if dry_run:
        if staged and not as_json:
            groups = plan.batches([d.name for d in devs])
            click.echo(plan_table(plan, groups, plan.labels(len(groups))))
        res = fan_out(devs, lambda d: ops.deploy(d, arts, opts, dry_run=True), parallel, debug=opts.debug)
        _finish(res, as_json, DEPLOY_HEADERS, deploy_row, title="dry run: " + title)
        return
    if not staged:  # all at once, no record: one table row per device
        res = fan_out(devs, lambda d: ops.deploy(d, arts, opts), parallel, debug=opts.debug)
        for x in res.results:
            if x.offline and offline == "skip":
                x.status = "skipped-offline"
        _finish(res, as_json, DEPLOY_HEADERS, deploy_row, title=title)
        return
    r = Rollout.create(plan, arts, devs, opts, inv.path, bundle)
    if not (quiet or as_json):
        click.echo(f"rollout {r.id}: {len(r.record['batches'])} batches; "
                   f"`edgekit deploy --resume {r.id}` continues it after an abort or a crash", err=True)
    _run_rollout(r, as_json)


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

    if rollout_id:
        from edgekit.deploy.rollout import read_record

        return _show_rollout(read_record(rollout_id), as_json)
    if not (device_name or group or all_devices):
        all_devices = True
    res = _on_devices(inventory, device_name, group, all_devices, trust_new_host,
                      lambda d, opts: ops.status(d, opts, model, health=not no_health))
    if as_json:
        _finish(res, True, [], None)
        return
    click.echo(status_table(res.results))
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

    res = _on_devices(inventory, device_name, None, False, trust_new_host,
                      lambda d, opts: ops.rollback(d, model, opts, to))
    _finish(res, as_json, ROLLBACK_HEADERS, lambda r: rollback_row(r, model))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", "-d", "device_name", help="One device from the inventory.")
@_device_selection
@click.option("--runs", type=int, help="Timed runs (default 200; a language model: 3 generations).")
@click.option("--warmup", type=int, help="Warm-up runs, not timed (default 20; a language model: 1).")
@click.option("--threads", type=int, help="Override the profile's thread count.")
@click.option("--prompt-tokens", type=int, default=128, show_default=True,
              help="A language model: prompt length of each run (TTFT, prefill tok/s).")
@click.option("--new-tokens", type=int, default=128, show_default=True,
              help="A language model: tokens generated per run (decode tok/s).")
@click.option("--parallel", type=int, default=1, show_default=True,
              help="Devices profiled at a time (1: no device disturbs another's figures).")
@click.option("--save-dir", default="profiles", show_default=True, type=click.Path(),
              help="Where the JSON reports are saved (<dir>/<device>/...).")
@_inventory_opt
@_trust_opt
@click.option("--json", "as_json", is_flag=True)
@click.option("--report", "html_report", is_flag=True,
              help="Also write the HTML report of the bundle's build directory with these profiles.")
def profile(bundle, device_name, group, all_devices, runs, warmup, threads, prompt_tokens, new_tokens, parallel,
            save_dir, inventory, trust_new_host, as_json, html_report):
    """Measure BUNDLE on the device(s) with the latency method; table, JSON saved under profiles/.
    A language model: load time, TTFT, prefill and decode tok/s and peak memory on the device."""
    from edgekit.deploy import ops
    from edgekit.deploy.artifact import read_one
    from edgekit.runtime.report import bench_table

    for flag, v in (("--runs", runs), ("--prompt-tokens", prompt_tokens), ("--new-tokens", new_tokens)):
        if v is not None and v < 1:
            raise click.BadParameter("must be at least 1", param_hint=flag)
    b = read_one(bundle)
    if b.is_llm and new_tokens < 2:   # decode tok/s is timed from the first generated token to the last
        raise click.BadParameter("a language model's decode speed needs at least 2", param_hint="--new-tokens")
    runs = runs or (3 if b.is_llm else 200)
    warmup = (1 if b.is_llm else 20) if warmup is None else warmup
    res = _on_devices(inventory, device_name, group, all_devices, trust_new_host,
                      lambda d, opts: ops.profile(d, b, opts, runs, warmup, save_dir, threads, prompt_tokens,
                                                  new_tokens), parallel,
                      quiet=as_json)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in res.results], indent=2, default=str))
    else:
        reps = [r.data["report"] for r in res.succeeded]
        if reps:
            if b.is_llm:
                from edgekit.runtime.llmbench import llm_bench_table

                click.echo(llm_bench_table(reps, label="device"))
            else:
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

