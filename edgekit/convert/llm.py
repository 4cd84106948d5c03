"""Hugging Face causal LM -> LLM bundle per target (ONNX Runtime GenAI's model builder).

    from edgekit.convert.llm import LLMRecipe, convert_llm
    result = convert_llm(LLMRecipe("./SmolLM2-135M-Instruct", ("rpi5",), precision="int4"), "build")

For each target the profile's `[llm]` section says how to build (precision, block size, accuracy level, rounding,
which layers stay wider); the builder (`onnxruntime_genai.models.builder`, in process) writes the ONNX decoder
with its KV cache, genai_config.json and the tokenizer; llm_fidelity measures it against the float model in
torch; below the floor an INT4 build walks the rescue ladder:

1. wide: the lm_head at INT8 and the embeddings never 4-bit, where the profile had not already;
2. matmuls: the decoder MatMuls that cost most per weight at INT8 (llm_sensitivity: each MatMul alone at INT4 in
   torch, KL against the float model on calibration text that is not the fidelity text), up to 1/16, 1/8, 1/4,
   then 1/2 of the decoder's weights;
3. int8: INT8 weights throughout.

An INT8 row is held to its own floor (INT8_FLOOR: perplexity +1%); below it (llm_actquant: the int8 activations of
accuracy level 4 are most of INT8's error) the decoder MatMuls that cost most per weight as INT8 nodes, measured in
torch on calibration text, stay fp32 (up to 1/32, then 1/16 of the decoder's weights), then the same at block 16.

A row that still misses the floor is FAILED and not written. Each bundle directory (written atomically: a
temporary directory beside it, then a rename):

    <name>-<target>-<precision>/
      manifest.json   kind "llm", format "onnx-genai": target profile, model files (sha256, bytes), architecture,
                      recipe, llm (bytes read per token, KV bytes per token, context), fidelity, rescue ladder
      model/          what onnxruntime_genai.Model(dir) loads: genai_config.json, model.onnx(.data), tokenizer
                      files, chat template, generation_config.json
      golden.json     golden prompts (token ids) with top-1 and top-k logits here, and a short generation
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import edgekit
from edgekit.bundle import SCHEMA_VERSION, check_name, sha256_file, sha256_files, staged_dir, write_json_atomic
from edgekit.convert import hf_config
from edgekit.convert.llm_fidelity import (BUILTIN_PROMPTS, EvalText, FloatModel, LLMFloor, OnnxDecoder, compare,
                                          golden, mem_available)
from edgekit.convert.llm_graph import (PRUNE_NOTE, alias_tied_embedding, embedding_summary, half_scales,
                                      initializer_bytes, prune_lm_head, read_bytes, readers, scales_summary,
                                      stored_bytes)
from edgekit.convert.llm_gptq import ALGOS as _CALIBRATED_ALGOS, builder_algo, calibrated, int8_summary, \
    kquant_rows
from edgekit.convert.llm_tokenizer import check_tokenizer
from edgekit.errors import BudgetMissed, EdgekitError, SourceModelError
from edgekit.progress import Progress
from edgekit.runtime.cpuid import cpu_flags
from edgekit.runtime.llmopts import kv_capacity, kv_floor
from edgekit.runtime.llmtemplate import relayout_folder
from edgekit.table import render
from edgekit.targets import TargetProfile, load_target

PRECISIONS = ("int4", "int8", "fp16", "fp32")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# What the builder copies besides the model; generation defaults come from the source folder
SOURCE_EXTRAS = ("generation_config.json",)


# --- the source ---------------------------------------------------------------------------------------------------

def is_hf_causal_lm(path: os.PathLike) -> bool:
    """A directory holding a Hugging Face config.json that names an architecture (the rule is
    convert.hf_config's, which sources.check_hf_config puts in words)."""
    return hf_config.is_hf_causal_lm(path)


# a branch of the model builder's dispatch (builder.create_model): `config.architectures[0] == "Name"`
_DISPATCH = re.compile(r'config\.architectures\[0\]\s*==\s*"(\w+)"')


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A config.json's text model's settings: its text_config where it has one (Gemma 3, multimodal), else itself."""
    c = config.get("text_config")
    return c if isinstance(c, dict) else config


def builder_architectures() -> List[str]:
    """The architectures the installed model builder exports (read from its dispatch, not a list kept here)."""
    import inspect

    from onnxruntime_genai.models import builder

    return sorted(set(_DISPATCH.findall(inspect.getsource(builder.create_model))))


def causal_lm_classes() -> set:
    """The class names transformers' AutoModelForCausalLM makes without remote code (its causal-LM mapping): the
    float model every build is measured against is one of them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: set = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        out.update(v if isinstance(v, (tuple, list)) else (v,))
    return out


# What the model builder dispatches but does not build right (onnxruntime-genai 0.18 with transformers 5.25, on
# benchmarks/llm_arch_sweep.py's tiny checkpoints): architecture -> (why, what to do). Out of
# supported_architectures; read_source refuses them in one line before any work.
BUILDER_CANNOT: Dict[str, Tuple[str, str]] = {
    "Gemma4ForConditionalGeneration": (
        "ONNX Runtime GenAI's model builder builds it only with its Gemma 4 MoE class: the dense text decoders "
        "(gemma-4-E2B / E4B / 31B) fail in it (their per-layer embeddings are not built), and the 26B-A4B's "
        "experts become a geglu MoE node ONNX Runtime's CPU kernel refuses",
        "no Gemma 4 checkpoint of this class converts with this builder; Gemma 3 (Gemma3ForCausalLM, "
        "Gemma3ForConditionalGeneration) and Gemma 4's unified form (Gemma4UnifiedForConditionalGeneration) do"),
}


def supported_architectures() -> List[str]:
    """The architectures edgekit converts: those the installed model builder exports (builder_architectures) that
    transformers' AutoModelForCausalLM also loads (causal_lm_classes), less those it builds wrong (BUILDER_CANNOT).
    The builder's others (0.18: ChatGLM, InternLM2, Phi-3 small / vision, Phi-4 multimodal, PhiMoE, Qwen2.5-VL,
    Qwen3-VL, Qwen3.5, Mistral 3, LFM2-VL / Audio, VideoChat-Flash, Whisper) need remote code or another auto class
    for the float reference. Some checkpoints of a supported architecture are still refused (builder_refusal)."""
    return sorted((set(builder_architectures()) & causal_lm_classes()) - set(BUILDER_CANNOT))


# transformers 5's names for GraniteMoeHybrid's legacy layer types (configuration_utils' remap)
_LAYER_TYPE_NAMES = {"mamba": "linear_attention", "attention": "full_attention"}


def builder_refusal(config: Dict[str, Any], arch: str) -> Optional[Tuple[str, str]]:
    """Why the model builder cannot build this checkpoint of `arch` right, and what to do; None where nothing is
    known against it. BUILDER_CANNOT's architectures; GraniteMoeHybrid with a Mamba-2 (linear attention) layer or
    experts (granite-4.0-h-*, the MoE ones: the builder's Granite 4 class builds attention layers and the shared MLP
    only, and crashes on a Mamba layer: 'NoneType' object has no attribute 'q_proj'); GPT-OSS not in its MXFP4
    form (a dequantized BF16 re-upload: the builder reads the experts from the MXFP4 `*_blocks` / `*_scales`
    tensors only)."""
    if arch in BUILDER_CANNOT:
        return BUILDER_CANNOT[arch]
    c = text_config(config)
    if arch == "GraniteMoeHybridForCausalLM":
        types = c.get("layer_types") or c.get("layers_block_type")
        # transformers' defaults where config.json names none: linear attention everywhere, 8 experts
        kinds = [_LAYER_TYPE_NAMES.get(t, t) for t in types] if isinstance(types, list) else ["linear_attention"]
        other = sorted({k for k in kinds if k != "full_attention"})
        experts = c.get("num_local_experts", 8)
        why = ([f"{kinds.count(k)} {'Mamba-2 (linear attention)' if k == 'linear_attention' else k} layer(s)"
                for k in other] + ([f"{experts} experts a layer"] if isinstance(experts, int) and experts > 0
                                   else []))
        if why:
            return (f"{' and '.join(why)}: ONNX Runtime GenAI's model builder builds GraniteMoeHybrid's attention "
                    "layers and shared MLP only (it fails on a Mamba layer and would leave the experts out)",
                    "the attention-only, expert-free Granite 4 checkpoints (granite-4.0-micro, granite-4.0-350m / "
                    "1b: layer_types all \"attention\", num_local_experts 0) convert; the hybrid granite-4.0-h-* and "
                    "MoE ones do not with this builder")
    if arch == "GptOssForCausalLM":
        qc = config.get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method != "mxfp4":
            return (f"gpt-oss {'quantized by ' + repr(method) if method else 'saved in float'} (no "
                    "quantization_config.quant_method \"mxfp4\"): ONNX Runtime GenAI's model builder reads the "
                    "experts only from the MXFP4 *_blocks / *_scales tensors of OpenAI's checkpoint",
                    "convert the original MXFP4 checkpoint (openai/gpt-oss-20b, openai/gpt-oss-120b), not a "
                    "dequantized (BF16) re-upload")
    return None


def builder_classes(arch: str) -> List[type]:
    """The model builder's classes that `arch` may be built with (read from its dispatch, like
    supported_architectures: each `config.architectures[0] == "..."` branch and the class its `onnx_model = ...`
    makes; Phi-3 has two, by context length)."""
    import inspect

    from onnxruntime_genai.models import builder

    found: List[type] = []
    pending = False
    for line in inspect.getsource(builder.create_model).splitlines():
        names = _DISPATCH.findall(line)
        if names:
            pending = arch in names
            continue
        made = re.match(r"\s*onnx_model\s*=\s*(\w+)\(", line)
        if made and pending:
            cls = getattr(builder, made.group(1), None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
            pending = False
    return found


def rope_scaling_type(config: Dict[str, Any]) -> Optional[str]:
    """The RoPE scaling type of a config.json (its text_config where it has one): rope_parameters (transformers 5;
    per layer type too) or rope_scaling, `rope_type` or `type`; None for plain RoPE."""
    c = text_config(config)
    for key in ("rope_parameters", "rope_scaling"):
        rs = c.get(key)
        if not isinstance(rs, dict):
            continue
        forms = [v for v in rs.values() if isinstance(v, dict)] if all(isinstance(v, dict) for v in rs.values()) \
            and rs else [rs]
        for form in forms:
            kind = form.get("rope_type") or form.get("type")
            if kind and kind != "default":
                return str(kind)
    return None


def _rope_form(config: Dict[str, Any]) -> Dict[str, Any]:
    """The flat RoPE settings of a config.json (rope_parameters or rope_scaling; {} where nested per layer type)."""
    c = text_config(config)
    for key in ("rope_parameters", "rope_scaling"):
        rs = c.get(key)
        if isinstance(rs, dict) and ("rope_type" in rs or "type" in rs):
            return rs
    return {}


def _check_rope(p: Path, config: Dict[str, Any], arch: str) -> None:
    """Dynamic NTK RoPE is built only by the Llama-family builders (LlamaModel's RoPE setup); the others refuse it
    once the float model is loaded (NotImplementedError, exit 1): refused here first, in one line. HunYuan's
    "dynamic" with a fixed NTK `alpha` (Hunyuan-0.5B-7B) is static RoPE at theta * alpha ** (d / (d - 2)), as
    transformers 5 computes it (its ntk_alpha) and the builder's HunYuan model bakes into its theta: let through."""
    if rope_scaling_type(config) != "dynamic":
        return
    if arch == "HunYuanDenseV1ForCausalLM" and _rope_form(config).get("alpha"):
        return
    from onnxruntime_genai.models import builder

    llama = getattr(getattr(builder, "LlamaModel", None), "make_rope_init", None)   # the dispatch's own module
    classes = builder_classes(arch)
    if llama is not None and classes and all(getattr(cls, "make_rope_init", None) is llama for cls in classes):
        return
    limit = text_config(config).get("max_position_embeddings")
    raise SourceModelError(
        f"architecture {arch} with RoPE scaling type 'dynamic' (dynamic NTK): ONNX Runtime GenAI's model builder "
        "builds it only for the Llama family", path=str(p),
        hint=f"transformers computes dynamic NTK as plain RoPE up to max_position_embeddings ({limit}): remove "
             "rope_scaling / rope_parameters' scaling from a copy of the folder's config.json to build it for "
             "that context")


# The model types (of the architectures supported_architectures() takes) whose transformers configuration ties the
# embeddings by default (tie_word_embeddings=True: Gemma 1-4, Ernie 4.5, LFM2, SmolLM3; 4.x's PretrainedConfig
# default too, where Llama / Qwen2 / Mistral / Phi-3 ... say False). A hub config.json saved by transformers 4.x
# omits a key equal to its default (gemma-3-1b's has no tie_word_embeddings). Read only where transformers cannot
# read the folder's config (config_tie); transformers' own reading comes first (effective_tie).
TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "gemma4_unified",
                             "gemma4_unified_text", "ernie4_5", "lfm2", "lfm2_moe", "smollm3"})


def config_tie(config: Dict[str, Any]) -> bool:
    """tie_word_embeddings from a config.json's dict alone: the key where it is written (the model's own
    settings, then its text_config's), else its model type's default (TIED_BY_DEFAULT)."""
    for c in (config, text_config(config)):
        if c.get("tie_word_embeddings") is not None:
            return bool(c["tie_word_embeddings"])
    return bool({config.get("model_type"), text_config(config).get("model_type")} & TIED_BY_DEFAULT)


# What transformers 5's AutoConfig.from_pretrained raises for a config it cannot read: ValueError (a model_type it
# does not know, none at all, one that needs remote code), OSError (config.json unreadable or not JSON); with
# huggingface_hub's StrictDataclassError (a value its configuration class rejects: a string for
# num_attention_heads), imported where transformers is
CONFIG_UNREAD: Tuple[type, ...] = (ValueError, OSError)
# What a configuration class raises on a value it cannot use ("dtype": "bfloat", num_attention_heads 0, a
# rope_scaling missing its factors, a quantization_config string): not a fallback but the config's error, one line
# (the float model's load would fail on it too: llm_fidelity.load_error)
CONFIG_BAD_VALUE: Tuple[type, ...] = (AttributeError, TypeError, KeyError, ArithmeticError, RuntimeError)


def auto_config(path: os.PathLike, strict: bool = False):
    """transformers' configuration object of the folder (what transformers and the model builder build from: a key
    config.json omits at its class's default), None where transformers cannot read it (CONFIG_UNREAD, or is not
    installed). A value the configuration class trips over (CONFIG_BAD_VALUE) is a SourceModelError naming it; with
    `strict`, so is a value its strict dataclass rejects (huggingface_hub's StrictDataclassError: "4" for
    num_hidden_layers), else that reads as unreadable. Anything else it raises is not caught. Remote code is never
    run (nor asked about on a terminal)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging
    except ImportError:   # no transformers: what the dict says
        return None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # its notes on unusual token ids are not this check's business
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except StrictDataclassError as e:
        if not strict:
            return None
        # "Validation error for field 'num_hidden_layers':\n    TypeError: Field 'num_hidden_layers' expected int,
        # got str (value: '4')": its lines in one
        why = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()).replace(":;", ":")
        raise SourceModelError(f"config.json: a value its configuration class rejects: {why[:300]}", path=str(path),
                               hint="fix the value in config.json (a number written as a number, not a string); "
                                    "--debug shows the traceback") from None
    except CONFIG_UNREAD:
        return None
    except CONFIG_BAD_VALUE as e:   # a value its configuration class trips over: the config is wrong, said in a line
        from edgekit.convert.llm_fidelity import load_error

        raise load_error(Path(path), "config.json", e,
                         hint="a value in config.json its configuration class cannot use (a zero or a string where "
                              "a number belongs, a rope_scaling without its factors): fix config.json; --debug "
                              "shows the traceback") from None
    finally:
        hf_logging.set_verbosity(level)


def _tie_of(cfg, config: Dict[str, Any]) -> bool:
    """effective_tie's answer from auto_config's object (None: the dict's, config_tie)."""
    value = getattr(cfg, "tie_word_embeddings", None) if cfg is not None else None
    if value is None and cfg is not None:
        try:
            value = getattr(cfg.get_text_config(), "tie_word_embeddings", None)
        except ValueError:   # transformers 5: more than one text config, none the text config
            value = None
    return config_tie(config) if value is None else bool(value)


def effective_tie(path: os.PathLike, config: Dict[str, Any]) -> bool:
    """Whether the model ties its lm_head to the embedding table, as transformers (and the model builder, which
    reads the same AutoConfig) takes it: the configuration class's value, its default where config.json omits
    the key; the model's own setting where it has one (transformers ties by it: Gemma3ForConditionalGeneration's
    top level), else its text config's. config_tie where transformers cannot read the config (CONFIG_UNREAD, a
    value its strict dataclass rejects); a value the configuration class trips over (CONFIG_BAD_VALUE) is a
    SourceModelError naming it (auto_config)."""
    return _tie_of(auto_config(path), config)


# the sizes LMSource.dims reads from config.json's text settings, with transformers' class defaults where it omits
# them (gemma-3-4b-it's text_config names no num_attention_heads): those without which no bundle can be described
DIM_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "max_position_embeddings")
REQUIRED_DIMS = ("num_hidden_layers", "hidden_size", "num_attention_heads")


def class_dims(cfg) -> Dict[str, Any]:
    """DIM_KEYS of auto_config's object's text config (transformers' values: config.json's, else its class's
    defaults); {} where there is none."""
    if cfg is None:
        return {}
    try:
        text = cfg.get_text_config()
    except ValueError:
        return {}
    out = {}
    for k in DIM_KEYS:
        try:
            v = getattr(text, k, None)
        except (AttributeError, ValueError, RuntimeError):   # a per-layer attribute (Gemma 4's head_dim: its
            # AmbiguousGlobalPerLayerAttributeError) has no one value
            v = None
        if isinstance(v, int) and not isinstance(v, bool):
            out[k] = v
    return out


@dataclass
class LMSource:
    path: Path
    config: Dict[str, Any]
    architecture: str
    sha256: str
    bytes: int
    tied_embeddings: Optional[bool] = None   # read_source: effective_tie; None: config_tie of the dict
    # DIM_KEYS as transformers reads them (class_dims: its class defaults where config.json omits one); read where
    # config.json's text settings have no value
    defaults: Dict[str, Any] = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return config_tie(self.config) if self.tied_embeddings is None else self.tied_embeddings

    def context(self, t: TargetProfile) -> int:
        """The context a bundle for `t` has: the model's max_position_embeddings, at most the profile's
        llm.context_max."""
        return min(int(self.dims()["max_positions"] or t.llm.context_max), t.llm.context_max)

    def dims(self) -> Dict[str, Any]:
        """The model's sizes: config.json's text settings, transformers' class defaults (`defaults`) where it has
        none. Without num_hidden_layers, hidden_size or num_attention_heads (a whole number above 0) from either, a
        SourceModelError naming the key."""
        c = text_config(self.config)

        def get(k):
            v = c.get(k)
            return self.defaults.get(k) if v is None else v

        for k in REQUIRED_DIMS:
            v = get(k)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise SourceModelError(
                    "config.json " + (f"has no {k}" if v is None else f"{k} is {v!r}, not a whole number above 0"),
                    path=str(self.path), hint=f"write the checkpoint's {k} into config.json (the one its weights "
                                              "were saved with), or fetch the checkpoint again")
        layers, hidden, heads = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads")
        return {"vocab": get("vocab_size"), "layers": layers, "hidden": hidden,
                "heads": heads, "kv_heads": int(get("num_key_value_heads") or heads),
                "head_dim": int(get("head_dim") or hidden // heads),
                "max_positions": get("max_position_embeddings")}


# what a Git LFS pointer file holds in place of the file (a clone without git-lfs, or GIT_LFS_SKIP_SMUDGE=1): about
# 130 bytes of "version https://git-lfs.github.com/spec/v1", the object's sha256 and size
LFS_POINTER = b"version https://git-lfs"


def _lfs_pointer(f: Path) -> bool:
    try:
        if f.is_file() and f.stat().st_size < 1024:
            with open(f, "rb") as fh:
                return fh.read(len(LFS_POINTER)) == LFS_POINTER
    except OSError:
        pass
    return False


def _check_lfs_pointers(p: Path, files: List[Path]) -> None:
    """A folder checked out without its Git LFS objects: weights (and often tokenizer.json) are pointer files,
    which would pass every check by name and fail deep in safetensors / the tokenizer; refused here, naming them.
    `files`: those the conversion reads (source_files): a pointer it never opens (a .gguf, tf_model.h5 or
    pytorch_model.bin beside the safetensors, tokenizer.model beside tokenizer.json: `git lfs pull --include
    "*.safetensors"`) is no reason to refuse."""
    pointers = [f.relative_to(p).as_posix() for f in files if _lfs_pointer(f)]
    if pointers:
        more = f" and {len(pointers) - 1} other file(s)" if len(pointers) > 1 else ""
        raise SourceModelError(f"{pointers[0]}{more}: a Git LFS pointer, not the file itself", path=str(p),
                               hint="run `git lfs pull` in the folder with git-lfs installed, or download the files "
                                    "themselves")


# formats a conversion reads only where the source's selection names the file (source_files): weights transformers
# does not pick (consolidated.safetensors beside the shards, pytorch_model.bin beside model.safetensors, *.gguf,
# tf_model.h5, flax_model.msgpack, ONNX exports), SentencePiece models beside tokenizer.json, archives, arrays
UNREAD_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".hdf5", ".keras",
                   ".msgpack", ".onnx", ".onnx_data", ".tflite", ".pb", ".ot", ".npy", ".npz", ".pkl", ".pickle",
                   ".joblib", ".mlmodel", ".model", ".tiktoken", ".nemo", ".llamafile", ".zip", ".tar", ".gz",
                   ".tgz", ".xz", ".bz2", ".zst", ".7z", ".rar", ".arrow", ".parquet", ".wasm", ".ftz")
# transformers' from_pretrained looks for these in this order (modeling_utils: SAFE_WEIGHTS_NAME, ...INDEX_NAME,
# WEIGHTS_NAME, ...INDEX_NAME) and reads the first it finds
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weight_files(p: Path, config: Dict[str, Any]) -> List[Path]:
    """The weight files transformers' from_pretrained reads (and the model builder, which loads the model through
    it): config.json's `transformers_weights` where it names one, else the first of WEIGHT_NAMES in the folder; an
    index with the shards its weight_map names (present or not). [] where there is none."""
    explicit = config.get("transformers_weights")
    for name in [explicit] if isinstance(explicit, str) else WEIGHT_NAMES:
        f = p / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        if _lfs_pointer(f):
            _check_lfs_pointers(p, [f])
        try:
            shards = json.loads(f.read_text(encoding="utf-8"))["weight_map"].values()
            return [f] + [p / s for s in sorted(set(shards))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SourceModelError(f"{name} is not a weight index transformers reads ({type(e).__name__}: "
                                   f"{(str(e).splitlines() or [''])[0][:200]})", path=str(p),
                                   hint="download it again with the checkpoint's shards") from None
    return []


def tokenizer_source(p: Path) -> Optional[str]:
    """What transformers makes the tokenizer of: tokenizer.json; else a BPE vocab.json + merges.txt (Qwen2, GPT-2:
    transformers 5 builds the same tokenizer from them); else a SentencePiece tokenizer.model (read with the
    sentencepiece package). None: no tokenizer."""
    if (p / "tokenizer.json").is_file():
        return "tokenizer.json"
    if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return "vocab.json + merges.txt"
    if (p / "tokenizer.model").is_file():
        return "tokenizer.model"
    return None


def _check_tokenizer_source(p: Path) -> None:
    """Refuse a folder whose tokenizer cannot be read or that ONNX Runtime GenAI would tokenize otherwise. A folder
    without tokenizer.json gets the one the model builder writes into the bundle (transformers' AutoTokenizer of
    the folder, save_pretrained), made here and checked as a folder's own (convert.llm_tokenizer)."""
    import importlib.util

    kind = tokenizer_source(p)
    if kind is None:
        raise SourceModelError("no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)",
                               path=str(p), hint="copy the tokenizer files of the checkpoint into the folder")
    if kind == "tokenizer.json":
        # a Metaspace form ONNX Runtime GenAI tokenizes otherwise than the file is refused (convert.llm_tokenizer)
        check_tokenizer(p)
        return
    if kind == "tokenizer.model" and importlib.util.find_spec("sentencepiece") is None:
        raise SourceModelError("the only tokenizer is tokenizer.model (SentencePiece), and the sentencepiece package "
                               "transformers reads it with is not installed", path=str(p),
                               hint="add the checkpoint's tokenizer.json to the folder, or pip install sentencepiece")
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    with tempfile.TemporaryDirectory(prefix="edgekit-tok-") as work:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                AutoTokenizer.from_pretrained(str(p)).save_pretrained(work)
        except ImportError as e:   # a package the tokenizer's class needs (sentencepiece, protobuf, tiktoken)
            raise SourceModelError(f"transformers needs the {e.name or 'a missing'} package to read {kind}",
                                   path=str(p), hint=f"pip install {e.name}, or add the checkpoint's tokenizer.json"
                                   if e.name else "add the checkpoint's tokenizer.json") from None
        except MemoryError:
            raise
        except Exception as e:   # transformers raises anything from a tokenizer it cannot build: named, one line
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise SourceModelError(f"transformers cannot make a tokenizer of {kind}: {type(e).__name__}"
                                   + (f": {first[:300]}" if first else ""), path=str(p),
                                   hint="add the checkpoint's tokenizer.json to the folder") from None
        finally:
            hf_logging.set_verbosity(level)
        if not (Path(work) / "tokenizer.json").is_file():
            raise SourceModelError(f"transformers writes no tokenizer.json from {kind}, and ONNX Runtime GenAI reads "
                                   "only that", path=str(p), hint="add the checkpoint's tokenizer.json to the folder")
        try:
            check_tokenizer(Path(work))
        except SourceModelError as e:
            msg = e.message[len(f"{e.path}: "):] if e.path and e.message.startswith(f"{e.path}: ") else e.message
            raise SourceModelError(f"{msg} (the tokenizer.json transformers writes from {kind}, as the model builder "
                                   "does for the bundle)", path=str(p), hint=e.hint) from None


def chat_templates(p: Path) -> List[Tuple[str, str]]:
    """The folder's chat templates as (where, text): chat_template.jinja, else tokenizer_config.json's chat_template
    (a string, or transformers' list of {"name", "template"}); those a bundle's tokenizer carries and the runtime
    renders (runtime.llmtemplate.source_template reads the first)."""
    jinja = p / "chat_template.jinja"
    try:
        if jinja.is_file():
            return [("chat_template.jinja", jinja.read_text(encoding="utf-8"))]
        tc = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):   # unreadable, not UTF-8, not JSON: the tokenizer's checks say so
        return []
    t = tc.get("chat_template") if isinstance(tc, dict) else None
    if isinstance(t, str):
        return [("tokenizer_config.json's chat_template", t)]
    if isinstance(t, list):
        return [(f"tokenizer_config.json's chat_template {d.get('name')!r}", d["template"]) for d in t
                if isinstance(d, dict) and isinstance(d.get("template"), str)]
    return []


def _check_chat_template(p: Path) -> None:
    """Refuse a chat template that does not compile as Jinja (a `}` short of `}}`, an unknown filter...):
    transformers renders none of the conversations with it, and the bundle's every chat would fail on the device
    with a message blaming the messages. Compiled as transformers compiles it; a template that compiles but refuses
    a conversation (raise_exception on a system message) is not this check's business (_template_check)."""
    found = chat_templates(p)
    if not found:
        return
    from jinja2 import TemplateSyntaxError

    try:   # transformers' own compilation: its {% generation %} tag, filters and globals
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                         extensions=["jinja2.ext.loopcontrols"]).parse
    for where, text in found:
        try:
            compile_template(text)
        except ImportError:   # a jinja2 transformers refuses to render with: its own error, where it renders
            return
        except TemplateSyntaxError as e:   # a syntax error; an unknown filter or test (TemplateAssertionError)
            raise SourceModelError(f"{where} does not parse as a Jinja template: {e.message} (line {e.lineno})",
                                   path=str(p), hint="fix the template (the checkpoint's original, or fetch the "
                                                     "file again): transformers and the device render every chat "
                                                     "with it") from None


def read_source(path: str) -> LMSource:
    """Check a Hugging Face causal-LM folder before any work: config, architecture, weights. A hub cache
    repository folder (models--ORG--NAME) is read at its refs/main snapshot (hf_config.hub_snapshot)."""
    p = Path(hf_config.hub_snapshot(path))
    if p.suffix.lower() == ".gguf":
        raise SourceModelError("a GGUF file, llama.cpp's format, not a Hugging Face folder", path=str(p),
                               hint="convert the Hugging Face folder it came from")
    if not p.is_dir():
        raise SourceModelError("not a directory (a Hugging Face model folder holds config.json, weights and "
                               "tokenizer files)", path=str(p))
    from edgekit.convert.sources import check_adapter

    check_adapter(p)   # a PEFT adapter: merged into its base first
    if not is_hf_causal_lm(p):
        raise SourceModelError("no Hugging Face config.json naming an architecture", path=str(p),
                               hint="give the folder a hub download or save_pretrained() wrote")
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    try:
        supported = supported_architectures()
    except ImportError:
        raise SourceModelError("converting a language model needs ONNX Runtime GenAI's model builder, torch and "
                               "transformers", path=str(p), hint="pip install 'edgekit[llm-convert]'") from None
    refusal = builder_refusal(config, arch)
    if refusal is not None:
        raise SourceModelError(f"architecture {arch}: {refusal[0]}", path=str(p),
                               hint=f"{refusal[1]}; supported: " + ", ".join(supported))
    if arch not in supported:
        if arch in builder_architectures():
            import transformers

            raise SourceModelError(
                f"architecture {arch}: ONNX Runtime GenAI's model builder exports it, but transformers "
                f"{transformers.__version__}'s AutoModelForCausalLM does not load it (edgekit measures every build "
                "against that float model and runs no remote code)", path=str(p),
                hint="supported: " + ", ".join(supported))
        raise SourceModelError(f"architecture {arch} is not one ONNX Runtime GenAI's model builder exports",
                               path=str(p), hint="supported: " + ", ".join(supported))
    _check_rope(p, config, arch)
    weights = weight_files(p, config)
    if not weights:
        other = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES + (".gguf",))
        raise SourceModelError("no weights transformers reads beside config.json (model.safetensors, "
                               "model.safetensors.index.json and its shards, or pytorch_model.bin"
                               + (f"; not {', '.join(other[:3])}" if other else "") + ")", path=str(p))
    missing = [f.relative_to(p).as_posix() for f in weights if not f.is_file()]
    if missing:
        more = f" and {len(missing) - 1} other shard(s)" if len(missing) > 1 else ""
        raise SourceModelError(f"{missing[0]}{more}, named by {weights[0].name}, not in the folder", path=str(p),
                               hint="download the checkpoint's remaining shards")
    files = source_files(p, config)
    _check_lfs_pointers(p, files)
    cfg = auto_config(p, strict=True)   # a value its class rejects: config.json's fault, said before the tokenizer's
    _check_tokenizer_source(p)
    _check_chat_template(p)
    # its sizes (dims) are checked where first read: the k_quant block check, the session's context, both before
    # any build (a stand-in folder transformers cannot read is still a source here)
    return LMSource(p, config, arch, sha256_files(p, files), sum(f.stat().st_size for f in files),
                    _tie_of(cfg, config), class_dims(cfg))


def source_files(p: Path, config: Optional[Dict[str, Any]] = None) -> List[Path]:
    """The files a conversion reads: the folder's own, hidden ones left out, and of those in a format of
    UNREAD_SUFFIXES only the ones read: the weights transformers picks (weight_files; every *.safetensors of a
    checkpoint with a quantization_config, which the model builder's loaders read all of), `edgekit factorize`'s
    factors, tokenizer.model where it is the tokenizer (tokenizer_source). Mistral's consolidated.safetensors
    (14.5 GB beside its shards), pytorch_model.bin beside model.safetensors, a .gguf or tf_model.h5 neither count
    in the source's digest and bytes nor are refused as Git LFS pointers. Not its subfolders: a hub download's
    `original/` (Llama 3.2's consolidated .pth, 2.5 GB beside 2.5 GB of safetensors) and `--local-dir`'s
    `.cache/huggingface/` metadata are no part of the model the builder and transformers read, and would double
    the source's size and hashing time or make the same model hash differently."""
    if config is None:
        try:
            config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    read = set(weight_files(p, config))
    if config.get("quantization_config") or text_config(config).get("quantization_config"):
        read.update(p.glob("*.safetensors"))
    if tokenizer_source(p) == "tokenizer.model":
        read.add(p / "tokenizer.model")
    try:   # a factorized folder's low-rank factors (convert.llm_lowrank)
        low = json.loads((p / "edgekit_factorize.json").read_text(encoding="utf-8")).get("lowrank")
        read.add(p / str(low.get("file", "edgekit_lowrank.safetensors")))
    except (OSError, ValueError, AttributeError):
        pass
    own = {f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
           and (f.suffix.lower() not in UNREAD_SUFFIXES or f in read)}
    return sorted(own | {f for f in read if f.is_file()})


# --- builds -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LLMBuildOptions:
    """One build of the model builder: what the recipe records and the ladder varies."""

    precision: str
    execution_provider: str = "cpu"
    block_size: int = 32
    accuracy_level: int = 4
    algo: str = "k_quant"
    lm_head_int8: bool = True           # INT4 builds: the lm_head at INT8
    embeddings_wide: bool = True        # the embedding table never 4-bit
    llama_mixed: bool = False           # INT4 builds: llama.cpp's sensitive MatMuls at INT8 (builder preset)
    int8_layers: Tuple[int, ...] = ()   # INT4 builds: decoder layers whose MatMuls are INT8 (measured)
    int8_matmuls: Tuple[str, ...] = ()  # INT4 builds: decoder MatMul nodes at INT8 (measured, llm_sensitivity)
    fp32_matmuls: Tuple[str, ...] = ()  # decoder MatMul nodes left unquantized (fp32 MatMul; measured, llm_actquant)
    head_block: int = 0                 # calibrated algos (llm_gptq): the INT8 lm_head's block size (0: the builder's)
    int8_symmetric: bool = True         # the 8-bit MatMulNBits rewritten symmetric, no zero points (int8_blocks)
    half_scales: bool = True            # the MatMulNBits scales stored fp16 in the file (fp16_scales); the
                                        # converter's default: only under a byte budget (profile_options)

    def __post_init__(self) -> None:
        # calibrated rounding (llm_gptq.apply) runs for INT4 builds only: any other build is the builder's
        # (builder_algo: k_quant), and its options (the manifest's recipe, the ladder's rungs) say so
        if self.precision != "int4" and calibrated(self.algo):
            object.__setattr__(self, "algo", builder_algo(self.algo))

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    def int8_blocks(self) -> Tuple[int, ...]:
        """Blocks of the symmetric 8-bit MatMulNBits (llm_gptq.symmetric_int8: the first dividing K, else the
        node's own), () when the builder's asymmetric ones stay. An INT4 build's few 8-bit nodes (lm_head,
        measured MatMuls) at 64: SmolLM2-135M's ladder build 120.5 -> 115.3 MB, decode 81 -> 86 tok/s at 1
        thread, KL +1% on the benchmark text (+6% on other prose); the decoder nodes at 128 where K allows saved
        0.2 MB more at the same speed; the lm_head has its own blocks (int8_head_blocks). An INT8 build keeps its
        block (only the zero points go: 170.6 -> 166.5 MB, same KL and speed): at accuracy level 4 the block is also the
        int8 activations', and at 64 / 128 INT8's KL doubled (0.0032 -> 0.0066). CPU builds only: the figures
        above are MLAS's (llm_gptq.symmetric_int8 would write a CUDA build's fp16 scales; no GPU measured it)."""
        if not (self.int8_symmetric and self.quantized and self.execution_provider == "cpu"):
            return ()
        return (64,) if self.precision == "int4" else (self.block_size,)

    def int8_head_blocks(self) -> Tuple[int, ...]:
        """Blocks of an INT4 build's 8-bit lm_head (the first dividing K, else int8_blocks'): 128, then 64. The
        lm_head is the largest matrix a token reads (Gemma 3 270M's 262,144 x 640 is 62% of its weights), and MLAS's
        8-bit M = 1 kernel alone runs it faster at 128 (1 thread, EPYC: 262,144 x 640 13.3 -> 7.6 ms, Qwen2.5-0.5B's
        151,936 x 896 8.6 -> 7.8 ms); in whole models a few percent (6 rounds alternating, medians: Qwen2.5-0.5B's
        shapes decoded 36.3 -> 38.4 tok/s, Gemma 3 270M 41.6 -> 42.6, the ranges overlapping), with fewer scales.
        Its own cost, measured alone on 750 held-out tokens against the float lm_head: Gemma 3 270M's
        KL 0.0009 -> 0.0016, perplexity +0.04% -> +0.13% (an INT4 build's KL is ~0.07). Where 128 does not divide K
        (SmolLM2's 576) it stays 64: padded to 128 it was 10% faster alone but 9% larger, KL 0.0021 -> 0.0035. The
        last position's logits are then not bit-identical between one row and a batch (MLAS sums a 128-block's
        halves in another order at M = 1; a few 1e-6), which the 4-bit nodes above block 32 already are not. INT8
        builds keep their block for the lm_head too (it holds their KL near 0.003)."""
        if self.precision != "int4" or not self.int8_blocks():
            return ()
        return (128,) + self.int8_blocks()

    def fp16_scales(self) -> bool:
        """Whether the build's MatMulNBits / GatherBlockQuantized scales are stored fp16 behind a Cast that ONNX
        Runtime folds at load (llm_graph.half_scales): the kernels compute with the same fp32 values, the file is
        smaller (SmolLM2-135M's INT4 ladder build 115.3 -> 108.6 MB, INT8 166.5 -> 158.3 MB; decode the same).
        The 8-bit nodes edgekit rounds (int8_blocks) are rounded on the fp16 grid itself; the builder's 4-bit
        k-quant scales are rounded to fp16 after (at most 2^-11 of a scale: the weights' mean squared error
        unchanged to 7 digits on SmolLM2). CPU builds only: a CUDA build's scales are fp16 already.
        The cost is memory on the device: ONNX Runtime keeps the Cast's folded fp32 copy of every scale in the heap
        beside MLAS's packed one, where scales stored fp32 stay pages of the mapped file, which the runtime hands
        back after the load (runtime.llmopts.release_model_pages). Measured here (Xeon VM, 1 thread, prompt 128 +
        64): the generation's peak RSS 1043 -> 915 MiB for TinyLlama-1.1B's shapes (file 769 -> 836 MB), 231 ->
        217 MiB for SmolLM2-135M. So the converter stores them fp32 unless a byte budget (--max-mb) asks for the
        smallest file (profile_options)."""
        return self.half_scales and self.quantized and self.execution_provider == "cpu"

    def builder_block(self, src: Optional["LMSource"] = None) -> int:
        """The block the model builder writes this build's MatMulNBits at: where edgekit rounds the INT4 decoder
        MatMuls itself (a calibrated algo; with src, also k_quant at a block ORT's quantizer cannot pack for it:
        edgekit_packs) at most 32, and with src the first of that and 16 the quantizer can pack (it packs 4-bit
        zero points two a byte across rows: 64 / 128 fail on SmolLM2's 576 = 9 x 64), the decoder MatMuls then
        rewritten at block_size by llm_gptq.apply."""
        if not (calibrated(self.algo) and self.precision == "int4" or src is not None and self.edgekit_packs(src)):
            return self.block_size
        b = min(self.block_size, 32)
        if src is not None and b > 16 and kquant_odd_blocks(src, b) and not kquant_odd_blocks(src, 16):
            b = 16
        return b

    def edgekit_packs(self, src: "LMSource") -> bool:
        """Whether llm_gptq.apply rounds and packs this build's INT4 decoder MatMuls rather than the builder: a
        calibrated algo, or k_quant at a block ONNX Runtime's quantizer cannot pack for src (kquant_odd_blocks;
        the same k-quant rounding, packed per row)."""
        return self.precision == "int4" and (calibrated(self.algo) or kquant_cannot_build(src, self) is not None)

    def int8_bytes(self, K: int, N: int, src: Optional["LMSource"] = None) -> int:
        """Bytes of the 8-bit MatMulNBits this build writes for a K x N decoder MatMul (an INT4 build's
        int8_matmuls): with int8_blocks, symmetric at llm_gptq.symmetric_block (the node's fallback is the
        builder's block: llm_gptq rewrites the builder's 8-bit node, in a calibrated build too); without, the
        builder's asymmetric node at its block, or in a calibrated build llm_gptq.apply's at block_size, a zero
        point per block (also in a k_quant build edgekit packs: edgekit_packs, known with src). Scales 2 bytes where
        the file holds them fp16 (fp16_scales; a CUDA build's activations and so its scales are fp16: the builder's io
        dtype), else 4."""
        from edgekit.convert.llm_gptq import nbits_bytes, symmetric_block

        scale = 2 if self.fp16_scales() or self.execution_provider == "cuda" else 4
        if self.int8_blocks():
            return nbits_bytes(K, N, 8, symmetric_block(K, self.int8_blocks(), self.builder_block(src)), scale,
                               False)
        own = self.edgekit_packs(src) if src is not None else calibrated(self.algo) and self.precision == "int4"
        block = self.block_size if own else self.builder_block(src)
        return nbits_bytes(K, N, 8, block, scale, True)

    def describe(self) -> str:
        if not self.quantized:
            return f"{self.precision} ({self.execution_provider})"
        s = f"{self.precision} block {self.block_size}, accuracy_level {self.accuracy_level}, {self.algo}"
        if self.precision == "int4":
            s += ", lm_head " + ("int8" if self.lm_head_int8 else "int4")
            if self.llama_mixed:
                s += ", llama.cpp's mixed layers int8"
            if self.int8_layers:
                s += f", layers {','.join(map(str, self.int8_layers))} int8"
            if self.int8_matmuls:
                s += f", {len(self.int8_matmuls)} measured MatMuls int8"
        if self.fp32_matmuls:
            s += f", {len(self.fp32_matmuls)} measured MatMuls fp32"
        if self.head_block and calibrated(self.algo) and self.precision == "int4":
            s += f", lm_head block {self.head_block}"
        if self.int8_blocks():
            s += ", int8 symmetric" + (f" block {'/'.join(map(str, self.int8_blocks()))} (lm_head "
                                       f"{self.int8_head_blocks()[0]} where its K allows)"
                                       if self.precision == "int4" else "")
        if self.fp16_scales():
            s += ", fp16 scales"
        return s

    def wide_layers(self, tied: bool) -> List[str]:
        out = []
        if self.precision == "int4" and self.lm_head_int8:
            out.append("lm_head (int8)")
        if self.quantized and self.embeddings_wide:
            shared = tied and (self.precision == "int8" or self.lm_head_int8)
            own = "8-bit" if self.execution_provider == "cpu" else "float"   # llm_gptq.quantize_embedding
            out.append("embeddings (" + ("shared with the lm_head" if shared else own) + ")")
        if self.precision == "int4" and self.llama_mixed:
            out.append("llama.cpp mixed layers: first/last eighth, every third qkv/v/down (int8)")
        out += [f"layer {i} (int8)" for i in self.int8_layers]
        if self.int8_matmuls:
            from edgekit.convert.llm_sensitivity import short_name

            out += [f"{short_name(n)} (int8)" for n in self.int8_matmuls]
        if self.fp32_matmuls:
            from edgekit.convert.llm_sensitivity import short_name

            out += [f"{short_name(n)} (fp32)" for n in self.fp32_matmuls]
        return out

    def builder_args(self, src: LMSource, matmuls: Dict[int, List[str]]) -> Tuple[List[str], Optional[dict]]:
        """The builder's extra_options (KEY=VALUE) and target_options (its structured quant_config: which op
        types are quantized, per-node overrides)."""
        extra = ["hf_remote=false", "hf_token=false"]
        if not self.quantized:
            return extra, None
        # a calibrated algo (llm_gptq): the builder writes k_quant at block <= 32, then its decoder MatMuls are
        # rewritten
        extra += [f"block_size={self.builder_block(src)}", f"accuracy_level={self.accuracy_level}",
                  f"algo_config={builder_algo(self.algo)}"]
        wide_head = self.precision == "int8" or self.lm_head_int8
        if src.tied:
            # the tied table is shared with the lm_head (GatherBlockQuantized): at the lm_head's bits when that is
            # wide; an INT4 lm_head with wide embeddings gets its own float table instead
            share = wide_head or not self.embeddings_wide
            extra.append(f"shared_embeddings={'true' if share else 'false'}")
            op_types = ["MatMul", "Gather"] if share else ["MatMul"]
        else:
            op_types = ["MatMul"] if self.embeddings_wide else ["MatMul", "Gather"]
        # nodes kept fp32 first: the builder keeps the first override that names a node
        overrides = [{"match": {"name": n}, "exclude": True} for n in self.fp32_matmuls]
        if self.precision == "int4":
            if self.lm_head_int8:
                overrides.append({"match": {"preset": "last_matmul"}, "type": "int8"})
            if self.llama_mixed:
                overrides.append({"match": {"preset": "mixed_layers"}, "type": "int8"})
            for i in self.int8_layers:
                overrides += [{"match": {"name": n}, "type": "int8"} for n in matmuls.get(i, [])]
            overrides += [{"match": {"name": n}, "type": "int8"} for n in self.int8_matmuls]
        return extra, {"quant_config": {"weights": {"op_types": op_types, "overrides": overrides}}}


def _quiet_builder():
    """The builder prints its progress on stdout and logs every node: kept out of the user's terminal."""
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer",
                 "neural_compressor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the tied-embedding graph names the lm_head's initializers before they exist; the saved model is complete
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


# the builder's peak beside the converter's own memory, in float32 copies of the checkpoint: it reads the
# checkpoint again in float32 and holds its graph's float initializers and the quantizer's arrays. Measured (Xeon
# VM, peak RSS): DeepSeek-R1-Distill-Qwen-1.5B's shapes (1.46 G parameters, 5.45 GiB in float32) 17.36 GiB with
# the float model held, 11.87 GiB with it dropped (in a 14 GiB cgroup; the same bundle to the byte): the builder
# ~11.2 GiB over a ~0.7 GiB converter, 2.05 copies; TinyLlama-1.1B's shapes (1.17 G, 4.36 GiB) 14.5 GiB held: 2.2
# copies (2.5 before the k-quant ran in slices). With margin, 2.5
BUILDER_FP32_COPIES = 2.5
# The most measured above (2.2 copies): with less than that available even after the float model is dropped, the
# run is refused in one line (_Session._make_room) rather than killed by the OOM killer inside the builder; between
# it and BUILDER_FP32_COPIES the build is tried (the 1.5B build above fit a 14 GiB cgroup with 2.05)
BUILDER_FP32_MEASURED = 2.2
# An untied embedding table's 8-bit block (llm_gptq.quantize_embedding): the first dividing the hidden size (a
# Gather reads one row a token: its block costs no speed; a tied table is the lm_head's, at int8_head_blocks). CPU
# builds: GatherBlockQuantized on CUDA is not measured here.
EMBED_BLOCKS = (64, 32, 16)
@contextlib.contextmanager
def _quantizer_hooks(progress: Optional[Progress], label: str, log: io.StringIO):
    """While the builder quantizes: its per-MatMul progress (ORT's simple_progress_bar, printed on stdout and
    captured) drawn as edgekit's with rate and time left, its k-quant sliced over the free cores
    (kquant_rows), and neural_compressor's log lines (its handler writes to the terminal's stderr, past the
    redirect) into the build's log. Where ORT's quantizer module lacks either function, it is left as it is;
    everything is put back on the way out, an error's included."""
    try:
        from onnxruntime.quantization.neural_compressor import weight_only as wo
    except ImportError:
        wo = None
    if wo is None:
        yield
        return
    from edgekit.convert.llm_fidelity import free_cores

    saved = {k: getattr(wo, k) for k in ("simple_progress_bar", "quant_tensor_k_quant_cuda",
                                         "quant_tensor_k_quant_cpu") if hasattr(wo, k)}
    nc = logging.getLogger("neural_compressor")
    handlers, propagate = nc.handlers[:], nc.propagate
    shown = [0, 0]   # MatMuls done, of how many

    def draw(done, total):
        try:
            tick(done, total)
        except (OSError, ValueError):   # a closed terminal: the build goes on without its progress line
            pass

    def bar(total, i):
        # ORT calls it before quantizing MatMul i: i - 1 are done
        if tick is not None and total:
            shown[:] = [i - 1, total]
            draw(i - 1, total)

    def kquant(data, num_bits=4, group_size=32):
        return kquant_rows(saved["quant_tensor_k_quant_cpu"], data, num_bits, group_size, threads)

    try:
        nc.handlers, nc.propagate = [logging.StreamHandler(log)], False
        tick = progress.timed(label, " MatMuls") if progress is not None else None
        threads = min(os.cpu_count() or 1, free_cores() + 1)   # the load average counts the converter's thread
        if "simple_progress_bar" in saved:
            wo.simple_progress_bar = bar
        if "quant_tensor_k_quant_cuda" in saved and "quant_tensor_k_quant_cpu" in saved:
            try:
                import cupy  # noqa: F401  (ORT's k-quant runs on the GPU with it: left alone)
            except ImportError:
                wo.quant_tensor_k_quant_cuda = kquant
        yield
        if tick is not None and shown[1] and shown[0] < shown[1]:
            draw(shown[1], shown[1])
    finally:
        for k, v in saved.items():
            setattr(wo, k, v)
        nc.handlers, nc.propagate = handlers, propagate


def run_builder(src: LMSource, opts: LLMBuildOptions, out_dir: Path, cache: Path,
                matmuls: Dict[int, List[str]], float_model: Optional[FloatModel] = None,
                progress: Optional[Progress] = None) -> str:
    """Build into out_dir; returns the builder's captured output (for the log). float_model: the converter's
    FloatModel (the 8-bit rewrite reads its weights, loading them again if they were released for the builder),
    else the source is loaded when needed."""
    from onnxruntime_genai.models import builder

    _quiet_builder()
    extra, target_options = opts.builder_args(src, matmuls)
    precision = opts.precision
    if precision == "int8" and src.tied and matmuls:
        # the builder shares a tied embedding with the lm_head only in an INT4 build (GatherBlockQuantized): INT8
        # throughout is built as INT4 with every MatMul overridden to INT8, so the embedding shares the INT8 table
        # instead of staying a float32 copy (SmolLM2-135M: 275 -> ~160 MB)
        precision = "int4"
        names = [n for layer in sorted(matmuls) for n in matmuls[layer]]
        keep = [o for o in target_options["quant_config"]["weights"]["overrides"] if o.get("exclude")]
        target_options["quant_config"]["weights"]["overrides"] = keep + (
            [{"match": {"preset": "last_matmul"}, "type": "int8"}] + [{"match": {"name": n}, "type": "int8"}
                                                                      for n in names])
    from edgekit.convert.llm_compat import builder_config_fixes

    buf, fixes = io.StringIO(), []
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), builder_config_fixes(fixes), \
            _quantizer_hooks(progress, f"quantizing ({opts.precision})", buf):
        kv = builder.parse_extra_options(None, str(src.path), str(out_dir), precision, opts.execution_provider,
                                         str(cache), extra, target_options=target_options)
        builder.create_model(None, str(src.path), str(out_dir), precision, opts.execution_provider,
                             str(cache), **kv)
    if fixes:
        buf.write("\n" + "\n".join(fixes) + "\n")
    # the builder's graph (onnx_ir: nodes and values refer to each other) and its float weights go only with a
    # collection: before anything reads the float model again
    import gc

    gc.collect()
    from edgekit.convert import llm_gptq, llm_lowrank   # llm_lowrank: a factorized folder's pairs as two MatMuls

    with contextlib.redirect_stdout(buf):   # ORT's k_quant prints a progress bar
        low = llm_lowrank.apply(src.path, out_dir, builder_algo(opts.algo))
    if low is not None:
        buf.write(f"\nlow-rank: {low['factorized']} layer(s) as two MatMuls, {low['left_alone']} left: "
                  f"{low['left']}\n")
    if opts.edgekit_packs(src):   # AWQ / GPTQ rounding of the decoder MatMuls, or k_quant packed here
        algo = opts.algo if calibrated(opts.algo) else llm_gptq.OWN_KQUANT
        cal = llm_gptq.apply(src.path, out_dir, algo, opts.block_size,
                             head_block=opts.head_block if calibrated(opts.algo) else 0,
                             int8_blocks=opts.int8_blocks(), half=opts.fp16_scales(),
                             head_blocks=opts.int8_head_blocks())
        buf.write(f"\n{'calibrated ' if calibrated(algo) else ''}rounding ({algo}, block {opts.block_size}, "
                  f"the builder's at {opts.builder_block(src)}): {cal['nodes']} MatMuls rewritten in "
                  f"{cal['seconds']} s, {cal['calibration']}\n")
        sym = cal.get("int8")
    elif opts.int8_blocks():   # the 8-bit MatMulNBits symmetric, no zero points
        sym = llm_gptq.rewrite_int8(src.path, out_dir, opts.int8_blocks(),
                                    model_fn=(lambda: float_model.model) if float_model is not None else None,
                                    half=opts.fp16_scales(), head_blocks=opts.int8_head_blocks())
    else:
        sym = None
    if sym:
        buf.write(f"\n8-bit MatMulNBits symmetric: {sym['nodes']} at blocks {sym['blocks']}"
                  + (f", {len(sym['kept'])} left asymmetric: {sym['kept']}" if sym["kept"] else "") + "\n")
    if opts.quantized and opts.execution_provider == "cpu":   # an untied float embedding table -> 8-bit
        emb = llm_gptq.quantize_embedding(out_dir, EMBED_BLOCKS, half=opts.fp16_scales())
        if emb.get("node"):
            buf.write(f"\nembedding table 8-bit ({emb['node']}, block {emb['block']}): {emb['bytes_before']} -> "
                      f"{emb['bytes_after']} B\n")
        elif emb.get("skipped"):
            buf.write(f"\nembedding table left float: {emb['skipped']}\n")
    if opts.fp16_scales():   # the scales fp16 in the file, read through a Cast (llm_graph.half_scales)
        h = half_scales(out_dir)
        buf.write(f"\nscales fp16 in the file: {h['initializers']} initializers, {h['saved_bytes']} B less"
                  + (f"; kept fp32: {h['kept']}" if h["kept"] else "") + "\n")
    for a in alias_tied_embedding(out_dir)["aliased"]:   # the tied embedding reads the lm_head's bytes (llm_graph)
        buf.write(f"\n{a['node']}: reads {a['of']}'s bytes ({a['bytes']} B), no copy at load\n")
    saved = compact_json(out_dir / "tokenizer.json")
    if saved:
        buf.write(f"\ntokenizer.json written without indentation: {saved} B less\n")
    return buf.getvalue()


def _strict_object(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("a key given twice")
    return d


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def compact_json(path: Path) -> int:
    """Rewrite a JSON file (the checkpoint's tokenizer.json, which the tokenizers library writes indented: SmolLM2's
    3.5 MB is 1.6 MB without the whitespace) as the same JSON value with no whitespace between tokens, keys in
    their order, non-ASCII text as UTF-8; returns the bytes saved. 0, the file untouched, where it is missing or
    unwritable, is not strict JSON (NaN, a number beyond a double, a key given twice: what a reader might take
    otherwise), holds text UTF-8 cannot (an escaped lone surrogate), nests too deep, or is no smaller."""
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        raw = path.read_bytes()
        value = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_strict_object, parse_constant=_no_constant)
        out = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        if len(out) >= len(raw):
            return 0
        tmp.write_bytes(out)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except (OSError, UnicodeError, ValueError, RecursionError):
        return 0
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(raw) - len(out)


def decoder_matmuls(model_onnx: Path) -> Dict[int, List[str]]:
    """The builder's MatMul node names per decoder layer (before quantization: the names overrides match). A MoE
    router's (`/moe/router/MatMul`) left float is not one: LFM2-MoE's builder keeps its routers float whatever an
    override asks (an INT8 override fails the build), so they are neither overridden nor ladder candidates; one
    the builder quantized (gpt-oss's: MatMulNBits) is. In a float graph every router is left out."""
    import onnx

    m = onnx.load(str(model_onnx), load_external_data=False)
    out: Dict[int, List[str]] = {}
    for n in m.graph.node:
        mt = re.match(r"^/model/layers\.(\d+)/.*/MatMul", n.name)
        if mt and (n.op_type == "MatMulNBits" or (n.op_type == "MatMul" and "/moe/router/" not in n.name)):
            out.setdefault(int(mt.group(1)), []).append(re.sub(r"_Q\d+$", "", n.name))
    return out


def weight_bytes(model_dir: Path) -> Dict[str, int]:
    """Bytes of the weights (initializers, as the file holds them) and of those a decoded token reads: all but an
    untied embedding table (float, or 8-bit with its scales: a Gather reads one row of it per token), a scale
    stored fp16 behind a Cast at the fp32 of the initializer ONNX Runtime folds the Cast into (llm_graph.read_bytes:
    the kernels read that, not the file's fp16)."""
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    sizes = initializer_bytes(m)   # an initializer aliasing another's bytes (llm_graph) counted once
    read = read_bytes(m)           # and a Cast of one (fp16 scales) at its output's type, under the name read
    reads = readers(m.graph)
    gathered = 0
    for n in m.graph.node:
        if n.op_type == "Gather" and n.name.endswith("embed_tokens/Gather") and n.input[0] in sizes:
            gathered += sizes[n.input[0]]
        elif n.op_type == "GatherBlockQuantized" and "embed_tokens" in n.name and sizes.get(n.input[0]):
            # an untied table of its own (llm_gptq.quantize_embedding): it and the scales only it reads; a tied
            # one aliases the lm_head's bytes (counted 0 here) and shares its scales
            gathered += sizes[n.input[0]] + sum(read.get(x, 0) for x in n.input[2:]
                                                if x and len(reads.get(x, ())) == 1)
    return {"weights": sum(sizes.values()), "per_token": sum(read.values()) - gathered}


# --- recipe and result --------------------------------------------------------------------------------------------

# The floor of an INT8 build (INT4's is LLMFloor's default, +10%): INT8 is the precision chosen for fidelity, and
# llama.cpp's Q8_0 keeps +1.2% on the benchmark text (SmolLM2-135M), edgekit's INT8 +0.95% after its ladder (+1.5%
# before: the int8 activations of accuracy level 4, llm_actquant). KL and agreement: SmolLM2 INT8 0.0042 / 95.9%,
# Gemma 3 270M 0.0033 / 95.9%. A floor flag given on the command line applies to INT8 builds too.
INT8_FLOOR = LLMFloor(max_ppl_increase=0.01, max_kl=0.01, min_agreement=0.90)

# the builder's roundings and llm_gptq's calibrated ones (built as k_quant, then the decoder MatMuls rewritten)
LLM_ALGOS = ("k_quant", "rtn", "default") + _CALIBRATED_ALGOS
LLM_COMPAT = ("auto", "emulated", "venv", "off")   # --compat-check for a language model (compat.check_llm)

@dataclass(frozen=True)
class LLMRecipe:
    model: str
    targets: Tuple[str, ...]
    precision: Optional[str] = None        # None: each profile's llm.precision
    name: Optional[str] = None
    val: Optional[str] = None              # held-out text file (UTF-8)
    val_tokens: int = 1024                 # at most this many tokens of it
    window: int = 256                      # teacher-forced window (tokens)
    floor: LLMFloor = field(default_factory=LLMFloor)
    int8_floor: LLMFloor = INT8_FLOOR      # the floor of a row that starts at INT8 (the INT4 ladder's int8 rung: floor)
    rescue: bool = True
    select: str = "profile"                # fastest: among builds meeting the floor, the fastest decode here
    block_size: Optional[int] = None       # overrides the profiles' llm.block_size
    accuracy_level: Optional[int] = None   # overrides the profiles' llm.accuracy_level
    algo: Optional[str] = None             # overrides the profiles' llm.algo (k_quant, rtn, default, awq, gptq...)
    max_bytes: Optional[int] = None        # model bytes a bundle may have: INT4 fills them with INT8 MatMuls (_walk)
    compat_check: str = "auto"             # an arm64 target's golden check on ARM's kernels (compat.check_llm)

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise EdgekitError(f"precision {self.precision!r} is not one a language model builds at",
                               hint="one of " + ", ".join(PRECISIONS))
        if not self.targets:
            raise EdgekitError("give at least one --target")
        if self.block_size is not None and self.block_size not in (16, 32, 64, 128, 256):
            raise EdgekitError(f"block size {self.block_size} is not one of 16, 32, 64, 128, 256")
        if self.algo is not None and self.algo not in LLM_ALGOS:
            raise EdgekitError(f"algo {self.algo!r} is not one a language model builds with",
                               hint="one of " + ", ".join(LLM_ALGOS))
        if self.precision not in (None, "int4") and self.algo is not None and calibrated(self.algo):
            # refused, not ignored: GPTQ / AWQ exist at 8 bits elsewhere, and a line in minutes of progress is missed
            raise EdgekitError(f"algo {self.algo!r} is calibrated INT4 rounding: an {self.precision} build does not "
                               "use it" + (" (its INT8 weights are the model builder's k_quant)"
                                           if self.precision == "int8" else ""),
                               hint=f"drop --algo {self.algo}, or build --precision int4")
        if self.select not in ("profile", "fastest"):
            raise EdgekitError(f"select {self.select!r}: profile or fastest")
        if self.max_bytes is not None and self.max_bytes <= BUNDLE_MARGIN:
            raise EdgekitError(f"a byte budget of {self.max_bytes} B holds no language model",
                               hint="--max-mb takes the bundle's model size in MB (10^6 bytes), e.g. 105.5")
        if self.compat_check not in LLM_COMPAT:
            raise EdgekitError(f"compatibility check {self.compat_check!r} is not one a language model takes",
                               hint="one of " + ", ".join(LLM_COMPAT) + " (accept-crash is for TFLite artifacts)")
        if self.val_tokens < 32:
            raise EdgekitError(f"--val-tokens {self.val_tokens}: fidelity is measured on at least 32 tokens",
                               hint="give --val-tokens 32 or more (default 1024)")
        if self.window < 16:   # not a CLI option: the API's
            raise EdgekitError(f"window {self.window}: a teacher-forced window is at least 16 tokens")

    def floor_for(self, precision: str) -> LLMFloor:
        """The floor a row starting at `precision` must meet (its ladder's rungs too)."""
        return self.int8_floor if precision == "int8" else self.floor

    @property
    def bundle_name(self) -> str:
        return check_name(self.name or hf_config.hub_name(self.model))

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["kind"] = "llm"
        return d


@dataclass
class LLMRow:
    target: str
    precision: str
    path: Path
    ok: bool = False
    options: Optional[LLMBuildOptions] = None
    fidelity: Dict[str, Any] = field(default_factory=dict)
    rescue: List[Dict[str, Any]] = field(default_factory=list)
    rescued_by: Optional[str] = None
    bytes: int = 0
    bytes_per_token: int = 0
    reason: str = ""
    seconds: float = 0.0
    candidates: List[Dict[str, Any]] = field(default_factory=list)   # --select fastest: each build measured
    runtime: Dict[str, Any] = field(default_factory=dict)   # --select fastest: {threads, threads_choice} measured
    floor: Optional[LLMFloor] = None   # the floor this row was held to (recipe.floor_for its starting precision)
    stage: str = ""   # a failed row: where it failed (build, fidelity, budget; writing: generation, compatibility...)

    @property
    def fmt(self) -> str:
        return "onnx-genai"

    def to_dict(self) -> Dict[str, Any]:
        d = {"path": str(self.path), "target": self.target, "format": self.fmt, "precision": self.precision,
             "status": "written" if self.ok else "failed", "bytes": self.bytes or None,
             "bytes_per_token": self.bytes_per_token or None, "fidelity": self.fidelity, "rescue": self.rescue,
             "rescued_by": self.rescued_by, "seconds": round(self.seconds, 1), "candidates": self.candidates,
             "recipe": None if self.options is None else dataclasses.asdict(self.options),
             "floor": None if self.floor is None else self.floor.to_dict()}
        if not self.ok:
            d["failure"] = {"stage": self.stage or ("fidelity" if self.fidelity else "build"), "reason": self.reason}
        return d


@dataclass
class LLMConvertResult:
    name: str
    recipe: Dict[str, Any]
    source: Dict[str, Any]
    text: str
    floor: LLMFloor
    bundles: List[LLMRow] = field(default_factory=list)
    report_path: Optional[Path] = None
    log_path: Optional[Path] = None

    @property
    def written(self) -> List[LLMRow]:
        return [b for b in self.bundles if b.ok]

    @property
    def failed(self) -> List[LLMRow]:
        return [b for b in self.bundles if not b.ok]

    def table(self) -> str:
        rows = []
        for b in self.bundles:
            f = b.fidelity
            ppl = f"{f['ppl_float']:.3f}→{f['ppl']:.3f} ({100 * f['ppl_increase']:+.1f}%)" if f else "-"
            rows.append([b.path.name, b.precision, b.bytes / 1e6 if b.bytes else None,
                         b.bytes / 2 ** 20 if b.bytes else None,
                         b.bytes_per_token / 2 ** 20 if b.bytes_per_token else None, ppl,
                         f.get("kl_mean"), None if not f else 100 * f["top1_agreement"],
                         ("ok" + (f" (rescued: {b.rescued_by})" if b.rescued_by else "")) if b.ok
                         else f"FAILED: {b.reason}"[:110]])
        fl = self.floor
        title = (f"{self.name}: float → quantized on {self.text}; floor: perplexity ≤ "
                 f"+{100 * (fl.max_ppl_increase or 0):.0f}%, KL ≤ {fl.max_kl}, agreement ≥ "
                 f"{100 * (fl.min_agreement or 0):.0f}%")
        f8 = next((b.floor for b in self.bundles if b.floor is not None and b.floor != fl), None)
        if f8 is not None:   # an INT8 row's own floor (recipe.int8_floor)
            title += (f" (INT8: ≤ +{100 * (f8.max_ppl_increase or 0):.0f}%, KL ≤ {f8.max_kl}, agreement ≥ "
                      f"{100 * (f8.min_agreement or 0):.0f}%)")
        text = render(["bundle", "precision", "MB", "MiB", "MiB/token", "perplexity f→q", "KL", "top-1 agree %",
                       "result"], rows, title=title)
        for b in self.bundles:
            if len(b.rescue) > 1:
                text += "\n\n" + render(
                    ["rung", "what", "ppl +%", "KL", "top-1 agree %", "MiB", "meets floor"],
                    [[s["rung"], s["what"][:70], None if s.get("ppl_increase") is None else 100 * s["ppl_increase"],
                      s.get("kl_mean"), None if s.get("top1_agreement") is None else 100 * s["top1_agreement"],
                      None if not s.get("bytes") else s["bytes"] / 2 ** 20,
                      "yes" if s.get("meets") else (s.get("error") or "; ".join(s.get("misses") or []) or "no")[:60]]
                     for s in b.rescue], title=f"rescue ladder for {b.path.name}")
            if b.candidates:
                text += "\n\n" + render(
                    ["candidate", "decode tok/s", "MiB", "ppl +%", "KL", "meets floor", "chosen"],
                    [[c["what"][:60], c.get("decode_tok_s"), None if not c.get("bytes") else c["bytes"] / 2 ** 20,
                      None if c.get("ppl_increase") is None else 100 * c["ppl_increase"], c.get("kl_mean"),
                      "yes" if c.get("meets") else (c.get("error") or "no")[:40], "yes" if c.get("chosen") else ""]
                     for c in b.candidates], title=f"--select fastest for {b.path.name}: {b.candidates[0]['timed']}")
        return text

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": "llm", "recipe": self.recipe, "source": self.source, "text": self.text,
                "floor": self.floor.to_dict(), "log": str(self.log_path) if self.log_path else None,
                "bundles": [b.to_dict() for b in self.bundles]}


# --- the conversion -----------------------------------------------------------------------------------------------

def profile_options(t: TargetProfile, recipe: LLMRecipe) -> LLMBuildOptions:
    llm = t.llm
    precision = recipe.precision or llm.precision
    if precision == "fp16" and llm.execution_provider != "cuda":
        raise EdgekitError(f"target {t.name}: fp16 is the GPU path (the CPU build of the model builder is "
                           "int4, int8 or fp32)", hint="use --precision int4, int8 or fp32 for CPU targets")
    return LLMBuildOptions(
        precision=precision, execution_provider=llm.execution_provider,
        block_size=recipe.block_size or llm.block_size,
        accuracy_level=llm.accuracy_level if recipe.accuracy_level is None else recipe.accuracy_level,
        algo=recipe.algo or llm.algo, lm_head_int8="lm_head" in llm.wide_layers,
        embeddings_wide="embeddings" in llm.wide_layers, half_scales=recipe.max_bytes is not None)


class _Session:
    """One conversion: the source, the float reference, the text, and every build made (shared by targets)."""

    def __init__(self, recipe: LLMRecipe, src: LMSource, wd: Path, progress: Progress, log):
        self.recipe, self.src, self.wd, self.progress, self.log = recipe, src, wd, progress, log
        self.arm_checks: Dict[Any, Dict[str, Any]] = {}   # compat.check_llm's records, by model files and golden
        self.rope_rows: Optional[int] = None   # each build's RoPE caches cut to these rows (_convert; None: not cut)
        self.floor = recipe.floor
        progress.say(f"{src.path.name}: loading the float model ({src.architecture}) in torch")
        self.float = FloatModel(src.path)
        if self.float.load_report:   # transformers' notes on loading the weights: the log's, not the terminal's
            log.write(f"loading the float model:\n{self.float.load_report}\n")
        if recipe.val:
            vp = Path(recipe.val)
            try:
                text = vp.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                from edgekit.errors import DataError
                raise DataError("not UTF-8 text", path=str(vp), hint="--val takes a plain text file") from None
            self.text: EvalText = self.float.text_windows(text, str(vp), recipe.val_tokens, recipe.window)
        else:
            progress.say(f"{src.path.name}: no --val: generating the float model's own continuations")
            self.text = self.float.own_continuations(min(recipe.val_tokens, 512), recipe.window,
                                                     tick=progress.timed("generating", " prompts"))
        self.ref = self.float.logprobs(self.text.windows)
        self.builds: Dict[LLMBuildOptions, Dict[str, Any]] = {}
        # the floors of the rows still to finish (this target's and the later ones'; _convert sets them): sweep()
        # keeps the files of the builds that meet one of them. None: every build's files are kept
        self.keep_for: Optional[List[LLMFloor]] = None
        self.matmuls: Dict[int, List[str]] = {}
        self._sensitivity: Dict[Any, Any] = {}

    def build(self, opts: LLMBuildOptions) -> Dict[str, Any]:
        """Build (once per options) and measure: {"dir", "metrics", "bytes", ...} or {"error"}."""
        if opts in self.builds:
            return self.builds[opts]
        self.sweep()   # the builds no one will read again make room for this one
        d = self.wd / f"build-{len(self.builds)}"
        t0 = time.monotonic()
        self.progress.say(f"  building {opts.describe()}")
        rec: Dict[str, Any] = {"dir": d}
        try:
            self._make_room()
            if not self.matmuls and opts.precision == "int8" and self.src.tied:
                # the INT8 build of a tied model names every MatMul: learn the names from a plain build first
                run_builder(self.src, dataclasses.replace(opts, int8_symmetric=False), self.wd / "names",
                            self.wd / "cache", {})
                self.matmuls.update(decoder_matmuls(self.wd / "names" / "model.onnx"))
                shutil.rmtree(self.wd / "names", ignore_errors=True)
            out = run_builder(self.src, opts, d, self.wd / "cache", self.matmuls, self.float, self.progress)
            self.log.write(out[-20000:])
            if not self.matmuls:
                self.matmuls.update(decoder_matmuls(d / "model.onnx"))
            if self.rope_rows:   # at least a sliding window's rows (GroupQueryAttention's KV cache: kv_floor)
                from edgekit.convert.llm_graph import cut_rope_caches

                genai = json.loads((d / "genai_config.json").read_text(encoding="utf-8"))
                rec["rope"] = cut_rope_caches(d, max(self.rope_rows, kv_floor(genai)))
            dims = self.src.dims()
            dec = OnnxDecoder(d, dims["kv_heads"], dims["head_dim"])
            q = [dec.logits(w) for w in self.text.windows]
            rec["metrics"] = compare(self.ref, self.text, q)
            rec["golden"] = golden(dec, self.text.windows)
            rec["ort_version"] = dec.version
            wb = weight_bytes(d)
            rec["bytes"] = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            rec["bytes_per_token"] = wb["per_token"]
            if self.recipe.max_bytes and opts.precision == "int4":   # read by _walk_budget after the files may go
                rec["int8_costs"] = int8_costs(d, opts, self.src)
            m = rec["metrics"]
            self.progress.say(f"    perplexity {m['ppl_float']:.3f} -> {m['ppl']:.3f} "
                              f"({100 * m['ppl_increase']:+.1f}%), "
                              f"KL {m['kl_mean']:.4f}, top-1 agreement {100 * m['top1_agreement']:.1f}%, "
                              f"{rec['bytes'] / 2 ** 20:.1f} MiB ({time.monotonic() - t0:.0f} s)")
        except (RuntimeError, ValueError, NotImplementedError, OSError, KeyError, AttributeError,
                SourceModelError) + _ort_errors() as e:
            # a build the builder or ONNX Runtime refuses is recorded (the ladder goes on), not raised
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            self.log.write(f"build {opts} failed: {rec['error']}\n{traceback.format_exc()}\n")
        rec["seconds"] = time.monotonic() - t0
        self.builds[opts] = rec
        return rec

    def sweep(self) -> None:
        """Remove the files of the builds nothing left in the run reads (a 1B ladder's rungs are several GB, in
        RAM where /tmp is tmpfs); their records stay: the ladder, the choice between builds and the report read
        only their figures. A build's files are read only where it meets its row's floor and budget (_usable: the
        build shipped, --select's candidates timed; _walk_budget's INT8 costs are taken when it is built), so
        those meeting one of keep_for's floors (the row under way's, the later targets') stay; a rung below the
        floor, a failed build's leftovers, and --select's losers once no later target can take them go."""
        if self.keep_for is None:
            return
        for rec in self.builds.values():
            if rec.get("removed") or "dir" not in rec or any(_usable(rec, f, self.recipe.max_bytes)
                                                             for f in self.keep_for):
                continue
            shutil.rmtree(rec["dir"], ignore_errors=True)
            rec["removed"] = True

    def _make_room(self) -> None:
        """The builder reads the checkpoint again in float32 and holds its graph's float initializers and the
        quantizer's arrays beside it (BUILDER_FP32_COPIES): where that would not fit in the memory available
        now, the float model's weights are dropped for the build and read again when next needed (a
        1.5B-parameter checkpoint on a 24 GB machine; a 135M one never). Where it still would not fit, the run
        ends here with one line (an EdgekitError, which build() does not record as a build's failure) rather than
        the kernel's OOM killer ending it without a word in the builder."""
        held = self.float.loaded
        need = BUILDER_FP32_COPIES * 4 * self.float.params
        avail = mem_available()
        if held and avail is not None and need > avail:
            self.float.release()
            msg = (f"  the builder needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available: the float model's "
                   f"{4 * self.float.params / 1e9:.1f} GB are dropped for the build and read again after")
            self.progress.say(msg)
            self.log.write(msg.strip() + "\n")
            avail = mem_available()
        least = BUILDER_FP32_MEASURED * 4 * self.float.params   # refused below what builds were measured to take
        if avail is not None and least > avail:
            raise EdgekitError(f"converting {self.src.path.name} needs ~{least / 1e9:.1f} GB of memory for ONNX "
                               f"Runtime GenAI's model builder ({self.float.params / 1e9:.2f} G parameters in "
                               f"float32, {BUILDER_FP32_MEASURED:g} copies), {avail / 1e9:.1f} GB available",
                               hint="convert on a machine with more memory, or close other programs")

    def matmul_sensitivity(self, block: int, algo: str) -> Tuple[List[Dict[str, Any]], str]:
        """Each decoder MatMul's cost alone at INT4 (llm_sensitivity), on calibration text that is not the
        fidelity text; worst per weight first. Returns (ranking, what the calibration text was)."""
        from edgekit.convert import llm_sensitivity as ls

        key = ("matmuls", block, algo)
        if key not in self._sensitivity:
            t0 = time.monotonic()
            cal = ls.calibration_text(self.float)
            n = sum(len(v) for v in self.matmuls.values())
            self.progress.say(f"  measuring each of {n} decoder MatMuls' INT4 sensitivity (torch, block {block}, "
                              f"{algo}, {cal.tokens} calibration tokens)")
            ranking = ls.matmul_sensitivity(self.float, cal, self.matmuls, block, algo)
            self.log.write(f"matmul sensitivity (block {block}, {algo}, {time.monotonic() - t0:.0f} s): "
                           + ", ".join(f"{ls.short_name(d['name'])} {d['kl_mean']:.5f}" for d in ranking) + "\n")
            self._sensitivity[key] = (ranking, cal.source)
        return self._sensitivity[key]

    def activation_sensitivity(self, block: int, algo: str, level: int) -> Tuple[List[Dict[str, Any]], str]:
        """Each decoder MatMul's cost alone as an INT8 node computes it (llm_actquant: INT8 weights, and at
        accuracy_level 4 its input int8 per block), on the calibration text; worst per weight first."""
        from edgekit.convert import llm_actquant as aq
        from edgekit.convert import llm_sensitivity as ls

        key = ("int8", block, algo, level)
        if key not in self._sensitivity:
            t0 = time.monotonic()
            cal = ls.calibration_text(self.float)
            n = sum(len(v) for v in self.matmuls.values())
            self.progress.say(f"  measuring each of {n} decoder MatMuls' cost at INT8 (torch, block {block}, "
                              + ("int8 activations, " if level == 4 else "") + f"{cal.tokens} calibration tokens)")
            ranking = aq.activation_sensitivity(self.float, cal, self.matmuls, block, algo, activations=level == 4)
            self.log.write(f"INT8 sensitivity (block {block}, accuracy_level {level}, {time.monotonic() - t0:.0f} s): "
                           + ", ".join(f"{ls.short_name(d['name'])} {d['kl_mean']:.6f}" for d in ranking) + "\n")
            self._sensitivity[key] = (ranking, cal.source)
        return self._sensitivity[key]


def _ort_errors() -> Tuple[type, ...]:
    """ONNX Runtime's own exceptions (they derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    return tuple(getattr(st, n) for n in ("Fail", "InvalidGraph", "InvalidArgument", "RuntimeException",
                                          "NotImplemented", "NoSuchFile", "InvalidProtobuf") if hasattr(st, n))


# what the bundle adds to a build's folder (generation_config.json, the relaid chat template, the pruned lm_head's
# Gather: ~1 KB for SmolLM2), kept free under a byte budget
BUNDLE_MARGIN = 65536


def _over_budget(rec: Dict[str, Any], max_bytes: Optional[int]) -> List[str]:
    if not max_bytes or "bytes" not in rec or rec["bytes"] + BUNDLE_MARGIN <= max_bytes:
        return []
    return [f"{rec['bytes'] / 1e6:.3f} MB > the budget's {max_bytes / 1e6:.3f} MB (with {BUNDLE_MARGIN} B kept for "
            "the bundle's own files)"]


def _usable(rec: Dict[str, Any], floor: LLMFloor, max_bytes: Optional[int]) -> bool:
    """A build a row held to `floor` may ship or time (what _step calls meets): measured, meeting the floor and
    the byte budget."""
    return "metrics" in rec and not floor.misses(rec["metrics"]) and not _over_budget(rec, max_bytes)


def _step(rung: str, opts: LLMBuildOptions, rec: Dict[str, Any], floor: LLMFloor,
          max_bytes: Optional[int] = None) -> Dict[str, Any]:
    d = {"rung": rung, "what": opts.describe(), "options": dataclasses.asdict(opts),
         "seconds": round(rec.get("seconds", 0.0), 2), "error": rec.get("error")}
    if "metrics" in rec:
        m = rec["metrics"]
        misses = floor.misses(m) + _over_budget(rec, max_bytes)
        d.update(ppl=m["ppl"], ppl_increase=m["ppl_increase"], kl_mean=m["kl_mean"],
                 top1_agreement=m["top1_agreement"], bytes=rec["bytes"], misses=misses, meets=not misses)
    else:
        d["meets"] = False
    return d


# the matmuls rungs: the most sensitive decoder MatMuls (per weight) at INT8, up to these fractions of the decoder's
# weights (SmolLM2-135M, block 32, simulated in torch on held-out prose: perplexity +33% with none, +14% with 1/16
# (+3.4 MB), +12% with 1/8, +7% with 1/4 (+14 MB); docs/llm.md has the builds' own figures)
MATMUL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def _ladder(s: _Session, base: LLMBuildOptions):
    """The INT4 rungs after the profile's build that need no measurement, in order: (rung, options)."""
    if not (base.lm_head_int8 and base.embeddings_wide):
        return [("wide", dataclasses.replace(base, lm_head_int8=True, embeddings_wide=True))]
    return []


def _try(s: _Session, row: LLMRow, rung: str, opts: LLMBuildOptions, **extra) -> Tuple[Dict[str, Any], bool]:
    rec = s.build(opts)
    step = dict(_step(rung, opts, rec, row.floor or s.floor, s.recipe.max_bytes), **extra)
    row.rescue.append(step)
    s.progress.say(f"  [{row.target}] rescue: {opts.describe()}: "
                   + ("meets the floor" if step["meets"] else (rec.get("error") or "; ".join(step["misses"]))))
    return rec, step["meets"]


def _walk(s: _Session, row: LLMRow, base: LLMBuildOptions) -> Optional[Tuple[LLMBuildOptions, Dict[str, Any]]]:
    """The profile's build, then (INT4 below the floor) the ladder; the first build meeting the floor.

    INT4 ladder: `wide` (lm_head INT8, embeddings not 4-bit) where the profile had not; `matmuls`: the decoder
    MatMuls that cost most per weight alone at INT4 (measured in torch on calibration text, llm_sensitivity) at
    INT8, up to 1/16, 1/8, 1/4, 1/2 of the decoder's weights; then INT8 throughout.

    INT8 (held to recipe.int8_floor): `fp32`: the decoder MatMuls that cost most per weight as INT8 nodes (int8
    activations at accuracy level 4: llm_actquant) left unquantized, then block 16 (llm_actquant.INT8_RUNGS)."""
    row.floor = s.recipe.floor_for(base.precision)
    rec = s.build(base)
    row.rescue.append(_step("profile", base, rec, row.floor, s.recipe.max_bytes))
    if base.precision == "int4" and s.recipe.max_bytes and s.recipe.rescue and "error" not in rec:
        return _walk_budget(s, row, base, rec)
    if row.rescue[-1]["meets"]:
        return base, rec
    if base.precision == "int8" and s.recipe.rescue:
        return _walk_int8(s, row, base)
    if base.precision != "int4" or not s.recipe.rescue:
        return None
    cur = base
    for rung, opts in _ladder(s, base):
        rec, ok = _try(s, row, rung, opts)
        if ok:
            return opts, rec
        if "error" not in rec:
            cur = opts
    if s.matmuls and "error" not in s.builds.get(cur, {"error": 1}):
        from edgekit.convert.llm_sensitivity import pick_int8, short_name

        # ranked with the builder's k-quant rounding (a calibrated algo's own is not simulated per MatMul)
        ranking, calibration = s.matmul_sensitivity(cur.block_size, builder_algo(cur.algo))
        total = sum(d["params"] for d in ranking)
        tried: set = set()
        for frac in MATMUL_FRACTIONS:
            names = tuple(sorted(pick_int8(ranking, frac, total)))
            if not names or names in tried:
                continue
            tried.add(names)
            opts = dataclasses.replace(cur, int8_matmuls=names)
            chosen = [dict(d, name=short_name(d["name"])) for d in ranking if d["name"] in names]
            rec, ok = _try(s, row, "matmuls", opts, fraction=frac, calibration=calibration,
                           int8_weights=sum(d["params"] for d in chosen) / total if total else 0.0,
                           sensitivity=chosen)
            if ok:
                return opts, rec
    opts = LLMBuildOptions("int8", base.execution_provider, base.block_size, base.accuracy_level, base.algo,
                           True, True, half_scales=base.half_scales)
    rec = s.build(opts)
    row.rescue.append(_step("int8", opts, rec, row.floor, s.recipe.max_bytes))
    if row.rescue[-1]["meets"]:
        return opts, rec
    return None


def int8_costs(model_dir: Path, opts: LLMBuildOptions, src: Optional[LMSource] = None) -> Dict[str, int]:
    """Bytes each 4-bit decoder MatMulNBits of a build (by node name without its _Q4 suffix) would add to the file
    as the 8-bit node the build would write for it (LLMBuildOptions.int8_bytes) in place of its 4-bit one (its
    initializers' bytes in the file). Exact in initializer bytes; the file also moves by the data file's alignment
    padding and the graph's own bytes (node and initializer names, attributes): tens of bytes a node."""
    import onnx

    from edgekit.convert.llm_gptq import _attr

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    sizes = stored_bytes(m)
    out: Dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type != "MatMulNBits" or _attr(n, "bits") != 4:
            continue
        now = sum(sizes.get(x, 0) for x in list(n.input)[1:4] if x)
        out[re.sub(r"_Q\d+$", "", n.name)] = opts.int8_bytes(_attr(n, "K"), _attr(n, "N"), src) - now
    return out


def _walk_budget(s: _Session, row: LLMRow, base: LLMBuildOptions, rec: Dict[str, Any]
                 ) -> Optional[Tuple[LLMBuildOptions, Dict[str, Any]]]:
    """INT4 under a byte budget (recipe.max_bytes): the best fidelity that fits, not the smallest build meeting the
    floor. After the profile's build (and `wide` where the profile had not), the `budget` rung: the decoder MatMuls
    measured most sensitive per weight (as the `matmuls` rungs rank them) at INT8, in that order, as many as the
    bytes left allow (int8_costs; a MatMul too big for what is left is skipped for smaller ones after it); built,
    and one MatMul fewer at a time while the build is over the budget. Shipped when it fits and meets the floor."""
    from edgekit.convert.llm_sensitivity import short_name

    budget = s.recipe.max_bytes
    cur, cur_ok = base, row.rescue[-1]["meets"]
    if _over_budget(rec, budget):
        return None   # the INT8 MatMuls only add bytes: the row's reason names the profile build's size
    for rung, opts in _ladder(s, base):
        r, ok = _try(s, row, rung, opts)
        if "error" not in r and not _over_budget(r, budget):
            cur, rec, cur_ok = opts, r, ok
    best = (cur, rec) if cur_ok else None
    if not s.matmuls:
        return best
    ranking, calibration = s.matmul_sensitivity(cur.block_size, builder_algo(cur.algo))
    costs = rec["int8_costs"] if "int8_costs" in rec else int8_costs(rec["dir"], cur, s.src)
    left = budget - BUNDLE_MARGIN - rec["bytes"]
    names: List[str] = []
    for d in ranking:
        c = costs.get(d["name"])
        if c is not None and 0 < c <= left and d["kl_mean"] > 0:
            names.append(d["name"])
            left -= c
    total = sum(d["params"] for d in ranking)
    while names:
        opts = dataclasses.replace(cur, int8_matmuls=tuple(sorted(names)))
        chosen = [dict(d, name=short_name(d["name"])) for d in ranking if d["name"] in names]
        r, ok = _try(s, row, "budget", opts, calibration=calibration, budget_bytes=budget,
                     int8_weights=sum(d["params"] for d in chosen) / total if total else 0.0, sensitivity=chosen)
        if "error" in r:
            return best
        if not _over_budget(r, budget):
            return (opts, r) if ok else best
        # the estimate was short: the least sensitive of those picked go back to INT4 until their costs cover it
        over = r["bytes"] + BUNDLE_MARGIN - budget
        while names and over > 0:
            over -= costs[names.pop()]
    return best


def _walk_int8(s: _Session, row: LLMRow, base: LLMBuildOptions) -> Optional[Tuple[LLMBuildOptions, Dict[str, Any]]]:
    """The INT8 rungs (llm_actquant.INT8_RUNGS): the measured MatMuls left fp32 up to a fraction of the decoder's
    weights, at the profile's block size, then at block 16; the first build meeting the INT8 floor."""
    from edgekit.convert.llm_actquant import INT8_RUNGS, pick_fp32
    from edgekit.convert.llm_sensitivity import short_name

    if not s.matmuls or "error" in s.builds.get(base, {"error": 1}):
        return None
    tried: set = set()
    for block, frac in INT8_RUNGS:
        block = block or base.block_size
        ranking, calibration = s.activation_sensitivity(block, builder_algo(base.algo), base.accuracy_level)
        total = sum(d["params"] for d in ranking)
        names = tuple(sorted(pick_fp32(ranking, frac, total)))
        if (block, names) in tried or not names:
            continue
        tried.add((block, names))
        opts = dataclasses.replace(base, block_size=block, fp32_matmuls=names)
        chosen = [dict(d, name=short_name(d["name"])) for d in ranking if d["name"] in names]
        rec, ok = _try(s, row, "fp32" if block == base.block_size else "blocks", opts, fraction=frac,
                       calibration=calibration, fp32_weights=sum(d["params"] for d in chosen) / total if total else 0.0,
                       sensitivity=chosen)
        if ok:
            return opts, rec
    return None


def _numerics(t: TargetProfile, opts: LLMBuildOptions, ort_version: str) -> Dict[str, Any]:
    import platform

    host = platform.machine()
    flags = cpu_flags()
    host_int8 = ("avx512_vnni" in flags or "avx_vnni" in flags or "avx2" in flags or "asimddp" in flags)
    d = {"mode": "host", "engine": f"onnxruntime {ort_version} CPUExecutionProvider (MLAS)", "host_arch": host,
         "accuracy_level": opts.accuracy_level if opts.quantized else None}
    if not opts.quantized:
        d["kernels"] = f"{opts.precision} MatMul; float accumulation order may differ on the target"
    elif opts.accuracy_level == 4:
        d["kernels"] = ("int8 activations quantized per block (MatMulNBits CompInt8), as the target's "
                        + ("ARM sdot" if t.device.arch == "aarch64" else "x86 int8") + " kernels do"
                        + ("" if host_int8 else "; this host lacks int8 dot-product kernels (fp32 compute here)"))
    else:
        d["kernels"] = "dequantized weights, fp32 compute (accuracy_level 1), as on the target"
    if opts.execution_provider == "cuda":
        d["warning"] = ("a CUDA build measured with CPU kernels: the GPU's fp16 arithmetic is not what was measured "
                        "(unverified until a GPU runs the golden check)")
    elif t.device.arch != host:
        d["note"] = (f"measured on {host}: the same quantized arithmetic as the {t.device.arch} kernels, rounding of "
                     "the accumulation may differ (the device's golden check compares within tolerance)")
    return d


def _generation(model_dir: Path, prompt: str, tokens: int = 16, cpu: bool = False,
                hf_tokenizer=None) -> Dict[str, Any]:
    """A short greedy generation with ONNX Runtime GenAI on the bundle's model folder (it must produce text).
    cpu: a GPU build run with the CPU provider (this machine has no GPU). hf_tokenizer: the source's; where it
    puts a BOS before the prompt that ONNX Runtime GenAI's tokenizer leaves out (Gemma: tokenizer.json's
    post-processor, which ORT GenAI ignores), the BOS is added here and returned as prompt_bos for the manifest
    (the runtime adds it to every plain prompt: without it Gemma 3 270M answered 'The capital of France is'
    with ' France of France of ...')."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if cpu:
        config.clear_providers()
    model = og.Model(config)
    tok = og.Tokenizer(model)
    ids = [int(i) for i in tok.encode(prompt)]
    bos = None
    if hf_tokenizer is not None:
        ref = [int(i) for i in hf_tokenizer(prompt).input_ids]
        first = getattr(hf_tokenizer, "bos_token_id", None)
        if first is not None and ref == [first] + ids:
            bos, ids = int(first), [int(first)] + ids
    params = og.GeneratorParams(model)
    genai = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    # the search options of the runtime's greedy generate() (llmopts.GenOptions: repetition_penalty 1.0 over
    # genai_config's, which is the checkpoint's since _tune_genai_config), so the golden text is what
    # `edgekit check` (runtime.llmcheck) generates again on the device
    from edgekit.runtime.llmopts import GenOptions

    params.set_search_options(max_length=kv_capacity(genai, len(ids) + tokens),
                              **GenOptions(max_new_tokens=tokens).search())
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    out = []
    while not gen.is_done() and len(out) < tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return {"prompt": prompt, "max_new_tokens": tokens, "tokens": out, "text": tok.decode(out), "prompt_bos": bos,
            "engine": f"onnxruntime-genai {og.__version__}" + (" (CPU provider; built for the GPU)" if cpu else "")}


def _template_check(mdir: Path, s: "_Session") -> Optional[Dict[str, Any]]:
    """The bundle's chat template rendered by ONNX Runtime GenAI (as the runtime renders it) and by the checkpoint's
    tokenizer in transformers on llmtemplate.TEMPLATE_PROBES: {"conversations": n compared, "differ": [names],
    "skipped"?: [those transformers refuses], "first"?: {conversation, transformers, onnxruntime_genai}}; None
    without a chat template. A difference is logged and said
    in the progress (one line), the bundle still written: the runtime uses this template either way."""
    from edgekit.runtime.llmtemplate import TEMPLATE_PROBES, source_template, template_mismatches

    if source_template(mdir) is None:
        return None
    tok = s.float.tokenizer
    skipped: List[str] = []
    bad = template_mismatches(mdir, source=s.src.path, reference=lambda m: tok.apply_chat_template(
        m, tokenize=False, add_generation_prompt=True), skipped=skipped)
    out: Dict[str, Any] = {"conversations": len(TEMPLATE_PROBES) - len(skipped), "differ": [b["conversation"]
                                                                                       for b in bad]}
    if skipped:   # conversations the checkpoint's own template refuses (a system message, for Gemma's)
        out["skipped"] = skipped
    if bad:
        out["first"] = {k: str(v)[:2000] for k, v in bad[0].items()}
        s.log.write(f"chat template: ONNX Runtime GenAI renders {len(bad)} of {len(TEMPLATE_PROBES)} conversations "
                    f"otherwise than transformers: {json.dumps(bad, ensure_ascii=False)[:20000]}\n")
        s.progress.say(f"  warning: the chat template renders {', '.join(out['differ'])} otherwise in ONNX Runtime "
                       "GenAI than in transformers (the manifest's llm.chat_template_check, the convert log)")
    return out


def _source_search(model_dir: Path) -> Dict[str, Any]:
    """The repetition settings of the checkpoint's generation_config.json (in model_dir: SOURCE_EXTRAS) as ONNX
    Runtime GenAI search options. The builder copies them from the configuration object only where it has the
    attribute, which transformers 5's AutoConfig no longer gives: Qwen2.5-0.5B-Instruct's repetition_penalty 1.1
    became 1.0 (what `edgekit chat` / `run` take as the model's default: runtime.llm generation_defaults).
    A penalty that is not a number above 0 is left out. no_repeat_ngram_size is not copied: ONNX Runtime GenAI 0.18
    would apply it to every generation (a tiny Llama, size 2: the bigram seen before not generated again), and
    edgekit's runtime has no such option to turn it off for its greedy API and golden check."""
    try:
        gc = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(gc, dict):
        return {}
    out: Dict[str, Any] = {}
    rp = gc.get("repetition_penalty")
    if isinstance(rp, (int, float)) and not isinstance(rp, bool) and 0 < rp < float("inf"):
        out["repetition_penalty"] = float(rp)
    return out


def _tune_genai_config(model_dir: Path, t: TargetProfile, context: int) -> int:
    """genai_config.json: the profile's default context as search.max_length (the KV cache a runtime allocates
    with past_present_share_buffer), the target's threads and whether ORT's intra-op threads spin between ops
    (profile llm.intra_op_spinning: a decode step is ~300 small ops, and threads that busy-wait for the next
    one take the CPU from whatever else runs on the device), the checkpoint's repetition settings
    (_source_search), and model.context_length the bundle's context: the builder writes max_position_embeddings
    (131,072 for Llama 3.2), which the runtime takes as the longest context (lm.max_context) and ONNX Runtime
    GenAI as the longest max_length it accepts. Where a sliding window is longer than the context (GroupQueryAttention
    refuses a KV cache smaller than the window: kv_floor) the window's length, at most the builder's. Returns the
    context_length written: the RoPE caches' rows (llm_graph.cut_rope_caches)."""
    p = model_dir / "genai_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg.setdefault("search", {})["max_length"] = min(t.llm.context_default, context)
    cfg["search"].update(_source_search(model_dir))
    built = int(cfg["model"].get("context_length") or 0)
    rows = max(int(context), kv_floor(cfg))
    rows = min(rows, built) if built > 0 else rows
    cfg["model"]["context_length"] = rows
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    if t.llm.execution_provider == "cpu":
        so["intra_op_num_threads"] = t.runtime.threads
        so["session.intra_op.allow_spinning"] = "1" if t.llm.intra_op_spinning else "0"
    p.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    return rows


class BundleWriteError(EdgekitError):
    """A bundle _write_bundle did not write, and the stage it failed at (the row's failure.stage: "generation",
    "budget"; compat.check_llm's ConversionError carries "compatibility")."""

    def __init__(self, message: str, *, stage: str, hint: Optional[str] = None):
        super().__init__(message, hint=hint)
        self.stage = stage


def _write_bundle(s: _Session, row: LLMRow, t: TargetProfile, opts: LLMBuildOptions, rec: Dict[str, Any],
                  dest: Path, device_check: bool = True) -> None:
    """The bundle at dest (staged: nothing at dest changes unless all of it is written). device_check: an arm64
    target's golden check on ARM's kernels (compat.check_llm, recipe.compat_check); the candidates --select
    fastest times on a device skip it (the device runs them). Raises an EdgekitError whose `stage` says where it
    failed (BundleWriteError; compat.check_llm's ConversionError). A failure of the tools it runs or of the disk
    (ONNX Runtime GenAI's RuntimeError in the generation check, an OSError writing a file: WRITE_FAILURES) is a
    BundleWriteError too, stage "bundle", naming the step it failed at (_BundleSteps; its traceback in the log):
    the row fails (exit 1 with the report, as a build that fails does), not the run with a traceback."""
    at = _BundleSteps()
    try:
        _stage_bundle(s, row, t, opts, rec, dest, device_check, at)
    except WRITE_FAILURES + _ort_errors() as e:
        s.log.write(f"writing {dest.name} failed at {at.step}:\n{traceback.format_exc()}\n")
        what, detail, code = _write_failure(e)
        raise BundleWriteError(f"writing the bundle failed at {at.step}: {what}" + (f": {detail}" if detail else ""),
                               stage="bundle",
                               hint=(f"free space on the disk of {dest.parent} or choose another --out; "
                                     if code == errno.ENOSPC else
                                     f"{dest.parent} is on a read-only file system: choose another --out; "
                                     if code == errno.EROFS else "") + "its traceback is in the convert log") from None


_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:]*)")


def _write_failure(e: BaseException) -> Tuple[str, str, Optional[int]]:
    """(the exception's type name, its message's first line (at most 300 characters), its errno) for the line a
    failed bundle write ends with. shutil.copytree's shutil.Error holds a list of (source, destination, reason) for
    every file that failed: the first reason is the message ("[Errno 28] No space left on device: SRC -> DST": the
    error and DST's file name), its errno read from it, and how many more there were."""
    code = getattr(e, "errno", None)
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        entries = e.args[0]
        first = entries[0]
        why = str(first[-1]) if isinstance(first, (tuple, list)) and first else str(first)
        m = _ERRNO.match(why)
        if m:
            code = int(m.group(1))
            dst = first[1] if isinstance(first, (tuple, list)) and len(first) == 3 else None
            why = f"[Errno {code}] {m.group(2)}" + (f": {Path(str(dst)).name}" if dst else "")
        more = f" (and {len(entries) - 1} other file(s))" if len(entries) > 1 else ""
        return "OSError", (why.splitlines()[0][:300] if why.strip() else "?") + more, code
    detail = str(e).splitlines()[0][:300] if str(e).strip() else ""
    return type(e).__name__, detail, code


# what _write_bundle turns into a failed row (a BundleWriteError) rather than a traceback: a tool it runs refusing
# the build (ONNX Runtime GenAI's RuntimeError, ONNX Runtime's own exceptions: _ort_errors), the disk (OSError: no
# space, no permission), memory (MemoryError). Others (TypeError, KeyError ...) are bugs and keep their traceback.
WRITE_FAILURES: Tuple[type, ...] = (RuntimeError, OSError, MemoryError)


class _BundleSteps:
    """The step _stage_bundle is at (for the line a failure ends with)."""

    def __init__(self) -> None:
        self.step = "copying the build"


def _stage_bundle(s: _Session, row: LLMRow, t: TargetProfile, opts: LLMBuildOptions, rec: Dict[str, Any],
                  dest: Path, device_check: bool, at: _BundleSteps) -> None:
    """_write_bundle's work; `at.step` says where it is."""
    src, dims = s.src, s.src.dims()
    with staged_dir(dest) as tmp:
        mdir = tmp / "model"
        shutil.copytree(rec["dir"], mdir)
        at.step = "preparing the model folder (genai_config.json, RoPE caches, chat template, lm_head)"
        for extra in SOURCE_EXTRAS:
            if (src.path / extra).is_file() and not (mdir / extra).exists():
                shutil.copyfile(src.path / extra, mdir / extra)
        context = src.context(t)
        rows = _tune_genai_config(mdir, t, context)
        # the RoPE cos / sin caches cut from max_position_embeddings rows to the context's (llm_graph): Llama-3.2-1B
        # 33.5 MB less, Phi-3.5-mini ~50 MB; fidelity and golden read positions far below the cut, the same bits
        from edgekit.convert.llm_graph import cut_rope_caches

        rope = cut_rope_caches(mdir, rows)
        per_token = weight_bytes(mdir)["per_token"] if rope["caches"] else rec["bytes_per_token"]
        # the chat template laid out as transformers renders it (trim_blocks / lstrip_blocks: runtime.llmtemplate)
        relayout_folder(mdir)
        # the chat template as the device's ORT GenAI renders it against transformers' rendering of the checkpoint's
        # (three conversations: llmtemplate.template_mismatches); a difference is said and recorded, not refused
        # (a template may read the date or raise on a role the other engine lets through)
        tpl_bad = _template_check(mdir, s)
        # the shipped graph computes the last position's logits only (llm_graph.prune_lm_head): fidelity and the
        # golden logits were measured on the build before it, the same numbers at the last position
        pruned = prune_lm_head(mdir)
        prompt = s.text.prompts[0] if s.text.prompts else BUILTIN_PROMPTS[0]
        at.step = "the generation check (ONNX Runtime GenAI)"
        gen = _generation(mdir, prompt, cpu=opts.execution_provider != "cpu", hf_tokenizer=s.float.tokenizer)
        if not gen["text"].strip():
            raise BundleWriteError(f"the build generates no text from {prompt!r} (tokens {gen['tokens']})",
                                   stage="generation")
        at.step = "writing golden.json and manifest.json"
        gold = dict(rec["golden"], generation=gen)
        write_json_atomic(tmp / "golden.json", gold)
        files = {f.relative_to(mdir).as_posix(): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
                 for f in sorted(mdir.rglob("*")) if f.is_file()}
        total = sum(f["bytes"] for f in files.values())
        if s.recipe.max_bytes and total > s.recipe.max_bytes:   # BUNDLE_MARGIN too small: a bundle at dest stays
            raise BundleWriteError(f"over the byte budget: the bundle would be {total / 1e6:.3f} MB > "
                                   f"{s.recipe.max_bytes / 1e6:.3f} MB", stage="budget")
        kv_bytes = 2 * int(dims["layers"]) * dims["kv_heads"] * dims["head_dim"] * (
            2 if t.llm.kv_type(opts.precision) == "float16" else 4)
        m = rec["metrics"]
        manifest = {
            "schema": SCHEMA_VERSION, "kind": "llm", "format": "onnx-genai", "name": s.recipe.bundle_name,
            "edgekit_version": edgekit.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": t.to_dict(),
            "model": {"dir": "model", "files": files, "bytes": sum(f["bytes"] for f in files.values()),
                      "architecture": src.architecture, "params": s.float.params, "vocab": dims["vocab"],
                      "layers": dims["layers"], "hidden": dims["hidden"], "heads": dims["heads"],
                      "kv_heads": dims["kv_heads"], "head_dim": dims["head_dim"], "context": context,
                      "tied_embeddings": src.tied},
            "inputs": [], "outputs": [],
            **({"runtime": row.runtime} if row.runtime else {}),
            "recipe": dict(dataclasses.asdict(opts), wide_layers=opts.wide_layers(src.tied),
                           builder=f"onnxruntime_genai.models.builder {_genai_version()}",
                           floor=(row.floor or s.floor).to_dict(), val=s.recipe.val, val_tokens=s.recipe.val_tokens,
                           max_bytes=s.recipe.max_bytes,
                           window=s.recipe.window),
            "llm": {"bytes_per_token": per_token, "kv_bytes_per_token": kv_bytes,
                    "kv_cache_type": t.llm.kv_type(opts.precision),
                    "context_default": min(t.llm.context_default, context), "context_max": context,
                    "execution_provider": opts.execution_provider,
                    "verified": t.llm.verified, "verified_why": t.reason("llm.verified"),
                    "prompt_bos": gen["prompt_bos"], "embedding": embedding_summary(mdir),
                    "int8_nodes": int8_summary(mdir), "scales": scales_summary(mdir),
                    "lm_head": ({"positions": "last", "note": PRUNE_NOTE} if pruned["pruned"] else
                                {"positions": "all", "note": pruned["why"]}),
                    "chat_template_check": tpl_bad,
                    "rope_caches": {"rows": rows, "cut": sorted({c["name"] for r in (rec.get("rope") or {}, rope)
                                                                 for c in r.get("caches", [])}),
                                    "saved_bytes": (rec.get("rope") or {}).get("saved_bytes", 0)
                                    + rope["saved_bytes"], "note": rope["note"] or (rec.get("rope") or {}).get("note")},
                    "eos_token_id": json.loads((mdir / "genai_config.json").read_text())["model"].get("eos_token_id")},
            "fidelity": dict(m, text=s.text.source, numerics=_numerics(t, opts, rec["ort_version"]),
                             floor=(row.floor or s.floor).to_dict(), meets=True),
            "lowrank": _lowrank_summary(mdir),
            "calibration": _calibration_summary(mdir),
            "rescue": row.rescue, "rescued_by": row.rescued_by, "candidates": row.candidates, "golden": "golden.json",
            "source": {"path": str(src.path), "sha256": src.sha256, "bytes": src.bytes,
                       "architecture": src.architecture},
            "source_sha256": src.sha256,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        if device_check and t.device.arch == "aarch64":
            at.step = "the golden check on ARM's kernels"
            from edgekit.convert.compat import check_llm

            records = check_llm(tmp, t, s.recipe.compat_check, opts.execution_provider, cache=s.arm_checks,
                                say=lambda line: s.progress.say(f"  [{t.name}] {line}"))
            for r in records:
                s.progress.say(f"  [{t.name}] " + (
                    f"ARM: top-1 agreement {r['top1_agreement']:.3f}, logit SNR "
                    + ("n/a" if r.get("snr_db") is None else f"{r['snr_db']:.1f} dB")
                    + (f" ({r['where']}, the same model as checked above)" if r.get("reused") else
                       f" ({r['where']}, {r['seconds']:.0f} s)") if r.get("checked") else
                    f"not checked on ARM's kernels: {r['reason']}"))
            manifest["compatibility"] = records
            write_json_atomic(tmp / "manifest.json", manifest)
        at.step = f"moving the bundle to {dest}"
    row.bytes = manifest["model"]["bytes"]
    row.bytes_per_token = per_token


def _calibration_summary(model_dir: Path):
    """llm_gptq's record of a calibrated build (None for the builder's own rounding)."""
    p = model_dir / "edgekit_calibration.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def _lowrank_summary(model_dir: Path):
    from edgekit.convert.llm_lowrank import summary

    return summary(model_dir)


def _genai_version() -> str:
    try:
        import onnxruntime_genai as og

        return og.__version__
    except ImportError:  # pragma: no cover - the builder itself imports it
        return "?"


# --select fastest here: each candidate that meets the floor is timed in HOST_ROUNDS rounds alternating between the
# candidates, as on a device (drift and other work on this machine hit them alike: one round's spread is 10-25% on a
# shared machine, runtime.llmopts); a round loads the candidate's model at the profile's threads and intra-op
# spinning (what its bundle ships: _tune_genai_config), runs HOST_WARMUP new tokens, then times one run of
# HOST_PROMPT prompt tokens and HOST_NEW new ones; decode tok/s is the median of the rounds (host_rounds)
HOST_ROUNDS = 3
HOST_PROMPT, HOST_NEW, HOST_WARMUP = 64, 32, 4


def decode_speed(model_dir: Path, threads: int, prompt_tokens: int = HOST_PROMPT, new_tokens: int = HOST_NEW,
                 runs: int = 1, spinning: Optional[bool] = None) -> float:
    """Decode tokens per second of a build with ONNX Runtime GenAI here: greedy, after a short warm-up generation
    (HOST_WARMUP new tokens); the best of `runs`. The decoder at `threads` intra-op threads, spinning between ops
    as `spinning` says (None: as the folder's genai_config.json has it), through an overlay (runtime.llm._og_model):
    the folder's files are not changed."""
    import onnxruntime_genai as og

    from edgekit.runtime.llm import _og_model

    cfg = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    model = _og_model(og, model_dir, threads, spinning)
    vocab = int(cfg["model"]["vocab_size"])
    ids = [(7 * i + 3) % vocab for i in range(prompt_tokens)]

    def run(new: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=kv_capacity(cfg, prompt_tokens + new_tokens),
                                  min_length=prompt_tokens + new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        t0, n = time.perf_counter(), 0
        while not gen.is_done() and n < new - 1:
            gen.generate_next_token()
            n += 1
        return n / (time.perf_counter() - t0) if n else 0.0

    run(min(HOST_WARMUP, new_tokens))
    return max(run(new_tokens) for _ in range(max(1, runs)))


def _shipped_spinning(t: TargetProfile) -> Optional[bool]:
    """Whether the bundle's intra-op threads spin between ops as it ships (_tune_genai_config: the profile's
    llm.intra_op_spinning, written for a CPU target); None for a GPU target (genai_config's own)."""
    return bool(t.llm.intra_op_spinning) if t.llm.execution_provider == "cpu" else None


def _host_runs(t: TargetProfile) -> Tuple[bool, str]:
    """Whether this host's decode speed stands for the target's: a CPU target, and this host of its kind as the
    CNN path's --select fastest judges it (convert.select.host_matches: the architecture, and on x86 whether both
    have VNNI's exact int8 dot products, which the int8-activation MatMulNBits kernels of accuracy level 4 run on:
    a VNNI host would rank an AVX2 target's candidates by kernels that target lacks)."""
    from edgekit.convert.numerics import this_host
    from edgekit.convert.select import host_matches

    if t.llm.execution_provider != "cpu":
        return False, f"not timed: {t.name} runs on its GPU"
    ok, why = host_matches(t)
    if not ok:
        return False, f"not timed: {why}"
    return True, f"decode tok/s on this {this_host().describe()} host, {_ceiling(t)} thread(s)"


def _ceiling(t: TargetProfile) -> int:
    """The most threads a load of the bundle here would use: the profile's count clamped to the usable CPUs."""
    from edgekit.runtime.threads import choose_threads

    return int(choose_threads(None, t.runtime.threads))


# --device: each candidate is profiled on the device DEVICE_ROUNDS times, the rounds alternating between the
# candidates (drift hits them alike); each profile call is DEVICE_RUNS runs of DEVICE_PROMPT prompt tokens and
# DEVICE_NEW new ones (after one warm-up run) in a fresh process on the device, whose load() picks its thread count
DEVICE_ROUNDS = 2
DEVICE_RUNS, DEVICE_PROMPT, DEVICE_NEW = 2, 32, 32


def _select_fastest(s: _Session, row: LLMRow, t: TargetProfile, chosen: LLMBuildOptions, rec: Dict[str, Any],
                    device=None):
    """--select fastest: INT4 block sizes x accuracy levels and INT8 around the build that met the floor; those
    that meet it are timed here (where this host stands for the target: _host_runs; rounds alternating between
    them: _time_here) or, with `device` (deploy.timing.DeviceTimer, handed in by the CLI: convert never imports
    deploy) covering the target, on that device; the fastest ships, with the thread count measured for it
    (row.runtime: the manifest's runtime.threads_choice). Where neither times them, the profile's build ships and
    no other is built (the output and its one candidate record say why)."""
    on_device = device is not None and device.covers(t.name)
    timed, where = (True, device.describe()) if on_device else _host_runs(t)
    if not timed:   # nothing here stands for the target: no other candidate is built (as the CNN path keeps its own)
        s.progress.say(f"  [{t.name}] --select fastest: {where}; the profile's build ships")
        row.candidates = [dict(_step("select", chosen, rec, row.floor or s.floor, s.recipe.max_bytes), timed=where,
                               chosen=True)]
        return chosen, rec
    cands = [chosen]
    if chosen.precision == "int4":
        levels = [chosen.accuracy_level] + ([1] if chosen.accuracy_level == 4 else [])
        for bs in (32, 64, 128):
            for lv in levels:
                cands.append(dataclasses.replace(chosen, block_size=bs, accuracy_level=lv))
        cands.append(LLMBuildOptions("int8", chosen.execution_provider, 32, chosen.accuracy_level, chosen.algo,
                                     True, True, half_scales=chosen.half_scales))
    seen, out = set(), []
    for o in cands:
        if o in seen:
            continue
        seen.add(o)
        r = s.build(o)   # a block ORT's k_quant cannot pack: edgekit packs it (LLMBuildOptions.edgekit_packs)
        c = _step("select", o, r, row.floor or s.floor, s.recipe.max_bytes)
        c["timed"] = where
        out.append((o, r, c))
        if not on_device and not (c["meets"] and "error" not in r):
            s.progress.say(f"  [{t.name}] candidate {o.describe()}: " + (c.get("error") or "below the floor"))
    meeting = [x for x in out if x[2]["meets"] and "error" not in x[1]]
    reports: Dict[int, Dict[str, Any]] = {}
    if on_device:
        reports = _time_on_device(s, t, device, meeting)
    else:
        _time_here(s, t, meeting)
    fast = [x for x in out if x[2].get("decode_tok_s")]
    if on_device and not fast:
        s.progress.say(f"  [{t.name}] no candidate could be timed on {device.device.name}: the profile's build ships")
    pick = max(fast, key=lambda x: x[2]["decode_tok_s"]) if fast else out[0]
    pick[2]["chosen"] = True
    row.candidates = [x[2] for x in out]
    if fast:
        row.runtime = (_device_threads(device, reports.get(id(pick[2]))) if on_device
                       else _host_threads(s, t, pick[1], where))
    return pick[0], pick[1]


def _time_here(s: _Session, t: TargetProfile, timed) -> None:
    """Each candidate that meets the floor timed here in HOST_ROUNDS rounds alternating between the candidates
    (decode_speed: one run each, at the profile's threads clamped to this host's CPUs and the intra-op spinning
    its bundle ships); its decode_tok_s is the median of its rounds (host_rounds). A candidate ONNX Runtime GenAI
    refuses is recorded with the error and left out."""
    import statistics

    threads, spinning = _ceiling(t), _shipped_spinning(t)
    samples: Dict[int, List[float]] = {id(c): [] for _, _, c in timed}
    for _ in range(HOST_ROUNDS):
        for o, r, c in timed:
            if c.get("error"):
                continue
            try:
                samples[id(c)].append(decode_speed(Path(r["dir"]), threads, spinning=spinning))
            except RuntimeError as e:   # ORT GenAI refusing a build: recorded, not chosen
                c["error"] = f"timing: {str(e).splitlines()[0][:200]}"
    for o, r, c in timed:
        xs = samples[id(c)]
        if xs and not c.get("error"):
            c.update(decode_tok_s=round(statistics.median(xs), 1), host_rounds=[round(x, 1) for x in xs],
                     threads=threads, spinning=spinning)
        s.progress.say(f"  [{t.name}] candidate {o.describe()}: " + (
            f"{c['decode_tok_s']} tok/s (median of {', '.join(map(str, c['host_rounds']))})"
            if c.get("decode_tok_s") is not None else c.get("error") or "not timed"))


def _time_on_device(s: _Session, t: TargetProfile, device, timed) -> Dict[int, Dict[str, Any]]:
    """Each candidate that meets the floor written as a bundle and profiled on the device (uploaded to its store,
    not activated) in alternating rounds: decode tok/s is the median over the rounds of each call's p50. A
    candidate the device cannot run is recorded with the error and left out. Returns the last report of each
    (keyed by id of its candidate record)."""
    name = device.device.name
    reports: Dict[int, Dict[str, Any]] = {}
    samples: Dict[int, List[float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-llm-sel-") as d:
        dirs: Dict[int, Path] = {}
        for i, (o, r, c) in enumerate(timed):
            dest = Path(d) / f"candidate-{i}"
            try:
                _write_bundle(s, LLMRow(t.name, o.precision, dest), t, o, r, dest, device_check=False)
            except EdgekitError as e:
                c["error"] = f"bundle: {e}"
                continue
            dirs[id(c)], samples[id(c)] = dest, []
        for rnd in range(DEVICE_ROUNDS):
            for o, r, c in timed:
                if id(c) not in dirs or c.get("error"):
                    continue
                try:
                    rep = device.decode(dirs[id(c)], prompt_tokens=DEVICE_PROMPT, new_tokens=DEVICE_NEW,
                                        runs=DEVICE_RUNS)
                except EdgekitError as e:
                    c["error"] = f"timing on {name}: {e}"
                    s.progress.say(f"  [{t.name}] candidate {o.describe()}: not timed ({c['error'][:160]})")
                    continue
                samples[id(c)].append(float(rep["decode_tok_s"]))
                reports[id(c)] = rep
                c["threads"] = rep.get("threads")
    for o, r, c in timed:
        xs = sorted(samples.get(id(c)) or [])
        if xs and not c.get("error"):
            c["decode_tok_s"] = round(xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
                                      / 2, 1)
            c["device_rounds"] = [round(x, 1) for x in samples[id(c)]]
            s.progress.say(f"  [{t.name}] candidate {o.describe()}: {c['decode_tok_s']} tok/s on {name} "
                           f"({c.get('threads')} thread(s))")
    return reports


def _device_threads(device, rep: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The winner's thread count as the device's load() measured it (its probe, or its cached probe): recorded for
    the manifest, so a load on such a device takes it without probing. Nothing when the device did not measure."""
    choice = (rep or {}).get("threads_choice") or {}
    if (rep or {}).get("threads_chosen_by") not in ("probe", "cache") or not choice.get("tried"):
        return {}
    rec = {k: v for k, v in choice.items() if k != "cache"}
    rec["where"] = f"on device {device.device.name} ({device.device.target}): {choice.get('where', 'probed')}"
    return {"threads": int(choice["threads"]), "threads_choice": rec}


def _host_threads(s: _Session, t: TargetProfile, rec: Dict[str, Any], where: str) -> Dict[str, Any]:
    """The winner timed at 1, 2, 4 ... threads up to the ceiling (runtime.llmthreads: decode steps, alternating
    rounds; the intra-op spinning its bundle ships) and the count runtime.threadprobe's rule picks, for the
    manifest (load_llm takes it instead of probing). Nothing to record with a ceiling of one thread."""
    import onnxruntime_genai as og

    from edgekit.runtime import llmthreads
    from edgekit.runtime.llm import _og_model

    ceiling = _ceiling(t)
    if ceiling < 2:
        return {}
    mdir = Path(rec["dir"])
    genai = json.loads((mdir / "genai_config.json").read_text(encoding="utf-8"))
    vocab = int(genai["model"]["vocab_size"])
    ids = (rec.get("golden") or {}).get("prompts", [[]])[0][:llmthreads.PROBE_PROMPT]
    if len(ids) < llmthreads.PROBE_PROMPT:
        ids = llmthreads.probe_ids(None, vocab)
    try:
        spinning = _shipped_spinning(t)   # as the bundle ships (decode_speed timed the candidates so)
        choice, _ = llmthreads.measure(og, lambda n: _og_model(og, mdir, n, spinning), ceiling, [int(i) for i in ids],
                                       where=where.replace("decode tok/s on", "timed on", 1),
                                       capacity=kv_floor(genai))
    except RuntimeError as e:   # ORT GenAI refusing the build at some count: the load at the device probes instead
        s.progress.say(f"  [{t.name}] threads not measured ({str(e).splitlines()[0][:160]})")
        return {}
    s.progress.say(f"  [{t.name}] threads: {choice['why']}")
    return {"threads": int(choice["threads"]), "threads_choice": choice}


def _emulated_ready(progress: Progress) -> None:
    """--compat-check emulated with an arm64 CPU target: the emulated root's LLM venv built (or found) before any
    work; one line (exit 2) where it cannot be."""
    import subprocess

    from edgekit.errors import DeviceError
    from edgekit.lab import emulated as emulate

    unfit = emulate.host_unfit()
    if unfit:
        raise EdgekitError(f"--compat-check emulated: {unfit}",
                           hint="--compat-check auto records the ARM check as not done here")
    try:
        emulate.build_llm(say=progress.say)
    except (DeviceError, OSError, subprocess.SubprocessError) as e:
        raise EdgekitError(f"--compat-check emulated: no emulated arm64 root with onnxruntime-genai: {e}",
                           hint="--compat-check auto records the ARM check as not done here") from None


def kquant_odd_blocks(src: "LMSource", block: int) -> Optional[str]:
    """Why ONNX Runtime's k_quant quantizer (the model builder's, ORT 1.32) cannot build `src`'s decoder MatMuls at
    `block`, or None: it packs two 4-bit zero points a byte across a matrix's rows, so a MatMul whose input width K
    spans an odd number of blocks fails ("cannot reshape array of size 288 into shape (64,newaxis)" for K 576 at
    64: checked on single MatMuls, K 192 at 64, 576 at 64 / 128, 640 at 128, 96 / 160 at 32 fail with 3, 9 / 5, 5,
    3 / 5 blocks; K 256 at 64 builds).
    The widths: hidden_size (q, k, v, gate, up), heads x head_dim (o_proj), intermediate_size (down)."""
    d = src.dims()
    c = text_config(src.config)
    widths = {"hidden_size": d["hidden"], "heads x head_dim": d["heads"] * d["head_dim"],
              "intermediate_size": int(c.get("intermediate_size") or 0)}
    for what, k in widths.items():
        if k > 0 and (-(-k // block)) % 2:
            return f"{what} {k} is {-(-k // block)} blocks of {block}, an odd number"
    return None


def kquant_cannot_build(src: "LMSource", o: LLMBuildOptions) -> Optional[str]:
    """kquant_odd_blocks for a build the model builder quantizes with k_quant at 4 bits; None for any other."""
    return kquant_odd_blocks(src, o.block_size) if o.precision == "int4" and o.algo == "k_quant" else None


def convert_llm(recipe: LLMRecipe, out: str = "build", *, progress: Optional[Progress] = None,
                device=None) -> LLMConvertResult:
    """Build, measure and write an LLM bundle per target of `recipe` under `out`. `device`: with select
    "fastest", a deploy.timing.DeviceTimer (handed in by the CLI) that times its target's candidates on the device.

    Raises BudgetMissed (exit 1) after writing what passed when a row missed the floor or failed to build;
    EdgekitError (exit 2) for a user's mistake, before any work."""
    progress = progress or Progress(enabled=False)
    targets = [load_target(n) for n in recipe.targets]
    src = read_source(recipe.model)
    if recipe.val is not None and not Path(recipe.val).is_file():
        from edgekit.errors import DataError
        raise DataError("held-out text not found", path=recipe.val, hint="--val takes a UTF-8 .txt file")
    plans = [(t, profile_options(t, recipe)) for t in targets]
    for t, o in plans:   # a block ORT's k_quant cannot pack: edgekit packs the same rounding itself (said)
        why = kquant_cannot_build(src, o)
        if why:
            progress.say(f"[{t.name}] {o.precision} block {o.block_size}: {why}, which ONNX Runtime's k-quant "
                         "cannot pack (4-bit zero points two a byte across rows): edgekit rounds and packs the "
                         f"decoder MatMuls itself (the builder's at block {o.builder_block(src)})")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgekitError(f"{out_dir}: exists and is not a directory", hint="choose another --out")
    if recipe.compat_check == "emulated" and any(t.device.arch == "aarch64" and o.execution_provider == "cpu"
                                                 for t, o in plans):
        _emulated_ready(progress)
    for t, o in plans:   # a profile's own precision (no --precision): the rows it does not apply to say so
        if recipe.algo and calibrated(recipe.algo) and o.algo != recipe.algo:
            progress.say(f"[{t.name}] {o.precision}: algo {recipe.algo} is calibrated INT4 rounding, not applied "
                         f"(built {o.algo})")
    name = recipe.bundle_name
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}.convert.log"
    # the log is written under a temporary name and renamed into place with the report: a run that ends early
    # leaves an earlier run's log (the one its NAME.convert.json names) as it was
    work_log = out_dir / f".{name}.convert.log.tmp-{os.getpid()}"
    import torch

    threads = torch.get_num_threads()   # the float model sets its own (free cores); put back afterwards
    written: List[Path] = []   # bundles this run finished writing (a multi-target run, or Ctrl-C while cleaning up)
    try:
        result = _convert(recipe, src, plans, out_dir, name, work_log, progress, device, written)
    except KeyboardInterrupt as e:
        # Ctrl-C: the step in progress goes (bundles are staged beside their destination and removed by staged_dir
        # as the exception passes). Bundles already finished stay: this run's log stays with them as NAME's log, and
        # an earlier run's report, which no longer describes them, goes. Nothing finished: as a refusal, below.
        e.kept = [str(p) for p in written]
        if written:
            os.replace(work_log, log_path)
            (out_dir / f"{name}.convert.json").unlink(missing_ok=True)
        else:
            work_log.unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
        raise
    except EdgekitError:
        # a user's problem that ends the run (the float model unreadable, too little memory for the builder): its
        # half-written log goes, and the --out folder this run made where nothing else is in it
        work_log.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    finally:
        torch.set_num_threads(threads)
        if work_log.exists():   # the run's log, in place (a bug's too: beside its traceback)
            os.replace(work_log, log_path)
    result.log_path = log_path
    result.report_path = out_dir / f"{name}.convert.json"
    write_json_atomic(result.report_path, result.to_dict())
    if result.failed:
        worst = result.failed[0]
        raise BudgetMissed(f"{len(result.failed)} of {len(result.bundles)} language-model bundle(s) not written: "
                           f"{worst.path.name}: {worst.reason}", result=result,
                           hint=f"report {result.report_path}, log {log_path}" + _failure_hint(worst))
    return result


def _failure_hint(row: LLMRow) -> str:
    """What to do about a row that was not written (BudgetMissed's hint, after the report and the log), by the
    stage it failed at (LLMRow.stage)."""
    if row.stage == "budget" or "the budget's" in row.reason:
        return "; raise --max-mb, or loosen the floor"
    if row.stage == "fidelity":
        return "; loosen the floor (--max-ppl-increase, --max-kl, --min-agreement) or use --precision int8"
    if row.stage == "build":
        return (": the log holds the builder's traceback (an architecture or configuration this onnxruntime-genai "
                "builder does not handle)")
    if row.stage == "generation":
        return ("; the build met the floor, but a short greedy generation with ONNX Runtime GenAI decoded to no "
                "text: the reason lists its token ids (an end-of-text id first, or ids the tokenizer decodes to "
                "nothing: check the folder's tokenizer files and generation_config.json)")
    return ""   # compatibility (the reason says what ARM's kernels did), or writing the files (the reason)


def _convert(recipe: LLMRecipe, src: LMSource, plans, out_dir: Path, name: str, log_path: Path,
             progress: Progress, device=None, written: Optional[List[Path]] = None) -> LLMConvertResult:
    with tempfile.TemporaryDirectory(prefix="edgekit-llm-") as wd, open(log_path, "w", encoding="utf-8") as log:
        log.write(f"edgekit {edgekit.__version__} convert {recipe.model} (language model)\n")
        s = _Session(recipe, src, Path(wd), progress, log)
        # every build's RoPE caches cut to the longest context a target's bundle has (_write_bundle cuts each to its
        # own): the byte budget and the ladder judge builds of the size they ship at (Llama-3.2-1B: 33.5 MB less)
        s.rope_rows = max(src.context(t) for t, _ in plans)
        result = LLMConvertResult(name, recipe.to_dict(), {"path": str(src.path), "sha256": src.sha256,
                                                           "bytes": src.bytes, "architecture": src.architecture},
                                  s.text.source, recipe.floor, log_path=log_path)
        for i, (t, opts) in enumerate(plans):
            s.keep_for = [recipe.floor_for(o.precision) for _, o in plans[i:]]   # Session.sweep: this row's, later
            dest = out_dir / f"{name}-{t.name}-{opts.precision}"
            row = LLMRow(t.name, opts.precision, dest)
            t0 = time.monotonic()
            progress.say(f"[{t.name}] {opts.precision}: {opts.describe()}")
            found = _walk(s, row, opts)
            if found is None:
                last = next((st for st in reversed(row.rescue) if st.get("misses") or st.get("error")), row.rescue[-1])
                first = row.rescue[0]
                misses = first.get("misses") or []
                row.stage = ("budget" if misses and all("budget" in x for x in misses) else
                             "fidelity" if misses else "build")
                row.reason = ({"budget": "over the byte budget: ", "fidelity": "below the floor: ",
                               "build": "build failed: "}[row.stage]
                              + "; ".join(first.get("misses") or [first.get("error") or "?"])
                              + ("" if len(row.rescue) == 1 else f" (ladder: {len(row.rescue) - 1} rung(s), "
                                 f"none met it; last: {'; '.join(last.get('misses') or [last.get('error') or '?'])})"))
                prof = s.builds.get(opts, {})
                row.fidelity = dict(prof.get("metrics") or {})
            else:
                chosen, rec = found
                if recipe.select == "fastest":
                    chosen, rec = _select_fastest(s, row, t, chosen, rec, device)
                    if chosen.precision != opts.precision:
                        dest = out_dir / f"{name}-{t.name}-{chosen.precision}"
                        row.path = dest
                row.options, row.ok = chosen, True
                row.precision = chosen.precision
                # the rung whose build ships (a budget walk may fall back to an earlier one)
                shipped = [st for st in row.rescue if st.get("options") == dataclasses.asdict(chosen)]
                rung = shipped[-1]["rung"] if shipped else row.rescue[-1]["rung"]
                if len(row.rescue) > 1 and rung != "profile":
                    row.rescued_by = rung
                    dest = out_dir / f"{name}-{t.name}-{chosen.precision}" if chosen.precision != opts.precision \
                        else dest
                    row.path = dest
                row.fidelity = dict(rec["metrics"])
                try:
                    _write_bundle(s, row, t, chosen, rec, dest)
                except EdgekitError as e:   # the stage it failed at (BundleWriteError, compat's ConversionError)
                    row.ok, row.reason, row.stage = False, str(e), getattr(e, "stage", None) or "bundle"
                else:
                    if written is not None:
                        written.append(dest)
            row.seconds = time.monotonic() - t0
            s.keep_for = s.keep_for[1:]   # this row's builds are written or failed: those no later row takes go
            s.sweep()
            result.bundles.append(row)
            progress.say(f"[{t.name}] " + (f"wrote {row.path}" if row.ok else f"FAILED: {row.reason}"))
    return result
