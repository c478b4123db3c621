"""Wire formats: checked views over bytes plus the code that emits them.

One module per format (Ethernet, ARP, IPv4, IPv6, ICMP, ICMPv6, UDP, TCP, DHCP,
DNS, TFTP, the virtio-net offload word). A view validates lengths once in its
constructor and raises ``errors.MalformedPacket``; emitters build headers with
correct checksums. No engine state lives here: the engines in ``stack/`` and
``tcp/`` use these. Wire modules import only the standard library, numpy and
each other (``tools/check_imports.py`` enforces it).
"""
