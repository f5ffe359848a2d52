"""Cloud Hypervisor and a TAP in another network namespace (Nomad's group network mode).

CH's vm.create takes no TAP descriptors, so the backend finds the namespace of the TAP the
driver opened (TUNGETDEVNETNS on its descriptor) and starts CH inside it (nsenter), where CH
opens the TAP by name. Checked here with a real TAP in a throwaway namespace and a stand-in
program in CH's place (there is no CH binary here): it runs in the TAP's namespace, under the
pid that was recorded, and nothing else moves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nomad_vm.errors import LaunchError
from nomad_vm.network import taps
from nomad_vm.network.netns import NETNS_DIR
from nomad_vm.processes import identity_of
from nomad_vm.vm.cloud_hypervisor import netns
from nomad_vm.vm.process import spawn
from tests.conftest import wait_until
from tests.netns import ip, isolated_namespaces

pytestmark = pytest.mark.integration


def test_ch_is_started_in_the_namespace_of_the_tap_it_is_given(short_tmp: Path) -> None:
    with isolated_namespaces(("nvtc",)) as spaces:
        ns = spaces.new()
        ip("-n", ns, "link", "add", "nvtcbr0", "type", "bridge")
        taps.create_tap("nvtctap0", "nvtcbr0", netns=ns)
        tap_fd = taps.open_tap("nvtctap0", netns=ns)
        netns_fd = netns.tap_namespace([tap_fd])
        assert netns_fd is not None
        try:
            assert os.fstat(netns_fd).st_ino == (NETNS_DIR / ns).stat().st_ino
            argv = [*netns.nsenter_argv(netns_fd), "/bin/sleep", "30"]
            process = spawn(
                argv, stdout=2, stderr=2, cwd=short_tmp, pass_fds=[netns_fd], gated=True
            )
        finally:
            os.close(netns_fd)
            os.close(tap_fd)
        try:
            process.release()

            def in_the_taps_namespace() -> bool:
                try:
                    here = os.stat(f"/proc/{process.pid}/ns/net").st_ino
                except OSError:
                    return False
                return here == (NETNS_DIR / ns).stat().st_ino

            assert wait_until(in_the_taps_namespace, 10.0)
            # Still the process the journal would have recorded (nsenter execs, no fork).
            assert identity_of(process.pid) == process.ident
            assert os.stat("/proc/self/ns/net").st_ino != (NETNS_DIR / ns).stat().st_ino
        finally:
            process.kill_and_reap()
            process.close()


def test_taps_in_two_namespaces_are_refused() -> None:
    with isolated_namespaces(("nvtc",)) as spaces:
        fds = []
        try:
            for i in range(2):
                ns = spaces.new()
                ip("-n", ns, "link", "add", f"nvtcbr{i}", "type", "bridge")
                taps.create_tap(f"nvtctap{i}", f"nvtcbr{i}", netns=ns)
                fds.append(taps.open_tap(f"nvtctap{i}", netns=ns))
            with pytest.raises(LaunchError, match="several"):
                netns.tap_namespace(fds)
        finally:
            for fd in fds:
                os.close(fd)
