"""Thin copy: overlay creation time for a 1 GiB and a 20 GiB base image (should not grow).

Measures the driver's own disk step (nomad_vm.storage.disk.prepare_boot_disk: chain inspection
plus `qemu-img create`), alternating the two sizes, and prints the ratio 20 GiB / 1 GiB.
Run: .venv/bin/python bench/thin_copy.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from nomad_vm.storage.disk import prepare_boot_disk
from nomad_vm.vm.qemu.binary import find_qemu_img


def once(qemu_img: Path, base: Path, work: Path) -> float:
    work.mkdir()
    started = time.perf_counter()
    prepare_boot_disk(
        qemu_img, base, work, thin=True, size_mb=None, allowed_dirs=[str(base.parent)]
    )
    elapsed = time.perf_counter() - started
    (work / "disk.qcow2").unlink()
    work.rmdir()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    qemu_img = find_qemu_img()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        bases = {}
        for label, size in (("1 GiB", "1G"), ("20 GiB", "20G")):
            bases[label] = root / "images" / f"base-{size}.raw"
            subprocess.run(["truncate", "-s", size, str(bases[label])], check=True)
        times: dict[str, list[float]] = {label: [] for label in bases}
        for i in range(args.runs):
            for label, base in bases.items():
                times[label].append(once(qemu_img, base, root / f"w{i}-{label[:2]}"))
    small, large = (statistics.median(times[k]) for k in ("1 GiB", "20 GiB"))
    print(f"runs: {args.runs} per size, alternating; medians")
    print(f"thin copy of a 1 GiB base:  {small * 1000:6.1f} ms")
    print(
        f"thin copy of a 20 GiB base: {large * 1000:6.1f} ms   ratio 20 GiB / 1 GiB: "
        f"{large / small:.2f}"
    )


if __name__ == "__main__":
    main()
