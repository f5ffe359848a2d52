"""One declarative description of the plugin config (``schema.plugin``) and the task config
(``schema.task``).

Three things are derived from it, so they cannot disagree:

* the hclspec Nomad uses to parse HCL (``nomad_vm.plugin.hclspec`` turns it into protobuf);
* validation of the decoded values, with errors that name the field (``fields.validate``);
* the configuration reference, ``docs/configuration.md`` (``nomad_vm.cli.reference``; a test
  fails when the checked-in file is stale).

Nothing here knows about protobuf or gRPC. Semantic checks that need the host (does the kernel
exist, is it inside ``image_paths``) live with the code that uses the value.
"""

from nomad_vm.schema.plugin import (
    ACCELERATORS,
    CH_SECCOMP,
    PLUGIN_CONFIG,
    SHARE_TRANSPORTS,
    plugin_config_schema,
)
from nomad_vm.schema.task import (
    CLOUD_INIT_OPTIONS,
    FIRMWARES,
    HYPERVISORS,
    MACHINES,
    NEEDS_SEED,
    TASK_CONFIG,
)

__all__ = [
    "ACCELERATORS",
    "CH_SECCOMP",
    "CLOUD_INIT_OPTIONS",
    "FIRMWARES",
    "HYPERVISORS",
    "MACHINES",
    "NEEDS_SEED",
    "PLUGIN_CONFIG",
    "SHARE_TRANSPORTS",
    "TASK_CONFIG",
    "plugin_config_schema",
]
