"""The batched decoder graph's step time against the batch and the context length, without the engine or HTTP:
what one decode step of runtime.llm_batch.BatchedDecoder costs at batch 1 and 4 with every row at 16 / 128 / 256
/ 384 tokens of context (the same length repeated: the cost at that length), 3 repetitions, medians.

    flock /tmp/edgekit-bench.lock python benchmarks/llm_batch_step.py MODEL_DIR THREADS

MODEL_DIR: an ORT GenAI folder (e.g. benchmarks/.cache/llm-1024x8-int4 from llm_serve_bench.py --synth 1024x8).
Prints one JSON line: per length ms_b1, ms_b4 and x4 (batch 4's tokens a second over batch 1's).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.runtime.llm_batch import BatchedDecoder  # noqa: E402

LENGTHS = (16, 128, 256, 384)


def main() -> None:
    d, threads = Path(sys.argv[1]), int(sys.argv[2])
    dec = BatchedDecoder(d, json.loads((d / "genai_config.json").read_text()), threads=threads, slots=8,
                         capacity=512)
    res = {}
    for _ in range(3):
        for L in LENGTHS:
            prompt = list(range(5, 5 + L))
            for n in (1, 4):
                for i in range(n):
                    dec.prefill(i, [prompt])
                lengths = np.full(n, L, dtype=np.int64)
                toks = np.full(n, 7, dtype=np.int64)
                for _ in range(3):
                    dec.decode(toks, lengths)
                t, k = time.perf_counter(), 40
                for _ in range(k):
                    dec.decode(toks, lengths)
                res.setdefault((L, n), []).append((time.perf_counter() - t) / k * 1e3)
    out = {f"L{L}": {"ms_b1": round(float(np.median(res[(L, 1)])), 3), "ms_b4": round(float(np.median(res[(L, 4)])), 3),
                     "x4": round(float(4 * np.median(res[(L, 1)]) / np.median(res[(L, 4)])), 2)} for L in LENGTHS}
    print(json.dumps({"model": str(d), "threads": threads, "steps": out, "load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
