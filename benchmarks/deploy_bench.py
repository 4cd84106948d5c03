"""Deploy figures on lab devices (real sshd in network namespaces; needs root, sshd, ip).

    python benchmarks/deploy_bench.py upload   # 50 MB bundle: edgekit upload vs scp, same link
    python benchmarks/deploy_bench.py fleet    # 8 devices in parallel vs 1 device: wall time
    python benchmarks/deploy_bench.py profile  # profile over SSH vs the same bench run locally

Each comparison alternates its two sides round by round, so drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

from conftest import device_venv  # noqa: E402
from devicelab import Lab  # noqa: E402

from edgekit.bundle import read_bundle  # noqa: E402
from edgekit.deploy import ops  # noqa: E402
from edgekit.deploy.connection import Connection  # noqa: E402
from edgekit.deploy.fleet import fan_out  # noqa: E402
from edgekit.deploy.inventory import load_inventory  # noqa: E402
from edgekit.deploy.session import DeviceSession  # noqa: E402


def digits_bundle(work: Path) -> Path:
    from digits import train

    from edgekit.convert import convert

    train(work, epochs=3)
    r = convert(str(work / "digits.keras"), ["rpi4"], str(work / "build"), calib=str(work / "calib.npz"),
                formats=["tflite"])
    return r.bundles[0].path


def make_lab(work: Path, n: int, reqs=("ai-edge-litert",)) -> Lab:
    lab = Lab(work / "lab")
    lab.setup()
    py = str(device_venv(list(reqs)))
    for i in range(n):
        lab.add(f"dev{i}", py)
    lab.write_known_hosts()
    lab.write_inventory()
    return lab


def bench_upload(work: Path, rounds: int, mb: int) -> dict:
    src = digits_bundle(work)
    big = work / "big"
    shutil.copytree(src, big)
    (big / "payload.bin").write_bytes(np.random.default_rng(0).bytes(mb << 20))
    bundle = read_bundle(big)
    size = sum(p.stat().st_size for p in big.rglob("*") if p.is_file())
    lab = make_lab(work, 1)
    try:
        dev = lab.devices["dev0"]
        inv = load_inventory(lab.inventory)
        ek, scp = [], []
        for _ in range(rounds):
            with Connection(inv.devices["dev0"], inv).open() as c:
                s = DeviceSession(c)
                s.ensure_runtime()
                free = s.release("status", "--name", "digits", "--clean-incoming")["free_bytes"]
                t0 = time.perf_counter()
                incoming, sent = s.upload_bundle(big, "digits", bundle.digest(), free)
                ek.append(time.perf_counter() - t0)
            shutil.rmtree(dev.root / "models", ignore_errors=True)
            dest = f"root@{dev.addr}:{dev.root}/scp-copy"
            t0 = time.perf_counter()
            subprocess.run(["scp", "-q", "-r", "-i", str(lab.key), "-o", f"UserKnownHostsFile={lab.known_hosts}",
                            "-o", "StrictHostKeyChecking=yes", str(big), dest], check=True)
            scp.append(time.perf_counter() - t0)
            shutil.rmtree(dev.root / "scp-copy", ignore_errors=True)
    finally:
        lab.teardown()
    mbps = lambda t: size / 1e6 / t  # noqa: E731
    return {"bytes": size, "rounds": rounds, "edgekit_s": ek, "scp_s": scp,
            "edgekit_MBps_median": mbps(statistics.median(ek)), "scp_MBps_median": mbps(statistics.median(scp)),
            "ratio_edgekit_over_scp_throughput": statistics.median(scp) / statistics.median(ek)}


def _cpu_busy():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(v) - v[3] - v[4], sum(v)


def bench_fleet(work: Path, rounds: int, n: int) -> dict:
    """Wall time of one deploy to n devices in parallel vs to one device. The lab's devices
    share this machine's cores with the controller, so the machine's CPU use is reported
    beside it: at 100% busy the fleet figure is bounded by the lab, not by the fan-out."""
    import resource

    bundle = read_bundle(digits_bundle(work))
    lab = make_lab(work, n)
    try:
        inv = load_inventory(lab.inventory)
        devs = list(inv.devices.values())
        opts = ops.Options(inv)
        fan_out(devs, lambda d: ops.setup(d, opts), parallel=n)  # runtime pushed up front in both cases
        rows = {1: [], n: []}
        for _ in range(rounds):
            for k in (1, n):
                for d in lab.devices.values():
                    shutil.rmtree(d.root / "models", ignore_errors=True)
                b0, j0 = _cpu_busy()
                c0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                r = fan_out(devs[:k], lambda d: ops.deploy(d, bundle, opts), parallel=k)
                wall = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_SELF)
                b1, j1 = _cpu_busy()
                assert not r.failed, r.failed[0].reason
                rows[k].append({"wall_s": wall, "machine_busy_core_s": (b1 - b0) / os.sysconf("SC_CLK_TCK"),
                                "machine_utilisation": (b1 - b0) / max(1, j1 - j0),
                                "controller_cpu_s": (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)})
    finally:
        lab.teardown()
    med = lambda k, key: statistics.median(x[key] for x in rows[k])  # noqa: E731
    cores = os.cpu_count()
    return {"devices": n, "rounds": rounds, "cores": cores, "one": rows[1], "fleet": rows[n],
            "ratio_fleet_over_one": med(n, "wall_s") / med(1, "wall_s"),
            "fleet_machine_utilisation": med(n, "machine_utilisation"),
            "lower_bound_wall_s_on_this_machine": med(n, "machine_busy_core_s") / cores,
            "controller_cpu_s_fleet": med(n, "controller_cpu_s")}


def resnet8_bundle(work: Path) -> Path:
    from imagegen import natural_patches

    from edgekit.convert import convert

    np.savez(work / "calib.npz", natural_patches(200, 0, 32))
    r = convert(str(ROOT.parent / "shared" / "models" / "mlperf-tiny" / "pretrainedResnet.h5"), ["rpi4"],
                str(work / "build"), calib=str(work / "calib.npz"), formats=["tflite"], name="resnet8")
    return r.bundles[0].path


def bench_profile(work: Path, rounds: int, runs: int, threads: int = 1) -> dict:
    """ResNet-8 (about a millisecond per inference, so the figure is not timer noise), one
    thread (the lab shares 2 cores), p50 on the device over SSH vs the same command run here
    in the same Python environment; rounds alternate."""
    bundle = read_bundle(resnet8_bundle(work))
    lab = make_lab(work, 1)
    try:
        inv = load_inventory(lab.inventory)
        dev = inv.devices["dev0"]
        opts = ops.Options(inv)
        py = lab.devices["dev0"].python
        remote, local = [], []
        for _ in range(rounds):
            r = ops.profile(dev, bundle, opts, runs=runs, warmup=50, threads=threads)
            remote.append(r.data["report"]["latency"]["p50_ms"])
            out = subprocess.run([py, "-m", "edgekit.runtime", "bench", str(bundle.path), "--json",
                                  "--runs", str(runs), "--warmup", "50", "--threads", str(threads)],
                                 capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, check=True)
            local.append(json.loads(out.stdout)["latency"]["p50_ms"])
    finally:
        lab.teardown()
    return {"model": "MLPerf Tiny ResNet-8, rpi4 bundle", "threads": threads, "rounds": rounds, "runs": runs,
            "device_p50_ms": remote, "local_p50_ms": local,
            "ratio_device_over_local": statistics.median(remote) / statistics.median(local)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["upload", "fleet", "profile"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--runs", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as d:
        work = Path(d)
        if a.what == "upload":
            res = bench_upload(work, a.rounds, a.mb)
        elif a.what == "fleet":
            res = bench_fleet(work, a.rounds, a.devices)
        else:
            res = bench_profile(work, a.rounds, a.runs)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
