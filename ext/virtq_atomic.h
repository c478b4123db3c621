/* Memory-ordering and atomic helpers for the split-ring kernel (ext/virtq.pyx).
 *
 * The rings live in memory shared with a guest running on other CPUs, so the
 * order of our reads and writes matters (virtio 1.x, "Memory barriers"):
 *   - read avail->idx, then an acquire fence, then the avail entries;
 *   - write used entries, then a release fence, then used->idx;
 *   - a full fence between publishing used->idx (or avail_event) and reading
 *     the guest's used_event / avail->idx again, so neither side misses a
 *     notification.
 * Index loads and stores are atomic (relaxed) so the compiler neither tears
 * nor caches them across loop iterations.
 */
#ifndef VHOSTNET_VIRTQ_ATOMIC_H
#define VHOSTNET_VIRTQ_ATOMIC_H

#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtq.pyx reads virtio 1.x (little-endian) rings directly; a big-endian host needs byte swaps"
#endif

static inline void vq_fence_acquire(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void vq_fence_release(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void vq_fence_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint16_t vq_load_u16(const uint8_t *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline void vq_store_u16(uint8_t *p, uint16_t value) {
    __atomic_store_n((uint16_t *)p, value, __ATOMIC_RELAXED);
}

static inline void vq_store_u32(uint8_t *p, uint32_t value) {
    __atomic_store_n((uint32_t *)p, value, __ATOMIC_RELAXED);
}

/* The dirty log is shared with QEMU (which clears words with xchg) and with
 * other back-ends of the same VM, so bits are set with an atomic OR. */
static inline void vq_log_or(uint8_t *p, uint8_t bits) {
    __atomic_fetch_or(p, bits, __ATOMIC_RELAXED);
}

#endif
