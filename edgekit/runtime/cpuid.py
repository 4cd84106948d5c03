"""x86 SIMD features as the CPU's CPUID instruction reports them: what ONNX Runtime's MLAS dispatches on.

/proc/cpuinfo's flags come from the kernel's view of the CPU and usually agree; where they do not, the
kernels follow CPUID. Under qemu-user (`qemu-x86_64 -cpu Haswell`, how the suite runs ONNX Runtime's AVX2
kernels on a VNNI machine) /proc/cpuinfo is the real host's file while CPUID is the emulated CPU's; a
hypervisor can also hide a feature in CPUID that a stale flags line still names. So `simd_flags()` reads
CPUID (and XCR0: AVX and AVX-512 need the OS to save their registers) by running the instruction itself,
a few bytes of machine code written into a fresh page that is then made read+execute (mprotect). Where that
cannot be done (a hardened kernel that refuses to make a written page executable, a Python without ctypes),
or this is not a 64-bit x86 Python on Linux (an ARM device never tries), it returns None and the caller
keeps /proc/cpuinfo's flags.
"""

from __future__ import annotations

import os
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
# /proc/cpuinfo's other names of these families (avx512_bf16, amx_bf16, avx_ifma, ...), which CPUID is not asked
# about, are kept only where CPUID has the family's base feature: under an emulator they are the real host's
FAMILIES = (("avx512", "avx512f"), ("amx", "amx_tile"), ("avx_", "avx_vnni"))


class _Code:
    """A function of raw machine code in its own page: written while read+write, then made read+execute (never
    writable and executable at once); the page lives as long as the object."""

    def __init__(self, ctypes, mmap, libc, code: bytes, restype, *argtypes):
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._page.write(code)
        self._buf = ctypes.c_char.from_buffer(self._page)
        addr = ctypes.addressof(self._buf)
        if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(mmap.PAGESIZE), mmap.PROT_READ | mmap.PROT_EXEC):
            raise OSError(ctypes.get_errno(), "mprotect(PROT_READ | PROT_EXEC) refused")
        self.fn = ctypes.CFUNCTYPE(restype, *argtypes)(addr)


@lru_cache(maxsize=1)
def simd_flags() -> Optional[FrozenSet[str]]:
    """The names in NAMES this CPU has and the OS enables, by CPUID and XCR0; None where CPUID cannot be run
    here (not a 64-bit x86 Python on Linux, no ctypes, or a kernel that refuses an executable page)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix" or platform.system() != "Linux":
        return None
    try:
        import ctypes
        import mmap
    except ImportError:          # a minimal device Python without ctypes
        return None
    if ctypes.sizeof(ctypes.c_void_p) != 8:      # a 32-bit Python on a 64-bit kernel: this code is 64-bit
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        cpuid = _Code(ctypes, mmap, libc, _CPUID, None, ctypes.c_uint32, ctypes.c_uint32,
                      ctypes.POINTER(ctypes.c_uint32 * 4))
        xgetbv = _Code(ctypes, mmap, libc, _XGETBV, ctypes.c_uint64)
    except (OSError, AttributeError):   # no executable page (SELinux execmem, PaX MPROTECT), no libc mprotect
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
    if simd is None:
        return flags

    def kept(flag: str) -> bool:
        return flag not in NAMES and all(base in simd for prefix, base in FAMILIES if flag.startswith(prefix))

    return frozenset(f for f in flags if kept(f)) | simd
