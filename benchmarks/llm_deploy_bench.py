"""Deploying a language-model-sized bundle to a lab device (real sshd in a network namespace; needs
root, sshd and ip): edgekit's upload against `scp -r` of the same files over the same link, and a
redeploy that changes one small file.

    python benchmarks/llm_deploy_bench.py [--mb 300] [--rounds 3]

The bundle is synthetic (random weights under model/, the LLM manifest listing every file with its
sha256: tests/test_deploy_llm.py's), since the transport never looks inside the files. Per round,
alternating sides so drift hits both:

- fresh release: the device's model directory removed, then edgekit's push (one device process:
  the plan, each object streamed down its standard input and hashed as it arrives, then the release
  linked from the objects and `release store` checking it against the release id computed from their
  verified digests) — timed as a whole and its upload phase apart;
  against `scp -r -q` of the bundle directory (OpenSSH, same key, same cipher choice left to ssh);
- redeploy: the same release on the device, then one whose chat template changed (and so its
  manifest): bytes sent and wall time of the push, against scp of the whole bundle again
  (what a copy without content addressing sends).

JSON in benchmarks/results/llm_deploy_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from devicelab import Lab  # noqa: E402
from test_deploy_llm import NAME, synthetic_llm  # noqa: E402

from edgekit.deploy import artifact, ops, transfer  # noqa: E402
from edgekit.deploy.connection import Connection  # noqa: E402
from edgekit.deploy.inventory import load_inventory  # noqa: E402


def _push(inv, art):
    """(seconds for the whole push, seconds of its upload phase, bytes sent)."""
    opts = ops.Options(inv)
    with Connection(inv.devices["dev0"], inv).open() as c:
        s = opts.session(c)
        s.ensure_runtime()
        s.status(art.name, clean_incoming=True)
        t0 = time.perf_counter()
        store = transfer.Store(s, art.name)
        plan = store.plan(art, genai=True)
        ops.preflight(s.device, art, opts)(plan)
        t1 = time.perf_counter()
        sent = store.send(plan)
        t2 = time.perf_counter()
        r = store.commit(art, plan, then="store")
        t3 = time.perf_counter()
        assert r["result"]["status"] == "stored", r
    return t3 - t0, t2 - t1, sent


def _scp(lab, src: Path) -> float:
    dev = lab.devices["dev0"]
    dest = f"root@{dev.addr}:{dev.root}/scp-copy"
    shutil.rmtree(dev.root / "scp-copy", ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", "-r", "-i", str(lab.key), "-o", f"UserKnownHostsFile={lab.known_hosts}",
                    "-o", "StrictHostKeyChecking=yes", str(src), dest], check=True)
    t = time.perf_counter() - t0
    shutil.rmtree(dev.root / "scp-copy", ignore_errors=True)
    return t


def bench(work: Path, mb: int, rounds: int) -> dict:
    load0 = list(os.getloadavg())
    a = synthetic_llm(work / f"{NAME}-x86-avx2-int4", mb=mb)
    b = synthetic_llm(work / "changed" / f"{NAME}-x86-avx2-int4", mb=mb, template="{{ bos }}{{ messages }}")
    art_a, art_b = artifact.read_one(a), artifact.read_one(b)
    lab = Lab(work / "lab")
    lab.setup()
    try:
        lab.add("dev0", sys.executable)
        lab.write_known_hosts()
        lab.write_inventory()
        inv = load_inventory(lab.inventory)
        dev = lab.devices["dev0"]
        fresh, upload, scp, redeploy, sent_fresh, sent_re, scp_again = [], [], [], [], [], [], []
        for i in range(rounds):
            for side in (("edgekit", "scp") if i % 2 == 0 else ("scp", "edgekit")):
                if side == "scp":
                    scp.append(_scp(lab, a))
                    continue
                shutil.rmtree(dev.root / "models", ignore_errors=True)
                total, up, sent = _push(inv, art_a)
                fresh.append(total)
                upload.append(up)
                sent_fresh.append(sent)
            # redeploy: release A is on the device (just pushed); B changes the chat template
            total, _, sent = _push(inv, art_b)
            redeploy.append(total)
            sent_re.append(sent)
            scp_again.append(_scp(lab, b))
            shutil.rmtree(dev.root / "models" / NAME / "releases" / art_b.sha256, ignore_errors=True)
    finally:
        lab.teardown()
    med = statistics.median
    return {
        "what": f"synthetic LLM bundle ({mb} MiB of random weights + model/ files + manifest) to one lab device "
                "(sshd in a network namespace on this machine; device and controller share its cores)",
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "load_avg_at_start": load0, "load_avg_at_end": list(os.getloadavg())},
        "bundle_bytes": art_a.bytes, "rounds": rounds,
        "fresh": {"edgekit_push_s": fresh, "edgekit_upload_phase_s": upload, "scp_s": scp,
                  "edgekit_bytes_sent": sent_fresh,
                  "edgekit_push_MBps_median": art_a.bytes / 1e6 / med(fresh),
                  "edgekit_upload_MBps_median": art_a.bytes / 1e6 / med(upload),
                  "scp_MBps_median": art_a.bytes / 1e6 / med(scp),
                  "speed_vs_scp_push": med(scp) / med(fresh),
                  "speed_vs_scp_upload_phase": med(scp) / med(upload)},
        "redeploy_one_small_file": {
            "edgekit_push_s": redeploy, "edgekit_bytes_sent": sent_re, "scp_whole_bundle_s": scp_again,
            "bytes_sent_fraction": med(sent_re) / art_b.bytes,
            "files_changed": sorted(rel for rel, d in art_b.file_digests().items()
                                    if art_a.file_digests().get(rel) != d)},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_deploy_bench.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-llm-deploy-") as d:
        res = bench(Path(d), args.mb, args.rounds)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
