"""Hyper-V enlightenments for Windows guests: which CPU flags QEMU gets, and which are dropped.

The enlightenments are paravirtual interfaces KVM implements (QEMU's docs/system/i386/hyperv.rst:
KVM on x86 implements them; QEMU then reports the Hyper-V CPUID leaves 0x40000000..0x4000000A).
``RECOMMENDED`` is the set that page recommends for Windows guests, minus the debugging and
nested-virtualisation ones (``hv-passthrough``, ``hv-enforce-cpuid``, ``hv-syndbg``,
``hv-evmcs``) and ``hv-reset`` (not needed by Windows).

Under TCG there is no KVM to implement them. Measured with QEMU 7.2 (Debian 12): TCG refuses
``hv-vpindex`` and everything that depends on it (``hv-synic``, ``hv-stimer``: "kernel doesn't
allow setting HyperV VP_INDEX"); the others are accepted but change nothing the guest sees (a
Linux guest reports no "Hypervisor detected: Microsoft Hyper-V" and no 0x40000000 leaf). So under
TCG every one of them is dropped, and the driver says which in a task event.
"""

from __future__ import annotations

from dataclasses import dataclass

# In dependency order (hv-synic needs hv-vpindex; hv-stimer needs hv-synic and hv-time; hv-ipi
# and hv-tlbflush need hv-vpindex).
RECOMMENDED = (
    "hv-relaxed",
    "hv-vapic",
    "hv-spinlocks=0x1fff",
    "hv-vpindex",
    "hv-runtime",
    "hv-time",
    "hv-synic",
    "hv-stimer",
    "hv-frequencies",
    "hv-tlbflush",
    "hv-ipi",
)


@dataclass(frozen=True)
class HypervChoice:
    """The flags the VM gets and the ones left out (with why, for the task event)."""

    flags: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    reason: str = ""

    def event(self) -> str:
        """The task event text; "" when nothing was dropped."""
        if not self.dropped:
            return ""
        return f"Hyper-V enlightenments dropped ({self.reason}): {', '.join(self.dropped)}"


def choose_hyperv(wanted: bool, accelerator: str) -> HypervChoice:
    """The enlightenments for a VM that ``wanted`` them, under ``accelerator``."""
    if not wanted:
        return HypervChoice(())
    if accelerator != "kvm":
        return HypervChoice(
            (), RECOMMENDED, f"they need KVM and this VM runs on {accelerator.upper()}"
        )
    return HypervChoice(RECOMMENDED)
