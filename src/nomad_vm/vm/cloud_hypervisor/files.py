"""The files of one Cloud Hypervisor VM in the task's runtime directory."""

# The REST API's unix socket (--api-socket).
API_SOCKET = "ch-api.sock"
# The event monitor's output (--event-monitor): outlives the plugin, read after a restart.
EVENTS_FILE = "ch-events.json"
# CH's own messages (its stderr), unless the operator's cloud_hypervisor.log_file takes them.
LOG_NAME = "cloud-hypervisor.log"
