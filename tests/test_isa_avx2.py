"""The other kind of x86: ONNX Runtime's AVX2 kernels (no VNNI), on whatever x86 CPU runs the suite.

CI's machines are x86 AVX2 without VNNI or AVX-512 VNNI, and the integer kernels differ between them: without
VNNI, MLAS multiplies u8 x s8 with VPMADDUBSW, whose int16 pair sums saturate (DESIGN.md, "Numerics"). A suite
that runs on one kind only checks that kind's kernels, so this file runs the ISA-dependent parts again under
qemu-user as a Haswell CPU (AVX2 + FMA, no AVX-512, no VNNI; qemu's TCG has AVX2 since 7.2, not AVX-512): the
kernels MLAS dispatches there are the AVX2 ones, whatever the host is. Checked there, against this process (the
host's own kernels):

- edgekit sees that CPU as AVX2 without VNNI (CPUID, runtime.cpuid: qemu-user shows the host's /proc/cpuinfo);
- rpi4's S8S8 INT8 artifact saturates there (the reason convert measures it as the graph is written), while
  its reference numerics (the graph as written) compute what they compute here;
- x86-avx2's artifact (u8 activations x 7-bit weights) computes there what it computes here;
- an INT4 language-model bundle (4-bit MatMulNBits, 8-bit lm_head, int8 activations) passes its golden check
  there, its logits close to this host's.

Under the emulator code runs tens of times slower: only ONNX Runtime inference runs there, never a convert.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_of, unavailable
from tinylm import tiny_int4_avx2, tiny_lm  # noqa: F401  (the session fixtures)

from edgekit.convert.numerics import this_host
from edgekit.runtime import load
from edgekit.runtime.check import snr_db

PROBE = Path(__file__).with_name("isa_probe.py")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="emulates an x86 CPU with qemu-x86_64: an x86-64 host's check")


def qemu() -> str:
    exe = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if not exe:
        unavailable("qemu-x86_64(-static) is not installed (apt install qemu-user-static)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if not m or (int(m.group(1)), int(m.group(2))) < (7, 2):
        unavailable(f"{exe} is not qemu 7.2 or later ({out.splitlines()[0] if out else '?'}): its TCG has no AVX2")
    return exe


def haswell(*args, timeout=600) -> dict:
    """Run isa_probe.py ARGS in this interpreter (this venv) on an emulated Haswell; its JSON line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), EDGEKIT_THREAD_PROBE="0",
               OMP_NUM_THREADS="1")
    r = subprocess.run([qemu(), "-cpu", "Haswell", sys.executable, str(PROBE), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    noise = "TCG doesn't support requested feature"
    err = "\n".join(ln for ln in r.stderr.splitlines() if noise not in ln)
    assert r.returncode == 0, err[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpuid_agrees_with_proc_cpuinfo_here():
    """On the host itself (no emulator) CPUID and the kernel's flags name the same SIMD features."""
    from edgekit.runtime.cpuid import simd_flags

    simd = simd_flags()
    assert simd is not None, "CPUID could not be run here (no executable page?)"
    line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "flags:")
    proc = set(line.split(":", 1)[1].split())
    for name in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"):
        assert (name in simd) == (name in proc), name


def test_without_cpuid_the_flags_are_proc_cpuinfos(monkeypatch):
    """Where CPUID is not tried (an ARM device) or refused (no executable page), /proc/cpuinfo decides."""
    from edgekit.runtime import cpuid

    line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "flags:")
    proc = frozenset(line.split(":", 1)[1].split())
    try:
        monkeypatch.setattr(cpuid.platform, "machine", lambda: "aarch64")
        cpuid.simd_flags.cache_clear()
        assert cpuid.simd_flags() is None and cpuid.cpu_flags() == proc
        monkeypatch.undo()

        def refused(*a, **k):
            raise OSError(13, "mprotect(PROT_READ | PROT_EXEC) refused")

        monkeypatch.setattr(cpuid, "_Code", refused)
        cpuid.simd_flags.cache_clear()
        assert cpuid.simd_flags() is None and cpuid.cpu_flags() == proc
    finally:
        monkeypatch.undo()
        cpuid.simd_flags.cache_clear()
    assert cpuid.simd_flags() is not None


def test_matmulnbits_int8_activations_do_not_saturate_on_avx2():
    """MatMulNBits at accuracy level 4 (int8 activations) with 8-bit and 4-bit weights at their extremes against
    activations at +-127 per block: the exact integer sums on the emulated AVX2 CPU (no VPMADDUBSW saturation)."""
    res = haswell("matmulnbits")
    assert res["max_abs_error"] == {"4": 0.0, "8": 0.0}, res


def test_the_emulated_cpu_is_avx2_without_vnni():
    h = haswell("host")
    assert not h["exact_int8"] and "AVX2 without VNNI" in h["describe"], h
    assert "avx2" in h["cpuid"] and "fma" in h["cpuid"]
    assert not any(f.startswith("avx512") or "vnni" in f for f in h["cpuid"]), h


def _outputs(bundle, x_npz, tmp_path, name, reference=False):
    dest = tmp_path / f"{name}.npz"
    haswell("run", bundle, x_npz, dest, *(["--reference"] if reference else []))
    return dict(np.load(dest))


def test_int8_artifacts_compute_on_avx2_what_numerics_says(digits, digits_build, tmp_path):
    _, _, val = digits
    x = np.load(val)["image"][:64]
    rpi4 = bundle_of(digits_build, "rpi4", "onnx")
    avx2 = bundle_of(digits_build, "x86-avx2", "onnx")
    m = load(rpi4.path, threads=1, providers=["CPUExecutionProvider"])
    feeds = tmp_path / "x.npz"
    np.savez(feeds, **{m.inputs[0].name: x})
    out = rpi4.artifact.outputs[0]["name"]

    # rpi4's S8S8 graph: the reference numerics (exact integer products) are the same there and here ...
    ref_here = load(rpi4.path, threads=1, reference_numerics=True, providers=["CPUExecutionProvider"])(x)
    ref_there = _outputs(rpi4.path, feeds, tmp_path, "rpi4-ref", reference=True)[out]
    assert snr_db(ref_here, ref_there) > 60
    # ... its fused kernels on AVX2 saturate: further from the float model than the exact result is
    # (measured: 20.1 dB against 42.0 for the digits CNN), and equal to the host's where the host is AVX2 too
    import keras

    flt = keras.models.load_model(digits[0]).predict(x, verbose=0)
    fused_there = _outputs(rpi4.path, feeds, tmp_path, "rpi4")[out]
    assert snr_db(flt, fused_there) < snr_db(flt, ref_here) - 3, (snr_db(flt, fused_there), snr_db(flt, ref_here))
    if this_host().exact_int8:
        assert snr_db(ref_here, m(x)) > 60          # VNNI: the host's fused kernels are exact
    else:
        assert snr_db(m(x), fused_there) > 60       # an AVX2 host: the same saturating kernels as the emulated one

    # x86-avx2's build (u8 activations x 7-bit weights) cannot saturate: the same result on both kinds
    here = load(avx2.path, threads=1, providers=["CPUExecutionProvider"])
    there = _outputs(avx2.path, feeds, tmp_path, "avx2")[avx2.artifact.outputs[0]["name"]]
    assert snr_db(here(x), there) > 60      # measured: bit-identical on an AVX-512 VNNI host


def test_an_int4_language_model_passes_its_golden_check_on_avx2(tiny_int4_avx2, tmp_path):  # noqa: F811
    int4_bundle = tiny_int4_avx2
    man = json.loads((int4_bundle / "manifest.json").read_text())
    assert man["recipe"]["accuracy_level"] == 4 and man["llm"]["int8_nodes"]["nodes"]   # int8 activations, 8-bit head
    res = haswell("llm", int4_bundle, tmp_path / "logits.npz")
    assert res["ok"] and res["generation_ok"] and res["text"], res
    lm = load(int4_bundle, threads=1)
    from edgekit.runtime.llmcheck import read_golden

    there = np.load(tmp_path / "logits.npz")
    for i, ids in enumerate(read_golden(lm)["prompts"]):
        here = lm.logits(ids)
        assert snr_db(here, there[f"p{i}"]) > 40, i   # measured 53-136 dB (the tiny Llama, 3 prompts)
        assert (here.argmax(-1) == there[f"p{i}"].argmax(-1)).mean() >= 0.9, i
