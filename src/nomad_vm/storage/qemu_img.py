"""Typed wrappers over qemu-img: info, check, create (overlay), convert, resize.

Every call passes the formats explicitly (``-f``/``-F``/``-O``): only ``info`` without ``fmt``
probes, and that is done once, on the user's top-level image, by the caller that then records the
answer. Letting qemu-img guess later is how a raw disk whose guest wrote a qcow2 header into
sector 0 becomes a qcow2 image that names a host file as its backing file.

Paths are made absolute before they reach qemu-img, so a relative name such as ``nbd:x`` or
``-f`` is never read as a protocol prefix or an option. A job's files are given as ``HeldFile``
descriptors (``nomad_vm.storage.held``): qemu-img inherits each one and reads it as
``/proc/self/fd/N``, so it reads the very file the plugin checked, whatever has happened to its
path since. A chain of such files is given to ``check`` and ``convert`` as a ``json:`` filename
with every backing file explicit (or none), so qemu-img never opens a name stored in a header.

qemu-img runs through ``storage.qemu_img_run``: a run on a job's image goes under
``nomad_vm.storage.limits.Limits`` (CVE-2015-5162); failures are ``QemuImgError`` (its stderr)
or ``QemuImgLimitExceeded``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from nomad_vm.errors import HypervisorError
from nomad_vm.storage.held import HeldFile
from nomad_vm.storage.image_sources import Source, fds_of, json_filename, name_of, real_path, shown
from nomad_vm.storage.limits import USER_IMAGE_LIMITS, Limits
from nomad_vm.storage.qemu_img_run import qemu_img_failure, run_qemu_img, run_qemu_img_to_end

# Metadata operations take milliseconds whatever the image size (see the timing test); a call
# that takes this long is stuck, e.g. on a FIFO or a dead NFS server named by the image.
INFO_TIMEOUT = 30.0
CREATE_TIMEOUT = 60.0
# check reads all of a qcow2's metadata (L1/L2 and refcount tables): tens of ms for a few GiB,
# more for a large, fully allocated image on slow storage.
CHECK_TIMEOUT = 120.0
# qemu-img check's exit statuses that come with a report (check_image in qemu-img.c): 0 whole,
# 1 errors while checking (report printed only if the check itself ran), 2 corruptions,
# 3 leaked clusters only. 63 is "this format does not support checks".
_CHECK_REPORTED = (0, 1, 2, 3)
_FIRST_ERROR_LIMIT = 300
_T = TypeVar("_T")


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image.

    ``backing_chain`` lists the backing files qemu-img named (``full-backing-filename``), the
    nearest first: the whole chain when asked with ``follow_backing=True``, otherwise at most the
    immediate backing file (which qemu-img then did not open). ``backing_format`` is the format
    the image records for its immediate backing file (None: not recorded, qemu would probe).
    ``data_file`` is a qcow2 external data file; ``extent_files`` are the files a vmdk reads.
    ``backing_filename`` is the immediate backing file's name as the image records it (not
    resolved: qemu-img resolves a relative one against the name it opened, which for a
    descriptor is ``/proc/self/fd/``). ``held`` is the descriptor it was read through, if any.
    """

    path: Path
    format: str
    virtual_size: int
    actual_size: int
    backing_chain: tuple[str, ...] = ()
    backing_format: str | None = None
    encrypted: bool = False
    data_file: str | None = None
    extent_files: tuple[str, ...] = ()
    backing_filename: str | None = None
    held: HeldFile | None = None


def info(
    qemu_img: Path,
    path: Source,
    *,
    fmt: str | None = None,
    follow_backing: bool = True,
    timeout: float = INFO_TIMEOUT,
    limits: Limits | None = USER_IMAGE_LIMITS,
) -> ImageInfo:
    """``qemu-img info --output=json --force-share [--backing-chain] [-f FMT] PATH``.

    ``--force-share`` because the image may be open by running VMs (as a read-only backing
    file); metadata reads do not need their lock. ``follow_backing=True`` opens every backing
    file qemu-img finds, wherever it points (another host file, ``nbd://`` on the network, a FIFO
    that blocks): use it only on trusted chains, and walk untrusted ones one level at a time
    with ``follow_backing=False`` (``nomad_vm.storage.disk`` does).
    """
    argv = [str(qemu_img), "info", "--output=json", "--force-share"]
    if follow_backing:
        argv.append("--backing-chain")
    if fmt is not None:
        argv += ["-f", fmt]
    argv.append(name_of(path))
    what = f"qemu-img info {shown(path)}"
    answer = run_qemu_img(argv, timeout, what, limits, fds_of([path]))
    found = parse_info(answer, real_path(path))
    return replace(found, held=path) if isinstance(path, HeldFile) else found


@dataclass(frozen=True)
class CheckResult:
    """What ``qemu-img check`` found in one image's own structure (not its backing files).

    ``corruptions``: metadata that is wrong (a table pointing past the end of the file, a
    cluster used twice, refcounts that disagree): reads may return wrong data. ``leaks``:
    clusters allocated but unused, wasted space only (qemu-img itself calls the image usable).
    ``check_errors``: parts qemu-img could not check at all (e.g. unreadable). ``first_error``
    is qemu-img's first line about a problem (it prints one per bad cluster), for messages.
    """

    path: Path
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    first_error: str = ""

    @property
    def intact(self) -> bool:
        return self.corruptions == 0 and self.check_errors == 0


def check(
    qemu_img: Path,
    path: Source,
    fmt: str,
    *,
    timeout: float = CHECK_TIMEOUT,
    limits: Limits | None = USER_IMAGE_LIMITS,
) -> CheckResult:
    """``qemu-img check --output=json --force-share -f FMT PATH``: never repairs (no ``-r``).

    Given a path, it opens the image's backing chain, so walk and check that first
    (``nomad_vm.storage.disk`` does); given a descriptor, only the file itself (its backing is
    set to none: check looks at the file's own structure). ``--force-share`` as for ``info``:
    running VMs may use the image as a backing file.
    """
    argv = [str(qemu_img), "check", "--output=json", "--force-share"]
    if isinstance(path, HeldFile):
        argv.append(json_filename([(path, fmt)]))
    else:
        argv += ["-f", fmt, _abs(path)]
    what = f"qemu-img check {shown(path)}"
    done = run_qemu_img_to_end(argv, timeout, what, limits, fds_of([path]))
    if done.returncode in _CHECK_REPORTED and done.stdout.strip():
        return parse_check(done.stdout, real_path(path), done.stderr)
    raise qemu_img_failure(what, done, limits)


def parse_check(text: str, path: Path, stderr: str = "") -> CheckResult:
    """The CheckResult in ``qemu-img check --output=json`` text (qemu-img leaves out the counts
    that are zero); ``stderr`` is where it lists the problems, one line each."""
    problems = [line.removeprefix("qemu-img: ").strip() for line in stderr.splitlines()]
    problems = [line for line in problems if line]
    try:
        decoded: Any = json.loads(text)
        return CheckResult(
            path=path,
            corruptions=_typed(decoded.get("corruptions", 0), int),
            leaks=_typed(decoded.get("leaks", 0), int),
            check_errors=_typed(decoded.get("check-errors", 0), int),
            first_error=problems[0][:_FIRST_ERROR_LIMIT] if problems else "",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise HypervisorError(
            f"qemu-img check {path}: unexpected JSON ({exc!r}): {text[:200]!r}"
        ) from None


def create_overlay(
    qemu_img: Path,
    base: Path,
    base_format: str,
    overlay: Path,
    size_bytes: int,
    *,
    timeout: float = CREATE_TIMEOUT,
    limits: Limits | None = None,
) -> None:
    """A qcow2 ``overlay`` of ``size_bytes`` that records ``base`` (an absolute path) and
    ``base_format`` as its backing file, without opening it (``-u``): the base was inspected
    through its descriptor, and QEMU is given its backing files explicitly, so the recorded
    name is for people and tools only. Overwrites ``overlay``.
    """
    argv = [str(qemu_img), "create", "-q", "-f", "qcow2", "-u"]
    argv += ["-b", _abs(base), "-F", base_format, _abs(overlay), _size_arg(size_bytes)]
    run_qemu_img(argv, timeout, f"qemu-img create {_abs(overlay)}", limits)


def set_backing_name(qemu_img: Path, overlay: Path, name: str, base_format: str) -> None:
    """Rewrite the backing file name recorded in our own qcow2 ``overlay`` to ``name``
    (``rebase -u``: only the header changes, no backing file is opened). For a VMM that
    follows the recorded name itself: given ``/proc/self/fd/N`` it reopens the base the
    plugin checked and handed over, not whatever is at the image's path by then."""
    argv = [str(qemu_img), "rebase", "-q", "-u", "-b", name, "-F", base_format, _abs(overlay)]
    run_qemu_img(argv, CREATE_TIMEOUT, f"qemu-img rebase -u {_abs(overlay)}", None)


def create(qemu_img: Path, path: Source, fmt: str, size_bytes: int, *, falloc: bool) -> None:
    """An empty ``fmt`` image of ours (no limits); ``falloc``: its space reserved up front. A
    held file (one the plugin created where a job could plant symlinks) is written through
    its descriptor."""
    prealloc = ["-o", "preallocation=falloc"] if falloc else []
    name = name_of(path)
    argv = [str(qemu_img), "create", "-q", "-f", fmt, *prealloc, name, _size_arg(size_bytes)]
    run_qemu_img(argv, CREATE_TIMEOUT, f"qemu-img create {shown(path)}", None, fds_of([path]))


def convert(
    qemu_img: Path,
    src: Source,
    src_format: str,
    dst: Path,
    dst_format: str,
    *,
    backing: Sequence[tuple[Source, str]] = (),
    timeout: float | None = None,
    limits: Limits | None = USER_IMAGE_LIMITS,
) -> None:
    """Copy ``src`` into a new, independent ``dst`` image (its backing chain flattened).

    ``-S 4k`` (qemu-img's default, stated because we rely on it): zero runs are not written, so
    a mostly empty disk stays sparse. No ``-W``: out-of-order writes fragment a qcow2 target.
    No ``--force-share``: copying an image some other process is writing gives a torn copy, so
    qemu-img's lock refusal is the right answer. ``timeout`` is None by default because the time
    grows with the allocated data; give ``limits`` CPU time in proportion to it
    (``Limits.for_conversion``). Overwrites ``dst``. A descriptor ``src`` is read with
    ``backing`` (its chain below it, nearest first, with their formats) as its explicit backing
    files, and no other.
    """
    argv = [str(qemu_img), "convert", "-q"]
    chain = [(src, src_format), *backing]
    if isinstance(src, HeldFile):
        argv.append(json_filename(chain))
    else:
        argv += ["-f", src_format, _abs(src)]
    argv += ["-O", dst_format, "-S", "4k", _abs(dst)]
    what = f"qemu-img convert {shown(src)} -> {_abs(dst)}"
    run_qemu_img(argv, timeout, what, limits, fds_of([source for source, _ in chain]))


def resize(
    qemu_img: Path, path: Path, fmt: str, size_bytes: int, *, timeout: float = CREATE_TIMEOUT
) -> None:
    """Set the virtual size of ``path``. Never passes ``--shrink``: qemu-img refuses to shrink.

    For the driver's own files only (no backing file), hence no limits."""
    argv = [str(qemu_img), "resize", "-q", "-f", fmt, _abs(path), _size_arg(size_bytes)]
    run_qemu_img(argv, timeout, f"qemu-img resize {_abs(path)}", None)


def parse_info(text: str, path: Path) -> ImageInfo:
    """The ImageInfo in ``qemu-img info --output=json`` text: one object, or with
    ``--backing-chain`` a list of them, the top image first."""
    try:
        decoded: Any = json.loads(text)
        levels = decoded if isinstance(decoded, list) else [decoded]
        top = levels[0]
        chain = tuple(_backingname_of(level) for level in levels if _backingname_of(level))
        specific = top.get("format-specific", {}).get("data", {})
        return ImageInfo(
            path=path,
            format=_typed(top["format"], str),
            virtual_size=_typed(top["virtual-size"], int),
            actual_size=_typed(top.get("actual-size", 0), int),
            backing_chain=chain,
            backing_format=_optional_str(top.get("backing-filename-format")),
            encrypted=bool(top.get("encrypted", False)),
            data_file=_optional_str(specific.get("data-file")),
            extent_files=tuple(str(e["filename"]) for e in specific.get("extents", ())),
            backing_filename=_optional_str(top.get("backing-filename")),
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise HypervisorError(
            f"qemu-img info {path}: unexpected JSON ({exc!r}): {text[:200]!r}"
        ) from None


def _backingname_of(level: dict[str, Any]) -> str:
    # full-backing-filename is the name resolved against the image's directory; qemu-img leaves
    # it out when it cannot build one (e.g. a json: pseudo-filename), so fall back to the raw one.
    return str(level.get("full-backing-filename") or level.get("backing-filename") or "")


def _typed(value: object, kind: type[_T]) -> _T:
    # bool is an int subclass: a "virtual-size": true must not pass as a size.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


def _optional_str(value: Any) -> str | None:
    return None if value is None else _typed(value, str)


def _abs(path: Path) -> str:
    return os.path.abspath(path)


def _size_arg(size_bytes: int) -> str:
    if size_bytes <= 0:
        raise ValueError(f"size must be positive, got {size_bytes}")
    return str(size_bytes)
