/* SIGBUS guard for the split-ring kernel (ext/virtq.pyx).
 *
 * Guest memory is a file the front-end shared with us. Sealed memfds (QEMU's
 * default) cannot shrink, but an unsealed one can be truncated after SET_MEM_TABLE,
 * and touching a mapped page past the new end raises SIGBUS, which by default
 * kills the whole process and every flow with it.
 *
 * Each kernel entry point runs inside vq_guarded_call: it arms a thread-local
 * jump buffer, and the SIGBUS handler, if (and only if) one is armed on the
 * faulting thread, jumps back out of the copy; the caller marks the queue
 * broken and the device closes that connection. A SIGBUS anywhere else goes to
 * the previous handler (faulthandler, say) or takes the default action.
 * The handler only reads a thread-local and calls async-signal-safe functions.
 */
#ifndef VHOSTNET_VIRTQ_GUARD_H
#define VHOSTNET_VIRTQ_GUARD_H

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

typedef long (*vq_guarded_fn)(void *queue, void *arg, long n);

static __thread sigjmp_buf *volatile vq_guard_jump;
static struct sigaction vq_guard_previous;
static int vq_guard_installed;

static void vq_guard_on_sigbus(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *jump = vq_guard_jump;
    if (jump != NULL) {
        vq_guard_jump = NULL;
        siglongjmp(*jump, 1);
    }
    if ((vq_guard_previous.sa_flags & SA_SIGINFO) && vq_guard_previous.sa_sigaction != NULL) {
        vq_guard_previous.sa_sigaction(sig, info, context);
        return;
    }
    if (vq_guard_previous.sa_handler != SIG_DFL && vq_guard_previous.sa_handler != SIG_IGN) {
        vq_guard_previous.sa_handler(sig);
        return;
    }
    /* Not ours: die as we would have without the guard (delivered when we return). */
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

/* Install the handler once per process; 0 on success. */
static int vq_guard_install(void) {
    struct sigaction action;
    if (vq_guard_installed)
        return 0;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = vq_guard_on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &vq_guard_previous) != 0)
        return -1;
    vq_guard_installed = 1;
    return 0;
}

/* fn(queue, arg, n), or 0 with *faulted set if guest memory raised SIGBUS meanwhile.
 * The signal mask is not saved (that would be a syscall per call, on every packet): the
 * handler's jump leaves SIGBUS blocked, as the kernel blocks it while its handler runs, so
 * it is unblocked here after a jump (a blocked SIGBUS would kill at the next fault). */
static long vq_guarded_call(vq_guarded_fn fn, void *queue, void *arg, long n, int *faulted) {
    sigjmp_buf jump;
    sigjmp_buf *volatile outer = vq_guard_jump;
    sigset_t bus;
    long result;
    if (sigsetjmp(jump, 0) != 0) {
        vq_guard_jump = outer;
        sigemptyset(&bus);
        sigaddset(&bus, SIGBUS);
        pthread_sigmask(SIG_UNBLOCK, &bus, NULL);
        *faulted = 1;
        return 0;
    }
    vq_guard_jump = &jump;
    result = fn(queue, arg, n);
    vq_guard_jump = outer;
    return result;
}

#endif
