#!/bin/sh
# /init of the nomad-vm "tiny" test guest (busybox sh, PID 1, running from the initramfs).
#
# Contract with the host (tests and the driver rely on these exact lines on the console):
#   "nomad-vm tiny guest: booted"                      once modules are loaded
#   "nomad-vm tiny guest: command exited with status N" after nomadvm.run=<base64> ran, then poweroff
#   "nomad-vm tiny guest: running" and "... uptime N"   when there is no command
# Kernel arguments it reads: nomadvm.run=<base64 shell command>, nomadvm.ignore_acpi=1.
# An ACPI power-button press (QMP system_powerdown) powers the guest off at any time.
# Nothing here touches the network.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
MARK="nomad-vm tiny guest:"
HEARTBEAT_SECONDS=5

# The kernel's built-in initramfs provides /dev/console, but mounting devtmpfs over /dev hides
# it; re-open our stdio on the devtmpfs node so later output still reaches the console.
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp

# The build writes the load order (dependencies first) so no depmod/modprobe is needed.
while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module.ko" || echo "$MARK insmod $module failed"
done </etc/nomad-vm/modules

echo "$MARK booted"

# Power off on the first event from every input device named "Power Button" (the ACPI
# fixed-feature button, and PNP0C0C where the machine has one). Any event from it means a press,
# so we need not decode input_event structs. evdev rejects reads smaller than one event
# (EINVAL), hence one large dd block rather than `head -c 1`.
# The device is opened here, in PID 1, before we announce readiness: evdev only queues events
# for readers that have it open, and a background dd may take a while to start under TCG, so a
# press arriving right after "running" would otherwise be lost.
watch_power_button() {
    found=0
    for dev in /sys/class/input/event*; do
        [ -r "$dev/device/name" ] || continue
        [ "$(cat "$dev/device/name")" = "Power Button" ] || continue
        exec 3<"/dev/input/${dev##*/}" || continue
        found=1
        (
            dd of=/dev/null bs=4096 count=1 2>/dev/null <&3
            echo "$MARK power button pressed, powering off"
            poweroff -f
        ) &
        exec 3<&-
    done
    [ "$found" = 1 ] || echo "$MARK no ACPI power button found; system_powerdown will not work"
}
# nomadvm.ignore_acpi=1 plays a guest that ignores the power button (for graceful-stop tests).
case " $(cat /proc/cmdline) " in
    *" nomadvm.ignore_acpi=1 "*) echo "$MARK ignoring the ACPI power button" ;;
    *) watch_power_button ;;
esac

have_run=0
run_b64=""
# Kernel arguments may contain glob characters: split words without pathname expansion.
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        nomadvm.run=*) have_run=1 run_b64="${arg#nomadvm.run=}" ;;
    esac
done
set +f

if [ "$have_run" = 1 ]; then
    # The command's stdin is /dev/null so it cannot block on (or eat) console input.
    if cmd="$(printf '%s\n' "$run_b64" | base64 -d)"; then
        sh -c "$cmd" </dev/null
        status=$?
    else
        echo "$MARK nomadvm.run is not valid base64"
        status=125
    fi
    echo "$MARK command exited with status $status"
    poweroff -f
    # poweroff -f only returns if the reboot syscall failed: exiting PID 1 panics, and with
    # panic=-1 plus QEMU's -no-reboot that still ends the VM.
    exit "$status"
fi

echo "$MARK running"
while :; do
    read -r up _ </proc/uptime
    echo "$MARK uptime ${up%.*}"
    sleep "$HEARTBEAT_SECONDS"
done
