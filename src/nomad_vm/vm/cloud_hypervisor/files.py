"""The files of one Cloud Hypervisor VM in the task's runtime directory."""

# The REST API's unix socket (--api-socket).
API_SOCKET = "ch-api.sock"
# The event monitor's output (--event-monitor): outlives the plugin, read after a restart.
EVENTS_FILE = "ch-events.json"
# CH's own messages (its stderr), unless the operator's cloud_hypervisor.log_file takes them.
LOG_NAME = "cloud-hypervisor.log"
# CH's working directory, vm_user's own (vmm_files): the sockets it reaches or binds by name.
VMM_DIR = "vmm"
# The hybrid-vsock socket CH binds in VMM_DIR; the plugin connects to it (guest agent).
VSOCK_SOCKET = "vsock.sock"
