"""The README's main job: the example model converted for every target, run, deployed, profiled.

    python examples/main_job.py [--out edgekit-demo] [--runs 200] [--no-device] [--keep-device] [--emulated]

1. trains the digits CNN (examples/digits.py) unless <out>/digits.keras exists;
2. converts it for every shipped target, validated on held-out digits;
3. loads each bundle with edgekit.runtime, checks its golden outputs, benchmarks it here;
4. starts a local device (sshd in its own network namespace: Linux, root, openssh-server,
   iproute2), deploys the whole build to it over SSH (it takes the bundle for its profile),
   and profiles that bundle on it (--emulated: the emulated arm64 Raspberry-Pi-OS-like device
   instead, built once and cached, about 4 minutes the first time);
5. prints the tables, saves <out>/main-job.json and writes <out>/report.html (edgekit report).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import train  # noqa: E402

from edgekit.bundle import write_json_atomic  # noqa: E402
from edgekit.convert import Calibration, ConvertRecipe, convert  # noqa: E402
from edgekit.progress import Progress  # noqa: E402
from edgekit.report import write_report  # noqa: E402
from edgekit.runtime import load  # noqa: E402
from edgekit.runtime.check import golden_check  # noqa: E402
from edgekit.table import render  # noqa: E402
from edgekit.targets import builtin_names  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="edgekit-demo")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-device", action="store_true", help="skip the local device (deploy + profile)")
    ap.add_argument("--keep-device", action="store_true", help="leave the local device running")
    ap.add_argument("--emulated", action="store_true",
                    help="deploy to the emulated arm64 device (qemu; needs qemu-user-static, debootstrap)")
    a = ap.parse_args()
    out = Path(a.out)
    progress = Progress()
    model = out / "digits.keras"
    if not model.exists():
        progress.say("training the digits CNN (scikit-learn's bundled digits)")
        train(out)
    result = convert(ConvertRecipe(str(model), builtin_names(), calibration=Calibration(str(out / "calib.npz")),
                                   validation=str(out / "val.npz")), str(out / "build"), progress=progress)
    print(result.table())
    rows, records = [], []
    for b in result.bundles:
        progress.say(f"measuring {b.path.name}: {a.warmup} warm-up + {a.runs} runs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # GPU providers absent on this machine
            m = load(b.path)
        health = golden_check(m)
        rep = m.benchmark(runs=a.runs, warmup=a.warmup)
        write_json_atomic(out / "bench" / f"{b.path.name}.json", rep)  # raw samples, for the HTML report
        v = b.artifact.metrics
        rows.append([b.target, b.fmt, len(b.artifact.data) / 1024, len(b.artifact.data) / b.artifact.float_bytes,
                     f"{100 * v['accuracy_float']:.2f} → {100 * v['accuracy_quant']:.2f}",
                     100 * v["top1_agreement"],
                     f"{m.backend} ({', '.join(p.replace('ExecutionProvider', '') for p in m.providers)})",
                     m.threads, rep["latency"]["p50_ms"], rep["end_to_end"]["p50_ms"],
                     "ok" if health["ok"] else "FAILED", "noisy" if rep["noisy"] else "ok"])
        records.append({"bundle": str(b.path), "target": b.target, "format": b.fmt,
                        "validation": v, "health": health, "benchmark": {
                            k: rep[k] for k in ("latency", "end_to_end", "backend", "backend_version",
                                                "threads", "providers", "conditions", "noisy",
                                                "noise_reasons", "load_ms", "first_inference_ms")}})
    print()
    print(render(["target", "format", "KiB", "size×", "accuracy % float → quantized", "agree %",
                  "backend here", "thr", "p50 ms", "e2e p50 ms", "golden", "timing"], rows,
                 title="edgekit main job: digits CNN, every target, measured on this machine"))
    c = records[0]["benchmark"]["conditions"] if records else {}
    print(f"measured on {c.get('cpu_model')} ({c.get('cpu_count')} cores); latency is this machine's, "
          "not the target's: deploy and `edgekit profile` for the device's figures")
    device = None if a.no_device else deploy_and_profile(out, a, progress)
    write_json_atomic(out / "main-job.json", {"convert": result.to_dict(), "bundles": records,
                                              "device": device})
    print(f"bundles in {out / 'build'}, JSON in {out / 'main-job.json'}")
    html = write_report(out / "build", [d for d in (out / "bench", out / "profiles") if d.is_dir()],
                        out / "report.html")
    print(f"report: {html}")
    ok = all(r["health"]["ok"] for r in records) and (device is None or device.get("ok", True))
    return 0 if ok else 1


def deploy_and_profile(out: Path, a, progress: Progress):
    """A local device, the whole build deployed to it over SSH, its bundle profiled on it."""
    import dataclasses

    from edgekit.bundle import read_bundle
    from edgekit.deploy import ops
    from edgekit.deploy.inventory import Device, Inventory
    from edgekit.errors import EdgekitError
    from edgekit.lab import local
    from edgekit.runtime.report import bench_table

    base = out / "local-devices"
    try:
        local.check_prerequisites()
    except EdgekitError as e:
        print(f"\nlocal device skipped: {e}")
        return {"skipped": str(e)}
    if a.emulated:
        from edgekit.lab import emulated as kind

        progress.say("starting the emulated arm64 device (Debian 12 arm64 under qemu)")
        info = kind.up("demo-device", say=progress.say, base=base)
    else:
        kind = local
        progress.say("starting a local device (sshd in its own network namespace)")
        info = local.up("demo-device", base=base)
    try:
        (out / "known_hosts").write_text(info["host_key"] + "\n")
        inv = Inventory(out / "devices.toml", known_hosts=str(out / "known_hosts"),
                        ssh_config=str(out / "ssh_config"))
        probe = Device(name="demo-device", host=info["host"], user="root", key_file=info["key_file"],
                       root=info["root"], python=info["python"])
        opts = ops.Options(inv, progress=progress)
        facts = ops.info(probe, opts).data["facts"]
        dev = dataclasses.replace(probe, target=facts["suggested_target"])
        inv.add(dev, replace_existing=True)
        inv.save()
        bundles = [read_bundle(p) for p in sorted((out / "build").iterdir()) if (p / "manifest.json").is_file()]
        dep = ops.deploy(dev, bundles, opts)
        chosen = read_bundle(out / "build" / dep.data["bundle"])
        prof = ops.profile(dev, chosen, opts, runs=a.runs, warmup=a.warmup, out_dir=out / "profiles")
        print(f"\ndeployed to {'the emulated arm64' if a.emulated else 'local'} device demo-device "
              f"({info['host']}, looks like {dev.target}): "
              f"{dep.data['bundle']} {dep.status}, "
              f"health {'ok' if (dep.data.get('health') or {}).get('ok') else 'FAILED'}")
        print(bench_table([prof.data["report"]], label="device"))
        print(f"profile saved to {prof.data['saved']}" + (
            f"; device kept: `edgekit status --inventory {inv.path}`, "
            f"`EDGEKIT_LOCAL_DEVICES={base} edgekit device {'emulate' if a.emulated else 'local'} down demo-device "
            f"--inventory {inv.path}`"
            if a.keep_device else "; local device removed (--keep-device keeps it)"))
        return {"ok": dep.ok, "deploy": dep.to_dict(), "profile": prof.data["saved"]}
    finally:
        if not a.keep_device:
            kind.down("demo-device", base=base)


if __name__ == "__main__":
    sys.exit(main())
