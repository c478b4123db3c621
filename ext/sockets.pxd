# The socket calls the Cython kernels make themselves (GIL released): the one place they are
# declared. Compile-time only: `from sockets cimport iovec, msghdr, sendmsg`.

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
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
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    int socket(int domain, int kind, int protocol)
    int setsockopt(int fd, int level, int name, const void *value, socklen_t length)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t length, int flags)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL
    int MSG_PEEK
    int MSG_TRUNC
    int SOL_SOCKET
    int SO_PEEK_OFF
    int SOCK_DGRAM

cdef enum:
    MAX_IOV = 1024  # IOV_MAX on Linux: the most iovecs one sendmsg takes
