"""Deploy figures on lab devices (real sshd in network namespaces; needs root, sshd, ip).

    python benchmarks/deploy_bench.py upload   # 50 MB bundle: edgekit upload vs scp, same link
    python benchmarks/deploy_bench.py fleet    # 8 devices in parallel vs 1 device: wall time
    python benchmarks/deploy_bench.py profile  # profile over SSH vs the same bench run locally
    python benchmarks/deploy_bench.py scale    # staged rollout to 1, 4, 8, 16 devices: controller CPU,
                                               # memory, wall time; device-side CPU apart
    python benchmarks/deploy_bench.py hashes   # bytes of the bundle hashed per single-device deploy
    python benchmarks/deploy_bench.py ansible  # the exported playbook vs edgekit deploy, same devices:
                                               # controller CPU and wall time

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
from edgekit.deploy import artifact, ops  # noqa: E402
from edgekit.deploy.connection import Connection  # noqa: E402
from edgekit.deploy.fleet import fan_out  # noqa: E402
from edgekit.deploy.inventory import load_inventory  # noqa: E402
from edgekit.deploy.session import DeviceSession  # noqa: E402


def digits_bundle(work: Path) -> Path:
    from digits import train

    from edgekit.convert import Calibration, ConvertRecipe, convert

    train(work, epochs=3)
    r = convert(ConvertRecipe(str(work / "digits.keras"), ["rpi4"], calibration=Calibration(str(work / "calib.npz")),
                              formats=["tflite"]), str(work / "build"))
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
    art = artifact.prepare(read_bundle(big))
    size = art.bytes
    lab = make_lab(work, 1)
    try:
        dev = lab.devices["dev0"]
        inv = load_inventory(lab.inventory)
        ek, scp = [], []
        for _ in range(rounds):
            with Connection(inv.devices["dev0"], inv).open() as c:
                s = DeviceSession(c)
                s.ensure_runtime()
                free = s.status("digits", clean_incoming=True).free_bytes
                t0 = time.perf_counter()
                incoming, sent = s.upload(art, free)
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


def bench_scale(work: Path, sizes=(1, 4, 8, 16), rounds: int = 2) -> dict:
    """A staged rollout (canary 1, then 50%, 100%; parallel 8) of the digits CNN (a ~170 KB
    bundle) to n lab devices, from scratch each round (runtime push + upload + switch + golden
    check). Controller: this process's CPU seconds (all threads) and the growth of its resident
    memory (peak VmRSS sampled every 20 ms, minus before; no tracemalloc: it would slow the
    controller two- to three-fold). Devices: the CPU seconds of everything their sshd ran (the listener's
    reaped children: sessions, the device Pythons), measured apart from the controller."""
    import resource

    from edgekit.deploy import artifact
    from edgekit.deploy.rollout import Plan, Rollout, Share

    src = digits_bundle(work)
    arts = artifact.load(src)
    lab = make_lab(work, max(sizes))
    os.environ["EDGEKIT_ROLLOUTS"] = str(work / "rollouts")
    out = []
    try:
        inv = load_inventory(lab.inventory)
        devs = list(inv.devices.values())
        for n in sizes:
            for _ in range(rounds):
                for d in lab.devices.values():
                    shutil.rmtree(d.root, ignore_errors=True)
                    d.root.mkdir()
                plan = Plan(canary=Share.parse("1"), stages=Share.parse_list("50%,100%"), parallel=8)
                r = Rollout.create(plan, arts, devs[:n], ops.Options(inv), lab.inventory, str(src))
                used = [lab.devices[d.name] for d in devs[:n]]
                d0 = sum(_reaped_cpu(d.proc.pid) for d in used)
                rss = _RssPeak()
                c0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                rec = r.run()
                wall = time.perf_counter() - t0
                c1 = resource.getrusage(resource.RUSAGE_SELF)
                rss_growth = rss.stop()
                d1 = sum(_reaped_cpu(d.proc.pid) for d in used)
                assert rec["state"] == "done", rec
                ctl = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                out.append({"devices": n, "batches": len(rec["batches"]), "wall_s": wall, "controller_cpu_s": ctl,
                            "controller_cpu_s_per_device": ctl / n, "controller_rss_growth_mb": rss_growth / 1e6,
                            "device_cpu_s_per_device": (d1 - d0) / n,
                            "device_seconds_median": statistics.median(d["seconds"] for d in rec["devices"].values())})
    finally:
        lab.teardown()
    table = {}
    for n in sizes:
        rows = [x for x in out if x["devices"] == n]
        table[n] = {k: statistics.median(x[k] for x in rows) for k in rows[0] if k != "devices"}
    return {"cores": os.cpu_count(), "rounds": rounds, "bundle_bytes": arts[0].bytes, "by_devices": table,
            "runs": out}


def _reaped_cpu(pid: int) -> float:
    """CPU seconds of a process's children it has waited for (cutime + cstime, /proc/PID/stat)."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")


class _RssPeak:
    """Samples this process's VmRSS every 20 ms; stop() gives the peak minus the start."""

    def __init__(self):
        import threading

        self.start, self.peak, self._stop = self._rss(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def _rss() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(0, max(self.peak, self._rss()) - self.start)


def bench_ansible(work: Path, n: int = 8, rounds: int = 1) -> dict:
    """The same one-batch deploy to n lab devices (fresh roots) by `edgekit deploy` (in process,
    parallel n) and by the exported playbook (`ansible-playbook`, forks n): wall time and the
    controller's CPU seconds (ansible: its processes, RUSAGE_CHILDREN; edgekit: this process)."""
    import resource

    from click.testing import CliRunner

    from edgekit.cli import cli

    src = digits_bundle(work)
    lab = make_lab(work, n)
    out = {"devices": n, "edgekit": [], "ansible": []}
    try:
        exp = work / "ansible"
        r = CliRunner().invoke(cli, ["export", "ansible", "--group", "lab", "--bundle", str(src), "-o", str(exp),
                                     "--forks", str(n), "--inventory", str(lab.inventory)])
        assert r.exit_code == 0, r.output
        env = dict(os.environ, ANSIBLE_NOCOLOR="1")
        for _ in range(rounds):
            for side in ("edgekit", "ansible"):
                for d in lab.devices.values():
                    shutil.rmtree(d.root, ignore_errors=True)
                    d.root.mkdir()
                c0, k0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                if side == "edgekit":
                    r = CliRunner().invoke(cli, ["deploy", str(src), "--group", "lab", "--parallel", str(n), "-q",
                                                 "--inventory", str(lab.inventory)])
                    assert r.exit_code == 0, r.output
                else:
                    p = subprocess.run(["ansible-playbook", "deploy.yml"], cwd=exp, env=env, capture_output=True,
                                       text=True)
                    assert p.returncode == 0, p.stdout[-2000:]
                wall = time.perf_counter() - t0
                c1, k1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
                who = (c1, c0) if side == "edgekit" else (k1, k0)
                cpu = (who[0].ru_utime - who[1].ru_utime) + (who[0].ru_stime - who[1].ru_stime)
                out[side].append({"wall_s": wall, "controller_cpu_s": cpu, "controller_cpu_s_per_device": cpu / n})
    finally:
        lab.teardown()
    return out


def bench_hashes(work: Path) -> dict:
    """How many times `edgekit deploy BUNDLE -d dev0` (in process, as a user runs it) reads the
    bundle's bytes into sha256, as bundle-equivalents: here (edgekit.bundle.sha256_file, counted)
    and on the device (hashlib.sha256 wrapped by a sitecustomize on the device Python's path),
    for a first deploy and for a redeploy of the same release."""
    from click.testing import CliRunner

    import edgekit.bundle as bmod
    from edgekit.cli import cli
    from edgekit.deploy import artifact

    src = digits_bundle(work)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    lab = make_lab(work, 1)
    site = work / "count-site"
    site.mkdir()
    counts = work / "device-hashed-bytes"
    (site / "sitecustomize.py").write_text(
        "import atexit, hashlib\n_n = [0]\n_sha = hashlib.sha256\n"
        "class _H:\n    def __init__(self, data=b''):\n        self._h = _sha(); self.update(data)\n"
        "    def update(self, b):\n        _n[0] += len(b); self._h.update(b)\n"
        "    def hexdigest(self):\n        return self._h.hexdigest()\n"
        "hashlib.sha256 = _H\n"
        f"atexit.register(lambda: _n[0] and open({str(counts)!r}, 'a').write(str(_n[0]) + '\\n'))\n")
    wrapper = work / "counting-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" '
                       f'exec {lab.devices["dev0"].python} "$@"\n')
    wrapper.chmod(0o755)
    lab.write_inventory(extra={"dev0": {"python": str(wrapper)}})
    here = [0]
    real = bmod.sha256_file

    def counted(path, *a, **kw):
        here[0] += Path(path).stat().st_size
        return real(path, *a, **kw)

    out = {"bundle_bytes": size}
    try:
        r = CliRunner().invoke(cli, ["device", "setup", "dev0", "--inventory", str(lab.inventory)])
        assert r.exit_code == 0, r.output           # the runtime push is not the bundle
        bmod.sha256_file = artifact.sha256_file = counted
        for label in ("first_deploy", "redeploy_unchanged"):
            here[0] = 0
            counts.unlink(missing_ok=True)
            r = CliRunner().invoke(cli, ["deploy", str(src), "-d", "dev0", "--inventory", str(lab.inventory), "--json"])
            assert r.exit_code == 0, r.output
            dev = sum(int(x) for x in counts.read_text().split()) if counts.exists() else 0
            out[label] = {"status": json.loads(r.stdout)[0]["status"], "times_here": here[0] / size,
                          "times_on_device": dev / size, "times_total": (here[0] + dev) / size}
    finally:
        bmod.sha256_file = artifact.sha256_file = real
        lab.teardown()
    return out


def resnet8_bundle(work: Path) -> Path:
    from imagegen import natural_patches

    from edgekit.convert import Calibration, ConvertRecipe, convert

    np.savez(work / "calib.npz", natural_patches(200, 0, 32))
    r = convert(ConvertRecipe(str(ROOT.parent / "shared" / "models" / "mlperf-tiny" / "pretrainedResnet.h5"), ["rpi4"],
                              calibration=Calibration(str(work / "calib.npz")), formats=["tflite"], name="resnet8"),
                              str(work / "build"))
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
    ap.add_argument("what", choices=["upload", "fleet", "profile", "scale", "hashes", "ansible"])
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
        elif a.what == "scale":
            res = bench_scale(work, rounds=a.rounds)
        elif a.what == "hashes":
            res = bench_hashes(work)
        elif a.what == "ansible":
            res = bench_ansible(work, a.devices, a.rounds)
        else:
            res = bench_profile(work, a.rounds, a.runs)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
