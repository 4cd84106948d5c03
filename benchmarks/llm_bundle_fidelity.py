"""Fidelity of LLM bundles on the benchmark's text, as llm_bench.py measures it (issue 21).

    flock /tmp/edgekit-bench.lock python benchmarks/llm_bundle_fidelity.py FLOAT_FOLDER BUNDLE [BUNDLE...] [--json OUT]

The float model (torch, float32) and each bundle's model.onnx (ONNX Runtime, the build's MatMulNBits kernels at its
accuracy level: edgekit.convert.llm_fidelity.OnnxDecoder) teacher-forced on the same windows of --text (default
tests/data/llm_heldout.txt, at most --eval-tokens tokens in windows of --window: llm_bench's defaults 1024 / 512):
perplexity, mean KL(float || bundle), top-1 agreement, and the bundle's model bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the float model: a Hugging Face causal-LM folder")
    ap.add_argument("bundles", nargs="+", help="LLM bundle directories (manifest.json + model/)")
    ap.add_argument("--text", default=str(HERE.parent / "tests" / "data" / "llm_heldout.txt"))
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    from edgekit.convert.llm_fidelity import FloatModel, OnnxDecoder, compare

    fm = FloatModel(Path(args.folder))
    text = fm.text_windows(Path(args.text).read_text(encoding="utf-8"), args.text, args.eval_tokens, args.window)
    ref = fm.logprobs(text.windows)
    rows = []
    for b in args.bundles:
        man = json.loads((Path(b) / "manifest.json").read_text(encoding="utf-8"))
        dec = OnnxDecoder(Path(b) / "model", man["model"]["kv_heads"], man["model"]["head_dim"])
        m = compare(ref, text, [dec.logits(w) for w in text.windows])
        rows.append({"bundle": str(b), "bytes": man["model"]["bytes"], "fidelity": m, "recipe": man["recipe"],
                     "rescue": man.get("rescue"), "rescued_by": man.get("rescued_by")})
        print(f"{b}: perplexity {m['ppl_float']:.3f} -> {m['ppl']:.3f} ({100 * m['ppl_increase']:+.2f}%), "
              f"KL {m['kl_mean']:.5f}, top-1 {100 * m['top1_agreement']:.1f}%, {man['model']['bytes'] / 1e6:.1f} MB",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"text": text.source, "tokens": text.tokens, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
