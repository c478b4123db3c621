# UDP GSO on send (Linux >= 4.18), included by udp_fast.pyx.
#
# Consecutive guest datagrams of one flow with the same payload size (the last may be shorter)
# leave as ONE message of a sendmmsg: its iovec lists their payloads, and its UDP_SEGMENT
# control message tells the kernel the size to cut them at. The kernel builds the datagrams
# (the receiver sees each one as the guest sent it), so the IP and UDP stacks and the device
# run once per message instead of once per datagram. A message holds at most GSO_SEGMENTS
# datagrams (UDP_MAX_SEGMENTS is 64 on older kernels) and GSO_PAYLOAD bytes (an IPv4 datagram's
# largest payload, the kernel's limit for both families).

from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from sockets cimport CMSG_DATA, CMSG_LEN, CMSG_SPACE, SOCK_DGRAM, cmsghdr, setsockopt, socket

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef enum:
    SOL_UDP_C = 17
    UDP_SEGMENT_C = 103
    GSO_SEGMENTS = 64
    GSO_PAYLOAD = 65507
    GSO_CONTROL_WORDS = 3        # CMSG_SPACE(sizeof(uint16_t)) = 24 bytes, 8-byte aligned


cdef struct Message:             # one message of a sendmmsg: one datagram, or several by GSO
    int slot                     # the flow's slot in the FlowIndex
    uint32_t first               # its first iovec in the sender's iovs
    uint32_t segments            # datagrams (iovecs) in it
    uint32_t segment_size        # the first datagram's payload bytes: the GSO size
    uint64_t bytes               # payload bytes in all
    bint closed                  # a shorter datagram ended it: no more may join
    uint64_t control[GSO_CONTROL_WORDS]


cdef bint gso_supported():
    """Whether this kernel knows UDP_SEGMENT (a kernel without it would ignore the control
    message and send the whole message as one datagram)."""
    cdef int fd = socket(AF_INET_C, SOCK_DGRAM, 0)
    cdef int zero = 0
    if fd < 0:
        return False
    cdef bint known = setsockopt(fd, SOL_UDP_C, UDP_SEGMENT_C, &zero, sizeof(int)) == 0
    close(fd)
    return known


cdef inline bint gso_may_join(const Message *message, int slot, uint64_t length) noexcept nogil:
    """Whether a datagram of ``length`` payload bytes on flow ``slot`` may be cut from the same
    GSO message as ``message``'s: same flow, same size (or shorter, as the last one)."""
    return (message.slot == slot and not message.closed and length > 0
            and length <= message.segment_size and message.segments < GSO_SEGMENTS
            and message.bytes + length <= GSO_PAYLOAD)


cdef inline void gso_control(msghdr *header, Message *message) noexcept nogil:
    """The UDP_SEGMENT control message of a message of more than one datagram (none for one)."""
    cdef cmsghdr *cmsg = <cmsghdr *>message.control
    cdef uint16_t size = <uint16_t>message.segment_size
    if message.segments < 2:
        header.msg_control = NULL
        header.msg_controllen = 0
        return
    cmsg.cmsg_len = CMSG_LEN(sizeof(uint16_t))
    cmsg.cmsg_level = SOL_UDP_C
    cmsg.cmsg_type = UDP_SEGMENT_C
    memcpy(CMSG_DATA(cmsg), &size, sizeof(uint16_t))
    header.msg_control = message.control
    header.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
