"""The user-mode network stack: sans-IO, one module per protocol."""
