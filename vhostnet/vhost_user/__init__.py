"""vhost-user protocol library: constants, codec, framer, back-end handler, front-end.

Self-contained: imports only the standard library and numpy, never the rest of
vhostnet, so it can be reused on its own.
"""
