# The socket calls the Cython kernels make themselves (GIL released): sendmsg(2) with an
# iovec array. Compile-time only: `from sockets cimport iovec, msghdr, sendmsg`.

cdef extern from "<sys/socket.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    cdef struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef enum:
    MAX_IOV = 1024  # IOV_MAX on Linux: the most iovecs one sendmsg takes
