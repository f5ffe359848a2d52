"""docs/configuration.md, rendered from the schema (``nomad-vm docs``; ``make docs``)."""

from __future__ import annotations

import json

from nomad_vm.fields import flatten
from nomad_vm.schema import PLUGIN_CONFIG, TASK_CONFIG


def render_reference() -> str:
    """The Markdown configuration reference (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from src/nomad_vm/schema/ by `make docs`; do not edit by hand. -->",
        "",
    ]
    for schema in (PLUGIN_CONFIG, TASK_CONFIG):
        lines += [f"## {schema.title}", "", f"Set in {schema.where}.", ""]
        lines += ["| option | type | default | description |", "|---|---|---|---|"]
        for f in flatten(schema.fields):
            default = "—" if f.default is None else f"`{json.dumps(f.default)}`"
            doc = f.doc
            if f.choices:
                doc += " One of: " + ", ".join(f"`{c}`" for c in f.choices) + "."
            if f.example:
                doc += f" Example: `{f.name} = {f.example}`."
            lines.append(f"| `{f.name}` | {f.type} | {default} | {doc} |")
        lines.append("")
    lines += [
        "## Resources",
        "",
        "The VM's size comes from the task's `resources` block, not from `config`:",
        "",
        "* vCPUs: the number of reserved `cores`, or else `cpu` (MHz) divided by the host's",
        "  per-core MHz as Nomad fingerprinted it, rounded up; at least 1, at most the host's",
        "  cores.",
        "* Memory: `memory` (MB) becomes the guest's RAM.",
        "",
    ]
    return "\n".join(lines)
