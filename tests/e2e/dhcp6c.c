/*
 * dhcp6c IFINDEX: a minimal DHCPv6 client (RFC 8415) for test guests, whose busybox has no
 * udhcpc6. Solicit -> Advertise -> Request -> Reply on the interface IFINDEX, each step tried
 * three times with a 3 s wait; prints "dhcp6 address=A dns=D" (addresses as eight hex groups,
 * then " bootfile_url=URL" when the Reply names a boot file, RFC 5970) and exits 0, or prints
 * what failed and exits 1. Freestanding (raw Linux x86-64 system calls, no libc), like
 * udpecho.c, so the binary can travel inside the test script.
 */

#include "guestsys.h"

static void say(const char *text)
{
    long n = 0;
    while (text[n])
        n++;
    write_all(text, n);
}

static void say_address(const unsigned char *a)
{
    static const char hex[] = "0123456789abcdef";
    char out[40];
    int i, n = 0;
    for (i = 0; i < 16; i += 2) {
        out[n++] = hex[a[i] >> 4];
        out[n++] = hex[a[i] & 15];
        out[n++] = hex[a[i + 1] >> 4];
        out[n++] = hex[a[i + 1] & 15];
        out[n++] = i < 14 ? ':' : 0;
    }
    say(out);
}

static unsigned char message[512], reply[1500], server_id[130];
static long server_id_length;
static const unsigned char client_id[] = {0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56};

static long put_option(long at, int code, const unsigned char *value, long length)
{
    long i;
    message[at] = code >> 8, message[at + 1] = code & 255;
    message[at + 2] = length >> 8, message[at + 3] = length & 255;
    for (i = 0; i < length; i++)
        message[at + 4 + i] = value[i];
    return at + 4 + length;
}

static long build(int type)
{
    static const unsigned char ia_na[12] = {0, 0, 0, 1};
    static const unsigned char elapsed[2] = {0, 0};
    static const unsigned char oro[4] = {0, 23, 0, 59};
    long n = 4;
    message[0] = type, message[1] = 0x0a, message[2] = 0xbc, message[3] = 0xde;
    n = put_option(n, 1, client_id, sizeof client_id);
    if (type == 3)
        n = put_option(n, 2, server_id, server_id_length);
    n = put_option(n, 3, ia_na, sizeof ia_na);
    n = put_option(n, 8, elapsed, sizeof elapsed);
    return put_option(n, 6, oro, sizeof oro);
}

static int option_at(long at, long end, long *code, long *length)
{
    if (at + 4 > end)
        return 0;
    *code = reply[at] << 8 | reply[at + 1];
    *length = reply[at + 2] << 8 | reply[at + 3];
    return at + 4 + *length <= end;
}

/* Send `type`, wait for `expected` with our transaction id; the reply's length, or 0. */
static long exchange(long fd, struct sockaddr_in6 *servers, int type, int expected)
{
    long length = build(type), got, attempt;
    for (attempt = 0; attempt < 3; attempt++) {
        syscall6(SYS_SENDTO, fd, (long)message, length, 0, (long)servers, sizeof *servers);
        for (;;) {
            got = syscall6(SYS_RECVFROM, fd, (long)reply, sizeof reply, 0, 0, 0);
            if (got < 0)
                break; /* timeout: send again */
            if (got >= 4 && reply[0] == expected && reply[1] == 0x0a && reply[2] == 0xbc
                && reply[3] == 0xde)
                return got;
        }
    }
    return 0;
}

void guest_main(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    struct sockaddr_in6 local = {0}, servers = {0};
    struct timeval64 limit = {3, 0};
    long fd, got, at, code, length, inner, inner_code, inner_length, i;
    const char *p;
    unsigned char *address = 0, *dns = 0, *url = 0;
    long url_length = 0;

    if (argc < 2) {
        say("usage: dhcp6c IFINDEX\n");
        finish(2);
    }
    for (p = argv[1]; *p >= '0' && *p <= '9'; p++)
        servers.scope_id = servers.scope_id * 10 + (*p - '0');
    fd = syscall6(SYS_SOCKET, 10 /* AF_INET6 */, 2 /* SOCK_DGRAM */, 0, 0, 0, 0);
    if (fd < 0)
        finish(1);
    syscall6(SYS_SETSOCKOPT, fd, 1 /* SOL_SOCKET */, 20 /* SO_RCVTIMEO */, (long)&limit,
             sizeof limit, 0);
    local.family = 10, local.port = 546 >> 8 | (546 & 255) << 8;
    if (syscall6(SYS_BIND, fd, (long)&local, sizeof local, 0, 0, 0) < 0) {
        say("dhcp6c: bind failed\n");
        finish(1);
    }
    servers.family = 10, servers.port = 547 >> 8 | (547 & 255) << 8;
    servers.addr[0] = 0xff, servers.addr[1] = 2, servers.addr[13] = 1, servers.addr[15] = 2;

    got = exchange(fd, &servers, 1 /* Solicit */, 2 /* Advertise */);
    if (!got) {
        say("dhcp6c: no advertise\n");
        finish(1);
    }
    for (at = 4; option_at(at, got, &code, &length); at += 4 + length)
        if (code == 2 && length <= (long)sizeof server_id) {
            for (i = 0; i < length; i++)
                server_id[i] = reply[at + 4 + i];
            server_id_length = length;
        }
    if (!server_id_length) {
        say("dhcp6c: advertise without server id\n");
        finish(1);
    }
    say("dhcp6c: advertise\n");
    got = exchange(fd, &servers, 3 /* Request */, 7 /* Reply */);
    if (!got) {
        say("dhcp6c: no reply\n");
        finish(1);
    }
    for (at = 4; option_at(at, got, &code, &length); at += 4 + length) {
        if (code == 23 && length >= 16)
            dns = reply + at + 4;
        if (code == 59)
            url = reply + at + 4, url_length = length;
        if (code != 3 || length < 12)
            continue;
        for (inner = at + 16; option_at(inner, at + 4 + length, &inner_code, &inner_length);
             inner += 4 + inner_length)
            if (inner_code == 5 && inner_length >= 24)
                address = reply + inner + 4;
    }
    if (!address) {
        say("dhcp6c: reply without address\n");
        finish(1);
    }
    say("dhcp6 address=");
    say_address(address);
    if (dns) {
        say(" dns=");
        say_address(dns);
    }
    if (url) {
        say(" bootfile_url=");
        write_all((const char *)url, url_length);
    }
    say("\n");
    finish(0);
}
