/*
 * udpecho PORT [COUNT]: a UDP responder for test guests, whose busybox nc has no -u.
 *
 * Waits for COUNT (default 1) datagrams on [::]:PORT (both families; 0.0.0.0:PORT on a
 * kernel without IPv6), prints each as
 * "udpecho got <bytes>" and answers the sender with "pong " + the datagram.
 * Gives up after 60 s without a datagram. Datagrams up to 65000 bytes.
 *
 * udpecho -c ADDRESS PORT SIZE: a client. Sends SIZE bytes of a letter pattern to
 * ADDRESS:PORT (dotted IPv4, or IPv6 text such as fec0::2), waits up to 20 s for the echo and prints
 * "udpecho client ok SIZE" if the answer is the same bytes, else
 * "udpecho client mismatch GOT" (exit 1), or "udpecho client nothing" (exit 1).
 *
 * Freestanding: guestsys.h.
 */

#include "guestsys.h"

#define MAX_DATAGRAM 65000
static char buffer[MAX_DATAGRAM + 5];
static char sent[MAX_DATAGRAM];

static void client(char **argv)
{
    struct sockaddr_in4 remote = {0};
    struct sockaddr_in6 remote6 = {0};
    struct timeval64 limit = {20, 0};
    long port = parse_number(argv[3]), size = parse_number(argv[4]), fd, got, i;
    unsigned short port_be = port_to_network(port);
    int ipv6 = has_colon(argv[2]);

    if (size > MAX_DATAGRAM)
        size = MAX_DATAGRAM;
    for (i = 0; i < size; i++)
        sent[i] = 'a' + (i * 7) % 26;
    remote.family = 2;
    remote.port = port_be;
    remote.addr = parse_ipv4(argv[2]);
    remote6.family = 10;
    remote6.port = port_be;
    if (ipv6)
        parse_ipv6(argv[2], remote6.addr);
    fd = syscall6(SYS_SOCKET, ipv6 ? 10 /* AF_INET6 */ : 2 /* AF_INET */, 2 /* SOCK_DGRAM */,
                  0, 0, 0, 0);
    if (fd < 0)
        finish(1);
    syscall6(SYS_SETSOCKOPT, fd, 1 /* SOL_SOCKET */, 20 /* SO_RCVTIMEO */, (long)&limit,
             sizeof limit, 0);
    if (ipv6)
        syscall6(SYS_SENDTO, fd, (long)sent, size, 0, (long)&remote6, sizeof remote6);
    else
        syscall6(SYS_SENDTO, fd, (long)sent, size, 0, (long)&remote, sizeof remote);
    got = syscall6(SYS_RECVFROM, fd, (long)buffer, sizeof buffer, 0, 0, 0);
    if (got < 0) {
        write_all("udpecho client nothing\n", 23);
        finish(1);
    }
    for (i = 0; i < got && i < size && buffer[i] == sent[i]; i++) {
    }
    if (got != size || i != size) {
        write_all("udpecho client mismatch ", 24);
        write_number(got);
        write_all("\n", 1);
        finish(1);
    }
    write_all("udpecho client ok ", 18);
    write_number(got);
    write_all("\n", 1);
    finish(0);
}

void guest_main(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    struct sockaddr_in4 local = {0};
    struct sockaddr_in6 local6 = {0}, peer; /* peer: room for either family */
    struct timeval64 limit = {60, 0};
    long port, count = 1, fd, got, i, bound = -1;
    unsigned int peer_length;

    if (argc < 2) {
        write_all("usage: udpecho PORT [COUNT]\n", 28);
        finish(2);
    }
    if (argv[1][0] == '-' && argv[1][1] == 'c') {
        if (argc < 5) {
            write_all("usage: udpecho -c ADDRESS PORT SIZE\n", 37);
            finish(2);
        }
        client(argv);
    }
    port = parse_number(argv[1]);
    if (argc > 2)
        count = parse_number(argv[2]);
    local.family = 2;
    local.port = port_to_network(port);
    local6.family = 10;
    local6.port = local.port;
    /* [::] takes IPv4 too (as mapped addresses: bindv6only is 0 by default); a kernel
     * without IPv6 gets 0.0.0.0. */
    fd = syscall6(SYS_SOCKET, 10 /* AF_INET6 */, 2 /* SOCK_DGRAM */, 0, 0, 0, 0);
    if (fd >= 0)
        bound = syscall6(SYS_BIND, fd, (long)&local6, sizeof local6, 0, 0, 0);
    else if ((fd = syscall6(SYS_SOCKET, 2 /* AF_INET */, 2 /* SOCK_DGRAM */, 0, 0, 0, 0)) >= 0)
        bound = syscall6(SYS_BIND, fd, (long)&local, sizeof local, 0, 0, 0);
    if (fd < 0 || bound < 0) {
        write_all("udpecho: bind failed\n", 21);
        finish(1);
    }
    syscall6(SYS_SETSOCKOPT, fd, 1 /* SOL_SOCKET */, 20 /* SO_RCVTIMEO */, (long)&limit,
             sizeof limit, 0);
    for (i = 0; i < count; i++) {
        peer_length = sizeof peer;
        got = syscall6(SYS_RECVFROM, fd, (long)(buffer + 5), sizeof buffer - 5, 0, (long)&peer,
                       (long)&peer_length);
        if (got < 0) {
            write_all("udpecho: nothing received\n", 26);
            finish(1);
        }
        write_all("udpecho got ", 12);
        write_all(buffer + 5, got);
        write_all("\n", 1);
        buffer[0] = 'p', buffer[1] = 'o', buffer[2] = 'n', buffer[3] = 'g', buffer[4] = ' ';
        syscall6(SYS_SENDTO, fd, (long)buffer, got + 5, 0, (long)&peer, peer_length);
    }
    finish(0);
}
