/*
 * The freestanding layer the guest tools share (udpecho.c, dnstcp.c): raw Linux x86-64
 * system calls (no libc, so each binary is a few kilobytes and travels inside the guest's
 * test script), socket addresses, and number and address text.
 */

#define SYS_READ 0
#define SYS_WRITE 1
#define SYS_SOCKET 41
#define SYS_CONNECT 42
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

static unsigned short port_to_network(long port)
{
    return (unsigned short)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
}

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

/* The kernel enters a tool at _start with argc at the stack pointer; align the stack and
 * call the tool's guest_main(stack). */
__asm__(".globl _start\n"
        "_start:\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call guest_main\n"
        "  hlt\n");
