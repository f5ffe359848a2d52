"""``render``: a CloudInitRequest -> the seed's meta-data, user-data and network-config.

Every document is built as data and dumped with PyYAML, never templated, so no value (a
command, a hostname, an environment value) can change the structure around it.

The user's own document is merged by cloud-init itself: with one, user-data becomes a MIME
multipart message whose first part is our generated ``#cloud-config`` and whose second is the
user's document, verbatim, with a ``Merge-Type`` header. Cloud-init merges each cloud-config part
onto what the parts before it built, with the mergers the part names (its ``merge_how`` key
first, then its ``Merge-Type`` header, per type: so says cloudinit/handlers/cloud_config.py,
while cloud-init's merging docs describe a part's mergers as applying to the next part; the
code is what runs, and tests/integration/test_cloudinit_seed.py checks it with the guest's own
cloud-init, once by its mergers and once by booting). That is more faithful than re-implementing
the mergers here (every merge_how the user may write works exactly as cloud-init documents it,
in whatever cloud-init version the guest has), and a ``#!`` script can travel the same way.

Our header, ``USER_PART_MERGE_TYPE`` = ``dict(no_replace,recurse_list)+list(append)+str()``,
replaces cloud-init's default for such parts (``dict(replace)+list()+str()``: each top-level key
of the later part replaces ours whole, so a user's ``runcmd`` would silently drop ``cmds`` and a
user's ``write_files`` the Nomad environment files). With ours, nested mappings merge key by key,
lists are concatenated (ours first), and where both set the same single value (a string,
number or boolean) the task option wins. Generated from ``cmds = ["echo one"]``::

    #cloud-config            (ours)          #cloud-config                (the user's)
    hostname: web-1                          hostname: other
    runcmd: [echo one]                       runcmd: [echo two]
    user: {name: nomad}                      user: {gecos: Web user}
                                             packages: [nginx]

cloud-init then runs with ``hostname: web-1``, ``runcmd: [echo one, echo two]``,
``user: {name: nomad, gecos: Web user}`` and ``packages: [nginx]``. A ``merge_how`` key in the
user's document takes precedence per type (``merge_how: dict(replace)+list()+str()`` restores
cloud-init's plain replacement). A script (``#!``) is run once, after ``runcmd``.

Without a user document, user-data is the plain ``#cloud-config`` document.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import yaml

from nomad_vm.cloudinit.envfiles import ENV_FILE_PATH, PROFILE_PATH, EnvFiles, environment_files
from nomad_vm.cloudinit.memory_online import ONLINE_MOVABLE_BOOTCMD
from nomad_vm.cloudinit.model import AgentVsock, CloudInitRequest, GuestMount, SeedDocuments
from nomad_vm.cloudinit.passwd import sha512_crypt
from nomad_vm.cloudinit.resolv import resolv_conf_bootcmd
from nomad_vm.cloudinit.timezone import check_timezone
from nomad_vm.cloudinit.userdoc import CLOUD_CONFIG, UserDocument, parse_user_data
from nomad_vm.errors import ConfigError

USER_PART_MERGE_TYPE = "dict(no_replace,recurse_list)+list(append)+str()"
# Part file names: cloud-init logs them, and runs scripts in name order ("runcmd" first).
GENERATED_PART_NAME = "nomad-vm.cfg"
USER_CONFIG_PART_NAME = "user-data.cfg"
USER_SCRIPT_PART_NAME = "user-data.sh"

_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_KEY_TYPE = re.compile(r"(^|\s)(ssh|ecdsa-sha2|sk)-[a-z0-9@.-]+\s")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so a seed reads like a hand-written one."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML itself falls back to a quoted style when a block cannot hold the value exactly.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    text = yaml.dump(
        _plain(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16
    )
    assert isinstance(text, str)
    return text


def _plain(value: Any) -> Any:
    """Mappings and tuples as dicts and lists: the safe dumper only represents those."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def render(req: CloudInitRequest) -> SeedDocuments:
    """The seed's documents for ``req``. Raises ConfigError naming the option at fault."""
    _check_request(req)
    env = environment_files(req.env)
    generated = CLOUD_CONFIG + "\n" + dump_yaml(_generated_config(req, env))
    user = parse_user_data(req.user_data_text) if req.user_data_text is not None else None
    meta = {"instance-id": req.instance_id, "local-hostname": req.hostname}
    network = None if req.network_config is None else dump_yaml(req.network_config)
    return SeedDocuments(
        meta_data=dump_yaml(meta),
        user_data=generated if user is None else _multipart(generated, user),
        network_config=network,
        warnings=tuple(f"not passed to the guest: {s}" for s in env.skipped),
    )


def with_network_config(docs: SeedDocuments, network: Mapping[str, Any]) -> SeedDocuments:
    """``docs`` with a network-config document: for an address known only after the rest was
    rendered (and checked) at planning time, without rendering user-data a second time."""
    return replace(docs, network_config=dump_yaml(network))


def _check_request(req: CloudInitRequest) -> None:
    if not req.instance_id or not req.hostname:
        raise ValueError("a cloud-init request needs an instance id and a hostname")
    if not _USER_NAME.match(req.default_user):
        raise ConfigError("config.default_user", "is not a valid Linux user name")
    if req.password == "":
        raise ConfigError("config.default_user_password", "must not be empty")
    if req.timezone is not None:
        check_timezone(req.timezone, "config.timezone")
    for index, cmd in enumerate(req.cmds):
        if not cmd.strip():
            raise ConfigError(f"config.cmds[{index}]", "is empty")
        if "\0" in cmd:
            raise ConfigError(f"config.cmds[{index}]", "contains a NUL character")


def _ssh_keys(text: str) -> list[str]:
    """The public keys in ``text``: one per line, as in an authorized_keys file."""
    field = "config.default_user_authorized_ssh_key"
    if "PRIVATE KEY" in text:
        # Said outright: a private key pasted here would otherwise end up in the seed.
        raise ConfigError(field, "is a private key; give the public key (the .pub file)")
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(field, "is empty")
    for number, key in enumerate(keys, 1):
        if not _KEY_TYPE.search(key + " "):
            raise ConfigError(field, f"key {number} is not an OpenSSH public key (ssh-ed25519 ...)")
    return keys


def _generated_config(req: CloudInitRequest, env: EnvFiles) -> dict[str, Any]:
    # "user" (not "users") amends the image's default user: its groups, sudo rule and shell
    # stay, and cloud-init creates it even when the user's document has its own "users" list.
    user: dict[str, Any] = {"name": req.default_user}
    if req.password is not None:
        # Cloud-init images lock the default user's password unless told otherwise.
        user |= {"lock_passwd": False, "hashed_passwd": sha512_crypt(req.password)}
    config: dict[str, Any] = {"user": user}
    bootcmd: list[Any] = []
    if req.online_hotplug_memory:
        bootcmd.append(ONLINE_MOVABLE_BOOTCMD)
    resolv = resolv_conf_bootcmd(req.name_servers)
    if resolv is not None:
        bootcmd.append(resolv)
    if bootcmd:
        config["bootcmd"] = bootcmd
    if req.ssh_authorized_key is not None:
        config["ssh_authorized_keys"] = _ssh_keys(req.ssh_authorized_key)
    config["hostname"] = req.hostname
    if req.timezone is not None:
        config["timezone"] = req.timezone
    runcmd: list[Any] = []
    write_files = [
        _env_file(PROFILE_PATH, env.profile, req.default_user),
        _env_file(ENV_FILE_PATH, env.env_file, req.default_user),
    ]
    if req.agent_vsock is not None:
        write_files.append(agent_vsock_unit(req.agent_vsock))
        # First, so exec works while the job's own commands run; enable reloads systemd.
        runcmd.append(["systemctl", "enable", "--now", AGENT_VSOCK_UNIT])
    # One entry per command: cloud-init runs them in order, each with sh, once per instance.
    runcmd += req.cmds
    if runcmd:
        config["runcmd"] = runcmd
    config["write_files"] = write_files
    if req.mounts:
        # cloud-init's mounts module writes fstab entries and mounts them (creating the
        # directories); nofail keeps a missing share from blocking the boot.
        config["mounts"] = [_mount_entry(m) for m in req.mounts]
    return config


# Debian's qemu-guest-agent unit is bound to the virtio-serial port's device (BindsTo=, which
# a drop-in cannot remove), so the vsock agent is a unit of its own.
AGENT_VSOCK_UNIT = "nomad-vm-guest-agent-vsock.service"
QEMU_GA = "/usr/sbin/qemu-ga"


def agent_vsock_unit(vsock: AgentVsock) -> dict[str, Any]:
    """qemu-ga listening on vsock ``cid:port`` (its ``vsock-listen`` method), restarted if it
    ends (before the vsock transport is loaded, it cannot listen yet)."""
    unit = (
        "[Unit]\n"
        "Description=QEMU guest agent on vsock (nomad-vm, Cloud Hypervisor)\n"
        "[Service]\n"
        f"ExecStart={QEMU_GA} --method=vsock-listen --path={vsock.cid}:{vsock.port}\n"
        "Restart=always\n"
        "RestartSec=1\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
    return {
        "path": f"/etc/systemd/system/{AGENT_VSOCK_UNIT}",
        "content": unit,
        "owner": "root:root",
        "permissions": "0644",
    }


def _mount_entry(mount: GuestMount) -> list[str]:
    mode = "ro" if mount.readonly else "rw"
    if mount.transport == "virtiofs":
        return [mount.tag, mount.path, "virtiofs", f"{mode},nofail", "0", "0"]
    options = f"trans=virtio,version=9p2000.L,msize=262144,{mode},nofail"
    return [mount.tag, mount.path, "9p", options, "0", "0"]


def _env_file(path: str, content: str, group: str) -> dict[str, Any]:
    return {
        "path": path,
        "content": content,
        "owner": f"root:{group}",
        "permissions": "0640",
        # write_files runs before users-groups (init stage), when the group does not exist
        # yet; deferred entries are written in the final stage, still before runcmd runs.
        "defer": True,
    }


def _multipart(generated: str, user: UserDocument) -> str:
    message = MIMEMultipart()
    message.attach(_part(generated, "cloud-config", GENERATED_PART_NAME))
    if user.is_script:
        message.attach(_part(user.text, "x-shellscript", USER_SCRIPT_PART_NAME))
    else:
        part = _part(user.text, "cloud-config", USER_CONFIG_PART_NAME)
        part["Merge-Type"] = USER_PART_MERGE_TYPE
        message.attach(part)
    return message.as_string()


def _part(text: str, subtype: str, filename: str) -> MIMEText:
    # No charset given: us-ascii (7bit, readable) when it fits, else UTF-8 in base64, which
    # cloud-init decodes exactly (an 8bit non-ASCII part would not survive its parser).
    part = MIMEText(text, subtype)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part
