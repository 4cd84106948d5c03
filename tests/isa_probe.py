"""Run inside an emulated CPU by tests/test_isa_avx2.py (`qemu-x86_64 -cpu Haswell python tests/isa_probe.py ...`):
what edgekit sees of the CPU, and what ONNX Runtime's kernels compute there. One JSON line on stdout.

    isa_probe.py host
    isa_probe.py run BUNDLE INPUTS.npz OUT.npz [--reference]   # every input array in INPUTS, outputs to OUT
    isa_probe.py llm BUNDLE OUT.npz                              # golden check + the golden prompts' logits
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(argv) -> int:
    os.environ.setdefault("EDGEKIT_THREAD_PROBE", "0")   # no thread-count timing under an emulator
    what = argv[0]
    if what == "host":
        from edgekit.convert.numerics import this_host
        from edgekit.runtime.cpuid import simd_flags

        h = this_host()
        out = {"describe": h.describe(), "exact_int8": h.exact_int8, "cpuid": sorted(simd_flags() or ())}
    elif what == "run":
        from edgekit.runtime import load

        bundle, inputs, dest = argv[1:4]
        m = load(bundle, threads=1, reference_numerics="--reference" in argv, providers=["CPUExecutionProvider"])
        feeds = dict(np.load(inputs))
        res = m.run(**feeds)
        np.savez(dest, **res)
        out = {"outputs": sorted(res)}
    elif what == "llm":
        from edgekit.runtime import load
        from edgekit.runtime.llmcheck import read_golden

        lm = load(argv[1], threads=1)
        chk = lm.check()
        g = read_golden(lm)
        np.savez(argv[2], **{f"p{i}": lm.logits(ids) for i, ids in enumerate(g["prompts"])})
        out = {k: chk[k] for k in ("ok", "top1_agreement", "snr_db", "text", "generation_ok")}
    else:
        print(f"isa_probe: unknown command {what!r}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
