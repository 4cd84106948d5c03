"""Target profiles: data files validated into frozen dataclasses.

A profile says what a device class is (arch, CPU, memory, accelerator) and what
to build for it (formats in order of preference, quantization scheme, threads,
execution providers). Each hardware-driven choice carries its reason as a
sibling key `<key>_why`. Unknown keys and wrong types are errors that name the
file and the key.

Shipped profiles live in the `edgekit.profiles` package (the repository's
`targets/` directory); a user profile is a path to a .toml file.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from edgekit.errors import TargetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older device images only
    import tomli as tomllib

# --- schema -----------------------------------------------------------------
# Each section: key -> (type, allowed values or None, default). `...` as default: required.
_STR, _INT, _BOOL, _STRS = "string", "integer", "boolean", "list of strings"

_SCHEMA: Dict[str, Dict[str, Tuple[str, Optional[Tuple[Any, ...]], Any]]] = {
    "": {
        "name": (_STR, None, ...),
        "description": (_STR, None, ...),
    },
    "device": {
        "arch": (_STR, ("x86_64", "aarch64", "armv7l"), ...),
        "cpu": (_STR, None, ...),
        "cpu_features": (_STRS, None, ()),
        "cores": (_INT, None, ...),
        "memory_mb": (_INT, None, ...),
        "accelerator": (_STR, None, "none"),
        "os": (_STR, None, ""),
        "limitations": (_STRS, None, ()),
    },
    "build": {
        "formats": (_STRS, ("tflite", "onnx"), ...),
    },
    "tflite": {
        "io_type": (_STR, ("int8", "uint8", "float32"), "int8"),
        "per_channel": (_BOOL, None, True),
        "activations": (_STR, ("int8", "int16", "float16", "dynamic"), "int8"),
    },
    "onnx": {
        "quant_format": (_STR, ("qdq", "qoperator"), "qdq"),
        "activation_type": (_STR, ("int8", "uint8", "int16"), "uint8"),
        "weight_type": (_STR, ("int8", "uint8"), "int8"),
        "per_channel": (_BOOL, None, True),
        "reduce_range": (_BOOL, None, False),
        "symmetric_activations": (_BOOL, None, False),
        "symmetric_weights": (_BOOL, None, True),
        "opset": (_INT, None, 17),
        "fp16_allowed": (_BOOL, None, False),
        "fp16": (_BOOL, None, False),
        "dynamic": (_BOOL, None, False),
        "calibration": (_STR, ("minmax", "percentile", "entropy"), "minmax"),
        "uint8_weights_cost_pct": (_INT, None, None),
    },
    "runtime": {
        "threads": (_INT, None, ...),
        "execution_providers": (_STRS, None, ("CPUExecutionProvider",)),
        "min_runtime": (_STRS, None, ()),
    },
    # language models (edgekit.convert.llm: ONNX Runtime GenAI's model builder)
    "llm": {
        "precision": (_STR, ("int4", "int8", "fp16", "fp32"), "int4"),
        "execution_provider": (_STR, ("cpu", "cuda"), "cpu"),
        "block_size": (_INT, (16, 32, 64, 128, 256), 32),
        "accuracy_level": (_INT, (0, 1, 2, 3, 4), 4),
        "algo": (_STR, ("default", "rtn", "k_quant", "awq", "gptq", "awq_gptq"), "k_quant"),
        "wide_layers": (_STRS, ("lm_head", "embeddings"), ("lm_head", "embeddings")),
        "kv_cache_type": (_STR, ("float32", "float16"), None),   # None: the build's (LLMBuild.kv_type)
        "context_default": (_INT, None, 2048),
        "context_max": (_INT, None, 4096),
        "verified": (_BOOL, None, True),
        "intra_op_spinning": (_BOOL, None, True),
    },
}

_KNOWN_PROVIDERS = (
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
    "XnnpackExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider",
    "OpenVINOExecutionProvider", "DnnlExecutionProvider",
)


@dataclass(frozen=True)
class DeviceSpec:
    arch: str
    cpu: str
    cores: int
    memory_mb: int
    cpu_features: Tuple[str, ...] = ()
    accelerator: str = "none"
    os: str = ""
    limitations: Tuple[str, ...] = ()


@dataclass(frozen=True)
class TFLiteBuild:
    io_type: str = "int8"
    per_channel: bool = True
    activations: str = "int8"


@dataclass(frozen=True)
class OnnxBuild:
    quant_format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    opset: int = 17
    fp16_allowed: bool = False
    fp16: bool = False             # build an FP16 model instead of INT8 (needs fp16_allowed)
    dynamic: bool = False          # weights INT8, activations quantized at run time (quantize_dynamic)
    calibration: str = "minmax"    # ONNX Runtime's calibration method (the rescue ladder tries others)
    # p50 of a uint8-weights (u8 x u8) build over this profile's build on the target's CPUs, in percent,
    # as measured there (None: not known); convert.faithful weighs fidelity against it where it cannot time
    uint8_weights_cost_pct: Optional[int] = None

    def __post_init__(self) -> None:
        if self.fp16 and not self.fp16_allowed:
            raise ValueError("onnx.fp16 needs onnx.fp16_allowed (a GPU target)")
        if self.symmetric_activations and self.activation_type == "uint8":
            raise ValueError("symmetric_activations needs activation_type = \"int8\" "
                             "(a symmetric uint8 range wastes half the codes)")


@dataclass(frozen=True)
class RuntimeSpec:
    threads: int
    execution_providers: Tuple[str, ...] = ("CPUExecutionProvider",)
    min_runtime: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        unknown = [p for p in self.execution_providers if p not in _KNOWN_PROVIDERS]
        if unknown:
            raise ValueError(f"unknown execution provider {unknown[0]!r}; known: "
                             + ", ".join(_KNOWN_PROVIDERS))


@dataclass(frozen=True)
class LLMBuild:
    """How a language model is built for the target (ONNX Runtime GenAI's model builder)."""

    precision: str = "int4"            # the default --precision for a language model
    execution_provider: str = "cpu"    # the builder's -e: cpu (MLAS MatMulNBits) or cuda
    block_size: int = 32               # INT4/INT8 weight block (MatMulNBits block_size)
    accuracy_level: int = 4            # MatMulNBits compute: 4 = int8 activations, 1 = fp32, 2 = fp16, 0 = EP default
    algo: str = "k_quant"              # weight rounding: default / rtn (round to nearest), k_quant (llama.cpp's)
    wide_layers: Tuple[str, ...] = ("lm_head", "embeddings")   # kept at 8 bits (lm_head) / never 4 (embeddings)
    kv_cache_type: Optional[str] = None   # the KV cache's element type: the builder's I/O type (kv_type; None: it)
    context_default: int = 2048        # the context a runtime opens by default (tokens)
    context_max: int = 4096            # the longest context the profile allows (memory)
    verified: bool = True              # False: the path was not run on such a device (said in the manifest)
    intra_op_spinning: bool = True     # ORT's intra-op threads busy-wait between ops (genai_config session option)

    def __post_init__(self) -> None:
        if self.context_default < 1 or self.context_max < self.context_default:
            raise ValueError("llm.context_default must be at least 1 and at most llm.context_max")
        if self.kv_cache_type is None:
            object.__setattr__(self, "kv_cache_type", self.kv_type())
        if self.kv_cache_type != self.kv_type():
            raise ValueError(f"llm.kv_cache_type: a {self.execution_provider} build at {self.precision} keeps its KV "
                             f"cache in {self.kv_type()} (the model builder's I/O type: float32 on the CPU and at "
                             "fp32, float16 for CUDA at int4, int8 and fp16)")

    def kv_type(self, precision: Optional[str] = None) -> str:
        """The KV cache's element type of a build at `precision` (default: the profile's) for this execution
        provider: the model builder's I/O type (onnxruntime-genai 0.18, quantization.default_io_dtype: float32 for
        the CPU's int4 / int8 and for fp32; float16 otherwise, so CUDA's int4, int8 and fp16). A --precision other
        than the profile's may change it (CUDA at fp32: float32)."""
        precision = precision or self.precision
        return "float32" if self.execution_provider == "cpu" or precision == "fp32" else "float16"


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    device: DeviceSpec
    formats: Tuple[str, ...]
    tflite: TFLiteBuild
    onnx: OnnxBuild
    runtime: RuntimeSpec
    reasons: Mapping[str, str] = field(default_factory=dict)
    llm: LLMBuild = field(default_factory=LLMBuild)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("build.formats must name at least one format")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("build.formats lists a format twice")

    def to_dict(self) -> Dict[str, Any]:
        """The profile as plain data (copied in full into each bundle's manifest)."""
        d = dataclasses.asdict(self)
        d["reasons"] = dict(self.reasons)
        return d

    def reason(self, key: str) -> str:
        return self.reasons.get(key, "")


# --- loading ----------------------------------------------------------------

def _profiles_dir() -> Path:
    """Where the shipped profiles are: the installed package, or the source checkout."""
    try:
        import edgekit.profiles as pkg  # the repository's targets/ directory, mapped at install

        paths = list(getattr(pkg, "__path__", []))
        if paths:
            return Path(paths[0])
    except ImportError:
        pass
    return Path(__file__).resolve().parent.parent / "targets"


def builtin_names() -> List[str]:
    return sorted(p.stem for p in _profiles_dir().glob("*.toml"))


def _check_type(kind: str, value: Any) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


def _section(data: Mapping[str, Any], section: str, path: str,
             reasons: Dict[str, str]) -> Dict[str, Any]:
    schema = _SCHEMA[section]
    out: Dict[str, Any] = {}
    prefix = f"{section}." if section else ""
    for key, value in data.items():
        if section == "" and key in _SCHEMA and key:
            continue  # a sub-table, handled by its own section
        full = prefix + key
        if key.endswith("_why"):
            base = key[: -len("_why")]
            if base not in schema:
                raise TargetError(f"reason given for unknown key '{base}'", path=path, key=full)
            if not isinstance(value, str):
                raise TargetError("a reason must be a string", path=path, key=full)
            reasons[prefix + base] = value
            continue
        if key not in schema:
            valid = ", ".join(sorted(schema)) if schema else "(none)"
            if section == "":
                valid += ", " + ", ".join(s for s in _SCHEMA if s)
            raise TargetError(f"unknown key (valid keys here: {valid})", path=path, key=full)
        kind, choices, _default = schema[key]
        if not _check_type(kind, value):
            raise TargetError(f"expected a {kind}, got {type(value).__name__} {value!r}",
                              path=path, key=full)
        if choices is not None:
            values = value if isinstance(value, list) else [value]
            for v in values:
                if v not in choices:
                    raise TargetError(f"{v!r} is not one of: " + ", ".join(map(str, choices)),
                                      path=path, key=full)
        out[key] = tuple(value) if isinstance(value, list) else value
    for key, (_kind, _choices, default) in schema.items():
        if key not in out:
            if default is ...:
                raise TargetError("required key is missing", path=path, key=prefix + key)
            out[key] = default
    return out


def parse_profile(text: str, path: str) -> TargetProfile:
    """Validate TOML text into a TargetProfile; errors name `path` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"not valid TOML: {e}", path=path) from None
    reasons: Dict[str, str] = {}
    top = _section(data, "", path, reasons)
    sections: Dict[str, Dict[str, Any]] = {}
    for name in _SCHEMA:
        if not name:
            continue
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise TargetError("expected a table", path=path, key=name)
        sections[name] = _section(raw, name, path, reasons)
    try:
        return TargetProfile(
            name=top["name"],
            description=top["description"],
            device=DeviceSpec(**sections["device"]),
            formats=sections["build"]["formats"],
            tflite=TFLiteBuild(**sections["tflite"]),
            onnx=OnnxBuild(**sections["onnx"]),
            runtime=RuntimeSpec(**sections["runtime"]),
            llm=LLMBuild(**sections["llm"]),
            reasons=reasons,
            source=path,
        )
    except ValueError as e:
        raise TargetError(str(e), path=path) from None


def load_target(name_or_path: str) -> TargetProfile:
    """A shipped profile by name (`rpi4`) or a user profile by path (`boards/my.toml`)."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise TargetError(f"target profile file not found: {name_or_path}",
                              hint="give a path to a .toml profile or one of: "
                              + ", ".join(builtin_names()))
        return parse_profile(p.read_text(encoding="utf-8"), str(p))
    path = _profiles_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise TargetError(f"unknown target '{name_or_path}'",
                          hint="valid targets: " + ", ".join(builtin_names())
                          + "; or give a path to your own .toml profile")
    profile = parse_profile(path.read_text(encoding="utf-8"), str(path))
    if profile.name != name_or_path:
        raise TargetError(f"profile names itself '{profile.name}'", path=str(path), key="name")
    return profile


def all_targets() -> List[TargetProfile]:
    return [load_target(n) for n in builtin_names()]
