# The virtio-net header's offload fields (virtio 1.x, 5.1.6): checked on TX, written on RX.
#
#   struct virtio_net_hdr { u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
#                           le16 csum_start; le16 csum_offset; [le16 num_buffers] }
#
# A frame's header travels through a FrameBatch as one 64-bit "vnet" word (ext/vnet.pxd),
# so the rest of vhostnet sees small integers, never a header struct.

from netbytes cimport le16, put_le16
from vnet cimport (VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_NONE,
                  VNET_GSO_TCPV4, VNET_GSO_TCPV6, VnetFields, vnet_decode, vnet_encode,
                  vnet_gso_type)

cdef enum:
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
    # Where the fields lie in the header (little-endian 16-bit values from hdr_len on).
    HDR_FLAGS = 0
    HDR_GSO_TYPE = 1
    HDR_HDR_LEN = 2
    HDR_GSO_SIZE = 4
    HDR_CSUM_START = 6
    HDR_CSUM_OFFSET = 8


cdef int check_tx_header(const uint8_t *hdr, uint64_t frame_len, uint64_t features,
                         uint64_t *vnet_out) noexcept nogil:
    """Validate a guest TX header against the negotiated features; CHAIN_OK or a reason.

    vhostnet terminates every TCP connection itself, so a GSO frame is never cut up
    again: its payload goes to a host socket whole. What must hold is only that
    the guest asked for offloads it negotiated and that the checksum position lies
    inside the frame; the frame's own IPv4/TCP lengths are checked by the stack.
    """
    cdef uint8_t flags = hdr[HDR_FLAGS]
    cdef uint8_t gso_type = hdr[HDR_GSO_TYPE]
    cdef uint64_t gso_size = le16(hdr + HDR_GSO_SIZE)
    cdef uint64_t csum_start = le16(hdr + HDR_CSUM_START)
    cdef uint64_t csum_offset = le16(hdr + HDR_CSUM_OFFSET)
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
    vnet_out[0] = vnet_encode(flags & VNET_F_NEEDS_CSUM, gso_type, <uint16_t>gso_size,
                              <uint16_t>csum_start, <uint16_t>csum_offset)
    return CHAIN_OK


cdef int fill_rx_header(uint8_t *hdr, uint64_t vnet, const uint8_t *frame, uint32_t frame_len,
                        uint64_t features) noexcept nogil:
    """Write the 10 offload bytes of an RX header from a frame's vnet word; CHAIN_OK or a reason.

    The stack only sets offloads the guest negotiated, but a reconnect can renegotiate
    while frames wait, so the features are checked once more here.
    """
    cdef VnetFields fields = vnet_decode(vnet)
    cdef uint8_t flags = fields.flags
    cdef uint8_t gso_type = fields.gso_type
    cdef uint16_t gso_size = fields.gso_size
    cdef uint16_t csum_start = fields.csum_start
    cdef uint16_t csum_offset = fields.csum_offset
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
    hdr[HDR_FLAGS] = flags
    hdr[HDR_GSO_TYPE] = gso_type
    put_le16(hdr + HDR_HDR_LEN, hdr_len)
    put_le16(hdr + HDR_GSO_SIZE, gso_size)
    put_le16(hdr + HDR_CSUM_START, csum_start)
    put_le16(hdr + HDR_CSUM_OFFSET, csum_offset)
    return CHAIN_OK
