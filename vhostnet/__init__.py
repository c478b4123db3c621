"""vhostnet: a user-mode network back-end for QEMU guests over vhost-user."""

__version__ = "0.1.0"
