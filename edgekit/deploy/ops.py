"""What edgekit does to one device: info, setup, deploy (or dry run), status, rollback, profile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from edgekit.bundle import Bundle, write_json_atomic
from edgekit.deploy.connection import Connection
from edgekit.deploy.fleet import DeviceResult
from edgekit.deploy.inventory import Device, Inventory
from edgekit.deploy.session import INSTALL_HINTS, DeviceSession
from edgekit.errors import DeviceError
from edgekit.progress import Progress


class Options:
    """Settings shared by every device of one run."""

    def __init__(self, inventory: Inventory, *, trust_new_host: bool = False, keep: int = 3,
                 progress: Optional[Progress] = None, timeout: float = 10.0):
        self.inventory = inventory
        self.trust_new_host = trust_new_host
        self.keep = keep
        self.progress = progress or Progress(enabled=False)
        self.timeout = timeout

    def connect(self, device: Device) -> Connection:
        return Connection(device, self.inventory, trust_new_host=self.trust_new_host,
                          timeout=self.timeout).open()


def suggest_target(facts: Dict[str, Any]) -> Optional[str]:
    """The shipped profile that fits what the device says about itself."""
    arch = facts.get("arch", "")
    text = " ".join(str(facts.get(k) or "") for k in ("board", "cpu_model", "l4t")).lower()
    flags = set(facts.get("cpu_features") or [])
    if facts.get("l4t") or "jetson" in text:
        return "jetson-orin" if ("orin" in text or "r36" in text or "r35" in text) else "jetson-nano"
    if arch in ("aarch64", "arm64", "armv7l"):
        if "raspberry pi 5" in text or "cortex-a76" in text:
            return "rpi5"
        if "zero 2" in text or "cortex-a53" in text:
            return "rpi-zero2"
        return "rpi4"
    if arch in ("x86_64", "amd64"):
        return "x86-avx512-vnni" if "avx512_vnni" in flags else "x86-avx2"
    return None


def info(device: Device, opts: Options) -> DeviceResult:
    with opts.connect(device) as c:
        s = DeviceSession(c)
        s.ensure_runtime()
        f = s.facts()
    f["suggested_target"] = suggest_target(f)
    warnings = []
    if device.target and f["suggested_target"] and device.target != f["suggested_target"]:
        warnings.append(f"inventory says target {device.target}, the device looks like {f['suggested_target']}")
    return DeviceResult(device.name, "ok", data={"facts": f}, warnings=warnings)


def setup(device: Device, opts: Options) -> DeviceResult:
    with opts.connect(device) as c:
        s = DeviceSession(c)
        pushed = s.ensure_runtime(force=True)
        f = s.facts()
    usable = [n for n, b in f["backends"].items() if b.get("available")]
    if not usable:
        return DeviceResult(device.name, "failed",
                            reason=f"device {device.name}: runtime installed under {s.root}/runtime, but no "
                                   f"inference backend is importable: {INSTALL_HINTS['tflite']}; "
                                   f"or {INSTALL_HINTS['onnx']}",
                            data={"facts": f})
    return DeviceResult(device.name, "ok", data={"runtime": f"{s.root}/runtime", "pushed": pushed,
                                                 "backends": {n: f["backends"][n].get("version") for n in usable},
                                                 "python": f["python"]})


def _mismatch(device: Device, bundle: Bundle):
    if device.target and device.target != bundle.target:
        return [f"bundle built for {bundle.target}, device profile is {device.target}"]
    return []


def choose_bundle(device: Device, bundles: Sequence[Bundle], runnable: Optional[Sequence[str]]) -> Bundle:
    """From a convert output: the bundle for the device's target profile (in the profile's
    order of formats) that a backend on the device can run."""
    if len(bundles) == 1:
        return bundles[0]
    mine = [b for b in bundles if b.target == device.target] if device.target else list(bundles)
    if not mine:
        raise DeviceError(f"none of the bundles is built for its target {device.target} "
                          f"(have: {', '.join(sorted({b.target for b in bundles}))})", device=device.name,
                          hint=f"convert with --target {device.target}")
    order = list(mine[0].manifest["target"].get("formats") or []) if device.target else []
    mine.sort(key=lambda b: order.index(b.format) if b.format in order else len(order))
    for b in mine:
        if runnable is None or b.format in runnable:
            return b
    raise DeviceError(f"no backend on the device runs {' or '.join(sorted({b.format for b in mine}))}",
                      device=device.name, hint=INSTALL_HINTS[mine[0].format])


def _runnable(s: DeviceSession) -> List[str]:
    b = s.backends()
    fmts = []
    if any(b.get(n, {}).get("available") for n in ("litert", "tflite-runtime", "tensorflow")):
        fmts.append("tflite")
    if b.get("onnxruntime", {}).get("available"):
        fmts.append("onnx")
    return fmts


def deploy(device: Device, bundles: Union[Bundle, Sequence[Bundle]], opts: Options,
           dry_run: bool = False) -> DeviceResult:
    candidates = [bundles] if isinstance(bundles, Bundle) else list(bundles)
    with opts.connect(device) as c:
        s = DeviceSession(c)
        stale = s.runtime_status() is None
        if not dry_run:
            s.ensure_runtime()
            stale = False
        name = candidates[0].name
        st = s.release("status", "--name", name, *([] if dry_run else ["--clean-incoming"])) \
            if not stale else {"models": {}, "free_bytes": 0}
        bundle = choose_bundle(device, candidates,
                               _runnable(s) if len(candidates) > 1 and not stale else None)
        sha = bundle.digest()
        warnings = _mismatch(device, bundle)
        data: Dict[str, Any] = {"model": name, "sha256": sha, "bytes_sent": 0,
                                "bundle": bundle.path.name, "format": bundle.format}
        if dry_run:
            entry = st["models"].get(name, {})
            cur = entry.get("current")
            have = any(r["sha256"] == sha for r in entry.get("releases", []))
            if have and not s.release("verify", "--name", name, "--sha", sha)["ok"]:  # read-only
                warnings.append(f"release {sha[:12]} on the device was modified or damaged: would upload again")
                have = False
            data.update(previous=cur, runtime=("would push" if stale else "present"))
            status = "unchanged" if (have and cur == sha) else ("would-switch" if have else "would-upload")
            return DeviceResult(device.name, status, data=data, warnings=warnings)
        data["backend"] = s.check_backend(bundle.format)
        entry = st["models"].get(name, {})
        cur = entry.get("current")
        have = any(r["sha256"] == sha for r in entry.get("releases", []))
        data["previous"] = cur
        incoming = None
        if have and not s.release("verify", "--name", name, "--sha", sha)["ok"]:
            warnings.append(f"release {sha[:12]} on the device was modified or damaged: uploaded again")
            have = False
        if have and cur == sha:
            return DeviceResult(device.name, "unchanged", data=data, warnings=warnings)
        if not have:
            tick = opts.progress.ticker(f"[{device.name}] upload", "")
            incoming, data["bytes_sent"] = s.upload_bundle(bundle.path, name, sha, st["free_bytes"],
                                                           tick=lambda d, t: tick(d >> 10, t >> 10, "KiB"))
        args = ["--name", name, "--sha", sha, "--keep", str(opts.keep)]
        if incoming:
            args += ["--incoming", incoming]
        res = s.release("activate", *args)
    data.update(health=res.get("health"), current=res.get("current"), pruned=res.get("pruned", []))
    status = res["status"]
    if incoming and status == "unchanged":
        status = "deployed"  # the damaged release was uploaded again and checked
    reason = None
    if status == "rolled-back":
        h = res.get("health") or {}
        reason = "health check failed on the device: " + (h.get("error") or ", ".join(
            f"{k}: SNR {v['snr_db']:.1f} dB vs golden (min {h.get('min_snr_db')}), top-1 agreement "
            f"{v['top1_agreement']}" for k, v in (h.get("outputs") or {}).items() if not v.get("ok")))
        reason += f"; current is back at {(res.get('current') or 'none')[:12]}"
    return DeviceResult(device.name, status, reason=reason, data=data, warnings=warnings)


def status(device: Device, opts: Options, model: Optional[str] = None, health: bool = True) -> DeviceResult:
    with opts.connect(device) as c:
        s = DeviceSession(c)
        s.ensure_runtime()
        st = s.release("status", *(["--name", model] if model else []), *(["--health"] if health else []))
    bad = [n for n, m in st["models"].items() if health and m.get("current") and not m["health"].get("ok")]
    return DeviceResult(device.name, "failed" if bad else "ok",
                        reason=(f"unhealthy: {', '.join(bad)}" if bad else None),
                        data={"models": st["models"], "free_bytes": st["free_bytes"]})


def rollback(device: Device, model: str, opts: Options, to: Optional[str] = None) -> DeviceResult:
    with opts.connect(device) as c:
        s = DeviceSession(c)
        s.ensure_runtime()
        res = s.release("rollback", "--name", model, *(["--to", to] if to else []))
    ok = (res.get("health") or {}).get("ok", True)
    return DeviceResult(device.name, "rolled-back-by-request" if ok else "failed",
                        reason=None if ok else "the release rolled back to fails its health check",
                        data=res)


def profile(device: Device, bundle: Bundle, opts: Options, runs: int = 200, warmup: int = 20,
            out_dir: Optional[Path] = None, threads: Optional[int] = None) -> DeviceResult:
    name, sha = bundle.name, bundle.digest()
    warnings = _mismatch(device, bundle)
    with opts.connect(device) as c:
        s = DeviceSession(c)
        s.ensure_runtime()
        st = s.release("status", "--name", name, "--clean-incoming")
        s.check_backend(bundle.format)
        entry = st["models"].get(name, {})
        have = any(r["sha256"] == sha for r in entry.get("releases", []))
        if have and not s.release("verify", "--name", name, "--sha", sha)["ok"]:
            have = False
        if not have:
            tick = opts.progress.ticker(f"[{device.name}] upload", "")
            incoming, _ = s.upload_bundle(bundle.path, name, sha, st["free_bytes"],
                                          tick=lambda d, t: tick(d >> 10, t >> 10, "KiB"))
            s.release("store", "--name", name, "--sha", sha, "--incoming", incoming)
        opts.progress.say(f"[{device.name}] profiling {name}: {warmup} warm-up + {runs} runs on the device")
        path = f"{s.root}/models/{name}/releases/{sha}"
        args = ["bench", path, "--json", "--runs", str(runs), "--warmup", str(warmup)]
        if threads:
            args += ["--threads", str(threads)]
        rep = s.call(*args, timeout=3600)
    rep["device"] = device.name
    rep["label"] = device.name
    rep["bundle_sha256"] = sha
    saved = None
    if out_dir is not None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        saved = Path(out_dir) / device.name / f"{name}-{bundle.target}-{bundle.format}-{stamp}.json"
        write_json_atomic(saved, rep)
    return DeviceResult(device.name, "ok", data={"report": rep, "saved": str(saved) if saved else None},
                        warnings=warnings)


__all__ = ["Options", "info", "setup", "deploy", "status", "rollback", "profile", "suggest_target", "choose_bundle"]
