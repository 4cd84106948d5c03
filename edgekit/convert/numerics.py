"""Whose numerics are these? Where an artifact's figures and golden outputs are computed faithfully.

Every figure convert reports, and every golden output it writes, must be what the target
computes, not what this host happens to compute (DESIGN.md, "Numerics").

ONNX Runtime's x86 integer kernels without VNNI multiply u8 x s8 with VPMADDUBSW, whose int16
pair sums saturate unless the weights are 7-bit (reduce_range) and the activations unsigned.
ARM (NEON widening multiplies, sdot), VNNI (VPDPBUSD) and TensorRT accumulate exactly in int32.
So an INT8 ONNX artifact is measured:

- with this host's kernels, where they compute what the target computes: the host has exact
  integer arithmetic (VNNI, or an ARM host) and so has the target, or the build cannot saturate
  (U8 activations x 7-bit weights) on either;
- otherwise both ways: with this host's kernels, and with the graph as written (ONNX Runtime with
  graph optimizations off: dequantize, float op, quantize; integer matmuls exact), and the run
  closer to the float model is kept (convert.measure). Each is a lower bound of the target's
  fidelity: saturation only loses precision, and the graph as written requantizes between ops
  where the target's fused integer kernels do not (PaddleOCR's classifier for rpi4: 21.5 dB as
  written, 46.6 dB fused; a Keras separable CNN: 42.3 dB as written, 10.1 dB on this host's
  saturating kernels). The manifest records both runs and which was kept.

TFLite artifacts run on this host's TFLite kernels. x86 and ARM TFLite kernels round a little
differently (ResNet-8: up to 19 int8 steps on the softmax, every top-1 the same); the golden
check's SNR/agreement tolerance covers that, and the compatibility check runs the target's own
ARM kernels in the emulated root where it is built.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from typing import FrozenSet, Optional

from edgekit.runtime.check import X86, cpu_flags, exact_int8
from edgekit.targets import OnnxBuild, TargetProfile



@dataclass(frozen=True)
class Host:
    arch: str                       # x86_64 | aarch64 | ...
    flags: FrozenSet[str]

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in X86

    @property
    def exact_int8(self) -> bool:
        """Integer dot products without int16 saturation: any non-x86 CPU, or x86 with VNNI."""
        return exact_int8(self.arch, self.flags)

    def describe(self) -> str:
        if not self.is_x86:
            return self.arch
        return f"{self.arch} {'with VNNI' if self.exact_int8 else 'AVX2 without VNNI'}"


@lru_cache(maxsize=1)
def this_host() -> Host:
    return Host(platform.machine().lower(), cpu_flags())


def target_exact_int8(profile: TargetProfile) -> bool:
    return exact_int8(profile.device.arch, profile.device.cpu_features)


def saturation_safe(build: OnnxBuild) -> bool:
    """A build whose int16 pair sums cannot saturate on VPMADDUBSW: u8 activations, 7-bit weights;
    or u8 x u8 (uint8 weights), which ONNX Runtime multiplies with widening 16-bit madds, exactly.
    (Dynamic quantization always quantizes activations to u8 at run time.)"""
    u8 = build.activation_type == "uint8" or getattr(build, "dynamic", False)
    return u8 and ((build.weight_type == "int8" and build.reduce_range) or build.weight_type == "uint8")


@dataclass(frozen=True)
class Numerics:
    mode: str            # "host" | "reference"
    why: str
    warning: Optional[str] = None

    @property
    def reference(self) -> bool:
        return self.mode == "reference"

    def to_dict(self):
        d = {"mode": self.mode, "why": self.why}
        if self.warning:
            d["warning"] = self.warning
        return d


def for_onnx(profile: TargetProfile, build: OnnxBuild, host: Optional[Host] = None) -> Numerics:
    """How to compute an ONNX artifact's figures and golden outputs faithfully for `profile`."""
    host = host or this_host()
    if build.fp16 or (build.activation_type not in ("int8", "uint8") and not getattr(build, "dynamic", False)):
        return Numerics("host", f"{'FP16' if build.fp16 else build.activation_type + ' activations'}: "
                                "no 8-bit integer dot products, so no ISA-dependent saturation")
    target_exact = target_exact_int8(profile)
    safe = saturation_safe(build)
    if not target_exact and not safe:
        return Numerics("reference", "exact integer arithmetic (the graph's integer ops computed exactly)",
                        warning=f"{profile.name} has no VNNI and this build ({build.activation_type} "
                                "activations, reduce_range "
                                f"{'on' if build.reduce_range else 'off'}) can saturate there; the device may "
                                "compute less accurate results than these figures (use uint8 activations "
                                "with reduce_range for AVX2 targets)")
    if host.exact_int8 or safe:
        why = ("this host's kernels are exact (" + host.describe() + ")" if host.exact_int8 else
               f"u8 activations x {'u8' if build.weight_type == 'uint8' else '7-bit'} weights cannot saturate, "
               "on this host or the target")
        return Numerics("host", why)
    return Numerics("reference", f"this host ({host.describe()}) can saturate where {profile.name} computes "
                                 "exactly: measured with this host's kernels and with the graph as written "
                                 "(unfused, integer products exact)")
