/*
 * dnstcp SERVER NAME TYPE: one DNS query over TCP (RFC 1035 4.2.2, RFC 7766) for test
 * guests, whose busybox nslookup only speaks UDP.
 *
 * Connects to SERVER port 53 (dotted IPv4, or IPv6 text such as fec0::3), sends one
 * length-prefixed recursive query for NAME of TYPE (a or aaaa), reads the length-prefixed
 * answer and prints the addresses of its answer records of that type, comma-separated on
 * one line (IPv6 as eight hex groups), then exits 0. Prints "error WHAT" and exits 1 when
 * the connection, the exchange or the answer fails (rcode N for a refusal or NXDOMAIN,
 * "none" for an answer without such records). Every socket operation waits 20 s at most.
 * Freestanding: guestsys.h.
 */

#include "guestsys.h"

#define DNS_PORT 53
#define TYPE_A 1
#define TYPE_AAAA 28

static unsigned char query[2 + 512], answer[2 + 65535];

static void fail(const char *what)
{
    long n = 0;
    while (what[n])
        n++;
    write_all("error ", 6);
    write_all(what, n);
    write_all("\n", 1);
    finish(1);
}

/* Reads exactly size bytes, or fails. */
static void read_exact(long fd, unsigned char *into, long size)
{
    long got;
    while (size > 0) {
        got = syscall6(SYS_READ, fd, (long)into, size, 0, 0, 0);
        if (got <= 0)
            fail(got == 0 ? "closed" : "read");
        into += got;
        size -= got;
    }
}

/* The query after its two length bytes; returns its length. */
static long build_query(const char *name, int type)
{
    unsigned char *at = query + 2, *label;
    static const unsigned char header[12] = {0x44, 0x53, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0};
    int i;

    for (i = 0; i < 12; i++)
        *at++ = header[i];
    while (*name && at < query + sizeof query - 8) {
        label = at++;
        while (*name && *name != '.' && at < query + sizeof query - 8)
            *at++ = (unsigned char)*name++;
        *label = (unsigned char)(at - label - 1);
        if (*name == '.')
            name++;
    }
    *at++ = 0;
    *at++ = 0, *at++ = (unsigned char)type;
    *at++ = 0, *at++ = 1; /* class IN */
    return at - (query + 2);
}

/* The offset just past the (possibly compressed) name at offset, or -1. */
static long skip_name(const unsigned char *message, long length, long offset)
{
    int labels;
    for (labels = 0; labels < 128 && offset < length; labels++) {
        if ((message[offset] & 0xc0) == 0xc0)
            return offset + 2;
        if (message[offset] == 0)
            return offset + 1;
        offset += 1 + message[offset];
    }
    return -1;
}

static void write_address(const unsigned char *data, int type)
{
    static const char hex[] = "0123456789abcdef";
    char text[40];
    int i, n = 0, group, shift, started;

    if (type == TYPE_A) {
        for (i = 0; i < 4; i++) {
            write_number(data[i]);
            if (i < 3)
                write_all(".", 1);
        }
        return;
    }
    for (i = 0; i < 16; i += 2) {
        group = data[i] << 8 | data[i + 1];
        for (shift = 12, started = 0; shift >= 0; shift -= 4)
            if ((started |= (group >> shift) & 15) || shift == 0)
                text[n++] = hex[(group >> shift) & 15];
        if (i < 14)
            text[n++] = ':';
    }
    write_all(text, n);
}

void guest_main(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    struct sockaddr_in4 server = {0};
    struct sockaddr_in6 server6 = {0};
    struct timeval64 limit = {20, 0};
    long fd, length, offset, count, record, rdlength, shown = 0;
    int type, ipv6, rtype;
    const unsigned char *message = answer + 2;

    if (argc < 4) {
        write_all("usage: dnstcp SERVER NAME a|aaaa\n", 33);
        finish(2);
    }
    type = (argv[3][0] == 'a' && argv[3][1] == 'a') ? TYPE_AAAA : TYPE_A;
    ipv6 = has_colon(argv[1]);
    server.family = 2;
    server.port = port_to_network(DNS_PORT);
    server.addr = parse_ipv4(argv[1]);
    server6.family = 10;
    server6.port = server.port;
    if (ipv6)
        parse_ipv6(argv[1], server6.addr);
    fd = syscall6(SYS_SOCKET, ipv6 ? 10 : 2, 1 /* SOCK_STREAM */, 0, 0, 0, 0);
    if (fd < 0)
        fail("socket");
    syscall6(SYS_SETSOCKOPT, fd, 1 /* SOL_SOCKET */, 20 /* SO_RCVTIMEO */, (long)&limit,
             sizeof limit, 0);
    syscall6(SYS_SETSOCKOPT, fd, 1 /* SOL_SOCKET */, 21 /* SO_SNDTIMEO */, (long)&limit,
             sizeof limit, 0);
    if (syscall6(SYS_CONNECT, fd, ipv6 ? (long)&server6 : (long)&server,
                 ipv6 ? sizeof server6 : sizeof server, 0, 0, 0) < 0)
        fail("connect");
    length = build_query(argv[2], type);
    query[0] = (unsigned char)(length >> 8), query[1] = (unsigned char)length;
    if (syscall6(SYS_WRITE, fd, (long)query, length + 2, 0, 0, 0) != length + 2)
        fail("write");
    read_exact(fd, answer, 2);
    length = answer[0] << 8 | answer[1];
    read_exact(fd, answer + 2, length);
    if (length < 12 || message[0] != 0x44 || message[1] != 0x53 || !(message[2] & 0x80))
        fail("not an answer to the query");
    if (message[3] & 15) {
        write_all("error rcode ", 12);
        write_number(message[3] & 15);
        write_all("\n", 1);
        finish(1);
    }
    offset = 12;
    for (count = message[4] << 8 | message[5]; count > 0 && offset > 0; count--)
        offset = skip_name(message, length, offset) + 4;
    count = message[6] << 8 | message[7];
    for (record = 0; record < count && offset > 0 && offset < length; record++) {
        offset = skip_name(message, length, offset);
        if (offset < 0 || offset + 10 > length)
            break;
        rtype = message[offset] << 8 | message[offset + 1];
        rdlength = message[offset + 8] << 8 | message[offset + 9];
        offset += 10;
        if (offset + rdlength > length)
            break;
        if (rtype == type && rdlength == (type == TYPE_A ? 4 : 16)) {
            if (shown++)
                write_all(",", 1);
            write_address(message + offset, type);
        }
        offset += rdlength;
    }
    if (!shown)
        fail("none");
    write_all("\n", 1);
    finish(0);
}
