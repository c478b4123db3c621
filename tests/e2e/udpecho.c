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
 * Freestanding (raw Linux x86-64 system calls, no libc), so the binary is a few
 * kilobytes and can travel inside the guest's test script.
 */

#define SYS_WRITE 1
#define SYS_SOCKET 41
#define SYS_SENDTO 44
#define SYS_RECVFROM 45
#define SYS_BIND 49
#define SYS_SETSOCKOPT 54
#define SYS_EXIT 60

struct sockaddr_in4 {
    unsigned short family;
    unsigned short port; /* network byte order */
    unsigned int addr;
    unsigned char zero[8];
};

struct sockaddr_in6 {
    unsigned short family;
    unsigned short port; /* network byte order */
    unsigned int flowinfo;
    unsigned char addr[16];
    unsigned int scope_id;
};

struct timeval64 {
    long sec;
    long usec;
};

static long syscall6(long number, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(number), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static void write_all(const char *text, long length)
{
    syscall6(SYS_WRITE, 1, (long)text, length, 0, 0, 0);
}

static long parse_number(const char *text)
{
    long value = 0;
    for (; *text >= '0' && *text <= '9'; text++)
        value = value * 10 + (*text - '0');
    return value;
}

static void finish(int status)
{
    syscall6(SYS_EXIT, status, 0, 0, 0, 0, 0);
    for (;;) {
    }
}

static void write_number(long value)
{
    char digits[24];
    int at = sizeof digits;
    do {
        digits[--at] = '0' + value % 10;
        value /= 10;
    } while (value && at > 0);
    write_all(digits + at, sizeof digits - at);
}

#define MAX_DATAGRAM 65000
static char buffer[MAX_DATAGRAM + 5];
static char sent[MAX_DATAGRAM];

/* Dotted IPv4 to the network-order word sockaddr_in wants. */
static unsigned int parse_ipv4(const char *text)
{
    unsigned int address = 0, shift = 0, part;
    for (;;) {
        part = parse_number(text);
        address |= (part & 0xff) << shift;
        shift += 8;
        while (*text >= '0' && *text <= '9')
            text++;
        if (*text != '.' || shift == 32)
            return address;
        text++;
    }
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* IPv6 text (groups of hex digits, one "::" at most, no embedded IPv4) to 16 bytes. */
static void parse_ipv6(const char *text, unsigned char *out)
{
    unsigned short groups[8] = {0};
    int count = 0, gap = -1, i, digit;
    unsigned int value;

    if (text[0] == ':' && text[1] == ':') {
        gap = 0;
        text += 2;
    }
    while (*text && count < 8) {
        value = 0;
        while ((digit = hex_digit(*text)) >= 0) {
            value = value * 16 + digit;
            text++;
        }
        groups[count++] = (unsigned short)value;
        if (*text != ':')
            break;
        text++;
        if (*text == ':') {
            gap = count;
            text++;
        }
    }
    for (i = 0; i < 16; i++)
        out[i] = 0;
    for (i = 0; i < count; i++) {
        int at = (gap >= 0 && i >= gap) ? 8 - count + i : i;
        out[2 * at] = groups[i] >> 8;
        out[2 * at + 1] = groups[i] & 0xff;
    }
}

static int has_colon(const char *text)
{
    for (; *text; text++)
        if (*text == ':')
            return 1;
    return 0;
}

static void client(char **argv)
{
    struct sockaddr_in4 remote = {0};
    struct sockaddr_in6 remote6 = {0};
    struct timeval64 limit = {20, 0};
    long port = parse_number(argv[3]), size = parse_number(argv[4]), fd, got, i;
    unsigned short port_be = (unsigned short)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
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

void udpecho_main(long *stack)
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
    local.port = (unsigned short)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
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

/* The kernel enters here with argc at the stack pointer; align and call C. */
__asm__(".globl _start\n"
        "_start:\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call udpecho_main\n"
        "  hlt\n");
