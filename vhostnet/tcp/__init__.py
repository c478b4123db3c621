"""TCP, in one place: the sans-IO engine and its flows, what it sends to the
guest, its timers and closed-connection memory, the host-socket glue
(``host.py``) and the C fast path for established flows (``fast.py``).

Other packages (the network assembler, migration) use the engine's public
methods only; see docs/ARCHITECTURE.md.
"""
