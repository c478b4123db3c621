# The virtio-net header's offload fields (virtio 1.x, 5.1.6): checked on TX, written on RX.
#
#   struct virtio_net_hdr { u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
#                           le16 csum_start; le16 csum_offset; [le16 num_buffers] }
#
# A frame's header travels through a FrameBatch as one 64-bit "vnet" word (layout
# below), so the rest of vhostnet sees small integers, never a header struct.

cdef enum:
    VNET_F_NEEDS_CSUM = 1     # partial L4 checksum: csum_start/csum_offset say where
    VNET_F_DATA_VALID = 2     # device -> driver: checksums already verified
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_UDP = 3
    VNET_GSO_TCPV6 = 4
    VNET_GSO_ECN = 0x80
    # Feature bits that allow header fields (device feature numbers).
    FEAT_CSUM = 1 << 0
    FEAT_GUEST_CSUM = 1 << 1
    FEAT_GUEST_TSO4 = 1 << 7
    FEAT_GUEST_TSO6 = 1 << 8
    FEAT_GUEST_ECN = 1 << 9
    FEAT_HOST_TSO4 = 1 << 11
    FEAT_HOST_TSO6 = 1 << 12
    FEAT_HOST_ECN = 1 << 13
    VNET_HEADER_FIELDS = 10   # the header without num_buffers

# vnet word: flags | gso_type << 8 | gso_size << 16 | csum_start << 32 | csum_offset << 48
VNET_FLAGS_SHIFT = 0
VNET_GSO_TYPE_SHIFT = 8
VNET_GSO_SIZE_SHIFT = 16
VNET_CSUM_START_SHIFT = 32
VNET_CSUM_OFFSET_SHIFT = 48


cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint16_t>p[1] << 8)


cdef int check_tx_header(const uint8_t *hdr, uint64_t frame_len, uint64_t features,
                         uint64_t *vnet_out) noexcept nogil:
    """Validate a guest TX header against the negotiated features; CHAIN_OK or a reason.

    vhostnet terminates every TCP connection itself, so a GSO frame is never cut up
    again: its payload goes to a host socket whole. What must hold is only that
    the guest asked for offloads it negotiated and that the checksum position lies
    inside the frame; the frame's own IPv4/TCP lengths are checked by the stack.
    """
    cdef uint8_t flags = hdr[0]
    cdef uint8_t gso_type = hdr[1]
    cdef uint64_t gso_size = le16(hdr + 4)
    cdef uint64_t csum_start = le16(hdr + 6)
    cdef uint64_t csum_offset = le16(hdr + 8)
    cdef uint8_t gso = gso_type & ~VNET_GSO_ECN
    if flags & VNET_F_NEEDS_CSUM:
        if not features & FEAT_CSUM:
            return R_TX_OFFLOAD_NOT_NEGOTIATED
        if csum_start < ETH_HEADER_BYTES or csum_start + csum_offset + 2 > frame_len:
            return R_TX_BAD_CSUM_OFFSET
    else:
        csum_start = csum_offset = 0
    if gso_type != VNET_GSO_NONE:
        if gso == VNET_GSO_TCPV4:
            if not features & FEAT_HOST_TSO4:
                return R_TX_OFFLOAD_NOT_NEGOTIATED
        elif gso == VNET_GSO_TCPV6:
            if not features & FEAT_HOST_TSO6:
                return R_TX_OFFLOAD_NOT_NEGOTIATED
        else:
            return R_TX_OFFLOAD_NOT_NEGOTIATED  # UFO/USO are never offered
        if gso_type & VNET_GSO_ECN and not features & FEAT_HOST_ECN:
            return R_TX_OFFLOAD_NOT_NEGOTIATED
        # Segmentation offload always comes with a partial checksum (5.1.6.2).
        if gso_size == 0 or not flags & VNET_F_NEEDS_CSUM:
            return R_TX_BAD_GSO
    else:
        gso_size = 0
    vnet_out[0] = ((flags & VNET_F_NEEDS_CSUM) | (<uint64_t>gso_type << 8) | (gso_size << 16)
                   | (csum_start << 32) | (csum_offset << 48))
    return CHAIN_OK


cdef int fill_rx_header(uint8_t *hdr, uint64_t vnet, const uint8_t *frame, uint32_t frame_len,
                        uint64_t features) noexcept nogil:
    """Write the 10 offload bytes of an RX header from a frame's vnet word; CHAIN_OK or a reason.

    The stack only sets offloads the guest negotiated, but a reconnect can renegotiate
    while frames wait, so the features are checked once more here.
    """
    cdef uint8_t flags = vnet & 0xFF
    cdef uint8_t gso_type = (vnet >> 8) & 0xFF
    cdef uint16_t gso_size = (vnet >> 16) & 0xFFFF
    cdef uint16_t csum_start = (vnet >> 32) & 0xFFFF
    cdef uint16_t csum_offset = (vnet >> 48) & 0xFFFF
    cdef uint16_t hdr_len = 0
    cdef uint8_t gso = gso_type & ~VNET_GSO_ECN
    memset(hdr, 0, VNET_HEADER_FIELDS)
    if vnet == 0:
        return CHAIN_OK
    if flags & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID) and not features & FEAT_GUEST_CSUM:
        return R_RX_OFFLOAD_NOT_NEGOTIATED
    if flags & VNET_F_NEEDS_CSUM and <uint32_t>csum_start + csum_offset + 2 > frame_len:
        return R_RX_OFFLOAD_NOT_NEGOTIATED
    if gso_type != VNET_GSO_NONE:
        if ((gso == VNET_GSO_TCPV4 and not features & FEAT_GUEST_TSO4)
                or (gso == VNET_GSO_TCPV6 and not features & FEAT_GUEST_TSO6)
                or (gso != VNET_GSO_TCPV4 and gso != VNET_GSO_TCPV6)
                or (gso_type & VNET_GSO_ECN and not features & FEAT_GUEST_ECN)
                or gso_size == 0 or not flags & VNET_F_NEEDS_CSUM):
            return R_RX_OFFLOAD_NOT_NEGOTIATED
        # hdr_len is a hint: Ethernet, IP and TCP headers (TCP's data offset at csum_start + 12).
        if <uint32_t>csum_start + 13 <= frame_len:
            hdr_len = csum_start + ((frame[csum_start + 12] >> 4) << 2)
    hdr[0] = flags
    hdr[1] = gso_type
    hdr[2] = hdr_len & 0xFF
    hdr[3] = hdr_len >> 8
    hdr[4] = gso_size & 0xFF
    hdr[5] = gso_size >> 8
    hdr[6] = csum_start & 0xFF
    hdr[7] = csum_start >> 8
    hdr[8] = csum_offset & 0xFF
    hdr[9] = csum_offset >> 8
    return CHAIN_OK
