"""This machine's CPU, and the ggml build variants that may run on it, best first.

A ``GGML_NATIVE`` build uses every instruction set ``/proc/cpuinfo`` lists, but a listed
set is not always one a program can execute: on some Intel Xeon VMs the AMX flags are
listed and the vendored ggml's AMX kernels die with SIGILL on the first inference
(``tinygemm_kernel_amx`` at ``tilezero``). So provisioning builds the best variant first,
proves it by generating tokens, and falls back down this list when it faults — as
llama.cpp's own release builds ship one CPU backend per instruction-set level
(``GGML_CPU_ALL_VARIANTS``) and pick one at run time.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One way to compile ggml's CPU backend."""

    name: str
    cmake_flags: tuple[str, ...]
    description: str


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel lists (``flags`` on x86, ``Features`` on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def machine_key() -> str:
    """What a build's fitness depends on: architecture, CPU flags and kernel. Builds are
    cached under it, and a variant that faulted is remembered under it."""
    raw = " ".join([platform.machine(), platform.release(), *sorted(cpu_flags())])
    return f"{platform.machine()}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


def boot_id() -> str:
    """Changes at every boot: a binary is proven again on a machine that booted anew
    (the same disk may come back on another host with the same CPU flags)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


# ggml's x86 options and the cpuinfo flags each needs (all of them).
_X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
# x86-64-v3 (Haswell and later, every AMD EPYC): what llama.cpp's "haswell" variant uses.
_X86_64_V3 = frozenset({"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"})
_AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def _explicit(enabled: set[str]) -> tuple[str, ...]:
    """cmake flags for a non-native build with exactly ``enabled`` on."""
    names = [name for name, _ in _X86_OPTIONS] + list(_AMX)
    return ("-DGGML_NATIVE=OFF", *(f"-D{n}={'ON' if n in enabled else 'OFF'}" for n in names))


def variants(flags: frozenset[str] | None = None, machine: str | None = None) -> list[Variant]:
    """Build variants for this machine, best first; each later one assumes less."""
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine() if machine is None else machine
    native = Variant("native", ("-DGGML_NATIVE=ON",), "tuned to this CPU (GGML_NATIVE)")
    generic = Variant(
        "generic", _explicit(set()) if machine in ("x86_64", "AMD64") else ("-DGGML_NATIVE=OFF",),
        "no optional instruction sets",
    )
    if machine not in ("x86_64", "AMD64"):
        return [native, generic]
    listed = {name for name, need in _X86_OPTIONS if all(f in flags for f in need)}
    out = [native]
    if any(f.startswith("amx") for f in flags):
        out.append(Variant(
            "no-amx", _explicit(listed),
            "every instruction set this CPU lists except AMX (" + _short(listed) + ")",
        ))
    v3 = listed & _X86_64_V3
    if v3 == _X86_64_V3 and v3 != listed:
        out.append(Variant("x86-64-v3", _explicit(set(v3)), "AVX2, FMA, F16C, BMI2 (x86-64-v3)"))
    out.append(generic)
    return out


def _short(enabled: set[str]) -> str:
    order = [name for name, _ in _X86_OPTIONS if name in enabled]
    return ", ".join(n.removeprefix("GGML_") for n in order) or "none"
