"""`nomad-vm`: the operator's command (doctor, image, demo, docs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nomad_vm import __version__


def _cmd_doctor(args: argparse.Namespace) -> int:
    from nomad_vm.cli.doctor import run_doctor

    return run_doctor(args.qemu_binary, args.accelerator, args.bridge)


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

    doctor = sub.add_parser("doctor", help="check that this host can run VM tasks")
    doctor.add_argument("--qemu-binary", default="qemu-system-x86_64")
    doctor.add_argument("--bridge", help="also check this bridge (the plugin's network.bridge)")
    doctor.add_argument("--accelerator", default="auto", choices=("auto", "kvm", "tcg"))
    doctor.set_defaults(func=_cmd_doctor)

    image = sub.add_parser("image", help="test guest images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build (or reuse the cached) test guest")
    build.add_argument("name", help="which guest: tiny (kernel + busybox) or debian (cloud image)")
    build.add_argument("--cache", help="cache directory (default: $NOMAD_VM_CACHE or ~/.cache)")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_cmd_image_build)

    demo = sub.add_parser("demo", help="run a VM job on a local Nomad dev agent")
    demo.add_argument("--stop", action="store_true", help="stop the demo agent and its VM")
    demo.set_defaults(func=_cmd_demo)

    docs = sub.add_parser("docs", help="write the configuration reference")
    docs.add_argument("--output", default="docs/configuration.md")
    docs.add_argument("--check", action="store_true", help="fail if the file is stale")
    docs.set_defaults(func=_cmd_docs)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
