"""The NoCloud seed ISO as others read it (pycdlib, isoinfo, blkid), cloud-init's own mergers on
our user-data, and (slow, last) the cached Debian guest booted with a seed.

The guest-based tests use the cached Debian guest (``.cache/guests/debian``, made by
``nomad-vm image build debian``) read-only; a missing one is a failure (`make setup` builds it).
"""

from __future__ import annotations

import base64
import contextlib
import email
import importlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from nomad_vm.cloudinit import CloudInitRequest, SeedDocuments, render, write_seed
from nomad_vm.errors import HypervisorError
from tests.conftest import guest_cache

pytestmark = pytest.mark.integration

DOCS = SeedDocuments(
    meta_data="instance-id: i-1\nlocal-hostname: web-1\n",
    user_data="#cloud-config\nruncmd:\n- echo ✓ 'quoted'\n",
    network_config="version: 2\nethernets: {}\n",
)
NAMES = {"meta-data": DOCS.meta_data, "user-data": DOCS.user_data}


def debian_dir() -> Path:
    """The cached Debian guest (`make setup` builds it; a missing one is a failure, not a skip)."""
    from nomad_vm.guests.debian import build_debian

    return build_debian(guest_cache()).disk.parent


# --- the ISO ---------------------------------------------------------------------------------


def read_with_pycdlib(path: Path) -> tuple[str, dict[str, dict[str, bytes]]]:
    """The volume label, and each file's content by Rock Ridge, Joliet and ISO9660 path."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        found: dict[str, dict[str, bytes]] = {}
        for name in ("meta-data", "user-data", "network-config"):
            iso9660 = "/" + name.upper().replace("-", "_") + ".;1"
            paths = {"rr_path": "/" + name, "joliet_path": "/" + name, "iso_path": iso9660}
            try:
                for kind, iso_path in paths.items():
                    out = io.BytesIO()
                    iso.get_file_from_iso_fp(out, **{kind: iso_path})
                    found.setdefault(name, {})[kind] = out.getvalue()
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
        return label, found
    finally:
        iso.close()


def test_seed_reads_back_with_pycdlib(tmp_path: Path) -> None:
    dest = write_seed(DOCS, tmp_path / "seed.iso")
    assert dest == tmp_path / "seed.iso"
    label, found = read_with_pycdlib(dest)
    assert label == "cidata"
    expected = NAMES | {"network-config": DOCS.network_config}
    assert set(found) == set(expected)
    for name, text in expected.items():
        assert text is not None
        for kind, content in found[name].items():
            assert content == text.encode(), (name, kind)


def test_seed_is_private_and_written_atomically(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    dest.write_bytes(b"old")
    dest.chmod(0o644)
    write_seed(DOCS, dest)
    assert dest.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]  # no temp file left


def test_network_config_only_when_given(tmp_path: Path) -> None:
    docs = SeedDocuments(meta_data=DOCS.meta_data, user_data=DOCS.user_data)
    _, found = read_with_pycdlib(write_seed(docs, tmp_path / "seed.iso"))
    assert set(found) == {"meta-data", "user-data"}


def test_seed_reads_back_with_isoinfo(tmp_path: Path) -> None:
    dest = write_seed(DOCS, tmp_path / "seed.iso")
    info = subprocess.run(["isoinfo", "-d", "-i", dest], capture_output=True, text=True)
    assert "Volume id: cidata" in info.stdout
    assert "Rock Ridge signatures" in info.stdout and "Joliet" in info.stdout
    for option in ("-R", "-J"):
        listing = subprocess.run(["isoinfo", option, "-f", "-i", dest], capture_output=True)
        assert set(listing.stdout.decode().split()) == {
            "/meta-data",
            "/user-data",
            "/network-config",
        }
        for name, text in NAMES.items():
            out = subprocess.run(
                ["isoinfo", option, "-x", f"/{name}", "-i", dest], capture_output=True, check=True
            )
            assert out.stdout == text.encode(), (option, name)


def test_blkid_sees_the_cidata_label(tmp_path: Path) -> None:
    """What cloud-init's ds-identify asks in the guest: the file system's label."""
    dest = write_seed(DOCS, tmp_path / "seed.iso")
    out = subprocess.run(
        ["blkid", "-p", "-o", "export", dest], capture_output=True, text=True, check=True
    )
    assert "LABEL=cidata" in out.stdout.splitlines() and "TYPE=iso9660" in out.stdout


def test_a_failed_write_leaves_nothing_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(HypervisorError, match="cannot write the cloud-init seed"):
        write_seed(DOCS, tmp_path / "missing-dir" / "seed.iso")

    def no_space(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(HypervisorError, match="No space left on device"):
        write_seed(DOCS, tmp_path / "seed.iso")
    assert list(tmp_path.iterdir()) == []


# --- cloud-init's own mergers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cloudinit_mergers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``cloudinit.mergers`` from the Debian guest's own cloud-init, read out of its disk.

    The disk is one partitionless ext4 file system, so debugfs reads it from a raw copy
    without mounting (about 10 s to convert the compressed qcow2).
    """
    directory = debian_dir()
    work = tmp_path_factory.mktemp("cloudinit")
    raw = work / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", directory / "disk.qcow2", raw], check=True)
    package = work / "lib" / "cloudinit"
    package.mkdir(parents=True)
    source = "/usr/lib/python3/dist-packages/cloudinit"
    commands = [f"rdump {source}/mergers {package}"]
    commands += [
        f"dump {source}/{name} {package / name}" for name in ("importer.py", "type_utils.py")
    ]
    for command in commands:
        subprocess.run(["debugfs", "-R", command, raw], capture_output=True, check=True)
    raw.unlink()
    (package / "__init__.py").write_text("")
    sys.path.insert(0, str(package.parent))
    try:
        yield importlib.import_module("cloudinit.mergers")
    finally:
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m == "cloudinit" or m.startswith("cloudinit.")]:
            del sys.modules[name]


def merged_by_cloud_init(user_data: str, mergers: Any) -> dict[str, Any]:
    """What cloud-init's cloud-config handler (22.4, cloudinit/handlers/cloud_config.py) builds:
    each cloud-config part merged onto the previous result with the mergers named by its
    merge_how key, then its Merge-Type header, else ``dict(replace)+list()+str()``."""
    message = email.message_from_string(user_data)
    result: dict[str, Any] = {}
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        config = yaml.safe_load(payload.decode())
        chosen = mergers.dict_extract_mergers(config)
        chosen += mergers.string_extract_mergers(part.get("Merge-Type", ""))
        chosen = chosen or mergers.string_extract_mergers("dict(replace)+list()+str()")
        result = mergers.construct(chosen).merge(result, config)
    return result


USER_EXAMPLE = (
    "#cloud-config\nhostname: other\nruncmd: [echo two]\nuser: {gecos: Web user}\n"
    "packages: [nginx]\nwrite_files: [{path: /etc/motd, content: hi}]\n"
)


def test_cloud_init_merges_the_user_document_as_documented(cloudinit_mergers: Any) -> None:
    """The example in nomad_vm/cloudinit/render.py's docstring, merged by cloud-init's code."""
    req = CloudInitRequest(
        instance_id="i-1", hostname="web-1", cmds=("echo one",), user_data_text=USER_EXAMPLE
    )
    merged = merged_by_cloud_init(render(req).user_data, cloudinit_mergers)
    assert merged["hostname"] == "web-1"  # a task option wins over the document
    assert merged["runcmd"] == ["echo one", "echo two"]  # lists: ours, then the user's
    assert merged["user"] == {"name": "nomad", "gecos": "Web user"}  # mappings merge by key
    assert merged["packages"] == ["nginx"]
    paths = [f["path"] for f in merged["write_files"]]
    assert paths == ["/etc/profile.d/nomad-env.sh", "/etc/nomad-env", "/etc/motd"]


def test_the_users_merge_how_takes_precedence(cloudinit_mergers: Any) -> None:
    text = "#cloud-config\nmerge_how: dict(replace)+list()+str()\nruncmd: [echo two]\n"
    req = CloudInitRequest(
        instance_id="i-1", hostname="web-1", cmds=("echo one",), user_data_text=text
    )
    merged = merged_by_cloud_init(render(req).user_data, cloudinit_mergers)
    assert merged["runcmd"] == ["echo two"]  # cloud-init's plain replacement, as asked
    assert merged["hostname"] == "web-1"


def test_without_a_user_document_the_config_is_ours(cloudinit_mergers: Any) -> None:
    req = CloudInitRequest(instance_id="i-1", hostname="web-1", cmds=("echo one",))
    docs = render(req)
    assert merged_by_cloud_init(docs.user_data, cloudinit_mergers) == yaml.safe_load(docs.user_data)


# --- a real boot ---------------------------------------------------------------------------------

NASTY = 'it\'s "q" $HOME `id` \\ ✓\nline 2\n'
PASSWORD = "nvt-boot-password"
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 420.0  # TCG on a shared 2-core host; the measured times are printed


class Serial:
    """The guest's serial console (QEMU's stdout), collected by a thread with arrival times."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.started = time.monotonic()
        self.text = ""
        self._process = process
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        while chunk := os.read(self._process.stdout.fileno(), 65536):
            with self._lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> float:
        """Seconds since QEMU started when ``pattern`` (a regex) was first seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if re.search(pattern, self.text):
                    return time.monotonic() - self.started
            if self._process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} on the console:\n" + "\n".join(self.text.splitlines()[-80:]))

    def value(self, key: str) -> str:
        match = re.search(rf"^NVT-{key} ?(.*?)\r?$", self.text, re.MULTILINE)
        assert match, f"NVT-{key} missing"
        return match.group(1)


def _hex_of(command: str) -> str:
    return f"$({command} | od -An -tx1 | tr -d ' \\n')"


def boot_request() -> CloudInitRequest:
    """Our cmds report what the guest sees; the user's document adds to runcmd and user."""
    profile = _hex_of("su - nomad -c 'printf %s \"$NVT_NASTY\"'")
    unit = "systemd-run --quiet --wait --pipe -p EnvironmentFile=/etc/nomad-env -p User=nomad"
    systemd = _hex_of(f"{unit} /bin/sh -c 'printf %s \"$NVT_NASTY\"'")
    cmds = (
        "echo NVT-CMD-1 > /dev/ttyS0",
        'echo "NVT-HOST $(hostname) $(cat /etc/timezone)" > /dev/ttyS0',
        f'echo "NVT-PROFILE {profile}" > /dev/ttyS0',
        f'echo "NVT-SYSTEMD {systemd}" > /dev/ttyS0',
        "echo \"NVT-PERMS $(stat -c '%a:%U:%G' /etc/nomad-env /etc/profile.d/nomad-env.sh)\""
        " | tr '\\n' ' ' > /dev/ttyS0; echo > /dev/ttyS0",
        'echo "NVT-SHADOW $(getent shadow nomad | cut -d: -f2)" > /dev/ttyS0',
        'echo "NVT-IID $(cat /var/lib/cloud/data/instance-id)" > /dev/ttyS0',
        'echo "NVT-MERGED $(base64 -w0 /var/lib/cloud/instance/cloud-config.txt)" > /dev/ttyS0',
    )
    user = "#cloud-config\nruncmd:\n  - echo NVT-USER-CMD > /dev/ttyS0\nuser: {gecos: NVT}\n"
    return CloudInitRequest(
        instance_id=f"nvt-{os.getpid()}-{time.time_ns()}",
        hostname="nvt-seed",
        timezone="Europe/Berlin",
        password=PASSWORD,
        cmds=cmds,
        env={"NVT_NASTY": NASTY, "NOMAD_TASK_NAME": "web"},
        user_data_text=user,
    )


@contextlib.contextmanager
def run_guest(directory: Path, tmp: Path, seed: Path) -> Iterator[Serial]:
    overlay = tmp / "overlay.qcow2"
    backing = directory / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, overlay],
        check=True,
    )
    cmdline = json.loads((directory / "manifest.json").read_text())["cmdline"]
    # fmt: off
    argv = [
        QEMU, "-accel", "tcg", "-machine", "pc", "-nodefaults", "-vga", "none", "-no-reboot",
        "-m", "1024", "-smp", "1", "-display", "none", "-serial", "stdio",
        "-drive", f"file={overlay},if=none,id=root,format=qcow2",
        "-device", "virtio-blk-pci,drive=root",
        "-drive", f"file={seed},if=none,id=seed,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=seed",
        "-kernel", str(directory / "vmlinux"), "-initrd", str(directory / "initrd.img"),
        "-append", cmdline,
    ]
    # fmt: on
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        yield Serial(process)
    finally:
        process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def test_debian_guest_runs_the_seed(short_tmp: Path) -> None:
    """SLOW (one TCG boot of the Debian guest, 1-3 minutes): cloud-init in a real guest reads our
    seed from a read-only virtio disk, creates the default user with our password hash, writes
    the environment files that a login shell and a systemd unit both read back exactly, runs
    ``cmds`` in order and then the user's runcmd, and merges the user's document as documented.
    Every check is printed by a runcmd entry to the serial console."""
    directory = debian_dir()
    req = boot_request()
    docs = render(req)
    seed = write_seed(docs, short_tmp / "seed.iso")
    with run_guest(directory, short_tmp, seed) as serial:
        first = serial.wait_for(r"NVT-CMD-1", BOOT_TIMEOUT)
        done = serial.wait_for(r"NVT-USER-CMD", 60)
        serial.wait_for(r"NVT-MERGED \S+\s", 10)
        print(f"\ncloud-init ran the first cmd at {first:.1f} s, the user's at {done:.1f} s")
        check_guest(serial, req, docs)


def check_guest(serial: Serial, req: CloudInitRequest, docs: SeedDocuments) -> None:
    text = serial.text
    order = [text.index(f"NVT-{key}") for key in ("CMD-1", "HOST", "MERGED", "USER-CMD")]
    assert order == sorted(order), "cmds ran out of order"
    assert serial.value("HOST") == "nvt-seed Europe/Berlin"
    assert serial.value("IID") == req.instance_id
    assert serial.value("PROFILE") == NASTY.encode().hex()
    assert serial.value("SYSTEMD") == NASTY.encode().hex()
    assert serial.value("PERMS").split() == ["640:root:nomad", "640:root:nomad"]
    hashed = serial.value("SHADOW")
    assert hashed.startswith("$6$") and PASSWORD not in text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in 3.11
        import crypt
    assert crypt.crypt(PASSWORD, hashed) == hashed
    merged = yaml.safe_load(base64.b64decode(serial.value("MERGED")))
    assert merged["runcmd"] == [*req.cmds, "echo NVT-USER-CMD > /dev/ttyS0"]
    assert merged["user"]["gecos"] == "NVT" and merged["user"]["name"] == "nomad"
    assert merged["user"]["hashed_passwd"] == hashed
