"""What edgekit does to one device: info, setup, deploy (or dry run), status, rollback, profile."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from edgekit.bundle import Bundle, write_json_atomic
from edgekit.deploy import protocol, transfer
from edgekit.deploy.artifact import Artifact, prepare
from edgekit.deploy.connection import Connection
from edgekit.deploy.fleet import DeviceResult
from edgekit.deploy.inventory import Device, Inventory
from edgekit.deploy.session import INSTALL_HINTS, DeviceSession
from edgekit.errors import DeviceError
from edgekit.progress import Progress


@dataclass(frozen=True)
class Gate:
    """A health gate beyond the golden check: p50 latency measured on the device after the
    switch, with the latency method of `profile` (a short run: `runs` timed, `warmup` dropped)."""

    max_p50_ms: float
    runs: int = 50
    warmup: int = 10

    def __post_init__(self):
        if not self.max_p50_ms > 0:
            raise DeviceError(f"--max-p50-ms must be above 0 (got {self.max_p50_ms})")
        if self.runs < 5 or self.warmup < 0:
            raise DeviceError("the p50 gate needs at least 5 timed runs and no negative warm-up")


class Options:
    """Settings shared by every device of one run."""

    def __init__(self, inventory: Inventory, *, trust_new_host: bool = False, keep: int = 3,
                 progress: Optional[Progress] = None, timeout: float = 10.0, debug: bool = False,
                 command_timeout: Optional[float] = None, gate: Optional[Gate] = None, force: bool = False):
        self.inventory = inventory
        self.trust_new_host = trust_new_host
        self.keep = keep
        self.progress = progress or Progress(enabled=False)
        self.timeout = timeout                    # connecting
        self.command_timeout = command_timeout    # any one device command (None: the command's own)
        self.debug = debug                        # device tracebacks in the reasons
        self.gate = gate
        self.force = force                        # upload even when the memory / disk check refuses

    def connect(self, device: Device) -> Connection:
        return Connection(device, self.inventory, trust_new_host=self.trust_new_host,
                          timeout=self.timeout).open()

    def session(self, c: Connection) -> DeviceSession:
        return DeviceSession(c, debug=self.debug, timeout=self.command_timeout)


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
        s = opts.session(c)
        s.ensure_runtime()
        f = dict(s.facts().raw)
    f["suggested_target"] = suggest_target(f)
    warnings = []
    if device.target and f["suggested_target"] and device.target != f["suggested_target"]:
        warnings.append(f"inventory says target {device.target}, the device looks like {f['suggested_target']}")
    return DeviceResult(device.name, "ok", data={"facts": f}, warnings=warnings)


def setup(device: Device, opts: Options) -> DeviceResult:
    with opts.connect(device) as c:
        s = opts.session(c)
        pushed = s.ensure_runtime(force=True)
        f = s.facts()
    usable = {n: b.version for n, b in f.backends.items() if b.available}
    if not usable:
        return DeviceResult(device.name, "failed",
                            reason=f"device {device.name}: runtime installed under {s.root}/runtime, but no "
                                   f"inference backend is importable: {INSTALL_HINTS['tflite']}; "
                                   f"or {INSTALL_HINTS['onnx']}",
                            data={"facts": f.raw})
    return DeviceResult(device.name, "ok", data={"runtime": f"{s.root}/runtime", "pushed": pushed,
                                                 "backends": usable, "python": f.python})


def _mismatch(device: Device, art: Artifact):
    if device.target and device.target != art.target:
        return [f"bundle built for {art.target}, device profile is {device.target}"]
    return []


def choose_bundle(device: Device, artifacts: Sequence[Artifact], runnable: Optional[Sequence[str]]) -> Artifact:
    """From a convert output: the bundle for the device's target profile (in the profile's
    order of formats) that a backend on the device can run."""
    if len(artifacts) == 1:
        return artifacts[0]
    mine = [b for b in artifacts if b.target == device.target] if device.target else list(artifacts)
    if not mine:
        raise DeviceError(f"none of the bundles is built for its target {device.target} "
                          f"(have: {', '.join(sorted({b.target for b in artifacts}))})", device=device.name,
                          hint=f"convert with --target {device.target}")
    order = mine[0].formats_in_order if device.target else []
    mine.sort(key=lambda b: order.index(b.format) if b.format in order else len(order))
    for b in mine:
        if runnable is None or b.format in runnable:
            return b
    raise DeviceError(f"no backend on the device runs {' or '.join(sorted({b.format for b in mine}))}",
                      device=device.name, hint=INSTALL_HINTS.get(mine[0].format, GENAI_HINT))


def _artifacts(bundles: Union[Bundle, Artifact, Sequence[Union[Bundle, Artifact]]]) -> List[Artifact]:
    items = [bundles] if isinstance(bundles, (Bundle, Artifact)) else list(bundles)
    return [b if isinstance(b, Artifact) else prepare(b) for b in items]


GENAI_HINT = "pip install onnxruntime-genai  (it runs language-model bundles; numpy is its only other need)"
LLM_KEEP_UNTIL_CHECKED = 1 << 30     # no release is pruned before a language model's golden check passed


def preflight(device: Device, art: Artifact, opts: Options):
    """The check before any byte is sent: the model (and a language model's KV cache at the
    bundle's context) must fit the device's available memory (--force skips it); a language
    model needs onnxruntime-genai there."""
    from edgekit.deploy.transfer import human

    def check(plan) -> None:
        need, avail = art.memory_need(), plan.mem_available
        if not opts.force and avail is not None and need["total"] > avail:
            what = (f"{human(need['weights'])} weights + {human(need['kv_cache'])} KV cache at {need['context']} "
                    f"tokens" if art.is_llm else "its model file")
            raise DeviceError(f"not enough memory for {art.name}: it needs {human(need['total'])} ({what}), the "
                              f"device has {human(avail)} available"
                              + (f" of {human(plan.mem_total)}" if plan.mem_total else ""),
                              device=device.name, hint="free memory there, choose a smaller model or context, "
                                                       "or deploy with --force")
        if art.is_llm and not (plan.genai or {}).get("available"):
            raise DeviceError(f"onnxruntime-genai is not installed for {device.python} on the device: it runs "
                              f"language-model bundles (nothing was uploaded)", device=device.name,
                              hint=f"{device.python} -m pip install onnxruntime-genai")

    return check


def _push(s: DeviceSession, art: Artifact, opts: Options, then: str, check: bool = True):
    """Upload what the device lacks (resumed, deduplicated, verified) and `then` activate / store it."""
    label = f"[{s.device.name}] upload {art.name}"
    keep = LLM_KEEP_UNTIL_CHECKED if art.is_llm else opts.keep
    return s.push(art, lambda unit: opts.progress.ticker(label, unit), then=then, keep=keep, check=check and not art.is_llm, force=opts.force,
                  preflight=preflight(s.device, art, opts))


def _llm_health(s: DeviceSession, art: Artifact, res: protocol.Activation, opts: Options,
                data: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """A language model's golden check on the device (LanguageModel.check() through
    `python -m edgekit.runtime check`), after the switch; on failure `current` goes back."""
    h = s.check(s.release_path(art.name, art.sha256))
    health = protocol.Health.parse(h)
    data["health"] = h
    if health.ok:
        gc = transfer.Store(s, art.name).gc(opts.keep)
        data["pruned"] = list(gc.get("pruned", []))
        return "deployed", None
    back = s.revert(art.name, art.sha256, res.previous)
    data["current"] = back.current
    return "rolled-back", (f"health check failed on the device: {health.why()}; current is back at "
                           f"{(back.current or 'none')[:12]}")


def _gate(s: DeviceSession, art: Artifact, gate: Gate) -> Tuple[bool, float]:
    """(passed, p50 ms) of the release just switched to, measured on the device."""
    rep = s.bench(s.release_path(art.name, art.sha256), gate.runs, gate.warmup)
    p50 = protocol.latency_p50_ms(rep)
    return p50 <= gate.max_p50_ms, p50


def deploy(device: Device, bundles: Union[Bundle, Artifact, Sequence[Union[Bundle, Artifact]]], opts: Options,
           dry_run: bool = False) -> DeviceResult:
    """Upload (unless the release is there), verify on the device, switch, health-check (and the
    p50 gate), roll back on failure. Bundles: prepared once by the caller for a fleet."""
    candidates = _artifacts(bundles)
    name = candidates[0].name
    with opts.connect(device) as c:
        s = opts.session(c)
        stale = s.runtime_status() is None
        if not dry_run:
            s.ensure_runtime()
            stale = False
        st = s.status(name, clean_incoming=not dry_run) if not stale else None
        art = choose_bundle(device, candidates,    # language models: by target (onnxruntime-genai checked later)
                            protocol.runnable_formats(s.backends())
                            if len(candidates) > 1 and st and not candidates[0].is_llm else None)
        sha = art.sha256
        warnings = _mismatch(device, art)
        entry = st.model(name) if st else protocol.ModelState(None)
        have = entry.has(sha)
        data: Dict[str, Any] = {"model": name, "sha256": sha, "bytes_sent": 0, "bundle": art.path.name,
                                "format": art.format, "previous": entry.current}
        if have and not s.verify(name, sha):  # read-only; a dry run says what a deploy would do
            warnings.append(f"release {sha[:12]} on the device was modified or damaged: "
                            + ("would upload again" if dry_run else "uploaded again"))
            have = False
        if dry_run:
            data["runtime"] = "would push" if stale else "present"
            status = "unchanged" if (have and entry.current == sha) else ("would-switch" if have else "would-upload")
            return DeviceResult(device.name, status, data=data, warnings=warnings)
        data["backend"] = "onnxruntime-genai" if art.is_llm else s.check_backend(art.format, art.preferred_backend)
        if have and entry.current == sha:
            return DeviceResult(device.name, "unchanged", data=data, warnings=warnings)
        if not have:
            pushed = _push(s, art, opts, "activate")
            res = protocol.Activation.parse(pushed.result)
            data.update(bytes_sent=pushed.sent, bytes_total=art.bytes, bytes_resumed=pushed.plan.resumed_bytes,
                        files_reused=len(art.files) - len(pushed.plan.items))
        else:
            res = s.activate(name, sha, None, LLM_KEEP_UNTIL_CHECKED if art.is_llm else opts.keep,
                             check=not art.is_llm)
        data.update(health=res.health.raw if res.health else None, current=res.current, pruned=list(res.pruned))
        status = "deployed" if res.status in ("deployed", "unchanged") else res.status
        reason = None
        if art.is_llm and status == "deployed":
            status, reason = _llm_health(s, art, res, opts, data)
            if opts.gate is not None:
                warnings.append("--max-p50-ms is a gate for tensor models; a language model's speed is "
                                "`edgekit profile` (TTFT, tok/s)")
        elif status == "rolled-back":
            reason = (f"health check failed on the device: {res.health.why() if res.health else 'no result'}; "
                      f"current is back at {(res.current or 'none')[:12]}")
        elif opts.gate is not None and not art.is_llm:
            ok, p50 = _gate(s, art, opts.gate)
            data["p50_ms"] = p50
            if not ok:
                back = s.revert(name, sha, res.previous)
                data["current"] = back.current
                status = "rolled-back"
                reason = (f"p50 {p50:.2f} ms on the device is above --max-p50-ms {opts.gate.max_p50_ms:g}; "
                          f"current is back at {(back.current or 'none')[:12]}")
    return DeviceResult(device.name, status, reason=reason, data=data, warnings=warnings)


def revert(device: Device, name: str, sha: str, to: Optional[str], opts: Options) -> DeviceResult:
    """Undo one switch (a rollout's abort): `current` back at `to` if it is still `sha`."""
    with opts.connect(device) as c:
        res = opts.session(c).revert(name, sha, to)
    return DeviceResult(device.name, res.status, data={"previous": res.previous, "current": res.current})


def status(device: Device, opts: Options, model: Optional[str] = None, health: bool = True) -> DeviceResult:
    with opts.connect(device) as c:
        s = opts.session(c)
        s.ensure_runtime()
        st = s.status(model, health=health)
    bad = [n for n, m in st.models.items() if health and m.current and not (m.health and m.health.ok)]
    models = {n: {"current": m.current, "releases": [asdict(r) for r in m.releases], "history": list(m.history),
                  "incoming": list(m.incoming), **({"health": m.health.raw} if m.health else {})}
              for n, m in st.models.items()}
    return DeviceResult(device.name, "failed" if bad else "ok",
                        reason=(f"unhealthy: {', '.join(bad)}" if bad else None),
                        data={"models": models, "free_bytes": st.free_bytes})


def rollback(device: Device, model: str, opts: Options, to: Optional[str] = None) -> DeviceResult:
    with opts.connect(device) as c:
        s = opts.session(c)
        s.ensure_runtime()
        res = s.rollback(model, to)
    ok = res.health.ok if res.health else True
    return DeviceResult(device.name, "rolled-back-by-request" if ok else "failed",
                        reason=None if ok else "the release rolled back to fails its health check",
                        data={"name": res.name, "previous": res.previous, "current": res.current,
                              "health": res.health.raw if res.health else None})


def profile(device: Device, bundle: Union[Bundle, Artifact], opts: Options, runs: int = 200, warmup: int = 20,
            out_dir: Optional[Path] = None, threads: Optional[int] = None, prompt_tokens: int = 128,
            new_tokens: int = 128) -> DeviceResult:
    """The latency method on the device (a language model: LanguageModel.benchmark(), TTFT and
    tok/s, `runs` runs of `prompt_tokens` in and `new_tokens` out after `warmup` ones)."""
    art = _artifacts(bundle)[0]
    name, sha = art.name, art.sha256
    warnings = _mismatch(device, art)
    with opts.connect(device) as c:
        s = opts.session(c)
        s.ensure_runtime()
        st = s.status(name, clean_incoming=True)
        if not art.is_llm:
            s.check_backend(art.format, art.preferred_backend)
        have = st.model(name).has(sha) and s.verify(name, sha)
        if not have:
            _push(s, art, opts, "store")
        path = s.release_path(name, sha)
        if art.is_llm:
            opts.progress.say(f"[{device.name}] profiling {name}: {runs} runs of {prompt_tokens} prompt + "
                              f"{new_tokens} new tokens on the device")
            rep = s.bench(path, runs, warmup, threads, prompt_tokens, new_tokens)
            rep.setdefault("kind", "llm")
        else:
            opts.progress.say(f"[{device.name}] profiling {name}: {warmup} warm-up + {runs} runs on the device")
            rep = s.bench(path, runs, warmup, threads)
    rep["device"] = device.name
    rep["label"] = device.name
    rep["bundle_sha256"] = sha
    saved = None
    if out_dir is not None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        saved = Path(out_dir) / device.name / f"{name}-{art.target}-{art.format}-{stamp}.json"
        write_json_atomic(saved, rep)
    return DeviceResult(device.name, "ok", data={"report": rep, "saved": str(saved) if saved else None},
                        warnings=warnings)


__all__ = ["Options", "Gate", "info", "setup", "deploy", "revert", "status", "rollback", "profile",
           "suggest_target", "choose_bundle"]
