"""``write_seed``: SeedDocuments -> a NoCloud seed ISO (volume ``cidata``), written atomically.

The guest finds the seed by its volume label (cloud-init's ds-identify and NoCloud look for
``cidata``) and reads the files by their Rock Ridge names, which Linux's isofs prefers; the
Joliet names serve other readers, and the plain ISO9660 names (upper case, no dashes, a
``;1`` version) exist only because the standard demands them.

The ISO holds the hashed password and the user's data, so it is created 0600 and only renamed
onto ``dest`` once complete: QEMU (or a reader racing a restart) never sees a partial seed.
"""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from nomad_vm.cloudinit.model import SeedDocuments
from nomad_vm.errors import HypervisorError
from nomad_vm.files import write_atomically

VOLUME_LABEL = "cidata"
PLAIN_LABEL = "nomad-seed"
SEED_MODE = 0o600
# Rock Ridge mode of the files inside the ISO (what `ls -l` shows where the guest mounts it):
# regular files that only root, i.e. cloud-init, reads; the user-data holds the password hash.
_FILE_MODE = 0o100400


def _files(docs: SeedDocuments | None) -> list[tuple[str, bytes]]:
    if docs is None:
        return []
    files = [("meta-data", docs.meta_data), ("user-data", docs.user_data)]
    if docs.network_config is not None:
        files.append(("network-config", docs.network_config))
    return [(name, text.encode("utf-8")) for name, text in files]


def _iso9660_name(name: str) -> str:
    # Interchange level 3: up to 30 d-characters (A-Z, 0-9, _), one dot before the extension
    # (none: a dot all the same), then the version.
    base, dot, ext = name.upper().replace("-", "_").rpartition(".")
    if not dot:
        base, ext = ext, ""
    return f"/{base.replace('.', '_')}.{ext};1"


def build_iso(
    docs: SeedDocuments | None, extra: tuple[tuple[str, bytes], ...] = ()
) -> bytes:
    """The complete ISO image of ``docs`` and the ``extra`` files (``seed_files``: for Windows
    Setup or cloudbase-init, at the root under their own names), built in memory. Without
    ``docs`` the volume is labelled ``nomad-seed``: cloud-init looks only for ``cidata``."""
    iso = pycdlib.PyCdlib()
    iso.new(
        interchange_level=3,
        vol_ident=VOLUME_LABEL if docs is not None else PLAIN_LABEL,
        app_ident_str="nomad-vm cloud-init seed",
        joliet=3,
        rock_ridge="1.09",
    )
    # pycdlib reads each file object when it writes the image, so they stay open until then.
    sources = []
    try:
        for name, data in [*_files(docs), *extra]:
            source = io.BytesIO(data)
            sources.append(source)
            iso.add_fp(
                source,
                len(data),
                iso_path=_iso9660_name(name),
                rr_name=name,
                joliet_path="/" + name,
                file_mode=_FILE_MODE,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def write_seed(
    docs: SeedDocuments | None, dest: Path, extra: tuple[tuple[str, bytes], ...] = ()
) -> Path:
    """Write the seed ISO to ``dest`` (mode 0600, atomically) and return ``dest``.

    Raises HypervisorError when the host cannot store it (no space, no permission).
    """
    try:
        image = build_iso(docs, extra)
    except PyCdlibException as error:
        raise HypervisorError(f"cannot build the cloud-init seed: {error}") from error
    try:
        write_atomically(dest, image, SEED_MODE)
    except OSError as error:
        raise HypervisorError(
            f"cannot write the cloud-init seed {dest}: {error.strerror or error}"
        ) from error
    return dest
