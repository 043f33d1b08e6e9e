"""What this CPU is: its vendor, model name and feature flags, read once from /proc/cpuinfo.

The matmul libraries are chosen by them (distgpt/blas.py: MKL on Intel; distgpt/gemm16.py: which
bf16 gemm uses AVX512-BF16 or AMX-BF16), and the benchmarks print them. Every reader goes through
`this_cpu()`, so a test can hand the choosers a pretended `Cpu` instead of the real one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

INTEL = "GenuineIntel"
AMD = "AuthenticAMD"


@dataclass(frozen=True)
class Cpu:
    vendor: str = ""                    # /proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD, ...
    model: str = ""                     # its model name
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def intel(self) -> bool:
        return self.vendor == INTEL


def parse(text: str) -> Cpu:
    """The first processor's entry of a /proc/cpuinfo text (they are alike on the machines we run);
    fields this architecture does not have are left empty (ARM's cpuinfo has no `flags`)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if found:
                break                   # the end of the first processor's entry
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("vendor_id", "model name", "flags") and key not in found:
            found[key] = value.strip()
    return Cpu(vendor=found.get("vendor_id", ""), model=found.get("model name", ""),
               flags=frozenset(found.get("flags", "").split()))


@functools.cache
def this_cpu() -> Cpu:
    """This machine's CPU (an empty Cpu where /proc/cpuinfo cannot be read: not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse(f.read())
    except OSError:
        return Cpu()


def flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo's `flags`)."""
    return this_cpu().flags
