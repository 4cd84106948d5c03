"""edgekit serve vs in-process model(x): p50/p99 latency and throughput at concurrency 1, 4, 16,
with and without dynamic batching, on loopback.

    python benchmarks/serve_bench.py [--requests 240] [--out serve_bench.json] [--json] [--http h11]

Models: MLPerf Tiny's ResNet-8 (tests/models/mlperf-tiny/pretrainedResnet_quant.tflite, INT8,
LiteRT) and a MobileNetV2 (keras.applications.MobileNetV2(weights=None), exported to float ONNX,
ONNX Runtime). In-process: c threads, each with its own runtime instance, calling model(x).
API: `python -m edgekit.serve` in its own process (same threads per instance, --max-concurrency 1
unless --max-concurrency is given), c client threads each with a keep-alive http.client
connection sending binary tensors (what tritonclient sends). Each loop is bounded by a request
count and a time limit. "CPU ms/req": in-process, this process's CPU time per call; API, the
server process's CPU time per request (clients excluded) -- unlike wall-clock latency, it does
not depend on how busy the machine is. Goals (issue 13): API overhead over in-process <= 1 ms at p50 at c=1 for
ResNet-8; with batching, >= 1.5x the throughput at c=16 for MobileNetV2. Batching can gain no more than
the backend gains from running a batch: "batch ceiling" (in-process, the same instance: 16 calls of batch 1
vs one call of batch 16) is measured beside it, and the server's mean batch size at c=16 is reported.
The server's HTTP parser (httptools when installed, else h11; --http picks) is in the conditions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESNET8 = ROOT / "tests" / "models" / "mlperf-tiny" / "pretrainedResnet_quant.tflite"
CONCURRENCY = (1, 4, 16)


def mobilenetv2(cache: Path, size: int) -> Path:
    """MobileNetV2 (random weights) as float ONNX with a dynamic batch; built once, cached."""
    out = cache / f"mobilenetv2_{size}.onnx"
    if out.is_file():
        return out
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from edgekit.convert.onnx import saved_model_to_onnx

    model = keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3))
    with tempfile.TemporaryDirectory() as d:
        model.export(os.path.join(d, "sm"), verbose=False)
        data = saved_model_to_onnx(Path(d) / "sm", 13)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def stats(lat_s, wall_s, n_ok, n_fail):
    a = np.asarray(lat_s) * 1e3
    return {"requests": int(n_ok), "failed": int(n_fail), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()),
            "throughput_per_s": float(n_ok / wall_s), "wall_s": float(wall_s)}


def run_threads(c, work, total, time_limit):
    """c threads share `total` calls of work(i) (each returns True on success); bounded in time."""
    lat, fails, lock = [], [0], threading.Lock()
    counter = iter(range(total))
    deadline = time.monotonic() + time_limit

    def worker(i):
        state = work("open", i)
        while time.monotonic() < deadline:
            with lock:
                k = next(counter, None)
            if k is None:
                break
            t0 = time.perf_counter()
            ok = work(state, k)
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    fails[0] += 1
        work(("close", state), i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats(lat, time.perf_counter() - t0, len(lat), fails[0])


def in_process(path, x, c, total, threads, time_limit):
    from edgekit.runtime import load

    models = [load(path, threads=threads) for _ in range(c)]
    for m in models:
        for _ in range(5):
            m(x)

    def work(state, k):
        if state == "open":
            return models[k]
        if isinstance(state, tuple):
            return None
        state(x)
        return True

    cpu0 = time.process_time()
    res = run_threads(c, work, total, time_limit)
    res["cpu_ms_per_request"] = (time.process_time() - cpu0) * 1e3 / max(res["requests"], 1)
    return res


def batch_ceiling(path, x, n, threads, rounds=7):
    """In-process throughput of one call of batch n over n calls of batch 1 (same instance,
    alternated rounds, best of each): the most dynamic batching can give this model here."""
    from edgekit.runtime import load

    m = load(path, threads=threads)
    xn = np.repeat(x, n, axis=0)
    for _ in range(3):
        m(x)
        m(xn)
    one, many = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            m(x)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m(xn)
        many.append(time.perf_counter() - t0)
    return {"batch": n, f"{n}x_batch1_ms": min(one) * 1e3, f"batch{n}_ms": min(many) * 1e3,
            "ceiling": min(one) / min(many)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, path, args, log):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekit.serve", str(path), "--port", str(self.port),
                                      *args], stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    c.close()
                    return
                c.close()
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("the server did not come up within 120 s")

    def cpu_s(self) -> float:
        """The server process's CPU time so far (user + system): robust to a busy machine."""
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def batches(self):
        """(samples run, model executions) so far, from the server's /metrics."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        vals = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                if ln.startswith(("edgekit_serve_batch_size_sum", "edgekit_serve_batch_size_count"))}
        return vals.get("edgekit_serve_batch_size_sum", 0.0), vals.get("edgekit_serve_batch_size_count", 0.0)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def via_api(port, name, input_name, x, c, total, time_limit):
    head = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + x.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    path = f"/v2/models/{name}/infer"
    errors = []

    def work(state, k):
        if state == "open":
            return http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if isinstance(state, tuple):
            state[1].close()
            return None
        state.request("POST", path, body, headers)
        r = state.getresponse()
        data = r.read()
        if r.status != 200:
            errors.append(data[:200])
            return False
        hl = int(r.getheader("Inference-Header-Content-Length"))
        return len(data) > hl

    for _ in range(5):  # warm-up
        conn = work("open", 0)
        work(conn, 0)
        work(("close", conn), 0)
    res = run_threads(c, work, total, time_limit)
    if errors:
        res["errors"] = sorted(set(e.decode("utf-8", "replace") for e in errors))[:3]
    return res


def table(rows):
    from edgekit.table import render

    return render(["model", "mode", "c", "p50 ms", "p99 ms", "req/s", "CPU ms/req", "mean batch", "ok", "failed"],
                  [[r["model"], r["mode"], r["c"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                    f"{r['throughput_per_s']:.1f}", f"{r['cpu_ms_per_request']:.2f}",
                    f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-", r["requests"], r["failed"]]
                   for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=240, help="requests per measurement (per c)")
    p.add_argument("--time-limit", type=float, default=15.0,
                   help="seconds per measurement at most (15 x 15 s bounds the run under 5 min)")
    p.add_argument("--mobilenet-size", type=int, default=128, help="MobileNetV2 input size")
    p.add_argument("--threads", type=int, default=1, help="backend threads per instance")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=2.0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "edgekit" / "bench"))
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    p.add_argument("--only", choices=["resnet8", "mobilenetv2"])
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="the server's HTTP parser (auto: httptools when installed)")
    a = p.parse_args(argv)

    def say(t):
        print(t, file=sys.stderr, flush=True)

    models = []
    if a.only in (None, "resnet8"):
        models.append(("resnet8", RESNET8, np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3))
                       .astype(np.float32), [("no batching", [])]))
    if a.only in (None, "mobilenetv2"):
        say(f"building MobileNetV2 {a.mobilenet_size}x{a.mobilenet_size} (cached under {a.cache}) ...")
        mb = mobilenetv2(Path(a.cache), a.mobilenet_size)
        models.append(("mobilenetv2", mb, np.random.default_rng(0).standard_normal(
            (1, a.mobilenet_size, a.mobilenet_size, 3)).astype(np.float32),
            [("no batching", []), (f"batching {a.max_batch}/{a.max_delay_ms}ms",
                                   ["--max-batch", str(a.max_batch), "--max-delay-ms", str(a.max_delay_ms)])]))
    from edgekit.serve.server import http_parser

    started = time.monotonic()
    rows = []
    load_before = os.getloadavg()
    say(f"load average before: {load_before[0]:.2f} on {os.cpu_count()} CPUs; "
        f"server HTTP parser: {http_parser(a.http)}")
    log = open(os.devnull, "w")
    for label, path, x, modes in models:
        from edgekit.runtime import load

        m = load(path)
        input_name, served = m.inputs[0].name, Path(path).stem
        for c in CONCURRENCY:
            say(f"{label}: in-process, c={c}")
            rows.append(dict(model=label, mode="in-process", c=c,
                             **in_process(path, x, c, a.requests, a.threads, a.time_limit)))
        for mode, extra in modes:
            srv = Server(path, ["--threads", str(a.threads), "--http", a.http, *extra], log)
            seen = srv.batches()
            try:
                for c in CONCURRENCY:
                    say(f"{label}: API {mode}, c={c}")
                    cpu0 = srv.cpu_s()
                    r = via_api(srv.port, served, input_name, x, c, a.requests, a.time_limit)
                    r["cpu_ms_per_request"] = (srv.cpu_s() - cpu0) * 1e3 / max(r["requests"] + 5, 1)
                    runs = srv.batches()
                    r["mean_batch"] = (runs[0] - seen[0]) / max(runs[1] - seen[1], 1)
                    r["model_runs"] = int(runs[1] - seen[1])
                    seen = runs
                    rows.append(dict(model=label, mode=f"API {mode}", c=c, **r))
            finally:
                srv.stop()
    summary = {}
    if any(m[0] == "mobilenetv2" for m in models):
        label, path, x, _ = next(m for m in models if m[0] == "mobilenetv2")
        say(f"{label}: batch ceiling (in-process, batch {a.max_batch} vs {a.max_batch} x batch 1)")
        summary["mobilenetv2_batch_ceiling"] = batch_ceiling(path, x, a.max_batch, a.threads)["ceiling"]

    def get(model, mode, c):
        return next((r for r in rows if r["model"] == model and r["mode"].startswith(mode) and r["c"] == c), None)

    ip, api = get("resnet8", "in-process", 1), get("resnet8", "API no batching", 1)
    if ip and api:
        summary["resnet8_overhead_p50_ms_c1"] = api["p50_ms"] - ip["p50_ms"]
        summary["resnet8_server_cpu_overhead_ms_c1"] = api["cpu_ms_per_request"] - ip["cpu_ms_per_request"]
        summary["resnet8_overhead_goal_met"] = summary["resnet8_overhead_p50_ms_c1"] <= 1.0
    nb, b = get("mobilenetv2", "API no batching", 16), get("mobilenetv2", "API batching", 16)
    if nb and b:
        summary["mobilenetv2_batching_speedup_c16"] = b["throughput_per_s"] / nb["throughput_per_s"]
        summary["mobilenetv2_batching_goal_met"] = summary["mobilenetv2_batching_speedup_c16"] >= 1.5
        summary["mobilenetv2_mean_batch_c16"] = b.get("mean_batch")
    from edgekit.runtime.facts import device_facts

    doc = {"rows": rows, "summary": summary, "conditions": {
        "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "threads_per_instance": a.threads, "requests_per_measurement": a.requests,
        "mobilenet_size": a.mobilenet_size, "http_parser": http_parser(a.http),
        "wall_s": time.monotonic() - started, "facts": device_facts()}}
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        os.replace(tmp, a.out)
    if a.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(table(rows))
        for k, v in summary.items():
            print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
