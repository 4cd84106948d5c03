"""Compatibility check: does the artifact load, and match, in the oldest runtime the target runs?

A profile lists that runtime (`runtime.min_runtime`, e.g. tflite-runtime==2.14.0 and numpy<2
for the Raspberry Pi profiles). The converter runs the bundle's golden check in exactly that
environment: for an arm64 profile inside the emulated Debian arm64 root (real ARM kernels
under qemu) when it is built, otherwise in a cached venv here. An artifact that would not
load there fails the conversion with the op and version named, instead of on the device.
Entries with a space or parentheses are what the device needs but cannot be installed here
(NVIDIA's Jetson builds): recorded as not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from edgekit.errors import ConversionError
from edgekit.lab.venvs import VenvUnavailable, cache_dir, venv_python  # noqa: F401 (re-exported)
from edgekit.runtime.files import copy_runtime
from edgekit.targets import TargetProfile

# accept-crash: as auto, but a crash under emulation (which cannot be told from a runtime bug
# without a board) is recorded in the manifest, op and shape named, and the bundle still written.
MODES = ("auto", "venv", "emulated", "off", "accept-crash")
_RUNTIME_PKGS = {"tflite": ("tflite-runtime",), "onnx": ("onnxruntime",)}


# the venvs of old runtimes are the lab's (edgekit.lab.venvs); the names stay importable from here
CompatUnavailable = VenvUnavailable


def requirements(profile: TargetProfile, fmt: str) -> Tuple[List[str], List[str]]:
    """(pip requirements to check `fmt` against, entries for `fmt` that cannot be installed here)."""
    mine = [e for e in profile.runtime.min_runtime if e.startswith(_RUNTIME_PKGS[fmt])]
    unchecked = [e for e in mine if " " in e or "(" in e]
    runtime = [e for e in mine if e not in unchecked]
    if not runtime:
        return [], unchecked
    numpy = [e for e in profile.runtime.min_runtime if e.startswith("numpy")]
    return runtime + numpy, unchecked


def _parse(proc: subprocess.CompletedProcess) -> Dict[str, Any]:
    out = proc.stdout.strip()
    if proc.returncode in (0, 1) and out:
        return json.loads(out.splitlines()[-1])
    lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
    msg = next((ln[len("error: "):] for ln in reversed(lines) if ln.startswith("error: ")),
               lines[-1] if lines else f"exit status {proc.returncode}")
    return {"ok": False, "error": msg, **({"crashed": True} if crashed(proc) else {})}


def _run_in_venv(bundle_dir: Path, reqs: List[str], reference: bool = False) -> Dict[str, Any]:
    py = venv_python(reqs)
    with tempfile.TemporaryDirectory(prefix="edgekit-compat-") as d:
        rt = copy_runtime(Path(d))
        proc = subprocess.run([str(py), "-m", "edgekit.runtime", "check", str(bundle_dir), "--json",
                               *(["--reference-numerics"] if reference else [])],
                              capture_output=True, text=True, cwd=d, timeout=600,
                              env={"PYTHONPATH": str(rt), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                   "PYTHONDONTWRITEBYTECODE": "1"})
    return _parse(proc)


def _emulation_fits(reqs: List[str]) -> bool:
    from edgekit.lab import emulated as emulate

    return emulate.host_unfit() is None and emulate.is_built() and set(reqs) <= set(emulate.RECIPE["pip"])


def _run_emulated(bundle_dir: Path, python: Optional[str] = None, timeout: float = 900) -> Dict[str, Any]:
    """The bundle's golden check (`python -m edgekit.runtime check --json`) inside the emulated arm64 root, with
    `python` as the root sees it (default: the root's tflite-runtime venv)."""
    from edgekit.lab import emulated as emulate

    root = emulate.root_path()
    emulate.ensure_binfmt()
    _sweep_stale(root / "tmp")
    tmp = Path(tempfile.mkdtemp(prefix="edgekit-compat-", dir=root / "tmp"))
    try:
        copy_runtime(tmp / "rt")
        shutil.copytree(bundle_dir, tmp / "bundle")
        inside = "/" + str(tmp.relative_to(root))
        proc = emulate.in_root(root, [python or f"{emulate.VENV}/bin/python", "-m", "edgekit.runtime", "check",
                                      f"{inside}/bundle", "--json"],
                               env={"PYTHONPATH": f"{inside}/rt", "PYTHONDONTWRITEBYTECODE": "1"},
                               timeout=timeout, capture=True)
        return _parse(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale(tmp_root: Path) -> None:
    """Remove the bundle copies of checks that cannot be running any more (older than twice the longest limit: a
    converter killed mid-check leaves its copy in the root's /tmp, a language model's hundreds of MB)."""
    cutoff = time.time() - 2 * max(LLM_EMULATED_LIMIT_S.values())
    for d in tmp_root.glob("edgekit-compat-*"):
        try:
            if d.is_dir() and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:   # gone meanwhile
            continue


# How long a language model's golden check may run under qemu: auto gives up (recorded as not checked), emulated
# waits longer (SmolLM2-135M's INT4 bundle: 208 s on a quiet 2-vCPU Xeon, 340 s with other work beside it).
LLM_EMULATED_LIMIT_S = {False: 900.0, True: 3600.0}


def check_llm(bundle_dir: Path, profile: TargetProfile, mode: str = "auto", execution_provider: str = "cpu",
              cache: Optional[Dict] = None, say=None) -> List[Dict[str, Any]]:
    """A language-model bundle for an arm64 profile: its golden check (teacher-forced top-1 agreement, logit SNR
    at the golden top-K, a generation) run by onnxruntime-genai on ARM's kernels in the emulated arm64 root, the
    engine at the versions that measured it here (edgekit.lab.emulated.build_llm). Fidelity was measured on this
    machine's kernels; this is where the target's rounding of the int8 dot products shows. Returns the manifest's
    compatibility records (none for an x86 profile: this machine's kernels are the target's kind; a build for
    another execution provider than the CPU's is recorded unchecked). Raises ConversionError when the bundle fails
    there (the row is not written). auto: checked where the LLM venv is built, else recorded with why not;
    emulated: required (built on first use); venv/off: recorded unchecked. cache: records by the model's files and
    golden (the Pi profiles' bundles of one build are checked once); say: a progress line before a check runs."""
    if mode not in MODES:
        raise ConversionError(f"unknown compatibility mode {mode!r}", hint="one of " + ", ".join(MODES))
    if profile.device.arch != "aarch64":
        return []
    from edgekit.errors import DeviceError
    from edgekit.lab import emulated as emulate

    recipe = emulate.llm_recipe()
    reqs = list(recipe["pip"])
    where = "emulated aarch64 (qemu)"
    if execution_provider != "cpu":
        return [{"requirements": reqs, "checked": False,
                 "reason": f"built for the {execution_provider} execution provider: ARM's CPU kernels are not the "
                           "device's (unverified until the device runs its golden check)"}]
    if mode in ("off", "venv"):
        why = ("--compat-check off" if mode == "off" else
               "--compat-check venv: an x86 venv runs this machine's kernels, which measured the bundle already")
        return [{"requirements": reqs, "checked": False, "reason": why}]
    bundle_dir = Path(bundle_dir).resolve()
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    key = (tuple(sorted((k, f["sha256"]) for k, f in manifest["model"]["files"].items())),
           hashlib.sha256((bundle_dir / "golden.json").read_bytes()).hexdigest(), tuple(reqs), mode)
    if cache is not None and key in cache:
        hit = cache[key]
        if "failed" in hit:   # the same model failed there for another profile: the same failure, this profile's
            raise ConversionError(hit["failed"][0], target=profile.name, stage="compatibility", hint=hit["failed"][1])
        return [dict(hit, reused=True)]
    if mode == "emulated":
        why = emulate.host_unfit()
        if why:
            raise ConversionError(why, target=profile.name, stage="compatibility",
                                  hint="--compat-check auto records the ARM check as not done here")
        try:
            python = emulate.build_llm(say=say or (lambda _t: None))
        except DeviceError as e:
            raise ConversionError(f"no emulated arm64 root with {' + '.join(reqs)}: {e}", target=profile.name,
                                  stage="compatibility") from None
    else:
        why = emulate.llm_unavailable(recipe)
        if why:
            return [{"requirements": reqs, "checked": False, "reason": why + ": measured on this machine's kernels only"}]
        python = f"{emulate.llm_venv(recipe)}/bin/python"
    if say:
        say(f"golden check on ARM's kernels ({where}, {' + '.join(reqs)})")
    t0 = time.monotonic()
    limit = LLM_EMULATED_LIMIT_S[mode == "emulated"]
    try:
        res = _run_emulated(bundle_dir, python=python, timeout=limit)
    except subprocess.TimeoutExpired:
        why = f"the golden check ran past {limit:.0f} s under emulation (qemu runs ARM code tens of times slower)"
        if mode == "emulated":
            return _failed(cache, key, why, "--compat-check off writes it unchecked; a board runs it in seconds",
                           profile)
        record = {"requirements": reqs, "checked": False,
                  "reason": why + f"; --compat-check emulated waits up to {LLM_EMULATED_LIMIT_S[True] / 60:.0f} minutes"}
    else:
        record = {"requirements": reqs, "where": where, "checked": True, **res,
                  "seconds": round(time.monotonic() - t0, 1)}
        if res.get("error"):
            return _failed(cache, key, f"the language model does not run in {' + '.join(reqs)} on aarch64 ({where}): "
                           f"{res['error']}", "a board decides; --compat-check off writes it unchecked", profile)
        if not res.get("ok"):
            snr = res.get("snr_db")
            detail = (f"teacher-forced top-1 agreement {res.get('top1_agreement', 0):.3f} (min "
                      f"{res.get('min_top1_agreement')}), logit SNR "
                      + ("n/a" if snr is None else f"{snr:.1f} dB (min {res.get('min_snr_db')})")
                      + ("" if res.get("generation_ok", True) else ", the generation produced no text"))
            int4 = (manifest.get("recipe") or {}).get("precision") == "int4"
            return _failed(cache, key, f"the language model fails its golden check on ARM's kernels ({where}, "
                           f"{' + '.join(reqs)}): {detail}", ("--precision int8 rounds closer to the float model on "
                           "the device; " if int4 else "a board decides; ") + "--compat-check off writes it unchecked",
                           profile)
    if cache is not None:
        cache[key] = record
    return [record]


def _failed(cache: Optional[Dict], key, message: str, hint: str, profile: TargetProfile):
    """Raise check_llm's failure, remembered for the same model on another profile (not checked again)."""
    if cache is not None:
        cache[key] = {"failed": (message, hint)}
    raise ConversionError(message, target=profile.name, stage="compatibility", hint=hint)


def _explain(error: str, reqs: List[str], model: Optional[Path] = None) -> str:
    m = re.search(r"support for domain (\S+) is till opset (\d+)", error)
    if m and model is not None and model.suffix == ".onnx" and model.is_file():
        from edgekit.convert.onnx import ops_needing

        domain = "" if m.group(1) in ("ai.onnx", "''") else m.group(1)
        ops = ops_needing(model.read_bytes(), domain, int(m.group(2)))
        return (f"{' + '.join(reqs)} reads {m.group(1)} up to opset {m.group(2)}; "
                + (f"newer opset needed by: {', '.join(ops)}" if ops else
                   "no op of the graph needs a newer one (the import is declared newer than its ops)"))
    m = re.search(r"builtin opcode '(\w+)' version '(\d+)'", error)
    if m:
        return (f"op {m.group(1)} version {m.group(2)} is newer than {' + '.join(reqs)} knows "
                f"(the device would fail to load it)")
    m = re.search(r"Type (\w+) is unsupported by op (\w+)", error)
    if m:
        return f"op {m.group(2).upper()} has no {m.group(1)} kernel in {' + '.join(reqs)}"
    if "XNNPACK" in error and ("failed to prepare" in error or "failed to create" in error):
        return (f"{error} (the XNNPACK delegate refused a node's parameters when preparing it: no op or op "
                "version is missing)")
    return error


def check(bundle_dir: Path, profile: TargetProfile, fmt: str, mode: str = "auto",
          cache: Optional[Dict] = None, artifact_sha: str = "", reference: bool = False) -> List[Dict[str, Any]]:
    """Check a (temporary) bundle; returns the manifest's compatibility records.
    Raises ConversionError when the artifact fails to load or match there. `reference`: the golden
    outputs are in reference numerics (convert.numerics), so an x86 venv runs the QDQ graph as written
    (the host's kernels would saturate where the target's do not)."""
    if mode not in MODES:
        raise ConversionError(f"unknown compatibility mode {mode!r}", hint="one of " + ", ".join(MODES))
    bundle_dir = Path(bundle_dir).resolve()  # the check runs from another working directory
    accept_crash, mode = mode == "accept-crash", ("auto" if mode == "accept-crash" else mode)
    reqs, unchecked = requirements(profile, fmt)
    records = [{"requirements": [u], "checked": False,
                "reason": "the device's own build; cannot be installed here"} for u in unchecked]
    if mode == "off" or not reqs:
        if mode == "off" and reqs:
            records.append({"requirements": reqs, "checked": False, "reason": "--compat-check off"})
        return records
    arm = profile.device.arch == "aarch64"
    where = "emulated aarch64 (qemu)" if (arm and mode in ("auto", "emulated") and _emulation_fits(reqs)) \
        else "x86_64 venv"
    if mode == "emulated" and not where.startswith("emulated"):
        raise ConversionError("no emulated arm64 root that has " + " + ".join(reqs), target=profile.name,
                              stage="compatibility", hint="edgekit device emulate up (Linux, root)")
    key = (artifact_sha, tuple(reqs), where, reference)
    if cache is not None and key in cache:
        res = dict(cache[key])
    else:
        t0 = time.monotonic()
        try:
            res = _run_emulated(bundle_dir) if where.startswith("emulated") else \
                _run_in_venv(bundle_dir, reqs, reference)
        except CompatUnavailable as e:
            if mode != "auto":
                raise ConversionError(str(e), target=profile.name, stage="compatibility") from None
            res = {"checked": False, "reason": str(e)}
        res["seconds"] = time.monotonic() - t0
        if res.get("crashed") and fmt == "tflite":
            try:
                res["crash"] = attribute_crash(bundle_dir, reqs, where.startswith("emulated"))
            except (OSError, ValueError, subprocess.SubprocessError, CompatUnavailable, ConversionError) as e:
                res["crash"] = {"reproduced": None, "statement": f"could not bisect the crash: {e}"}
        if cache is not None:
            cache[key] = res
    record = {"requirements": reqs, "where": where, "checked": res.get("checked", True), **res}
    if reference and not where.startswith("emulated"):
        record["numerics"] = "reference (QDQ graph as written: this host's kernels saturate)"
    if fmt == "tflite" and (bundle_dir / "model.tflite").is_file():
        from edgekit.convert.tflite_fc import rewrites_of

        rewrites = [r for r in rewrites_of((bundle_dir / "model.tflite").read_bytes()) if r["rewritten"]]
        if rewrites:
            record["graph_rewrites"] = rewrites
    crash = res.get("crash") or {}
    if record["checked"] and not res.get("ok") and crash.get("reproduced") and accept_crash \
            and not crash.get("attributed"):
        record["accepted"] = "--compat-check accept-crash: " + crash["statement"]
    elif record["checked"] and not res.get("ok"):
        detail = _explain(res["error"], reqs, bundle_dir / f"model.{fmt}") if res.get("error") else ", ".join(
            f"output {k}: SNR {v['snr_db']:.1f} dB vs golden (min {res.get('min_snr_db')}), top-1 agreement "
            f"{v['top1_agreement']}, max difference {v['max_abs_err']:.4g}"
            for k, v in res.get("outputs", {}).items() if not v.get("ok"))
        if crash.get("statement"):
            detail += f" ({crash['statement']})"
        unattributed = crash.get("reproduced") and not crash.get("attributed")
        raise ConversionError(f"the {fmt} artifact fails in {' + '.join(reqs)} ({where}): {detail}",
                              target=profile.name, stage="compatibility",
                              hint=("a board decides: test one, or --compat-check accept-crash to write the "
                                    "bundle with this recorded in its manifest" if unattributed else
                                    "choose ops/precision that runtime supports, update the devices' "
                                    "runtime and min_runtime, or --compat-check off to accept the risk"))
    records.append(record)
    return records



def describe(record: Dict[str, Any]) -> str:
    """One progress line for a compatibility record (a crash accepted with accept-crash is not a pass)."""
    runtime = " + ".join(record.get("requirements", []))
    if not record.get("checked", True) or "where" not in record:
        return f"not checked in {runtime}: {record.get('reason', '?')}"
    if record.get("accepted"):
        return f"CRASHES in {runtime} ({record['where']}), written anyway: {record['accepted']}"
    rewritten = len(record.get("graph_rewrites", []))
    return (f"loads and matches in {runtime} ({record['where']}, batch {record.get('batch', '?')})"
            + (f"; {rewritten} FULLY_CONNECTED rewritten as 1x1 CONV_2D" if rewritten else "")
            + (f"; {record['backend_note']}" if record.get("backend_note") else ""))

# --- a crash: which op, at which shape, and whose fault ---------------------------------------

# Runs inside the checking environment (stdlib + numpy + the runtime's interpreter) for the whole
# bisection: imports once (seconds under qemu), then for each line "model kernels" on stdin forks
# a child that loads and invokes that model on the raw inputs, and answers with how the child
# ended ({"signal": 11} for a crash). A crash kills the child only.
_PROBE = r"""
import json, os, sys
import numpy as np
from edgekit.runtime.tflite import find_interpreter
_, cls, _ = find_interpreter()
resolver = sys.modules[cls.__module__].OpResolverType
with np.load(sys.argv[1]) as z:
    feeds = [z[str(i)] for i in range(len(z.files))]

def run(path, kernels):
    kw = {"experimental_op_resolver_type": resolver.BUILTIN_REF} if kernels == "reference" else {}
    it = cls(model_path=path, **kw)
    dets = it.get_input_details()
    for d, x in zip(dets, feeds):
        it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    for d, x in zip(dets, feeds):
        it.set_tensor(d["index"], x)
    it.invoke()

for line in sys.stdin:
    path, kernels = line.split()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run(path, kernels)
        except Exception as e:
            sys.stderr.write(f"error: {type(e).__name__}: {e}\n")
            code = 3
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                     else {"exit": os.WEXITSTATUS(status)}), flush=True)
"""


def crashed(proc: subprocess.CompletedProcess) -> bool:
    """Killed by a signal (SIGSEGV, SIGABRT...), directly or as qemu reports it."""
    return proc.returncode < 0 or proc.returncode >= 128 or "uncaught target signal" in (proc.stderr or "")


class _Env:
    """Where probes run (the emulated root, files under its /tmp; or a venv here): one probe
    process for the whole bisection, so the runtime is imported once."""

    TIMEOUT = 600.0  # one probe; qemu is slow, a hang is not a crash

    def __init__(self, emulated: bool, reqs: List[str], feeds: bytes):
        self.emulated = emulated
        if emulated:
            from edgekit.lab import emulated as emulate

            self.root = emulate.root_path()
            self.dir = Path(tempfile.mkdtemp(prefix="edgekit-probe-", dir=self.root / "tmp"))
            self.inside = "/" + str(self.dir.relative_to(self.root))
        else:
            self.py = venv_python(reqs)
            self.dir = Path(tempfile.mkdtemp(prefix="edgekit-probe-"))
            self.inside = str(self.dir)
        copy_runtime(self.dir / "rt")
        (self.dir / "probe.py").write_text(_PROBE)
        argv = [f"{self.inside}/probe.py", self.put("feeds.npz", feeds)]
        env = {"PYTHONPATH": f"{self.inside}/rt", "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.stderr = open(self.dir / "stderr.txt", "w+")
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        if emulated:
            self.proc = emulate.popen_in_root(self.root, [f"{emulate.VENV}/bin/python", *argv], env=env, **pipes)
        else:
            env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
            self.proc = subprocess.Popen([str(self.py), *argv], env=env, cwd=self.dir, **pipes)

    def put(self, name: str, data: bytes) -> str:
        (self.dir / name).write_bytes(data)
        return f"{self.inside}/{name}"

    def last_error(self) -> str:
        self.stderr.flush()
        lines = [ln for ln in (self.dir / "stderr.txt").read_text(errors="replace").splitlines() if ln.strip()]
        return next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "?")

    def crashes(self, model: str, kernels: str = "optimized") -> bool:
        import select

        self.proc.stdin.write(f"{model} {kernels}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise CompatUnavailable(f"the crash probe gave no answer ({'timed out' if not ready else 'ended'}): "
                                    + self.last_error())
        res = json.loads(line)
        if res.get("exit", 0) not in (0,):
            raise CompatUnavailable("the crash probe failed without crashing: " + self.last_error())
        return "signal" in res

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _prefix(model, k: int) -> bytes:
    """The model's first k+1 operators, with the outputs of operator k as the model's outputs
    (TFLite runs every operator of a subgraph, so this runs exactly operators 0..k)."""
    import copy

    import flatbuffers

    m = copy.copy(model)
    sg = copy.copy(model.subgraphs[0])
    sg.operators = model.subgraphs[0].operators[:k + 1]
    sg.outputs = [int(i) for i in sg.operators[k].outputs if int(i) >= 0]
    m.subgraphs = [sg] + list(model.subgraphs[1:])
    m.signatureDefs = []
    b = flatbuffers.Builder(1 << 16)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _op_facts(model_bytes: bytes, feeds: List[Any]) -> List[Dict[str, Any]]:
    """Per operator (here, on the host): name, input/output shapes and dtypes at these inputs."""
    import numpy as np

    from edgekit.runtime.tflite import find_interpreter

    _, cls, _ = find_interpreter()
    it = cls(model_content=model_bytes)  # shapes stay readable after invoke
    dets = it.get_input_details()
    for d, x in zip(dets, feeds):
        it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    for d, x in zip(dets, feeds):
        it.set_tensor(d["index"], x)
    it.invoke()
    t = {d["index"]: d for d in it.get_tensor_details()}

    def desc(i):
        return {"shape": [int(v) for v in t[i]["shape"]], "dtype": np.dtype(t[i]["dtype"]).name}

    return [{"op": op["op_name"], "inputs": [desc(i) for i in op["inputs"] if i >= 0],
             "outputs": [desc(i) for i in op["outputs"] if i >= 0]}
            for op in it._get_ops_details() if op["op_name"] != "DELEGATE"]


def attribute_crash(bundle_dir: Path, reqs: List[str], emulated: bool,
                    say=lambda text: None) -> Dict[str, Any]:
    """Find the first operator whose run crashes the runtime at batch 1 (the golden sample, one at
    a time), by bisecting the graph: a prefix of the first k+1 operators runs exactly those, so the
    smallest crashing prefix ends at the culprit (log2(ops) runs). Then ask the runtime's reference
    kernels to run that prefix. Returns the manifest's record of it."""
    import io

    import numpy as np

    from edgekit.runtime import load
    from edgekit.runtime.check import batch_size

    t0 = time.monotonic()
    model_path = bundle_dir / "model.tflite"
    data = model_path.read_bytes()
    m = load(bundle_dir, verify=False)
    g = m.bundle.golden()
    n = batch_size(m)
    feeds = [np.ascontiguousarray(s.quantize(g[f"input:{s.name}"][:n])) for s in m.inputs]
    buf = io.BytesIO()
    np.savez(buf, **{str(i): f for i, f in enumerate(feeds)})
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(data, 0)
    ops = len(model.subgraphs[0].operators)
    env = _Env(emulated, reqs, buf.getvalue())
    runs = 0
    try:
        def crashes(k: int, kernels: str = "optimized") -> bool:
            nonlocal runs
            runs += 1
            return env.crashes(env.put(f"prefix-{k}.tflite", data if k == ops - 1 else _prefix(model, k)), kernels)

        say(f"a crash: bisecting the graph ({ops} operators) in {' + '.join(reqs)}")
        if not crashes(ops - 1):
            return {"reproduced": False, "batch": n, "probes": runs, "seconds": round(time.monotonic() - t0, 1),
                    "statement": "the crash did not recur when the model ran alone at batch "
                                 f"{n}: not attributed to an operator (intermittent, or in the check itself)"}
        lo, hi = 0, ops - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if crashes(mid):
                hi = mid
            else:
                lo = mid + 1
        facts = _op_facts(data, feeds)[lo]
        reference_runs = not crashes(lo, "reference")
        whole_reference_runs = reference_runs and not crashes(ops - 1, "reference")
    finally:
        env.close()
    shapes = " x ".join(f"{d['dtype']}{d['shape']}" for d in facts["inputs"])
    runtime = " + ".join(reqs)
    where = "under qemu (emulated aarch64)" if emulated else "natively here"
    if emulated:
        who = ("cannot be attributed: either the runtime's optimized kernel or qemu's emulation of the "
               "instructions it uses; only a real board can tell")
    else:
        who = "the runtime itself (no emulation involved)"
    ref = ("its reference kernels run it" + (" and the whole model" if whole_reference_runs else "")
           if reference_runs else "its reference kernels crash too")
    return {"reproduced": True, "op": facts["op"], "index": lo, "operators": ops, "batch": n,
            "inputs": facts["inputs"], "outputs": facts["outputs"],
            "reference_kernels_run": reference_runs, "attributed": not emulated,
            "probes": runs, "seconds": round(time.monotonic() - t0, 1),
            "statement": f"{runtime} crashes {where} in op {facts['op']} (operator {lo} of {ops}) on "
                         f"{shapes} at batch {n}; {ref}; {who}"}


# --- a delegate that refuses a node: which one, and why ---------------------------------------

# XNNPACK's quantized convolutions and fully connected layers take a requantization scale
# (input scale x weight scale / output scale) in [2^-32, 256) only; outside it the delegate
# fails when it builds its runtime ('failed to create XNNPACK runtime ... failed to prepare').
_REQUANT_RANGE = (2.0 ** -32, 256.0)
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
# an int8 activation scale above this spans more than +-1e8: no real activation does; a constant
# such as float32's minimum (a max pool's padding, an attention mask) was calibrated into it
_ABSURD_SCALE = 1e6


def delegate_refusal(model_bytes: bytes) -> Optional[Dict[str, Any]]:
    """Which operator the XNNPACK delegate refuses in a .tflite model, and why, found with this
    host's interpreter (None when it takes the whole graph): a prefix of operators 0..k is
    prepared with the default delegate, and the smallest refused prefix ends at that operator
    (log2(ops) prepares). The cause is read from the operator's quantization parameters: an
    activation range no real activation has, a requantization scale outside XNNPACK's range."""
    import numpy as np
    from tensorflow.lite.python import schema_py_generated as schema

    from edgekit.runtime.tflite import delegate_refused, find_interpreter

    name, cls, version = find_interpreter()

    def refused(data: bytes) -> bool:
        try:
            cls(model_content=data).allocate_tensors()
        except (ValueError, RuntimeError) as e:
            return delegate_refused(" ".join(str(e).split()))
        return False

    if not refused(model_bytes):
        return None
    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    sg = model.subgraphs[0]
    ops = len(sg.operators)
    lo, hi = 0, ops - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if refused(_prefix(model, mid)):
            hi = mid
        else:
            lo = mid + 1
    op = sg.operators[lo]
    code = model.operatorCodes[op.opcodeIndex]
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    op_name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), str(code.builtinCode))
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def scales(i: int) -> List[float]:
        q = sg.tensors[i].quantization
        return [] if q is None or q.scale is None else [float(s) for s in q.scale]

    def constant(i: int) -> bool:
        b = model.buffers[sg.tensors[i].buffer].data
        return b is not None and len(b) > 0

    def desc(i: int) -> Dict[str, Any]:
        t = sg.tensors[i]
        d = {"name": t.name.decode() if isinstance(t.name, bytes) else str(t.name),
             "dtype": types.get(t.type, str(t.type)),
             "shape": [int(v) for v in (t.shape if t.shape is not None else [])]}
        s = scales(i)
        if s:
            d["scale"] = s[0] if len(s) == 1 else [min(s), max(s)]
        return d

    ins = [int(i) for i in op.inputs if int(i) >= 0]
    outs = [int(i) for i in op.outputs if int(i) >= 0]
    causes = []
    for i in ins + outs:
        s = scales(i)
        if len(s) == 1 and s[0] > _ABSURD_SCALE and not constant(i):
            d = desc(i)
            causes.append(f"{'input' if i in ins else 'output'} '{d['name']}' has {d['dtype']} scale {s[0]:.3g} "
                          f"(a range of +-{s[0] * 128:.3g}): a constant such as float32's minimum (a max pool's "
                          "padding, a mask) was calibrated into that activation's range")
    if op_name in _WEIGHTED and len(ins) >= 2 and scales(ins[0]) and scales(ins[1]) and outs and scales(outs[0]):
        r = np.array(scales(ins[1])) * scales(ins[0])[0] / scales(outs[0])[0]
        bad = r[(r >= _REQUANT_RANGE[1]) | (r < _REQUANT_RANGE[0])]
        if bad.size:
            causes.append(f"requantization scale (input x weight / output scale) {float(bad.max()):.3g} is outside "
                          "[2^-32, 256), the range XNNPACK takes")
    cause = "; ".join(causes) or "XNNPACK refuses this node's parameters (no op or op version is missing)"
    shapes = " x ".join(f"{d['dtype']}{d['shape']}" for d in (desc(i) for i in ins))
    return {"op": op_name, "index": lo, "operators": ops, "inputs": [desc(i) for i in ins],
            "outputs": [desc(i) for i in outs], "cause": cause, "found_with": f"{name} {version}",
            "statement": f"XNNPACK refuses {op_name} (operator {lo} of {ops}) on {shapes}: {cause}"}
