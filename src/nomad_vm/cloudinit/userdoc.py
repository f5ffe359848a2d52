"""The user's own ``user_data`` document: what kind it is, and whether cloud-init can use it.

Two kinds are accepted, told apart by the first line as cloud-init does (case-insensitive):

* ``#cloud-config``: YAML, which must load (PyYAML's safe loader, the one cloud-init uses) to a
  mapping. Its ``merge_how`` / ``merge_type`` key, if any, must be one cloud-init's mergers
  understand: cloud-init drops a whole part with a malformed one, with only a warning in the
  guest's log.
* ``#!``: a script, passed through; cloud-init runs it once per instance after ``runcmd``.

Anything else (``#include``, ``#cloud-boothook``, jinja templates, archives, a MIME document, or
YAML without the ``#cloud-config`` line) is refused: the line and the reason, never the text, is
in the error, since user data may hold secrets and errors become task events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from nomad_vm.cloudinit.timezone import check_timezone
from nomad_vm.errors import ConfigError

FIELD = "config.user_data"

CLOUD_CONFIG = "#cloud-config"

# cloud-init's built-in mergers and the settings each reads (cloudinit/mergers/m_*.py).
_RECURSE = {"recurse_dict", "recurse_list", "recurse_array", "recurse_str"}
MERGER_SETTINGS: dict[str, frozenset[str]] = {
    "dict": frozenset({"replace", "no_replace", "allow_delete", *_RECURSE}),
    "list": frozenset({"append", "prepend", "replace", "no_replace", *_RECURSE}),
    "str": frozenset({"append"}),
}
_MERGER_TERM = re.compile(r"^([a-zA-Z_][A-Za-z0-9_]*)\((.*?)\)$")


@dataclass(frozen=True)
class UserDocument:
    """The user's document, verbatim (cloud-init reads it itself), and what we learnt of it."""

    text: str
    is_script: bool


def parse_user_data(text: str) -> UserDocument | None:
    """Check the user's document; None when there is nothing for cloud-init to do."""
    if not text.strip():
        return None
    raw_first_line = text.split("\n", 1)[0]
    if raw_first_line.startswith("#!"):
        # Not stripped: the kernel only runs a file whose very first bytes are "#!".
        return UserDocument(text, is_script=True)
    # A byte order mark from an editor: YAML skips it, so do we.
    first_line = raw_first_line.lstrip("\ufeff").strip().lower()
    if first_line != CLOUD_CONFIG:
        raise ConfigError(FIELD, f"line 1: {_first_line_problem(first_line)}")
    config = _load_mapping(text)
    return None if config is None else UserDocument(text, is_script=False)


def _first_line_problem(first_line: str) -> str:
    if first_line.startswith("#!"):
        return "a script's '#!' must be the very first characters (no space or mark before it)"
    if first_line.startswith("#"):
        return (
            "this kind of user data is not supported: use a '#cloud-config' document "
            "or a script starting with '#!'"
        )
    return (
        "a cloud-config document must start with the line '#cloud-config' "
        "(or give a script starting with '#!')"
    )


def _yaml_error(error: yaml.YAMLError, text: str) -> ConfigError:
    """A ConfigError naming the line (1-based) of a YAML error, without quoting the text."""
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        return ConfigError(FIELD, f"line {line}: character U+{error.character:04X} is not allowed")
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        problem = error.problem or "invalid YAML"
        if error.context and error.context_mark is not None:
            problem += f" ({error.context} at line {error.context_mark.line + 1})"
        return ConfigError(FIELD, f"{where}: invalid YAML: {problem}")
    return ConfigError(FIELD, f"invalid YAML: {type(error).__name__}")


def _load_mapping(text: str) -> dict[Any, Any] | None:
    """The document as a mapping (None if empty); errors name the line."""
    try:
        # The reader refuses control characters as soon as it is made: inside the try.
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise _yaml_error(error, text) from None
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(
            FIELD,
            f"line {node.start_mark.line + 1}: a cloud-config document must be a mapping "
            f"of keys (like 'runcmd:'), not a {_node_kind(node)}",
        )
    assert isinstance(data, dict)
    _check_merge_how(node, data)
    _check_timezone(node, data)
    return data


def _node_kind(node: yaml.Node) -> str:
    return "list" if isinstance(node, yaml.SequenceNode) else "single value"


def _check_merge_how(node: yaml.MappingNode, data: dict[Any, Any]) -> None:
    # cloud-init reads merge_how, and merge_type only when merge_how is absent.
    key = "merge_how" if "merge_how" in data else "merge_type" if "merge_type" in data else None
    if key is None:
        return
    line = next(k.start_mark.line + 1 for k, _ in node.value if k.value == key)
    try:
        _check_mergers(data[key])
    except ValueError as error:
        raise ConfigError(FIELD, f"line {line}: {key}: {error}") from None


def _check_timezone(node: yaml.MappingNode, data: dict[Any, Any]) -> None:
    """The document's own ``timezone:``, checked like the task's ``timezone`` option: cloud-init
    would only log its refusal inside the guest."""
    if "timezone" not in data:
        return
    line = next(k.start_mark.line + 1 for k, _ in node.value if k.value == "timezone")
    value = data["timezone"]
    if not isinstance(value, str):
        raise ConfigError(FIELD, f"line {line}: timezone: must be a zone name like Europe/Berlin")
    try:
        check_timezone(value, FIELD)
    except ConfigError as error:
        raise ConfigError(FIELD, f"line {line}: timezone: {error.reason}") from None


def _check_mergers(value: object) -> None:
    """Raise ValueError unless cloud-init can build mergers from ``value``."""
    if isinstance(value, str):
        terms = [t.strip().lower().replace("-", "_") for t in value.split("+")]
        for term in filter(None, terms):
            match = _MERGER_TERM.match(term)
            if match is None:
                raise ValueError(f"{term!r} is not of the form name(setting,...)")
            settings = [s.strip().lower() for s in match.group(2).split(",") if s.strip()]
            _check_merger(match.group(1), settings)
        return
    if not isinstance(value, list):
        raise ValueError("must be a string like 'list(append)+dict(recurse_list)' or a list")
    for entry in value:
        if isinstance(entry, dict) and isinstance(entry.get("settings"), list):
            _check_merger(str(entry.get("name", "")).replace("-", "_").strip(), entry["settings"])
        elif isinstance(entry, list) and entry:
            _check_merger(str(entry[0]), entry[1:])
        else:
            raise ValueError("each entry must be {name: ..., settings: [...]}")


def _check_merger(name: str, settings: list[Any]) -> None:
    if name not in MERGER_SETTINGS:
        raise ValueError(f"unknown merger {name!r} (cloud-init has dict, list and str)")
    unknown = [s for s in settings if s not in MERGER_SETTINGS[name]]
    if unknown:
        allowed = ", ".join(sorted(MERGER_SETTINGS[name]))
        raise ValueError(f"{name}: unknown setting(s) {unknown} (known: {allowed})")
