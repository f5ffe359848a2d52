"""The seed's part in hot-pluggable memory (virtio-mem, the task's ``memory_max``): a
``bootcmd`` that makes the guest kernel online hot-plugged memory as movable.

Debian's kernel (and others built without ``CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE``) leaves
hot-plugged memory offline, and a guest booted by its own boot loader does not get the
plugin's kernel command line (``memhp_default_state=online_movable``). The same setting at
run time is ``/sys/devices/system/memory/auto_online_blocks``. ``online_movable``, not
``online``: only memory in ZONE_MOVABLE can reliably be emptied and unplugged again.

``bootcmd`` runs early on every boot (the setting does not survive one), before any workload
can run short. Blocks plugged before it ran (a guest rebooted with memory plugged: QEMU asks
the guest to plug it again as soon as its virtio_mem driver loads) are onlined one by one.
The setting comes first, so a block that appears during the loop is onlined by the kernel.
"""

from __future__ import annotations

MEMORY_SYSFS = "/sys/devices/system/memory"

ONLINE_MOVABLE_BOOTCMD = f"""\
# nomad-vm (memory_max): online hot-plugged memory as movable, so it can be unplugged again
m={MEMORY_SYSFS}
if [ -w $m/auto_online_blocks ]; then
  echo online_movable > $m/auto_online_blocks
  for b in $m/memory*; do
    if [ "$(cat $b/state)" = offline ]; then echo online_movable > $b/state || true; fi
  done
fi
"""
