"""The few HCL forms we write for a Nomad agent: values, blocks and the plugin's own block."""

from __future__ import annotations

import json
from collections.abc import Mapping

PLUGIN_NAME = "nomad-driver-vm"


def hcl_string(value: str) -> str:
    """A quoted HCL string (JSON's escapes are HCL's for everything we write)."""
    return json.dumps(value)


def hcl_value(value: object) -> str:
    """A plugin option as HCL: strings, numbers, booleans and lists of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return hcl_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(hcl_value(v) for v in value) + "]"
    raise TypeError(f"no HCL form for {value!r}")


def hcl_block(name: str, attributes: Mapping[str, object], indent: str = "") -> str:
    """``name { key = value ... }``; a Mapping value becomes a nested block."""
    lines = [f"{indent}{name} {{"]
    width = max((len(k) for k, v in attributes.items() if not isinstance(v, Mapping)), default=0)
    for key, value in attributes.items():
        if isinstance(value, Mapping):
            lines.append(hcl_block(key, value, indent + "  "))
        else:
            lines.append(f"{indent}  {key.ljust(width)} = {hcl_value(value)}")
    return "\n".join([*lines, f"{indent}}}"])


def plugin_block(config: Mapping[str, object], name: str = PLUGIN_NAME) -> str:
    """The agent's ``plugin "<name>" { config { ... } }`` block for ``config`` (``name``: the
    executable's file name in plugin_dir, which is what Nomad matches the block by)."""
    return hcl_block(f"plugin {hcl_string(name)}", {"config": config}) + "\n"
