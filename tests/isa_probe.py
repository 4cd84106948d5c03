"""Run inside an emulated CPU by tests/test_isa_avx2.py (`qemu-x86_64 -cpu Haswell python tests/isa_probe.py ...`):
what edgekit sees of the CPU, and what ONNX Runtime's kernels compute there. One JSON line on stdout.

    isa_probe.py host
    isa_probe.py run BUNDLE INPUTS.npz OUT.npz [--reference]   # every input array in INPUTS, outputs to OUT
    isa_probe.py llm BUNDLE OUT.npz                              # golden check + the golden prompts' logits
    isa_probe.py matmulnbits                                     # extreme 8/4-bit MatMulNBits vs exact sums
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def _extreme_matmulnbits(bits: int) -> float:
    """One MatMulNBits node (accuracy level 4: int8 activations) whose weights are all at their largest or
    smallest code (alternate rows; zero point 128 / 8, scale 1) against activations of +-1 (quantized to +-127 per
    block): the largest difference from the exact integer result. A VPMADDUBSW on u8 x s8 would saturate here
    (255 x 127 x 2 > 32767)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n, blk = 256, 16, 32
    q = np.full((n, k // blk, blk), 255 if bits == 8 else 15, np.uint8)
    q[1::2] = 0
    data = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=blk, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(data, "B"),
                               numpy_helper.from_array(np.ones(n * (k // blk), np.float32), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.stack([np.ones(k), -np.ones(k), np.tile([1.0, -1.0], k // 2)]).astype(np.float32)
    exact = x.astype(np.int64) @ (q.reshape(n, k).astype(np.int64) - (128 if bits == 8 else 8)).T
    return float(np.abs(sess.run(None, {"X": x})[0] - exact).max())


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
    elif what == "matmulnbits":
        out = {"max_abs_error": {str(bits): _extreme_matmulnbits(bits) for bits in (8, 4)}}
    else:
        print(f"isa_probe: unknown command {what!r}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
