"""cloud-init data: request -> meta-data / user-data / network-config, as data (no ISO, no QEMU).

How cloud-init itself merges the parts is checked with cloud-init's own mergers in
tests/integration/test_cloudinit_seed.py; here: the documents, the hash, the quoting, the
MIME structure and the errors a user sees.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import warnings
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import yaml

from nomad_vm.cloudinit import (
    USER_PART_MERGE_TYPE,
    AgentVsock,
    CloudInitRequest,
    SeedDocuments,
    render,
    with_network_config,
)
from nomad_vm.cloudinit.envfiles import ENV_FILE_PATH, PROFILE_PATH, environment_files
from nomad_vm.cloudinit.passwd import sha512_crypt
from nomad_vm.cloudinit.render import AGENT_VSOCK_UNIT
from nomad_vm.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in 3.11, gone in 3.13
    try:
        import crypt
    except ImportError:  # pragma: no cover - Python >= 3.13
        crypt = None  # type: ignore[assignment]

PASSWORD = "correct horse battery staple"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBase64Base64Base64 user@laptop"
NASTY_VALUES = [
    "",
    "two words",
    "it's",
    'say "hi"',
    "$HOME and $(id) and `id` and ${X:-y}",
    "back\\slash",
    "ends with backslash\\",
    "backslash newline \\\nnext",
    "new\nline",
    "trailing newline\n",
    "\ttab and \r carriage return",
    "-n",
    "a=b;c&d|e>f<g*h?i[j]~k#l!m%n",
    "unicode ✓ é 日本",
]


def request(**changes: Any) -> CloudInitRequest:
    base: dict[str, Any] = {"instance_id": "nomad-1234", "hostname": "web-1"}
    return CloudInitRequest(**(base | changes))


def cloud_config(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n"), text[:40]
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def parts(docs: SeedDocuments) -> list[Message]:
    message = email.message_from_string(docs.user_data)
    assert message.is_multipart()
    return [p for p in message.walk() if not p.is_multipart()]


def part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode("utf-8")


# --- the documents -----------------------------------------------------------------------------


def test_meta_data_has_the_instance_id_and_hostname() -> None:
    docs = render(request())
    assert yaml.safe_load(docs.meta_data) == {
        "instance-id": "nomad-1234",
        "local-hostname": "web-1",
    }
    assert docs.network_config is None


def test_user_data_is_built_from_the_task_options() -> None:
    docs = render(
        request(timezone="Europe/Berlin", ssh_authorized_key=KEY + "\n", cmds=("echo a",))
    )
    config = cloud_config(docs.user_data)
    assert config["user"] == {"name": "nomad"}  # no password: the image keeps it locked
    assert config["ssh_authorized_keys"] == [KEY]
    assert config["hostname"] == "web-1"
    assert config["timezone"] == "Europe/Berlin"
    assert config["runcmd"] == ["echo a"]
    assert [f["path"] for f in config["write_files"]] == [PROFILE_PATH, ENV_FILE_PATH]


def test_optional_keys_are_left_out() -> None:
    config = cloud_config(render(request()).user_data)
    assert set(config) == {"user", "hostname", "write_files"}


def test_cmds_stay_list_entries_in_order() -> None:
    cmds = ("echo one", "mkdir -p '/srv/a b'", "echo $((1 + 2)) | tee /x", "echo 'four'")
    config = cloud_config(render(request(cmds=cmds)).user_data)
    assert config["runcmd"] == list(cmds)


def test_a_vsock_agent_gets_its_own_unit_started_before_the_jobs_commands() -> None:
    """Cloud Hypervisor's guests reach qemu-ga over vsock: Debian's own unit is bound to the
    virtio-serial port, so the seed adds one that runs qemu-ga's vsock-listen method."""
    docs = render(request(cmds=("echo a",), agent_vsock=AgentVsock(cid=3, port=7070)))
    config = cloud_config(docs.user_data)
    unit = next(f for f in config["write_files"] if f["path"].endswith(AGENT_VSOCK_UNIT))
    assert unit["path"] == f"/etc/systemd/system/{AGENT_VSOCK_UNIT}"
    assert "ExecStart=/usr/sbin/qemu-ga --method=vsock-listen --path=3:7070\n" in unit["content"]
    assert "WantedBy=multi-user.target" in unit["content"]
    assert config["runcmd"] == [["systemctl", "enable", "--now", AGENT_VSOCK_UNIT], "echo a"]
    # Not for a serial agent (QEMU): nothing of it.
    plain = cloud_config(render(request()).user_data)
    assert "runcmd" not in plain and AGENT_VSOCK_UNIT not in str(plain)


def test_an_empty_command_is_refused_by_index() -> None:
    with pytest.raises(ConfigError) as err:
        render(request(cmds=("echo ok", "  ")))
    assert err.value.field == "config.cmds[1]"


def test_network_config_is_dumped_as_given() -> None:
    network = {
        "version": 2,
        "ethernets": {"eth0": {"addresses": ["10.0.0.5/24"], "routes": [{"to": "default"}]}},
    }
    docs = render(request(network_config=network))
    assert docs.network_config is not None
    assert yaml.safe_load(docs.network_config) == network


def test_hostile_strings_stay_data() -> None:
    """Values are data in a YAML dump: a value cannot add keys or documents."""
    evil = "x\nruncmd: [reboot]\n---\n- !!python/object:os.system ls"
    config = cloud_config(render(request(cmds=(evil,), timezone="UTC")).user_data)
    assert config["runcmd"] == [evil]
    assert set(config) == {"user", "hostname", "timezone", "runcmd", "write_files"}


@pytest.mark.parametrize("bad", ["Europe/../etc/passwd", "a b", "", "Etc/GMT;reboot"])
def test_a_bad_timezone_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        render(request(timezone=bad))
    assert err.value.field == "config.timezone"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("hello world", "not an OpenSSH public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", "private key"),
    ],
)
def test_a_bad_ssh_key_is_refused(key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        render(request(ssh_authorized_key=key))
    assert err.value.field == "config.default_user_authorized_ssh_key"
    assert reason in err.value.reason


def test_several_ssh_keys_one_per_line() -> None:
    second = "ecdsa-sha2-nistp256 AAAAE2VjZHNh other"
    text = f"# mine\n{KEY}\n\n{second}\n"
    config = cloud_config(render(request(ssh_authorized_key=text)).user_data)
    assert config["ssh_authorized_keys"] == [KEY, second]


# --- the password --------------------------------------------------------------------------------


def test_password_is_stored_hashed_and_never_in_plaintext() -> None:
    req = request(password=PASSWORD, user_data_text="#cloud-config\npackages: [jq]\n")
    docs = render(req)
    hashed = cloud_config(part_text(parts(docs)[0]))["user"]["hashed_passwd"]
    assert hashed.startswith("$6$rounds=50000$")
    for text in (docs.user_data, docs.meta_data, repr(docs), repr(req), str(req)):
        assert PASSWORD not in text
    if crypt is not None:
        assert crypt.crypt(PASSWORD, hashed) == hashed
    assert sha512_crypt(PASSWORD, hashed.split("$")[3], 50_000) == hashed


def test_password_unlocks_the_default_user() -> None:
    user = cloud_config(render(request(password=PASSWORD)).user_data)["user"]
    assert user["lock_passwd"] is False
    assert user["name"] == "nomad"


def test_each_render_salts_anew() -> None:
    first = cloud_config(render(request(password=PASSWORD)).user_data)["user"]["hashed_passwd"]
    second = cloud_config(render(request(password=PASSWORD)).user_data)["user"]["hashed_passwd"]
    assert first != second


def test_an_empty_password_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        render(request(password=""))
    assert err.value.field == "config.default_user_password"


# The specification's own vectors (https://www.akkadia.org/drepper/SHA-crypt.txt).
SPEC_VECTORS = [
    (
        "Hello world!",
        "saltstring",
        5000,
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
    ),
    (
        "Hello world!",
        "saltstringsaltstring",
        10000,
        "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
    ),
    (  # asked for with rounds=10: the specification raises it to its minimum of 1000
        "the minimum number is still observed",
        "roundstoolow",
        1000,
        "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58jaTfF4ZEQpyUNGc0dqbpBYYBaHHrsX.",
    ),
]


@pytest.mark.parametrize(("password", "salt", "rounds", "expected"), SPEC_VECTORS)
def test_sha512_crypt_matches_the_specification(
    password: str, salt: str, rounds: int, expected: str
) -> None:
    assert sha512_crypt(password, salt, rounds) == expected


@pytest.mark.parametrize(
    "password", ["", "a", "x" * 63, "x" * 64, "x" * 65, "ü€ pass\n", "y" * 300]
)
def test_sha512_crypt_agrees_with_the_hosts_libcrypt(password: str) -> None:
    hashed = sha512_crypt(password, rounds=5000)
    if crypt is not None:
        assert crypt.crypt(password, hashed) == hashed
    # openssl reads one line of limited length from stdin.
    if shutil.which("openssl") and 0 < len(password) < 100 and "\n" not in password:
        salt = hashed.split("$")[2]
        out = subprocess.run(
            ["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
            input=password.encode(),
            capture_output=True,
            check=True,
        )
        assert out.stdout.decode().strip() == hashed


# --- the environment files -----------------------------------------------------------------------


def env_written(docs: SeedDocuments) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in cloud_config(docs.user_data)["write_files"]}


def test_env_files_are_readable_by_the_default_user_only() -> None:
    files = env_written(render(request(env={"NOMAD_TASK_NAME": "web"})))
    for path in (PROFILE_PATH, ENV_FILE_PATH):
        entry = files[path]
        assert entry["owner"] == "root:nomad"
        assert entry["permissions"] == "0640"
        # write_files runs before the default user (and its group) exists unless deferred.
        assert entry["defer"] is True
    assert "export NOMAD_TASK_NAME=web\n" in files[PROFILE_PATH]["content"]
    assert 'NOMAD_TASK_NAME="web"\n' in files[ENV_FILE_PATH]["content"]


def read_back(tmp_path: Path, content: str, name: str, *, allexport: bool) -> bytes:
    script = tmp_path / "env.sh"
    script.write_text(content)
    prefix = "set -a; " if allexport else ""
    out = subprocess.run(
        ["sh", "-c", f'{prefix}. "$1"; printf %s "${name}"', "sh", str(script)],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return out.stdout


@pytest.mark.parametrize("value", NASTY_VALUES)
def test_profile_quoting_round_trips_through_sh(tmp_path: Path, value: str) -> None:
    files = environment_files({"NASTY": value, "OTHER": "x"})
    assert read_back(tmp_path, files.profile, "NASTY", allexport=False) == value.encode()


@pytest.mark.parametrize("value", NASTY_VALUES)
def test_env_file_quoting_round_trips_through_sh(tmp_path: Path, value: str) -> None:
    # systemd's EnvironmentFile= reads the same double-quoted form (checked in the guest
    # by the boot test in tests/integration/test_cloudinit_seed.py).
    files = environment_files({"NASTY": value})
    assert read_back(tmp_path, files.env_file, "NASTY", allexport=True) == value.encode()


def test_env_values_survive_the_yaml_dump(tmp_path: Path) -> None:
    env = {f"V{i}": v for i, v in enumerate(NASTY_VALUES)}
    content = env_written(render(request(env=env)))[PROFILE_PATH]["content"]
    for name, value in env.items():
        assert read_back(tmp_path, content, name, allexport=False) == value.encode()


def test_names_that_are_not_shell_variables_are_left_out_with_a_warning() -> None:
    env = {"NOMAD_META_my-key": "1", "NOMAD_META_my_key": "1", "HOME": "/host", "9X": "2"}
    docs = render(request(env=env))
    content = env_written(docs)[PROFILE_PATH]["content"]
    assert "NOMAD_META_my_key=1" in content
    assert "my-key" not in content and "HOME" not in content and "9X" not in content
    assert len(docs.warnings) == 3
    assert any("NOMAD_META_my-key" in w for w in docs.warnings)
    assert all("/host" not in w for w in docs.warnings)


@pytest.mark.parametrize("value", ["a\0b", "bom\ufeff", "non\ufdd0char", "x\U0001fffe"])
def test_unrepresentable_values_are_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        render(request(env={"SECRET": value}))
    assert err.value.field == "env.SECRET"
    assert value not in str(err.value)


# --- the user's document -------------------------------------------------------------------------

USER_CONFIG = "#cloud-config\n# mine\nruncmd:\n  - echo user\npackages: [nginx]\n"


def test_without_user_data_the_user_data_is_one_cloud_config() -> None:
    assert not email.message_from_string(render(request()).user_data).is_multipart()


def test_user_cloud_config_becomes_a_second_part_with_our_merge_type() -> None:
    docs = render(request(cmds=("echo ours",), user_data_text=USER_CONFIG))
    ours, theirs = parts(docs)
    assert ours.get_content_type() == theirs.get_content_type() == "text/cloud-config"
    assert cloud_config(part_text(ours))["runcmd"] == ["echo ours"]
    assert "Merge-Type" not in ours
    assert theirs["Merge-Type"] == USER_PART_MERGE_TYPE
    assert part_text(theirs) == USER_CONFIG  # verbatim: comments and layout kept
    assert (ours.get_filename(), theirs.get_filename()) == ("nomad-vm.cfg", "user-data.cfg")


def test_a_script_is_passed_through_as_a_script_part() -> None:
    script = "#!/bin/bash\necho hi > /dev/ttyS0\n"
    _, theirs = parts(render(request(user_data_text=script)))
    assert theirs.get_content_type() == "text/x-shellscript"
    assert part_text(theirs) == script
    # cloud-init runs scripts in name order; its runcmd script is named "runcmd".
    assert theirs.get_filename() == "user-data.sh" and "user-data.sh" > "runcmd"


def test_non_ascii_user_data_survives_the_mime_encoding() -> None:
    text = "#cloud-config\nwrite_files:\n  - path: /x\n    content: 'grüße ✓'\n"
    assert part_text(parts(render(request(user_data_text=text)))[1]) == text


def test_a_byte_order_mark_is_tolerated() -> None:
    text = "\ufeff#cloud-config\nruncmd: [echo]\n"
    assert part_text(parts(render(request(user_data_text=text)))[1]) == text


@pytest.mark.parametrize("text", ["", "  \n", "#cloud-config\n", "#cloud-config\n# nothing\n"])
def test_empty_user_data_adds_no_part(text: str) -> None:
    assert not email.message_from_string(
        render(request(user_data_text=text)).user_data
    ).is_multipart()


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("#cloud-config\nruncmd:\n  - echo a\n bad: [\n", 4, "invalid YAML"),
        ("#cloud-config\npackages: [a, b\nruncmd: []\n", 3, "invalid YAML"),
        ("#cloud-config\nusers:\n\t- name: x\n", 3, "invalid YAML"),
        ("#cloud-config\na: 1\n---\nb: 2\n", 3, "invalid YAML"),
        ("#cloud-config\n\n- runcmd\n", 3, "must be a mapping"),
        ("#cloud-config\nx: 1\ny: \x00\n", 3, "not allowed"),
        ("runcmd:\n  - echo a\n", 1, "must start with the line '#cloud-config'"),
        ("#cloud-boothook\necho a\n", 1, "not supported"),
        ("#include\nhttp://example.com/x\n", 1, "not supported"),
        ("  #!/bin/sh\necho\n", 1, "very first characters"),
        ("#cloud-config\nmerge_how: list(apend)\n", 2, "unknown setting"),
        ("#cloud-config\nruncmd: []\nmerge_how: 'list(append)+bogus'\n", 3, "not of the form"),
        ("#cloud-config\nmerge_type: [{name: tuple, settings: []}]\n", 2, "unknown merger"),
    ],
)
def test_unusable_user_data_is_an_error_naming_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        render(request(user_data_text=text))
    assert err.value.field == "config.user_data"
    assert err.value.reason.startswith(f"line {line}"), err.value.reason
    assert words in err.value.reason


def test_a_yaml_error_does_not_quote_the_document() -> None:
    text = "#cloud-config\nchpasswd: {list: 'root:Sup3rSecret'\nruncmd: [\n"
    with pytest.raises(ConfigError) as err:
        render(request(user_data_text=text))
    assert "Sup3rSecret" not in str(err.value)


@pytest.mark.parametrize(
    "merge_how",
    [
        "dict(replace)+list()+str()",
        "list(append)",
        " List(Append, Recurse-Dict) + dict(no_replace,recurse_list) ",
        "[{name: list, settings: [prepend]}, {name: dict, settings: [replace]}]",
        "[[list, append], [str]]",
    ],
)
def test_valid_merge_how_is_accepted(merge_how: str) -> None:
    text = f"#cloud-config\nmerge_how: {merge_how}\nruncmd: [echo]\n"
    assert len(parts(render(request(user_data_text=text)))) == 2


def test_network_config_added_after_rendering_keeps_the_other_documents() -> None:
    docs = render(CloudInitRequest(instance_id="i-1", hostname="web-1"))
    config = {"version": 2, "ethernets": {"eth0": {"addresses": ["10.0.0.5/24"]}}}
    with_net = with_network_config(docs, config)
    assert yaml.safe_load(with_net.network_config or "") == config
    assert (with_net.meta_data, with_net.user_data) == (docs.meta_data, docs.user_data)
