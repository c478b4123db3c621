/*
 * udpecho PORT [COUNT]: a UDP responder for test guests, whose busybox nc has no -u.
 *
 * Waits for COUNT (default 1) datagrams on 0.0.0.0:PORT, prints each as
 * "udpecho got <bytes>" and answers the sender with "pong " + the datagram.
 * Gives up after 60 s without a datagram. Freestanding (raw Linux x86-64
 * system calls, no libc), so the binary is a few kilobytes and can travel
 * inside the guest's test script.
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

void udpecho_main(long *stack)
{
    long argc = stack[0];
    char **argv = (char **)(stack + 1);
    static char buffer[2048];
    struct sockaddr_in4 local = {0}, peer;
    struct timeval64 limit = {60, 0};
    long port, count = 1, fd, got, i;
    unsigned int peer_length;

    if (argc < 2) {
        write_all("usage: udpecho PORT [COUNT]\n", 28);
        finish(2);
    }
    port = parse_number(argv[1]);
    if (argc > 2)
        count = parse_number(argv[2]);
    fd = syscall6(SYS_SOCKET, 2 /* AF_INET */, 2 /* SOCK_DGRAM */, 0, 0, 0, 0);
    if (fd < 0)
        finish(1);
    syscall6(SYS_SETSOCKOPT, fd, 1 /* SOL_SOCKET */, 20 /* SO_RCVTIMEO */, (long)&limit,
             sizeof limit, 0);
    local.family = 2;
    local.port = (unsigned short)(((port & 0xff) << 8) | ((port >> 8) & 0xff));
    if (syscall6(SYS_BIND, fd, (long)&local, sizeof local, 0, 0, 0) < 0) {
        write_all("udpecho: bind failed\n", 21);
        finish(1);
    }
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
