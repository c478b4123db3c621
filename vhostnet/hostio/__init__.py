"""Host-side I/O glue of the network stack: real sockets, thin, no protocol logic."""
