"""xnbdd: a systemd-native NBD server compatible with xNBD."""

__version__ = "0.1.0"
