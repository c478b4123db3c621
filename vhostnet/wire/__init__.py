"""Wire formats: checked views over bytes plus the code that emits them.

One module per header (Ethernet, ARP, IPv4, IPv6, UDP, TCP, TFTP, the virtio-net
offload word). A view validates lengths once in its constructor and raises
``errors.MalformedPacket``; emitters build headers with correct checksums. No
engine state lives here: the engines in ``stack/`` and ``tcp/`` use these.
"""
