"""Live migration: the state blob format, network snapshots, and device-state transfer."""
