#!/bin/sh
# /init of the nomad-vm "tiny" test guest (busybox sh, PID 1, running from the initramfs).
#
# Contract with the host (tests and the driver rely on these exact lines on the console):
#   "nomad-vm tiny guest: booted"                      once modules are loaded
#   "nomad-vm tiny guest: command exited with status N" after nomadvm.run=<base64> ran, then poweroff
#   "nomad-vm tiny guest: running" and "... uptime N"   when there is no command
#   "nomad-vm tiny guest: dhcp eth0 A.B.C.D/N router R dns D hostname H"  with nomadvm.dhcp=1
# Kernel arguments it reads: nomadvm.run=<base64 shell command>, nomadvm.ignore_acpi=1,
# nomadvm.dhcp=1 (configure eth0 by DHCP before the command: the guest has no cloud-init, so
# this is how it learns the address the driver chose, from the driver's DHCP mode).
# An ACPI power-button press (QMP system_powerdown) powers the guest off at any time.
# Without nomadvm.dhcp=1 nothing here touches the network.

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
dhcp=0
# Kernel arguments may contain glob characters: split words without pathname expansion.
set -f
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        nomadvm.run=*) have_run=1 run_b64="${arg#nomadvm.run=}" ;;
        nomadvm.dhcp=1) dhcp=1 ;;
    esac
done
set +f

# busybox udhcpc calls this script with the lease in its environment ($ip, $mask as a prefix
# length, $router, $dns, $hostname). udhcpc stays in the background afterwards and renews.
configure_by_dhcp() {
    cat >/tmp/udhcpc.sh <<SCRIPT
#!/bin/sh
case "\$1" in
    deconfig) ip addr flush dev "\$interface"; ip link set "\$interface" up ;;
    bound|renew)
        ip addr flush dev "\$interface"
        ip addr add "\$ip/\$mask" dev "\$interface"
        [ -z "\$router" ] || ip route replace default via "\${router%% *}" dev "\$interface"
        [ -z "\$hostname" ] || hostname "\$hostname"
        rm -f /etc/resolv.conf
        for server in \$dns; do echo "nameserver \$server" >>/etc/resolv.conf; done
        echo "$MARK dhcp \$interface \$ip/\$mask router \$router dns \$dns hostname \$hostname" >/dev/console
        ;;
esac
SCRIPT
    chmod 755 /tmp/udhcpc.sh
    ip link set lo up
    udhcpc -i eth0 -s /tmp/udhcpc.sh -t 30 -T 2 >/dev/null 2>&1 || echo "$MARK dhcp failed on eth0"
}
[ "$dhcp" = 1 ] && configure_by_dhcp

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
