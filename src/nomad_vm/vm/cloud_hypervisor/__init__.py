"""The Cloud Hypervisor backend: the VMM launched with an API socket and an event monitor, the VM
defined and booted over CH's REST API. See ``backend`` (check_host, plan, launch, reattach),
``running`` (one VM), ``vm_config`` (the VM definition, a pure function), ``model`` (the typed
API model), ``client`` (HTTP over the unix socket) and ``events`` (the event-monitor file)."""
