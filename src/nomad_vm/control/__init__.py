"""The plugin's local control socket: its protocol and client (stdlib only, a leaf)."""
