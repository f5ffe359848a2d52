"""`nomad-vm`: the operator's command (install, doctor, image, demo, docs, console, vm)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nomad_vm import __version__
from nomad_vm.cli.console import add_console_parser
from nomad_vm.cli.install import CONFIG_FILE_NAME
from nomad_vm.cli.vms import add_vm_parser


def _cmd_doctor(args: argparse.Namespace) -> int:
    from nomad_vm.cli.doctor import run_doctor

    return run_doctor(
        args.qemu_binary, args.accelerator, args.bridge, args.ch_binary, args.vm_user
    )


def _cmd_install(args: argparse.Namespace) -> int:
    from nomad_vm.cli.doctor import run_doctor
    from nomad_vm.cli.install import (
        InstallError,
        InstallRequest,
        config_file_name,
        install,
        installed_driver,
    )
    from nomad_vm.identity import ALIASES

    identity = ALIASES[args.as_name]
    if args.config_dir:
        config_file: Path | None = Path(args.config_dir).absolute() / config_file_name(identity)
    else:
        config_file = Path(args.config).absolute() if args.config else None
    request = InstallRequest(
        plugin_dir=Path(args.plugin_dir).absolute(),
        config_file=config_file,
        image_paths=tuple(Path(p).absolute() for p in args.image_path),
        data_dir=Path(args.data_dir or identity.data_dir).absolute(),
        accelerator=args.accelerator,
        force=args.force,
        as_name=args.as_name,
    )
    try:
        driver = installed_driver()
    except InstallError as exc:
        print(f"FAIL  {exc}")
        return 1
    from nomad_vm.cli.vm_account import ensure_vm_user

    def check() -> int:
        return run_doctor("qemu-system-x86_64", args.accelerator)

    # The plugin's default vm_user; only root can create it (and only root runs the plugin).
    account = ensure_vm_user if os.geteuid() == 0 else None
    return install(request, driver, check, make_account=account)


def _cmd_vm_user(args: argparse.Namespace) -> int:
    from nomad_vm.cli.vm_account import AccountError, ensure_vm_user

    try:
        done = ensure_vm_user(args.name)
    except AccountError as exc:
        print(f"FAIL  {exc}")
        return 1
    print("\n".join(f"ok    {line}" for line in done) or f"ok    user {args.name} is ready")
    return 0


def _cmd_image_build(args: argparse.Namespace) -> int:
    from nomad_vm.cli.paths import guest_cache_dir

    cache = Path(args.cache) if args.cache else guest_cache_dir()
    if args.name == "tiny":
        from nomad_vm.guests.tiny import build_tiny

        tiny = build_tiny(cache, force=args.force)
        print(f"tiny guest ready: kernel {tiny.vmlinux}, initramfs {tiny.initramfs}")
        return 0
    if args.name == "debian":
        from nomad_vm.guests.debian import build_debian

        debian = build_debian(cache, force=args.force)
        print(
            f"debian guest ready: disk {debian.disk}, kernel {debian.vmlinux}, "
            f"initrd {debian.initrd}"
        )
        return 0
    print(f"unknown image {args.name!r}; available: tiny, debian", file=sys.stderr)
    return 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from nomad_vm.cli.demo import run_demo, stop_demo

    return stop_demo() if args.stop else run_demo()


def _cmd_cluster(args: argparse.Namespace) -> int:
    from nomad_vm.cli.cluster import run_cluster, stop_cluster

    return stop_cluster() if args.stop else run_cluster()


def _cmd_docs(args: argparse.Namespace) -> int:
    from nomad_vm.cli.reference import render_reference

    text = render_reference()
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    Path(args.output).write_text(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nomad-vm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nomad-vm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    inst = sub.add_parser(
        "install",
        help="put this installation's plugin in a Nomad agent's plugin_dir and configuration",
        description="Write the nomad-driver-vm wrapper into the agent's plugin_dir and the "
        "plugin's configuration block into the agent's configuration, then check this host "
        "like `nomad-vm doctor`. Changes nothing when already installed; refuses to replace "
        "a different file without --force.",
    )
    inst.add_argument("--plugin-dir", required=True, help="the agent's plugin_dir")
    where = inst.add_mutually_exclusive_group()
    where.add_argument(
        "--config-dir",
        help=f"the agent's configuration directory: writes {CONFIG_FILE_NAME} there "
        "(without --config-dir or --config the block is printed)",
    )
    where.add_argument("--config", help="write the plugin block to this file instead")
    inst.add_argument(
        "--image-path",
        action="append",
        default=[],
        help="a directory VM kernels and images may come from (repeatable): image_paths",
    )
    inst.add_argument(
        "--data-dir",
        help="the plugin's data_dir (/var/lib/nomad-vm; installed --as virt or ch: "
        "/var/lib/nomad-vm-virt or /var/lib/nomad-vm-ch)",
    )
    inst.add_argument(
        "--as",
        dest="as_name",
        default="vm",
        choices=("vm", "virt", "ch", "virt-legacy"),
        help="the name to install under: vm (nomad-driver-vm, jobs use driver = \"vm\"), "
        'virt (nomad-driver-virt, driver = "virt"), ch (nomad-driver-ch, '
        'driver = "nomad-driver-ch") or virt-legacy (nomad-driver-virt, driver = '
        '"nomad-driver-virt", as its earlier README), so the seed drivers\' jobs run '
        "unchanged (%(default)s)",
    )
    inst.add_argument("--accelerator", default="auto", choices=("auto", "kvm", "tcg"))
    inst.add_argument("--force", action="store_true", help="replace files that differ")
    inst.set_defaults(func=_cmd_install)

    account = sub.add_parser(
        "vm-user",
        help="create the unprivileged user QEMU and virtiofsd run as (the plugin's vm_user)",
    )
    account.add_argument("name", nargs="?", default="nomad-vm", help="(%(default)s)")
    account.set_defaults(func=_cmd_vm_user)

    doctor = sub.add_parser("doctor", help="check that this host can run VM tasks")
    doctor.add_argument("--qemu-binary", default="qemu-system-x86_64")
    doctor.add_argument(
        "--ch-binary",
        default="cloud-hypervisor",
        help="the Cloud Hypervisor to check (the plugin's cloud_hypervisor.bin)",
    )
    doctor.add_argument("--bridge", help="also check this bridge (the plugin's network.bridge)")
    doctor.add_argument("--accelerator", default="auto", choices=("auto", "kvm", "tcg"))
    doctor.add_argument("--vm-user", default="nomad-vm", help="the plugin's vm_user (%(default)s)")
    doctor.set_defaults(func=_cmd_doctor)

    image = sub.add_parser(
        "image", help="test guest images (build); the node's image cache (ls, rm, gc)"
    )
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build (or reuse the cached) test guest")
    build.add_argument("name", help="which guest: tiny (kernel + busybox) or debian (cloud image)")
    build.add_argument("--cache", help="cache directory (default: $NOMAD_VM_CACHE or ~/.cache)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_cmd_image_build)
    from nomad_vm.cli.images import add_parsers

    add_parsers(image_sub)

    demo = sub.add_parser("demo", help="run a VM job on a local Nomad dev agent")
    demo.add_argument("--stop", action="store_true", help="stop the demo agent and its VM")
    demo.set_defaults(func=_cmd_demo)

    cluster = sub.add_parser(
        "cluster", help="run a Nomad server and three clients in network namespaces (a test bed)"
    )
    cluster.add_argument("--stop", action="store_true", help="tear the cluster down")
    cluster.set_defaults(func=_cmd_cluster)

    docs = sub.add_parser("docs", help="write the configuration reference")
    docs.add_argument("--output", default="docs/configuration.md")
    docs.add_argument("--check", action="store_true", help="fail if the file is stale")
    docs.set_defaults(func=_cmd_docs)

    add_console_parser(sub)
    add_vm_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
