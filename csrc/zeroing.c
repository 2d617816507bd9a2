/* Making ranges of dst read as zeros: the holes of src, and the zero blocks found in what was read.
 *
 * Contiguous ranges are merged and settled in pieces of at most ZERO_PIECE: between two pieces a cancel
 * is seen and, where zeroing writes, the rate limit applies. A range stays pending until its piece
 * succeeds, so a checkpoint's watermark never passes a range that was not zeroed. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"

/* One zeroing call: a punched hole is metadata, but BLKZEROOUT without offload writes every byte: 16 MiB
 * is 80 ms at 200 MB/s, inside cancel's 200 ms. The calls cost little: zeroing all of a 16 GiB loop
 * device took 0.11-0.22 s in 64 MiB pieces and 0.17-0.22 s in 8 MiB pieces (3 runs each). */
#define ZERO_PIECE (16ull << 20)

static bool is_aligned(uint64_t x)
{
    return x % VC_ALIGN == 0;
}

static int write_zeros(struct engine *g, uint64_t off, uint64_t len)
{
    const struct vc_endpoint *d = &g->p->dst;
    /* An aligned range goes through the direct descriptor: a buffered write there could race with
     * direct writes to the same page. Unaligned ranges only exist while nothing else is in flight. */
    int fd = (is_aligned(off) && is_aligned(len)) ? d->fd : d->fd_buffered;

    if (!g->zero_buffer) {
        if (posix_memalign((void **)&g->zero_buffer, VC_ALIGN, VC_CHUNK_SIZE))
            return fail(g, ENOMEM, VC_SIDE_DST, VC_OP_ZERO, off, "allocating a zero buffer");
        memset(g->zero_buffer, 0, VC_CHUNK_SIZE);
    }
    while (len) {
        ssize_t n = pwrite(fd, g->zero_buffer, (size_t)VC_MIN(len, (uint64_t)VC_CHUNK_SIZE), (off_t)off);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            return fail(g, n < 0 ? errno : EIO, VC_SIDE_DST, VC_OP_ZERO, off, "writing zeros");
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

static int zero_piece(struct engine *g, uint64_t off, uint64_t len)
{
    int rc = g->dst_ops->zero(&g->p->dst, off, len);
    if (rc == -EOPNOTSUPP)
        return write_zeros(g, off, len);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_DST, VC_OP_ZERO, off, "zeroing");
    return 0;
}

int zero_flush(struct engine *g)
{
    struct zero_range *z = &g->zero_pending;
    uint64_t piece = g->zeroing_throttled ? g->io_max : ZERO_PIECE;

    while (z->len) {
        if (stop_requested(g))
            return -1;
        uint64_t n = VC_MIN(z->len, piece);
        int wait = g->zeroing_throttled ? vc_throttle_take(&g->throttle, n) : 0;
        if (wait) {
            sleep_ms(VC_MIN(wait, 50));
            continue;
        }
        if (zero_piece(g, z->off, n) < 0)
            return -1;
        z->off += n;
        z->len -= n;
    }
    return 0;
}

/* Regions that must read as zero in dst; contiguous ones are merged. */
int zero_add(struct engine *g, uint64_t off, uint64_t len)
{
    struct zero_range *z = &g->zero_pending;
    if (!len || !g->has_dst || (g->p->flags & VC_FLAG_DST_IS_ZERO))
        return 0;
    if (z->len && z->off + z->len == off) {
        z->len += len;
        return 0;
    }
    if (zero_flush(g) < 0) {
        /* The new range is dropped, and it may lie below the one that failed or is pending. */
        g->fail_floor = VC_MIN(g->fail_floor, off);
        return -1;
    }
    z->off = off;
    z->len = len;
    return 0;
}

/* ---- chunk digests
 * A chunk that reads as zeros is recorded as 16 zero bytes, not as the digest of its zeros: chunk_digests
 * starts zero-filled, so the holes of a huge sparse volume touch none of its pages, and a checkpoint
 * stores the chunks that hold data only. */

void record_digest(struct engine *g, uint64_t chunk_offset, const uint8_t digest[VC_DIGEST_SIZE])
{
    static const uint8_t zeros[VC_DIGEST_SIZE];
    uint8_t *out = g->p->chunk_digests + (chunk_offset / VC_CHUNK_SIZE) * VC_DIGEST_SIZE;
    uint64_t len = VC_MIN((uint64_t)VC_CHUNK_SIZE, g->end - chunk_offset);
    const uint8_t *of_zeros = len == VC_CHUNK_SIZE ? g->zero_digest_chunk : g->zero_digest_tail;

    if (digest && memcmp(digest, of_zeros, VC_DIGEST_SIZE) != 0) {
        /* Written without a look first: reading an untouched page maps the zero page, and the write
         * after it then copies that page and flushes the TLB of every thread's CPU (4096 times for W6). */
        memcpy(out, digest, VC_DIGEST_SIZE);
    } else if (memcmp(out, zeros, VC_DIGEST_SIZE) != 0) { /* a hole's page stays untouched */
        memcpy(out, zeros, VC_DIGEST_SIZE);
    }
}
