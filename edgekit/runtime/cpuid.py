"""x86 SIMD features as the CPU's CPUID instruction reports them: what ONNX Runtime's MLAS dispatches on.

/proc/cpuinfo's flags come from the kernel's view of the CPU and usually agree; where they do not, the
kernels follow CPUID. Under qemu-user (`qemu-x86_64 -cpu Haswell`, how the suite runs ONNX Runtime's AVX2
kernels on a VNNI machine) /proc/cpuinfo is the real host's file while CPUID is the emulated CPU's; a
hypervisor can also hide a feature in CPUID that a stale flags line still names. So `simd_flags()` reads
CPUID (and XCR0: AVX and AVX-512 need the OS to save their registers) by running the instruction itself,
a few bytes of machine code in an executable page. Where no such page can be made (a hardened kernel that
refuses writable+executable memory) or the CPU is not x86-64, it returns None and the caller keeps
/proc/cpuinfo's flags.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from functools import lru_cache
from typing import Dict, FrozenSet, Optional, Tuple

# void cpuid(uint32 leaf, uint32 subleaf, uint32 out[4])   (System V AMD64: edi, esi, rdx)
_CPUID = bytes([
    0x53,                    # push rbx
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])
# uint64 xgetbv0(void)
_XGETBV = bytes([
    0x31, 0xC9,              # xor ecx, ecx
    0x0F, 0x01, 0xD0,        # xgetbv
    0x48, 0xC1, 0xE2, 0x20,  # shl rdx, 32
    0x48, 0x09, 0xD0,        # or rax, rdx
    0xC3,                    # ret
])

# (leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit) -> /proc/cpuinfo's name
_BITS: Dict[str, Tuple[int, int, int, int]] = {
    "sse4_1": (1, 0, 2, 19), "sse4_2": (1, 0, 2, 20), "fma": (1, 0, 2, 12), "f16c": (1, 0, 2, 29),
    "avx": (1, 0, 2, 28),
    "avx2": (7, 0, 1, 5), "avx512f": (7, 0, 1, 16), "avx512dq": (7, 0, 1, 17), "avx512bw": (7, 0, 1, 30),
    "avx512vl": (7, 0, 1, 31), "avx512_vnni": (7, 0, 2, 11), "amx_tile": (7, 0, 3, 24),
    "amx_int8": (7, 0, 3, 25), "avx512_fp16": (7, 0, 3, 23),
    "avx_vnni": (7, 1, 0, 4), "avx_vnni_int8": (7, 1, 3, 4),
}
_NEEDS_AVX_STATE = {"avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8"}
_OSXSAVE = (1, 0, 2, 27)
# every name above: the caller replaces these in /proc/cpuinfo's set by what CPUID says
NAMES: FrozenSet[str] = frozenset(_BITS)


class _Code:
    """A function of raw machine code in its own executable page (kept alive with the object)."""

    def __init__(self, code: bytes, restype, *argtypes):
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.fn = ctypes.CFUNCTYPE(restype, *argtypes)(addr)


@lru_cache(maxsize=1)
def simd_flags() -> Optional[FrozenSet[str]]:
    """The names in NAMES this CPU has and the OS enables, by CPUID and XCR0; None where CPUID cannot be run
    here (not x86-64, or no writable+executable page)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        cpuid = _Code(_CPUID, None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))
        xgetbv = _Code(_XGETBV, ctypes.c_uint64)
    except (OSError, ValueError, TypeError):   # mmap refused PROT_EXEC (SELinux execmem, PaX) or no mmap.PROT_EXEC
        return None
    regs: Dict[Tuple[int, int], Tuple[int, ...]] = {}

    def reg(leaf: int, sub: int) -> Tuple[int, ...]:
        if (leaf, sub) not in regs:
            out = (ctypes.c_uint32 * 4)()
            cpuid.fn(leaf, sub, ctypes.byref(out))
            regs[(leaf, sub)] = tuple(out)
        return regs[(leaf, sub)]

    max_leaf = reg(0, 0)[0]
    max_sub7 = reg(7, 0)[0] if max_leaf >= 7 else 0

    def has(leaf: int, sub: int, r: int, bit: int) -> bool:
        if leaf > max_leaf or (leaf == 7 and sub > max_sub7):
            return False
        return bool(reg(leaf, sub)[r] >> bit & 1)

    xcr0 = int(xgetbv.fn()) if has(*_OSXSAVE) else 0
    avx_state = xcr0 & 0x6 == 0x6              # SSE + AVX registers saved by the OS
    avx512_state = avx_state and xcr0 & 0xE0 == 0xE0   # opmask, ZMM0-15 high halves, ZMM16-31
    amx_state = xcr0 & 0x60000 == 0x60000      # XTILECFG + XTILEDATA
    found = set()
    for name, where in _BITS.items():
        if not has(*where):
            continue
        if name.startswith("avx512") and not avx512_state:
            continue
        if name.startswith("amx") and not amx_state:
            continue
        if name in _NEEDS_AVX_STATE and not avx_state:
            continue
        found.add(name)
    return frozenset(found)


def cpu_flags() -> FrozenSet[str]:
    """This CPU's feature flags: /proc/cpuinfo's (x86 'flags', ARM 'Features'), with the x86 SIMD ones in NAMES
    as CPUID reports them where it can be read (simd_flags); empty where neither can be read, which counts as a
    host without VNNI (the safe side)."""
    flags: FrozenSet[str] = frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip().lower() in ("flags", "features"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = simd_flags()
    return flags if simd is None else (flags - NAMES) | simd
