"""The project's exception tree.

Foreign exceptions (grpc, QMP, OSError from subprocess, msgpack) are translated where the foreign
call is made; only these types cross a layer. The plugin layer maps them to gRPC statuses in one
table (``nomad_vm.plugin.status``)::

    NomadVMError
     +-- FieldError           a user-given value is wrong; names the field
     |    +-- ConfigError     bad plugin or task configuration
     |    +-- ImageError      kernel/image/initramfs missing, unreadable or outside image_paths
     +-- TaskNotFound         no task with that id in this plugin
     +-- TaskExists           StartTask for an id already running
     +-- VMRequestError       a backend cannot honour a VM request or hypervisor setting; names
     |                        the backend's option (``machine``), the driver turns it into a
     |                        ConfigError naming the config field (``config.os.machine``)
     +-- HypervisorError      the VMM could not be started, controlled or queried
     |    +-- LaunchError     the VMM exited or failed during start (recoverable: Nomad may retry)
     |    +-- GuestAgentUnavailable  exec/signal cannot reach the guest (no agent answering)
     |    +-- NetworkError    the host side of a VM's network (bridge, TAP, IP pool, nftables)
     +-- CommandNotRunnable   the guest could not start an exec'd command (not found, not
     |                        executable); ``exit_code`` is what a shell would give (127, 126)
     +-- GuestBuildError      building a test guest failed
     +-- Unsupported          the operation is not available for this task or host
"""

from __future__ import annotations


class NomadVMError(Exception):
    """Root of every error this project raises on purpose."""


class FieldError(NomadVMError):
    """A value a user gave is wrong. ``field`` is its dotted path, e.g. ``config.kernel``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ConfigError(FieldError):
    """Bad plugin or task configuration."""


class TaskNotFound(NomadVMError):
    """The task id is unknown to this plugin (the wording matches Nomad's ErrTaskNotFound)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task not found for given id: {task_id}")
        self.task_id = task_id


class TaskExists(NomadVMError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task with id already started: {task_id}")
        self.task_id = task_id


class VMRequestError(NomadVMError):
    """A VM request, or a hypervisor setting, that a backend cannot honour. ``option`` names it
    in the backend's own terms (``machine``, ``firmware``, ``accelerator``, ...): the hypervisor
    layer knows no Nomad config, so the driver, which knows where the value came from, raises a
    ConfigError naming the field instead."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


class ImageError(FieldError):
    """A boot artefact cannot be used; ``field`` names the task option that pointed at it."""


class HypervisorError(NomadVMError):
    """The VMM could not be started, controlled or queried."""


class LaunchError(HypervisorError):
    """The VMM failed while starting. Nomad may retry such a start (recoverable)."""


class GuestAgentUnavailable(HypervisorError):
    """The guest agent does not answer: exec and signals cannot reach the guest."""


class NetworkError(HypervisorError):
    """The host side of a VM's network could not be set up, queried or torn down.

    A ``HypervisorError`` so that a failed start stays recoverable: a full IP pool or a busy
    netlink may well succeed on Nomad's retry. Bad user input is a ``ConfigError`` instead.
    """


class CommandNotRunnable(NomadVMError):
    """The guest could not start the command given to exec. ``exit_code`` is a shell's for the
    same failure: 127 when the program was not found, 126 when it could not be executed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GuestBuildError(NomadVMError):
    """Building a test guest image failed."""


class Unsupported(NomadVMError):
    """The operation exists in Nomad's protocol but is not available here."""
