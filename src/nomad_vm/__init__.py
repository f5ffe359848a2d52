"""nomad-vm: run virtual machines as HashiCorp Nomad tasks."""

__version__ = "0.1.0"
__all__ = ["__version__"]
