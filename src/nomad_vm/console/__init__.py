"""`nomad-vm console serve`: VMs' graphical consoles in the browser (see registry.py)."""
