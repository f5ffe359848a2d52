"""`nomad-vm install`: make this installation the plugin a Nomad agent loads.

Writes the `nomad-driver-vm` wrapper into the agent's plugin_dir and the plugin's
`plugin "nomad-driver-vm"` block into the agent's configuration (or prints it), then runs
doctor's checks. With ``--as virt`` or ``--as ch`` the wrapper is `nomad-driver-virt` or
`nomad-driver-ch` (it tells the plugin its name through nomad_vm.identity.ENV_VAR) and the block
is that name's, so the seed drivers' jobs and client configs find it.
Running it again changes nothing; a different file in the way is only replaced
with ``force``, and then nothing at all is written without it.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import shlex
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.cli.hcl import PLUGIN_NAME, plugin_block
from nomad_vm.cli.vm_account import AccountError
from nomad_vm.files import write_atomically
from nomad_vm.identity import ALIASES, ENV_VAR, OWN, Identity

# The file name in an agent's config directory (`nomad agent -config DIR` reads *.hcl there).
CONFIG_FILE_NAME = f"{PLUGIN_NAME}.hcl"
DEFAULT_DATA_DIR = OWN.data_dir


def config_file_name(identity: Identity = OWN) -> str:
    """The file `--config-dir` writes: one per installed name, so two names coexist."""
    return f"{identity.file_name}.hcl"


class InstallError(Exception):
    """The installation cannot be made as asked; the message says what to do."""


def wrapper_script(driver: Path, identity: Identity = OWN) -> str:
    """The file Nomad runs from plugin_dir: a shell script that execs the installed plugin,
    telling it the name it is installed under (exec keeps argv[0] the console script's)."""
    if identity.is_own_name:
        return f'#!/bin/sh\nexec {shlex.quote(str(driver))} "$@"\n'
    return f'#!/bin/sh\n{ENV_VAR}={identity.alias} exec {shlex.quote(str(driver))} "$@"\n'


def installed_driver() -> Path:
    """The `nomad-driver-vm` console script of the environment this `nomad-vm` runs from.

    The package's own record of its files says where pip put it (a venv's bin/, ~/.local/bin
    for --user); the scripts directory of this Python is the fallback.
    """
    candidates: list[Path] = []
    try:
        files = importlib.metadata.distribution("nomad-vm").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [
        Path(os.path.normpath(f.locate())) for f in files if Path(str(f)).name == PLUGIN_NAME
    ]
    candidates.append(Path(sysconfig.get_path("scripts")) / PLUGIN_NAME)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.absolute()
    looked = ", ".join(str(c) for c in candidates)
    raise InstallError(
        f"the plugin executable {PLUGIN_NAME} is not installed with this nomad-vm (looked at "
        f"{looked}): install the package with pip (`pip install nomad-vm` or `pip install .`) "
        "and run the nomad-vm it installed"
    )


@dataclass(frozen=True)
class InstallRequest:
    plugin_dir: Path
    # Where the plugin block goes; None: it is printed for the operator to add.
    config_file: Path | None
    image_paths: tuple[Path, ...] = ()
    data_dir: Path = DEFAULT_DATA_DIR
    accelerator: str = "auto"
    force: bool = False
    # The name to install under: "vm" (nomad-vm's own), "virt" or "ch" (nomad_vm.identity).
    as_name: str = "vm"

    @property
    def identity(self) -> Identity:
        try:
            return ALIASES[self.as_name]
        except KeyError:
            raise InstallError(
                f"--as {self.as_name}: no such name; use one of {', '.join(ALIASES)}"
            ) from None


@dataclass(frozen=True)
class PlannedFile:
    path: Path
    text: str
    mode: int
    what: str

    def current(self) -> str | None:
        """The file's text now; None when it does not exist."""
        if self.path.is_dir():
            raise InstallError(f"{self.path} is a directory: remove it, or choose another path")
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise InstallError(f"cannot read {self.path} ({exc}): fix it or remove it") from exc

    def has_mode(self) -> bool:
        return (self.path.stat().st_mode & 0o777) == self.mode


def plugin_config(request: InstallRequest) -> dict[str, object]:
    """The plugin block's options, checked by the plugin's own config parser."""
    from nomad_vm.driver.config import parse_plugin_config
    from nomad_vm.errors import ConfigError

    config: dict[str, object] = {
        "image_paths": [str(p) for p in request.image_paths],
        "accelerator": request.accelerator,
        "data_dir": str(request.data_dir),
    }
    try:
        parse_plugin_config(config, request.identity)
    except ConfigError as exc:
        raise InstallError(f"the plugin would refuse this configuration: {exc}") from exc
    return config


def plan_files(request: InstallRequest, driver: Path) -> tuple[list[PlannedFile], str]:
    """The files to write, and the plugin block's text."""
    identity = request.identity
    block = plugin_block(plugin_config(request), identity.file_name)
    files = [
        PlannedFile(
            request.plugin_dir / identity.file_name,
            wrapper_script(driver, identity),
            0o755,
            f"the plugin wrapper: execs {driver}",
        )
    ]
    if request.config_file is not None:
        if not request.config_file.parent.is_dir():
            raise InstallError(
                f"{request.config_file.parent} is not a directory: give the directory your agent "
                "reads its configuration from (`nomad agent -config DIR`), e.g. /etc/nomad.d"
            )
        header = (
            "# Written by `nomad-vm install`; every option is in nomad-vm's "
            "docs/configuration.md.\n"
        )
        files.append(PlannedFile(request.config_file, header + block, 0o644, "the plugin block"))
    return files, block


def install(
    request: InstallRequest,
    driver: Path,
    check_host: Callable[[], int],
    out: Callable[[str], None] = print,
    make_account: Callable[[], list[str]] | None = None,
) -> int:
    """Write (or leave) the planned files, create the VMs' account (``make_account``, which
    raises AccountError), then run ``check_host``; the exit status."""
    try:
        files, block = plan_files(request, driver)
        currents = [f.current() for f in files]
    except InstallError as exc:
        out(f"FAIL  {exc}")
        return 1
    conflicts = [
        (f, current)
        for f, current in zip(files, currents, strict=True)
        if current is not None and current != f.text
    ]
    if conflicts and not request.force:
        for f, text in conflicts:
            out(f"FAIL  {f.path} exists with other content; pass --force to replace it:")
            out(_diff(f.path, text, f.text))
        out("nothing was written")
        return 1
    request.plugin_dir.mkdir(parents=True, exist_ok=True)
    for f, current in zip(files, currents, strict=True):
        if current == f.text and f.has_mode():
            out(f"ok    {f.path} already up to date ({f.what})")
            continue
        write_atomically(f.path, f.text.encode(), mode=f.mode)
        verb = "wrote" if current is None else "replaced" if current != f.text else "fixed mode of"
        out(f"ok    {verb} {f.path} ({f.what})")
    if request.config_file is None:
        out("info  add this block to the agent's configuration (or rerun with --config-dir):")
        out(block)
    else:
        name = request.identity.file_name
        for other in other_plugin_blocks(request.config_file, name):
            out(
                f"warn  {other} also has a plugin {name!r} block: the agent merges its "
                "configuration files, so keep only one"
            )
    for path in request.image_paths:
        if not path.is_dir():
            out(f"warn  image path {path} does not exist yet: put VM kernels and images there")
    if make_account is not None:
        try:
            done = make_account()
        except AccountError as exc:
            out(f"FAIL  {exc}")
            return 1
        out("\n".join(f"ok    {line}" for line in done) or "ok    the VMs' user already exists")
    out("==> checking this host (`nomad-vm doctor`)")
    status = check_host()
    out(next_steps(request))
    return status


def other_plugin_blocks(config_file: Path, name: str = PLUGIN_NAME) -> list[Path]:
    """Other files in the config's directory that also configure this plugin (as ``name``)."""
    pattern = re.compile(rf'plugin\s*"{re.escape(name)}"|"{re.escape(name)}"\s*:')
    found = []
    for path in sorted(config_file.parent.glob("*")):
        if path == config_file or path.suffix not in (".hcl", ".json") or not path.is_file():
            continue
        try:
            if pattern.search(path.read_text(errors="replace")):
                found.append(path)
        except OSError:
            continue
    return found


def next_steps(request: InstallRequest) -> str:
    identity = request.identity
    return f"""==> what else the agent needs
  * plugin_dir: the agent must load plugins from {request.plugin_dir}:
    `plugin_dir = "{request.plugin_dir}"` in its configuration, or `-plugin-dir`.
  * stats: `nomad alloc status -stats` shows a VM's CPU and memory only with
    `telemetry {{ publish_allocation_metrics = true }}` in the agent's configuration.
  * the agent's PATH is the plugin's: it must find QEMU there (doctor above used yours).
  * restart the agent; `nomad node status -verbose` then shows {identity.attribute_prefix}*
    attributes, and jobs use driver = "{identity.driver_name}"."""


def _diff(path: Path, current: str, wanted: str) -> str:
    lines = difflib.unified_diff(
        current.splitlines(keepends=True),
        wanted.splitlines(keepends=True),
        fromfile=f"{path} (now)",
        tofile=f"{path} (nomad-vm install)",
    )
    return "".join(lines).rstrip("\n")
