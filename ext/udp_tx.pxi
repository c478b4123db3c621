# Guest -> host (included by udp_fast.pyx): which TX frames ``send_batch`` takes. Only plain
# IPv4 or IPv6 UDP datagrams of a registered flow, addressed from the guest to the gateway's
# MAC, headers and checksums verified (or the UDP checksum left partial by the guest's
# driver); everything else is the Python stack's, which counts and drops what is bad.


cdef int datagram_of_flow(FlowIndex index, const uint8_t *gateway_mac, const uint8_t *guest_mac,
                          const uint8_t *frame, uint64_t length, uint64_t vnet,
                          const uint8_t **payload, uint64_t *payload_len,
                          bint *ipv6) noexcept nogil:
    """The flow slot of ``frame`` if the fast path takes it (its payload and family in the
    out-arguments), else -1."""
    cdef const uint8_t *ip = frame + ETH_LEN
    cdef const uint8_t *udp
    cdef uint64_t total, udp_len
    cdef int slot
    if length < ETH_LEN + IP_LEN + UDP_LEN:
        return -1
    if memcmp(frame, gateway_mac, 6) != 0 or memcmp(frame + 6, guest_mac, 6) != 0:
        return -1
    if frame[12] == 0x08 and frame[13] == 0x00:
        # Plain IPv4 only: no options, no fragment, UDP, a header that verifies.
        if ip[0] != 0x45 or ip[9] != PROTO_UDP or (be16(ip + 6) & 0x3FFF) != 0:
            return -1
        total = be16(ip + 2)
        if total < IP_LEN + UDP_LEN or total > length - ETH_LEN:
            return -1
        if not sum_verifies(sum_bytes(ip, IP_LEN)):
            return -1
        udp = ip + IP_LEN
        udp_len = be16(udp + 4)
        if udp_len < UDP_LEN or udp_len > total - IP_LEN:
            return -1
        slot = index.find(ip, udp)
        if slot < 0 or not checksum_acceptable(ip, udp, udp_len, vnet):
            return -1
        ipv6[0] = False
    elif frame[12] == 0x86 and frame[13] == 0xDD:
        # Plain IPv6 only: UDP right after the fixed header (no extension headers).
        if length < ETH_LEN + IP6_LEN + UDP_LEN or ip[0] >> 4 != 6 or ip[6] != PROTO_UDP:
            return -1
        total = be16(ip + 4)  # the payload length
        if total < UDP_LEN or total > length - ETH_LEN - IP6_LEN:
            return -1
        udp = ip + IP6_LEN
        udp_len = be16(udp + 4)
        if udp_len < UDP_LEN or udp_len > total:
            return -1
        slot = index.find6(ip, udp)
        if slot < 0 or not checksum6_acceptable(ip, udp, udp_len, vnet):
            return -1
        ipv6[0] = True
    else:
        return -1
    payload[0] = udp + UDP_LEN
    payload_len[0] = udp_len - UDP_LEN
    return slot


cdef inline bint checksum_acceptable(const uint8_t *ip, const uint8_t *udp, uint64_t udp_len,
                                     uint64_t vnet) noexcept nogil:
    if udp[6] == 0 and udp[7] == 0:
        return True  # the sender computed none (IPv4 allows it)
    # A partial checksum at the UDP header (virtio NEEDS_CSUM) is the guest's driver
    # leaving the sum to the device: nothing to verify.
    if vnet_partial_csum_at(vnet, ETH_LEN + IP_LEN, UDP_CHECKSUM_OFFSET):
        return True
    return sum_verifies(pseudo_header_sum(ip, PROTO_UDP, udp_len) + sum_bytes(udp, udp_len))


cdef inline bint checksum6_acceptable(const uint8_t *ip6, const uint8_t *udp, uint64_t udp_len,
                                      uint64_t vnet) noexcept nogil:
    if udp[6] == 0 and udp[7] == 0:
        return False  # forbidden over IPv6 (RFC 8200 8.1): Python counts and drops it
    if vnet_partial_csum_at(vnet, ETH_LEN + IP6_LEN, UDP_CHECKSUM_OFFSET):
        return True
    return sum_verifies(pseudo_header_sum6(ip6, PROTO_UDP, udp_len) + sum_bytes(udp, udp_len))
