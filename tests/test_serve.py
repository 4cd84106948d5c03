"""edgekit serve: a real server process on loopback, called with the real tritonclient.http and
with plain http.client requests (every error status), hot swap under a bounded request loop."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

import tritonclient.http  # noqa: F401  (the dev extra installs it: a missing client fails, never skips)


# --- models made here (ONNX built with onnx.helper: no TensorFlow, milliseconds) -------------

def _onnx_bundle(dest: Path, *, name="two", bias=0.0, slow=0, bad_golden=False):
    """A float ONNX bundle with a dynamic batch. Default: two outputs, scores = x@W + b (3) and
    relu = relu(x) (4). slow=k: one output after k chained 512x512 MatMuls (a model that takes time)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.bundle import write_bundle

    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    if slow:
        w = (rng.standard_normal((512, 512)) / 23).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "W"], [f"h{i + 1}" if i < slow - 1 else "y"])
                 for i in range(slow)]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", f, ["N", 512])],
                                  [helper.make_tensor_value_info("y", f, ["N", 512])],
                                  [numpy_helper.from_array(w, "W")])
        ins, outs, feat = [("x", [-1, 512])], [("y", [-1, 512])], 512
    else:
        w = rng.standard_normal((4, 3)).astype(np.float32)
        b = (rng.standard_normal(3) + bias).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["scores"]),
                 helper.make_node("Relu", ["x"], ["relu"])]
        graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", f, ["N", 4])],
                                  [helper.make_tensor_value_info("scores", f, ["N", 3]),
                                   helper.make_tensor_value_info("relu", f, ["N", 4])],
                                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
        ins, outs, feat = [("x", [-1, 4])], [("scores", [-1, 3]), ("relu", [-1, 4])], 4
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    x = rng.standard_normal((4, feat)).astype(np.float32)
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    golden = {"input:x": x}
    for (n, _), g in zip(outs, got):
        golden[f"output:{n}"] = -g if bad_golden else g
    def spec(n, shape):
        return {"name": n, "shape": shape, "dtype": "float32", "quantization": None}

    manifest = {"name": name, "target": {"name": "x86-avx2", "runtime": {"threads": 1}},
                "inputs": [spec(n, s) for n, s in ins], "outputs": [spec(n, s) for n, s in outs]}
    write_bundle(dest, fmt="onnx", model_bytes=data, manifest=manifest, golden=golden)
    return dest


def _reference(bundle):
    from edgekit.runtime import load

    return load(bundle)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _onnx_bundle(tmp_path_factory.mktemp("serve") / "two")


# --- a real server process -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *paths, args=(), env=None, tmp=None, cwd=ROOT):
        self.port = _free_port()
        self.log = Path(tmp or "/tmp") / f"serve-{self.port}.log"
        e = dict(os.environ, PYTHONPATH=str(ROOT))
        e.update(env or {})
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgekit.serve", *map(str, paths),
                                      "--port", str(self.port), *map(str, args)],
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=e, cwd=str(cwd))
        self.url = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server did not listen within 60 s:\n{self.log.read_text()}")

    def request(self, method, path, body=None, headers=None):
        """(status, headers dict (lower-case), body bytes) over a fresh http.client connection."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def json(self, method, path, doc=None, headers=None):
        body = None if doc is None else (doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        st, h, b = self.request(method, path, body, dict({"Content-Type": "application/json"}, **(headers or {})))
        return st, json.loads(b) if b else None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.log.read_text()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _infer_doc(x, name="x", datatype="FP32"):
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                        "data": x.reshape(-1).tolist()}]}


# --- protocol unit tests (pure logic) ------------------------------------------------------

def test_parse_binary_and_json_bodies():
    from edgekit.serve.protocol import ProtocolError, build_response, parse_infer

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    head = json.dumps({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 24}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    req = parse_infer(head + x.tobytes(), str(len(head)), 1 << 20)
    assert np.array_equal(req.inputs["x"], x) and req.outputs == [("y", True)]
    req = parse_infer(json.dumps(_infer_doc(x)).encode(), None, 1 << 20)
    assert np.array_equal(req.inputs["x"], x) and req.outputs is None
    for body, hlen, status, words in [
        (b"{not json", None, 400, "not valid JSON"),
        (head + x.tobytes()[:-4], str(len(head)), 400, "ends before"),
        (head + x.tobytes() + b"xx", str(len(head)), 400, "not claimed"),
        (json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]}).encode(),
         None, 400, "do not fill"),
        (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}).encode(),
         None, 400, "not supported"),
        (json.dumps({"inputs": [{"name": "x", "shape": [10 ** 9], "datatype": "FP32", "data": []}]}).encode(),
         None, 413, "limit"),
    ]:
        with pytest.raises(ProtocolError) as e:
            parse_infer(body, hlen, 1 << 20)
        assert e.value.status == status and words in e.value.message
    body, hl = build_response("m", "v", "7", [("a", x, True), ("b", x.astype(np.int8), False)])
    doc = json.loads(body[:hl])
    assert doc["id"] == "7" and doc["outputs"][0]["parameters"]["binary_data_size"] == 24
    assert doc["outputs"][1] == {"name": "b", "datatype": "INT8", "shape": [2, 3], "data": list(range(6))}
    assert np.array_equal(np.frombuffer(body[hl:], np.float32).reshape(2, 3), x)


def test_metrics_text_format():
    from edgekit.serve.metrics import Metrics

    m = Metrics()
    m.requests.inc(model="a")
    m.request_latency.observe(0.003, model="a")
    m.batch_size.observe(4, model="a")
    text = m.render().decode()
    assert 'edgekit_serve_requests_total{model="a"} 1' in text
    assert 'edgekit_serve_request_duration_seconds_bucket{model="a",le="0.0025"} 0' in text
    assert 'edgekit_serve_request_duration_seconds_bucket{model="a",le="0.005"} 1' in text
    assert 'edgekit_serve_batch_size_bucket{model="a",le="4"} 1' in text
    assert "# TYPE edgekit_serve_queue_length gauge" in text


def test_config_refuses_open_host_without_token(cli, two):
    from edgekit.serve.server import ServeConfig, ServeError

    with pytest.raises(ServeError, match="without a token"):
        ServeConfig(host="0.0.0.0")
    ServeConfig(host="0.0.0.0", token="t" * 24)
    ServeConfig(host="0.0.0.0", insecure=True)
    r = cli("serve", two, "--host", "0.0.0.0")
    assert r.exit_code == 2 and "--token" in r.output and "Traceback" not in r.output


def test_serve_imports_only_the_device_side():
    """DESIGN.md: serve imports runtime, bundle, errors, numpy, the standard library and uvicorn (a language
    model's batched decoder and tokenizer are the runtime's: edgekit.runtime.llm_batch, edgekit.runtime.llm)."""
    import ast

    allowed = {"edgekit", "edgekit.bundle", "edgekit.errors", "numpy", "uvicorn"}
    for f in (ROOT / "edgekit" / "serve").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for m in mods:
                ok = m in allowed or m.startswith(("edgekit.runtime", "edgekit.serve")) or \
                    m.split(".")[0] in sys.stdlib_module_names
                assert ok, f"{f.name} imports {m}"
    code = ("import sys, edgekit.serve.app, edgekit.serve.server; bad = [m for m in ('tensorflow', 'onnx', "
            "'paramiko', 'click', 'edgekit.convert', 'edgekit.deploy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout + r.stderr
    from edgekit.runtime.files import runtime_files

    assert "serve/__main__.py" in runtime_files()  # pushed to devices with the runtime


def test_serves_from_the_runtime_pushed_to_devices(two, tmp_path):
    """The files deploy pushes (runtime/files.py) are enough for `python -m edgekit.serve`."""
    from edgekit.runtime.files import copy_runtime

    pushed = copy_runtime(tmp_path / "runtime")
    with Server(two, env={"PYTHONPATH": str(pushed)}, tmp=tmp_path, cwd=tmp_path) as srv:
        st, body = srv.json("POST", "/v2/models/two/infer", _infer_doc(np.ones((1, 4), np.float32)))
        assert st == 200 and [o["name"] for o in body["outputs"]] == ["scores", "relu"]
    code = "import edgekit.serve.server as s; print(s.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(pushed)))
    assert out.stdout.strip().startswith(str(pushed)), out


# --- the real client against a real server ---------------------------------------------------

def test_tritonclient_binary_and_json_two_outputs(two, tmp_path):
    import tritonclient.http as th

    ref = _reference(two)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    want = ref.run(x)
    with Server(two, tmp=tmp_path) as srv:
        c = th.InferenceServerClient(srv.url)
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("two")
        meta = c.get_model_metadata("two")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert [o["name"] for o in meta["outputs"]] == ["scores", "relu"]
        version = meta["versions"][0]
        assert c.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_repository"]
        for binary_in in (True, False):
            inp = th.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary_in)
            res = c.infer("two", [inp])  # no outputs named: every output, binary
            assert res.get_response()["model_version"] == version
            for k in ("scores", "relu"):
                np.testing.assert_allclose(res.as_numpy(k), want[k], rtol=1e-6, atol=1e-6)
            outs = [th.InferRequestedOutput("relu", binary_data=False)]
            res = c.infer("two", [inp], outputs=outs, model_version=version, request_id="r1")
            r = res.get_response()
            assert r["id"] == "r1" and [o["name"] for o in r["outputs"]] == ["relu"]
            assert "data" in r["outputs"][0]
            np.testing.assert_allclose(res.as_numpy("relu"), want["relu"], rtol=1e-6)
        with pytest.raises(th.InferenceServerException, match="unknown model"):
            c.get_model_metadata("nope")
        metrics = srv.request("GET", "/metrics")[2].decode()
        assert 'edgekit_serve_requests_total{model="two"} 4' in metrics
        assert 'edgekit_serve_model_ready{model="two"} 1' in metrics
        c.close()


def test_quantized_model_float_and_raw_integer_tensors(tmp_path):
    """MLPerf Tiny's INT8 ResNet-8 (.tflite, int8 in and out): FP32 tensors in and out as model(x);
    INT8 tensors in and out as model.run(x, raw=True)."""
    import tritonclient.http as th

    from edgekit.runtime import load

    b = ROOT / "tests" / "models" / "mlperf-tiny" / "pretrainedResnet_quant.tflite"
    ref = load(b)
    spec = ref.inputs[0]
    assert spec.quantized and spec.dtype == "int8"
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    want_f = ref.run(x)
    xq = spec.quantize(x)
    want_q = ref.run(xq, raw=True)
    with Server(b, tmp=tmp_path) as srv:
        c = th.InferenceServerClient(srv.url)
        meta = c.get_model_metadata("pretrainedResnet_quant")
        assert meta["inputs"][0]["datatype"] == "FP32"
        assert meta["inputs"][0]["parameters"]["raw_datatype"] == "INT8"
        name = meta["name"]
        inp = th.InferInput(spec.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = c.infer(name, [inp])
        for o in ref.outputs:
            np.testing.assert_allclose(res.as_numpy(o.name), want_f[o.name], atol=1e-6)
            assert res.as_numpy(o.name).dtype == np.float32
        inp = th.InferInput(spec.name, list(xq.shape), "INT8")
        inp.set_data_from_numpy(xq)
        res = c.infer(name, [inp])
        for o in ref.outputs:
            got = res.as_numpy(o.name)
            assert got.dtype == np.dtype(o.dtype) and np.array_equal(got, want_q[o.name])
        c.close()


def test_each_error_status_over_plain_http(two, tmp_path):
    x = np.ones((1, 4), np.float32)
    with Server(two, args=["--max-body-mb", "0.01"], tmp=tmp_path) as srv:
        cases = [
            ("GET", "/v2/models/nope", None, 404, "unknown model"),
            ("POST", "/v2/models/nope/infer", _infer_doc(x), 404, "unknown model"),
            ("GET", "/v2/models/%2e%2e/ready", None, 400, "invalid model name"),
            ("GET", "/v2/models/.hidden", None, 400, "invalid model name"),
            ("GET", "/v2/models/two/versions/0123456789ab", None, 404, "no version"),
            ("POST", "/v2/models/two/infer", b"{oops", 400, "not valid JSON"),
            ("POST", "/v2/models/two/infer", _infer_doc(np.ones((1, 5), np.float32)), 400, "does not fit"),
            ("POST", "/v2/models/two/infer", _infer_doc(np.ones((4,), np.float32)), 400, "does not fit"),
            ("POST", "/v2/models/two/infer", _infer_doc(x.astype(np.int32), datatype="INT32"), 400, "datatype"),
            ("POST", "/v2/models/two/infer", _infer_doc(x, name="y"), 400, "unknown input"),
            ("POST", "/v2/models/two/infer", dict(_infer_doc(x), outputs=[{"name": "zz"}]), 400, "unknown output"),
            ("POST", "/v2/models/two/infer", _infer_doc(np.ones((1000, 4), np.float32)), 413, "over the limit"),
            ("GET", "/v2/models/two/infer", None, 405, "not allowed"),
            ("GET", "/v3/anything", None, 404, "no such endpoint"),
        ]
        for method, path, doc, status, words in cases:
            st, body = srv.json(method, path, doc)
            assert st == status, (method, path, st, body)
            assert words in body["error"], (path, body)
        st, body = srv.json("POST", "/v2/models/two/infer", _infer_doc(x))
        assert st == 200 and body["model_name"] == "two"
        metrics = srv.request("GET", "/metrics")[2].decode()
        assert 'edgekit_serve_request_failures_total{code="400",model="two"} 6' in metrics
        assert 'edgekit_serve_request_failures_total{code="413",model="two"} 1' in metrics


def test_not_ready_model_is_503(two, tmp_path):
    """A device root whose model's current release fails its golden check: served, not ready."""
    from edgekit.bundle import sha256_tree
    from edgekit.runtime import releases

    bad = _onnx_bundle(tmp_path / "bad", bad_golden=True)
    root = tmp_path / "root"
    sha = _install(root, "two", bad)
    releases.switch(releases.model_dir(str(root), "two"), sha)
    assert sha == sha256_tree(bad)
    with Server(root, tmp=tmp_path) as srv:
        st, body = srv.json("GET", "/v2/health/ready")
        assert st == 503 and "two" in body["error"]
        st, body = srv.json("GET", "/v2/models/two/ready")
        assert st == 503 and "golden check failed" in body["error"]
        st, body = srv.json("POST", "/v2/models/two/infer", _infer_doc(np.ones((1, 4), np.float32)))
        assert st == 503 and "not ready" in body["error"]
        st, body = srv.json("GET", "/v2/models/two")
        assert body["edgekit"]["failed_release"]["version"] == sha[:12]
        assert srv.json("GET", "/v2/health/live")[0] == 200


def test_tritonclient_repository_index_lists_each_release_and_refuses_load(two, tmp_path):
    """tritonclient's get_model_repository_index(): a bundle (READY), a deployed model serving its
    old release after its new `current` failed the golden check (READY + UNAVAILABLE with the reason),
    a deployed model with nothing loaded (UNAVAILABLE); {"ready": true} keeps the READY rows;
    load_model / unload_model are refused with a line that says why, an unknown model is 404."""
    import tritonclient.http as th
    from edgekit.runtime import releases

    good = _onnx_bundle(tmp_path / "good", name="dep")
    bad = _onnx_bundle(tmp_path / "bad", name="dep", bias=5.0, bad_golden=True)
    root = tmp_path / "root"
    sha_good, sha_bad = _install(root, "dep", good), _install(root, "dep", bad)
    releases.switch(releases.model_dir(str(root), "dep"), sha_good)
    sha_broken = _install(root, "broken", bad)
    releases.switch(releases.model_dir(str(root), "broken"), sha_broken)
    with Server(two, root, args=["--poll-interval", "0.1"], tmp=tmp_path) as srv:
        c = th.InferenceServerClient(srv.url)
        releases.switch(releases.model_dir(str(root), "dep"), sha_bad)
        _wait_for(lambda: srv.json("GET", "/v2/models/dep")[1]["edgekit"].get("failed_release"))
        two_version = c.get_model_metadata("two")["versions"][0]
        index = c.get_model_repository_index()
        by_key = {(r["name"], r.get("version")): r for r in index}
        assert [r["name"] for r in index] == ["broken", "dep", "dep", "two"]
        assert by_key[("two", two_version)] == {"name": "two", "version": two_version, "state": "READY",
                                                "reason": ""}
        assert by_key[("dep", sha_good[:12])]["state"] == "READY"
        failed = by_key[("dep", sha_bad[:12])]
        assert failed["state"] == "UNAVAILABLE" and "golden check failed" in failed["reason"]
        broken = by_key[("broken", sha_broken[:12])]
        assert broken["state"] == "UNAVAILABLE" and "golden check failed" in broken["reason"]
        st, ready = srv.json("POST", "/v2/repository/index", {"ready": True})
        assert st == 200 and sorted((r["name"], r["version"]) for r in ready) == [
            ("dep", sha_good[:12]), ("two", two_version)]
        assert all(r["state"] == "READY" for r in ready)
        for call, word in ((c.load_model, "load"), (c.unload_model, "unload")):
            with pytest.raises(th.InferenceServerException, match=f"cannot {word} model 'two' over the API"):
                call("two")
            with pytest.raises(th.InferenceServerException, match="unknown model 'nope'"):
                call("nope")
        assert c.is_model_ready("two")  # nothing was unloaded
        for method, path, doc, status, words in [
            ("POST", "/v2/repository/index", {"ready": "yes"}, 400, "true or false"),
            ("POST", "/v2/repository/index", b"[1]", 400, "JSON object"),
            ("GET", "/v2/repository/index", None, 405, "not allowed"),
            ("POST", "/v2/repository/models/two/delete", None, 404, "no such endpoint"),
        ]:
            st, body = srv.json(method, path, doc)
            assert st == status and words in body["error"], (path, st, body)
        c.close()


def test_queue_full_is_503_and_nothing_else_fails(tmp_path):
    slow = _onnx_bundle(tmp_path / "slow", name="slow", slow=12)
    x = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": [256, 512], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    body = head + x.tobytes()
    with Server(slow, args=["--max-concurrency", "1", "--max-queue", "1"], tmp=tmp_path) as srv:
        def call(_):
            st, h, b = srv.request("POST", "/v2/models/slow/infer", body,
                                   {"Inference-Header-Content-Length": str(len(head))})
            return st, b

        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(call, range(8)))
        statuses = sorted(st for st, _ in results)
        assert set(statuses) == {200, 503}, statuses
        assert statuses.count(200) >= 2  # the one running and the one queued
        for st, b in results:
            if st == 503:
                assert "queue is full" in json.loads(b)["error"]
        metrics = srv.request("GET", "/metrics")[2].decode()
        assert f'edgekit_serve_request_failures_total{{code="503",model="slow"}} {statuses.count(503)}' in metrics


def test_token_required_and_compared(two, tmp_path):
    import tritonclient.http as th

    token = "s3cret-token-of-some-length"
    with Server(two, args=["--token-file", _write(tmp_path / "tok", token + "\n")], tmp=tmp_path) as srv:
        for hdr in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": token},
                    {"Authorization": "Basic " + token}):
            st, body = srv.json("GET", "/v2/health/ready", headers=hdr)
            assert st == 401 and "bearer token" in body["error"], hdr
        assert srv.json("GET", "/v2/health/ready", headers={"Authorization": f"Bearer {token}"})[0] == 200
        c = th.InferenceServerClient(srv.url)
        with pytest.raises(th.InferenceServerException) as e:
            c.get_model_metadata("two")
        assert e.value.status() == "401"
        inp = th.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        res = c.infer("two", [inp], headers={"Authorization": f"Bearer {token}"})
        assert res.as_numpy("relu").shape == (1, 4)
        c.close()


def test_tls(two, tmp_path):
    import ssl

    cert, key = _self_signed(tmp_path)
    with Server(two, args=["--tls-cert", cert, "--tls-key", key], tmp=tmp_path) as srv:
        ctx = ssl.create_default_context(cafile=str(cert))
        c = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=30)
        c.request("GET", "/v2/health/ready")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"ready": True}
        c.close()


def test_dynamic_batching_gives_each_request_its_rows(two, tmp_path):
    ref = _reference(two)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(24)]
    with Server(two, args=["--max-batch", "8", "--max-delay-ms", "20", "--max-concurrency", "2"],
                tmp=tmp_path) as srv:
        def call(x):
            return srv.json("POST", "/v2/models/two/infer", _infer_doc(x))

        with ThreadPoolExecutor(12) as ex:
            results = list(ex.map(call, xs))
        single = call(xs[0])  # alone: waits at most max-delay, runs as a batch of one
        for x, (st, body) in zip(xs + [xs[0]], results + [single]):
            assert st == 200, body
            want = ref.run(x)
            for o in body["outputs"]:
                np.testing.assert_allclose(np.asarray(o["data"], np.float32).reshape(o["shape"]),
                                           want[o["name"]], rtol=1e-5, atol=1e-6)
        metrics = srv.request("GET", "/metrics")[2].decode()
        counts = {ln.split("le=")[1].split("}")[0].strip('"'): float(ln.rsplit(" ", 1)[1])
                  for ln in metrics.splitlines() if ln.startswith("edgekit_serve_batch_size_bucket")}
        assert counts["+Inf"] < len(xs) + 1  # requests were stacked: fewer executions than requests
        assert counts["1"] < counts["+Inf"]


def test_hot_swap_under_load_has_no_failed_request(tmp_path):
    """Flip `current` v1 -> v2 -> a release that fails its golden check, under a bounded request
    loop: every request succeeds; v2 serves after the swap; the bad release is refused and reported."""
    from edgekit.runtime import releases

    v1 = _onnx_bundle(tmp_path / "v1", bias=0.0)
    v2 = _onnx_bundle(tmp_path / "v2", bias=10.0)
    bad = _onnx_bundle(tmp_path / "bad", bias=20.0, bad_golden=True)
    root = tmp_path / "root"
    shas = {k: _install(root, "two", b) for k, b in (("v1", v1), ("v2", v2), ("bad", bad))}
    mdir = releases.model_dir(str(root), "two")
    releases.switch(mdir, shas["v1"])
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    want = {k: _reference(b).run(x)["scores"] for k, b in (("v1", v1), ("v2", v2))}
    seen, failures = [], []
    stop = threading.Event()
    with Server(root, args=["--poll-interval", "0.1", "--max-concurrency", "2", "--inline-ms", "0"],
                tmp=tmp_path) as srv:
        def loop():
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            body = json.dumps(_infer_doc(x)).encode()
            for _ in range(5000):  # bounded: also ends when the test is done
                if stop.is_set():
                    break
                c.request("POST", "/v2/models/two/infer", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                doc = json.loads(r.read())
                if r.status != 200:
                    failures.append((r.status, doc))
                    continue
                scores = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(2, 3)
                which = [k for k, w in want.items() if np.allclose(scores, w, atol=1e-5)]
                seen.append((doc["model_version"], which[0] if which else "WRONG"))
            c.close()

        threads = [threading.Thread(target=loop) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            _wait_for(lambda: len(seen) >= 30)
            releases.switch(mdir, shas["v2"])
            _wait_for(lambda: seen and seen[-1][0] == shas["v2"][:12])
            n = len(seen)
            _wait_for(lambda: len(seen) >= n + 30)
            releases.switch(mdir, shas["bad"])
            _wait_for(lambda: srv.json("GET", "/v2/models/two")[1]["edgekit"].get("failed_release"))
            n = len(seen)
            _wait_for(lambda: len(seen) >= n + 30)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        st, meta = srv.json("GET", "/v2/models/two")
        log = srv.stop()
    assert failures == []
    assert {w for _, w in seen} == {"v1", "v2"}
    assert all(v == shas[w][:12] for v, w in seen)  # the version a response names computed it
    assert meta["versions"] == [shas["v2"][:12]] and meta["edgekit"]["swaps"] == 1
    assert meta["edgekit"]["failed_release"]["version"] == shas["bad"][:12]
    assert "golden check failed" in meta["edgekit"]["failed_release"]["error"]
    assert f"release {shas['bad'][:12]} failed" in log and f"still serving {shas['v2'][:12]}" in log


def test_hot_swap_loop_keeps_no_reference_to_the_release_it_replaced(tmp_path):
    """After a swap the watch loop sleeps holding nothing of the retired release (a language model's weights
    and tokenizer stayed in memory until the next reload); the swap is still counted."""
    import asyncio
    import gc
    import weakref

    from edgekit.serve.app import App
    from edgekit.serve.metrics import Metrics

    class Release:
        load_seconds = 0.1

    class Entry:
        name, failure = "m", None

        def __init__(self):
            self.active, self.pending = Release(), [tmp_path]

        ready = property(lambda self: self.active is not None)

        def wants_reload(self):
            return self.pending.pop() if self.pending else None

        def try_load(self, path, **kw):
            self.active = Release()
            return True

    e, metrics = Entry(), Metrics()
    retired = weakref.ref(e.active)
    app = App([e], None, metrics, poll_interval=0.01)

    async def swap_then_look():
        watch = asyncio.get_running_loop().create_task(app._follow_current())
        try:
            while e.pending or retired() is e.active:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)   # the loop is sleeping again
            gc.collect()
            return retired() is None
        finally:
            watch.cancel()

    assert asyncio.run(swap_then_look())
    assert metrics.swaps.values == {(("model", "m"),): 1.0} and metrics.swap_failures.values == {}


def test_probe_checks_golden_outputs_through_the_api(two, tmp_path):
    from edgekit.runtime import releases
    from edgekit.serve.probe import probe

    root = tmp_path / "root"
    releases.switch(releases.model_dir(str(root), "two"), _install(root, "two", two))
    with Server(root, tmp=tmp_path) as srv:
        res = probe(srv.port, str(root), models=["two"])
        assert res["ok"] and res["models"]["two"]["outputs"]["scores"]["ok"], res
        out = subprocess.run([sys.executable, "-m", "edgekit.serve.probe", "--port", str(srv.port),
                              "--root", str(root)], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert out.returncode == 0 and json.loads(out.stdout)["models"]["two"]["ok"]
    res = probe(srv.port, str(root), models=["two"])  # stopped: nothing answers
    assert not res["ok"] and "no server answers" in res["error"]


def test_cli_serve_stop_with_pid_file(two, tmp_path):
    pid_file = tmp_path / "serve.pid"
    with Server(two, args=["--pid-file", pid_file], tmp=tmp_path) as srv:
        _wait_for(pid_file.is_file)
        assert int(pid_file.read_text()) == srv.proc.pid
        out = subprocess.run([sys.executable, "-m", "edgekit.serve", "--status", "--pid-file", str(pid_file)],
                             capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        st = json.loads(out.stdout)
        assert st["running"] and st["pid"] == srv.proc.pid and st["url"] == f"http://127.0.0.1:{srv.port}/v2"
        assert st["models"] == ["two"]
        out = subprocess.run([sys.executable, "-m", "edgekit.cli", "serve", "--stop", "--pid-file", str(pid_file)],
                             capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        assert out.returncode == 0, out.stderr
        assert srv.proc.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert not pid_file.exists() and not Path(str(pid_file) + ".json").exists()
    from edgekit.serve.server import state

    assert state(str(pid_file)) == {"running": False, "pid_file": str(pid_file)}
    out = subprocess.run([sys.executable, "-m", "edgekit.serve", "--stop", "--pid-file", str(pid_file)],
                         capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 2 and out.stderr.startswith("error: no server pid")


def test_port_in_use_is_one_line_before_any_model_loads(cli, two, tmp_path, monkeypatch):
    """A port another program listens on: one line naming it, exit 2, before a model is loaded or a pid file
    written (uvicorn's own bind called sys.exit(3) after the load); a server that bound beside ours and
    listened while our models loaded: the same line, not a traceback."""
    import edgekit.serve.server as server

    loaded = []
    real_build = server.build
    monkeypatch.setattr(server, "build", lambda *a: loaded.append(a) or real_build(*a))
    pid_file = tmp_path / "serve.pid"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = cli("serve", two, "--port", port, "--pid-file", pid_file)
    assert r.exit_code == 2 and loaded == [] and not pid_file.exists(), r.output
    assert r.output.strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use by another program (choose another with --port, or stop the "
        "server there first: edgekit serve --stop --pid-file FILE for one of ours)"]

    # bound, not listening: binding beside it succeeds (SO_REUSEADDR) ... and it listens first, while our models
    # load. In its own process: the models loaded in this one (beside TensorFlow, which the digits fixture imports)
    # and left by the refusal broke pytest's own capture files at teardown
    code = (
        "import socket, sys\n"
        "import edgekit.serve.server as server\n"
        "from edgekit.cli import cli\n"
        "other = socket.socket()\n"
        "other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "other.bind(('127.0.0.1', 0))\n"
        "port = other.getsockname()[1]\n"
        "real = server.build\n"
        "server.build = lambda *a: (other.listen(), print('loading', flush=True), real(*a))[-1]\n"
        "print(port, flush=True)\n"
        f"sys.argv = ['edgekit', 'serve', {str(two)!r}, '--port', str(port)]\n"
        "cli()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    port = p.stdout.split()[0]
    assert p.returncode == 2 and p.stdout.split()[1:] == ["loading"], (p.stdout, p.stderr)
    last = p.stderr.strip().splitlines()[-1]   # after the server's log line of the model it loaded
    assert last.startswith(f"error: port {port} on 127.0.0.1 is in use") and "Traceback" not in p.stderr, p.stderr


def test_port_0_reports_the_port_bound(two, tmp_path):
    """--port 0: the 'serving on' line and the pid file's JSON give the port the system chose, and it answers."""
    pid_file, log = tmp_path / "serve.pid", tmp_path / "serve.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "edgekit.serve", str(two), "--port", "0",
                                 "--pid-file", str(pid_file)], stdout=logf, stderr=subprocess.STDOUT,
                                cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        info_file = Path(str(pid_file) + ".json")
        _wait_for(lambda: proc.poll() is not None or (info_file.is_file() and
                                                      json.loads(info_file.read_text())["models"] == ["two"]))
        assert proc.poll() is None, log.read_text()
        info = json.loads(info_file.read_text())
        port = info["port"]
        assert port > 0 and info["url"] == f"http://127.0.0.1:{port}/v2"
        assert f"serving on http://127.0.0.1:{port}/v2 " in log.read_text()
        _wait_for(lambda: _ready(port))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bind_skips_a_family_the_machine_lacks(monkeypatch):
    """A host resolving to IPv6 and IPv4 ('' or localhost) on a machine without IPv6 (ipv6.disable=1: a socket
    of AF_INET6 cannot be made, EAFNOSUPPORT): the IPv4 address is bound, as asyncio's create_server (uvicorn's
    bind before) skips the family; only when no address can be bound is it one line."""
    import errno

    import edgekit.serve.server as server
    from edgekit.serve.server import ServeError

    real_socket = socket.socket

    def no_ipv6(family=socket.AF_INET, *a, **k):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *a, **k)

    def both(host, port, *a, **k):   # as glibc answers '' / localhost where ::1 is in /etc/hosts: IPv6 first
        ip6, ip4 = ("::1", "127.0.0.1") if host == "localhost" else ("::", "0.0.0.0")
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip6, port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip4, port))]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    monkeypatch.setattr(socket, "socket", no_ipv6)
    for host, want in (("", "0.0.0.0"), ("localhost", "127.0.0.1")):
        socks = server.bind(host, 0)
        try:
            assert [(s.family, s.getsockname()[0]) for s in socks] == [(socket.AF_INET, want)]
            assert socks[0].getsockname()[1] > 0
        finally:
            for s in socks:
                s.close()
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: both(host, port)[:1])
    with pytest.raises(ServeError, match="cannot open a socket") as e:
        server.bind("::1", 0)
    assert "IPv4 address" in e.value.hint


def _ready(port: int) -> bool:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/v2/health/ready")
        return c.getresponse().status == 200
    except OSError:
        return False
    finally:
        c.close()


# --- helpers ---------------------------------------------------------------------------------

def _install(root: Path, name: str, bundle: Path) -> str:
    """Put a bundle where a deploy would: <root>/models/<name>/releases/<sha256>."""
    from edgekit.bundle import sha256_tree

    sha = sha256_tree(bundle)
    dest = root / "models" / name / "releases" / sha
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, dest)
    return sha


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met within %.0f s" % timeout)


def _self_signed(tmp: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k
