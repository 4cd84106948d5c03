"""Check a running server from the outside: ready, then one golden inference per model through
the API, judged like the golden health check (SNR and top-1 against the bundle's golden outputs).

    python -m edgekit.serve.probe --port 8000 --root ~/.edgekit [--model NAME] [--token-file F]

Standard library and numpy (runs on the device; deploy calls it after starting the server).
Prints JSON; exit status 0 when every model answered correctly, 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from edgekit.bundle import check_name


def _call(host: str, port: int, method: str, path: str, body: Optional[bytes] = None,
          headers: Optional[Dict[str, str]] = None, timeout: float = 30.0):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def probe(port: int, root: str, host: str = "127.0.0.1", token: Optional[str] = None,
          models: Optional[List[str]] = None) -> Dict[str, Any]:
    import numpy as np

    from edgekit.runtime.check import MIN_SNR_DB, MIN_TOP1, snr_db

    auth = {"Authorization": f"Bearer {token}"} if token else {}
    out: Dict[str, Any] = {"url": f"http://{host}:{port}/v2", "ok": False, "models": {}}
    try:
        st, _, body = _call(host, port, "GET", "/v2/health/ready", headers=auth)
    except OSError as e:
        out["error"] = f"no server answers on {host}:{port} ({e})"
        return out
    out["ready"] = st == 200
    if st != 200:
        out["error"] = json.loads(body or b"{}").get("error", f"HTTP {st}")
        return out
    ok = True
    for name in models or []:
        res: Dict[str, Any] = {"ok": False}
        out["models"][name] = res
        st, _, body = _call(host, port, "GET", f"/v2/models/{check_name(name)}", headers=auth)
        meta = json.loads(body or b"{}")
        if st != 200:
            res["error"] = meta.get("error", f"HTTP {st}")
            ok = False
            continue
        info = meta.get("edgekit", {})
        res["version"] = info.get("version")
        if info.get("failed_release"):
            res["failed_release"] = info["failed_release"]
        sha = info.get("sha256") or ""
        golden = Path(root) / "models" / name / "releases" / sha / "golden.npz"
        if not sha or not golden.is_file():
            res["error"] = f"no golden data for release {sha[:12]} under {root}"
            ok = False
            continue
        with np.load(golden, allow_pickle=False) as z:
            g = {k: z[k] for k in z.files}
        inputs, blobs = [], []
        for t in meta["inputs"]:
            x = np.ascontiguousarray(g[f"input:{t['name']}"], dtype=np.float32)
            inputs.append({"name": t["name"], "shape": list(x.shape), "datatype": "FP32",
                           "parameters": {"binary_data_size": x.nbytes}})
            blobs.append(x.tobytes())
        head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
        st, hdr, body = _call(host, port, "POST", f"/v2/models/{name}/infer", head + b"".join(blobs),
                              dict(auth, **{"Inference-Header-Content-Length": str(len(head))}))
        if st != 200:
            res["error"] = json.loads(body or b"{}").get("error", f"HTTP {st}")
            ok = False
            continue
        hl = int(hdr.get("inference-header-content-length", len(body)))
        doc, off = json.loads(body[:hl]), hl
        res["ok"] = True
        res["outputs"] = {}
        for t in doc["outputs"]:
            n = t["parameters"]["binary_data_size"]
            got = np.frombuffer(body[off:off + n], dtype=np.float32).reshape(t["shape"])
            off += n
            exp = g[f"output:{t['name']}"].astype(np.float32)
            snr = snr_db(exp, got)
            top1 = float((exp.argmax(1) == got.argmax(1)).mean()) if exp.ndim == 2 and exp.shape[1] > 1 else None
            good = bool(snr >= MIN_SNR_DB and (top1 is None or top1 >= MIN_TOP1))
            res["outputs"][t["name"]] = {"snr_db": min(snr, 999.0), "top1_agreement": top1, "ok": good}
            res["ok"] = res["ok"] and good
        ok = ok and res["ok"]
    out["ok"] = ok
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgekit.serve.probe")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root", required=True, help="the device root the server serves (for golden data)")
    p.add_argument("--model", action="append", default=None, help="model to check (default: every one)")
    p.add_argument("--token-file", default=None)
    a = p.parse_args(argv)
    token = None
    if a.token_file:
        try:
            token = open(a.token_file, encoding="utf-8").read().strip()
        except OSError as e:
            print(f"error: cannot read {a.token_file}: {e.strerror}", file=sys.stderr)
            return 2
    token = token or os.environ.get("EDGEKIT_SERVE_TOKEN")
    models = a.model
    if models is None:
        base = Path(a.root) / "models"
        models = sorted(m.name for m in base.iterdir() if (m / "current").is_symlink()) if base.is_dir() else []
    res = probe(a.port, a.root, a.host, token, models)
    print(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
