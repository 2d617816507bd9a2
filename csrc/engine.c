/* The copy engine: a pipeline of queue_depth block-sized slots, each read, scanned and hashed in one
 * pass, then written, with holes and zero blocks turned into cheap zeroing of dst.
 *
 * A slot carries one "unit": a run of whole 1 MiB digest chunks (or, when explicit extents are given,
 * a piece of one extent). Because a unit never splits a chunk, each chunk is hashed once, from one
 * buffer, when its reads complete; no hash state outlives a slot.
 *
 * With O_DIRECT, a unit whose offsets are not aligned (the tail of a volume of odd size, unaligned
 * extents) goes through the page cache on the buffered descriptors, alone: nothing else is in flight
 * while it runs, because a buffered write to a page that a direct write also touches could write back
 * stale bytes. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MAX_OPS 64                      /* reads or writes per slot; more are merged */
#define PROGRESS_NS 100000000ull        /* progress (and the cancel check) every 100 ms */
#define CHECKPOINT_NS 2000000000ull     /* checkpoint at least every 2 s ... */
#define CHECKPOINT_BYTES (256ull << 20) /* ... and every 256 MiB */
#define ZERO_MERGE_MAX (1ull << 30)     /* one zeroing call covers at most 1 GiB: cancel stays quick */
#define HUGE_PAGE_SIZE (2u << 20)

enum slot_state { SLOT_FREE, SLOT_READING, SLOT_WRITING };

struct extent {
    uint64_t off, len;
};

struct slot {
    uint8_t *buf;
    uint64_t start; /* the unit */
    uint64_t len;
    int state;
    bool buffered;        /* unaligned: all of its I/O goes through the page cache */
    struct extent ops[MAX_OPS]; /* the reads, then the writes */
    unsigned n_ops;
    unsigned next_op;     /* issue cursor: which op, and how far into it */
    uint64_t next_off;
    unsigned in_flight;
    bool queued;          /* waiting in an issue queue */
};

struct request {
    unsigned slot;
    int op;
    uint64_t off;
    uint32_t len;
    uint8_t *buf;
    unsigned next_free;
};

struct zero_range {
    uint64_t off, len;
};

struct engine {
    const struct vc_copy_params *p;
    struct vc_copy_result *r;
    struct vc_error *e;
    const struct vc_endpoint_ops *src_ops, *dst_ops;
    bool has_dst, digest, sparse, any_direct;
    uint64_t end; /* == length */
    uint64_t io_max;

    struct vc_io io, io_buffered; /* the chosen engine, and the page-cache path for unaligned units */
    struct slot *slots;
    unsigned n_slots, busy_slots;
    bool buffered_busy;
    uint8_t *buffers;
    uint8_t *zero_buffer; /* for dst that cannot zero cheaply; allocated on first need */

    struct request *reqs;
    unsigned n_reqs, free_req;
    unsigned in_flight; /* requests queued and not yet completed, both paths */
    struct vc_io_completion *completions;

    unsigned *read_queue, *write_queue; /* slot indices waiting to issue, FIFO rings */
    unsigned rq_head, rq_count, wq_head, wq_count;

    /* the producer */
    uint64_t pos;           /* next offset not yet handed to a slot or to the zeroer */
    uint64_t data_query, data_start, data_stop; /* the last next_data answer, asked at data_query */
    uint64_t ext_index;     /* explicit extents: the one pos lies in or before */

    struct zero_range zero_pending;
    uint8_t zero_digest_chunk[VC_DIGEST_SIZE], zero_digest_tail[VC_DIGEST_SIZE];

    struct vc_throttle throttle;
    int throttle_wait_ms;

    uint64_t done, total;
    uint64_t last_progress_ns;

    struct vc_checkpoint ckpt;
    bool ckpt_open;
    uint64_t ckpt_last_ns, ckpt_last_done, ckpt_watermark;

    int status; /* first failure, or -ECANCELED */
};

int vc_fail(struct vc_error *e, int err, int side, int op, uint64_t offset, const char *fmt, ...)
{
    if (e && !e->err) {
        va_list ap;
        e->err = err;
        e->side = side;
        e->op = op;
        e->offset = offset;
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof(e->message), fmt, ap);
        va_end(ap);
    }
    return -err;
}

static int fail(struct engine *g, int err, int side, int op, uint64_t offset, const char *what)
{
    const char *name = side == VC_SIDE_SRC ? "source" : side == VC_SIDE_DST ? "destination" : "checkpoint";
    vc_fail(g->e, err, side, op, offset, "%s failed on the %s at offset %llu: %s", what, name,
            (unsigned long long)offset, strerror(err));
    if (!g->status)
        g->status = -err;
    return -err;
}

static bool is_aligned(uint64_t x)
{
    return x % VC_ALIGN == 0;
}

/* ---------------------------------------------------------------- zeroing dst */

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

static int zero_flush(struct engine *g)
{
    struct zero_range z = g->zero_pending;
    g->zero_pending.len = 0;
    if (!z.len)
        return 0;
    int rc = g->dst_ops->zero(g->p->dst.fd, z.off, z.len);
    if (rc == -EOPNOTSUPP)
        return write_zeros(g, z.off, z.len);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_DST, VC_OP_ZERO, z.off, "zeroing");
    return 0;
}

/* Regions that must read as zero in dst; contiguous ones are merged into one call. */
static int zero_add(struct engine *g, uint64_t off, uint64_t len)
{
    struct zero_range *z = &g->zero_pending;
    if (!len || !g->has_dst || (g->p->flags & VC_FLAG_DST_IS_ZERO))
        return 0;
    if (z->len && z->off + z->len == off && z->len + len <= ZERO_MERGE_MAX) {
        z->len += len;
        return 0;
    }
    int rc = zero_flush(g);
    z->off = off;
    z->len = len;
    return rc;
}

/* ---------------------------------------------------------------- digests of what needs no read */

static const uint8_t *zero_digest(struct engine *g, uint64_t len)
{
    return len == VC_CHUNK_SIZE ? g->zero_digest_chunk : g->zero_digest_tail;
}

static void digest_zeros(struct engine *g, uint64_t from, uint64_t to)
{
    if (!g->digest)
        return;
    for (uint64_t c = from; c < to; c += VC_CHUNK_SIZE) {
        uint64_t len = VC_MIN((uint64_t)VC_CHUNK_SIZE, g->end - c);
        memcpy(g->p->chunk_digests + (c / VC_CHUNK_SIZE) * VC_DIGEST_SIZE, zero_digest(g, len), VC_DIGEST_SIZE);
    }
}

/* ---------------------------------------------------------------- issuing */

static void enqueue(unsigned *ring, unsigned n, unsigned head, unsigned *count, unsigned value)
{
    ring[(head + (*count)++) % n] = value;
}

static void slot_queue(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    s->next_op = 0;
    s->next_off = s->n_ops ? s->ops[0].off : 0;
    s->queued = true;
    if (s->state == SLOT_READING)
        enqueue(g->read_queue, g->n_slots, g->rq_head, &g->rq_count, i);
    else
        enqueue(g->write_queue, g->n_slots, g->wq_head, &g->wq_count, i);
}

static int queue_request(struct engine *g, struct request *rq, unsigned tag)
{
    struct slot *s = &g->slots[rq->slot];
    const struct vc_endpoint *ep = rq->op == VC_OP_READ ? &g->p->src : &g->p->dst;
    struct vc_io_request io_rq = {
        .op = rq->op,
        .fd = s->buffered ? ep->fd_buffered : ep->fd,
        .buf = rq->buf,
        .len = rq->len,
        .offset = rq->off,
        .tag = tag,
        .buf_index = s->buffered ? -1 : (int)rq->slot, /* any range inside the slot's registered buffer */
    };
    struct vc_io *io = s->buffered ? &g->io_buffered : &g->io;
    int rc = io->ops->queue(io, &io_rq);
    if (rc < 0)
        return fail(g, -rc, rq->op == VC_OP_READ ? VC_SIDE_SRC : VC_SIDE_DST, rq->op, rq->off, "queueing I/O");
    return 0;
}

static void release_request(struct engine *g, unsigned tag)
{
    struct request *rq = &g->reqs[tag];
    g->slots[rq->slot].in_flight--;
    g->in_flight--;
    rq->next_free = g->free_req;
    g->free_req = tag;
}

/* Issues what a slot still has to issue; false when it must wait (throttle or no free request). */
static bool slot_issue(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    int op = s->state == SLOT_READING ? VC_OP_READ : VC_OP_WRITE;

    while (s->next_op < s->n_ops) {
        struct extent *x = &s->ops[s->next_op];
        uint64_t len = VC_MIN(g->io_max, x->off + x->len - s->next_off);
        if (g->free_req == UINT32_MAX)
            return false;
        if (op == VC_OP_READ) {
            int wait = vc_throttle_take(&g->throttle, len);
            if (wait) {
                g->throttle_wait_ms = wait;
                return false;
            }
        }
        unsigned tag = g->free_req;
        struct request *rq = &g->reqs[tag];
        g->free_req = rq->next_free;
        rq->slot = i;
        rq->op = op;
        rq->off = s->next_off;
        rq->len = (uint32_t)len;
        rq->buf = s->buf + (s->next_off - s->start);
        s->in_flight++;
        g->in_flight++;
        if (queue_request(g, rq, tag) < 0) {
            release_request(g, tag);
            return false;
        }
        s->next_off += len;
        if (s->next_off == x->off + x->len && ++s->next_op < s->n_ops)
            s->next_off = s->ops[s->next_op].off;
    }
    s->queued = false;
    return true;
}

static void issue_queue(struct engine *g, unsigned *ring, unsigned *head, unsigned *count)
{
    while (*count && !g->status) {
        if (!slot_issue(g, ring[*head]))
            return;
        *head = (*head + 1) % g->n_slots;
        (*count)--;
    }
}

static void issue(struct engine *g)
{
    g->throttle_wait_ms = 0;
    issue_queue(g, g->write_queue, &g->wq_head, &g->wq_count); /* writes first: they free slots */
    issue_queue(g, g->read_queue, &g->rq_head, &g->rq_count);
}

/* ---------------------------------------------------------------- the producer */

/* Appends [off, off+len) to a slot's ops; past MAX_OPS the last op grows over the gap instead. That is
 * only allowed where the gap may be read (a hole reads as zeros) or written (zero blocks written as
 * data), which is true everywhere ops are added. */
static void add_op(struct slot *s, uint64_t off, uint64_t len)
{
    struct extent *last = s->n_ops ? &s->ops[s->n_ops - 1] : NULL;
    if (last && last->off + last->len == off) {
        last->len += len;
    } else if (s->n_ops < MAX_OPS) {
        s->ops[s->n_ops++] = (struct extent){off, len};
    } else {
        last->len = off + len - last->off;
    }
}

/* The data of src in [from, to), from the endpoint's extent map (cached between calls). */
static int next_data(struct engine *g, uint64_t from, uint64_t to, uint64_t *start, uint64_t *stop)
{
    if (!g->sparse) {
        *start = from;
        *stop = to;
        return 0;
    }
    /* The cached answer holds for any offset between where we asked and the end of its extent. */
    if (!(from >= g->data_query && from < g->data_stop)) {
        g->data_query = from;
        int rc = g->src_ops->next_data(g->p->src.fd, from, g->end, &g->data_start, &g->data_stop);
        if (rc < 0)
            return fail(g, -rc, VC_SIDE_SRC, VC_OP_READ, from, "finding data extents");
    }
    *start = VC_MIN(VC_MAX(g->data_start, from), to);
    *stop = VC_MIN(g->data_stop, to);
    if (*start >= *stop)
        *start = *stop = to;
    return 0;
}

static unsigned free_slot(struct engine *g)
{
    for (unsigned i = 0; i < g->n_slots; i++)
        if (g->slots[i].state == SLOT_FREE)
            return i;
    return UINT32_MAX;
}

/* Whole-volume mode: the next run of chunks. Holes of whole chunks are settled here, without a slot. */
static int produce_chunks(struct engine *g, struct slot *s)
{
    uint64_t unit_end = VC_MIN(g->pos + g->p->block_size, g->end);
    uint64_t ds, de;

    if (next_data(g, g->pos, g->end, &ds, &de) < 0)
        return -1;
    uint64_t hole_end = ds >= g->end ? g->end : VC_ROUND_DOWN(ds, VC_CHUNK_SIZE);
    if (hole_end > g->pos) {
        /* Whole chunks of hole before the next data: nothing to read, nothing to hash. */
        digest_zeros(g, g->pos, hole_end);
        g->r->bytes_skipped += hole_end - g->pos;
        g->done += hole_end - g->pos;
        if (zero_add(g, g->pos, hole_end - g->pos) < 0)
            return -1;
        g->pos = hole_end;
        return 0;
    }
    s->start = g->pos;
    s->len = unit_end - g->pos;
    s->n_ops = 0;
    for (uint64_t at = g->pos; at < unit_end;) {
        if (next_data(g, at, unit_end, &ds, &de) < 0)
            return -1;
        if (ds >= unit_end)
            break;
        add_op(s, ds, de - ds);
        at = de;
    }
    g->pos = unit_end;
    return 1;
}

/* Explicit-extents mode: the next piece of the current extent, at most a block long. */
static int produce_extent(struct engine *g, struct slot *s)
{
    const int64_t *x = g->p->extents;
    while (g->ext_index < g->p->n_extents &&
           (uint64_t)x[2 * g->ext_index] + (uint64_t)x[2 * g->ext_index + 1] <= g->pos)
        g->ext_index++;
    if (g->ext_index == g->p->n_extents) {
        g->pos = g->end;
        return 0;
    }
    uint64_t ext_off = (uint64_t)x[2 * g->ext_index], ext_end = ext_off + (uint64_t)x[2 * g->ext_index + 1];
    s->start = VC_MAX(g->pos, ext_off);
    /* Stop at a block boundary so that units stay aligned after an unaligned start. */
    uint64_t block_end = VC_ROUND_DOWN(s->start, g->p->block_size) + g->p->block_size;
    s->len = VC_MIN(ext_end, block_end) - s->start;
    s->n_ops = 1;
    s->ops[0] = (struct extent){s->start, s->len};
    g->pos = s->start + s->len;
    return 1;
}

static bool unit_unaligned(const struct slot *s)
{
    if (!is_aligned(s->start) || !is_aligned(s->len))
        return true;
    for (unsigned i = 0; i < s->n_ops; i++)
        if (!is_aligned(s->ops[i].off) || !is_aligned(s->ops[i].len))
            return true;
    return false;
}

static void finish_slot(struct engine *g, unsigned i);

/* Fills free slots, stopping before an unaligned unit until the pipeline has drained. */
static void produce(struct engine *g)
{
    while (!g->status && g->pos < g->end && !g->buffered_busy) {
        unsigned i = free_slot(g);
        if (i == UINT32_MAX)
            return;
        struct slot *s = &g->slots[i];
        uint64_t saved_pos = g->pos;
        int rc = g->p->extents ? produce_extent(g, s) : produce_chunks(g, s);
        if (rc < 0)
            return;
        if (rc == 0)
            continue;
        s->buffered = false;
        if (g->any_direct && unit_unaligned(s)) {
            if (g->busy_slots) { /* drain first; produce this unit again then */
                g->pos = saved_pos;
                return;
            }
            /* Nothing is in flight; the zeroer's pending range may be unaligned too. */
            if (zero_flush(g) < 0)
                return;
            s->buffered = true;
            g->buffered_busy = true;
        }
        s->state = SLOT_READING;
        s->in_flight = 0;
        g->busy_slots++;
        if (s->n_ops == 0) { /* nothing to read (explicit extent in a hole cannot happen; be safe) */
            finish_slot(g, i);
            continue;
        }
        slot_queue(g, i);
    }
}

/* ---------------------------------------------------------------- completion of a slot's stages */

/* All reads of a slot are in: zero-scan and hash in one pass over the buffer, then queue the writes. */
static void process_read(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    struct extent reads[MAX_OPS];
    unsigned n_reads = s->n_ops;
    uint64_t chunk_has_data = 0; /* bit per chunk of the unit; a unit has at most 64 chunks */
    uint64_t at = s->start;

    memcpy(reads, s->ops, n_reads * sizeof(reads[0]));
    s->n_ops = 0;
    for (unsigned k = 0; k < n_reads; k++) {
        uint64_t off = reads[k].off, end = off + reads[k].len;
        /* The gap before this read is a hole of src: zeros in the buffer (for the hash), in dst too. */
        if (off > at) {
            if (g->digest)
                memset(s->buf + (at - s->start), 0, off - at);
            g->r->bytes_skipped += off - at;
            zero_add(g, at, off - at);
        }
        while (off < end) {
            uint64_t granule_end = VC_MIN(VC_ROUND_DOWN(off, VC_ALIGN) + VC_ALIGN, end);
            uint64_t n = granule_end - off;
            if (g->sparse && vc_zero_check(s->buf + (off - s->start), n)) {
                g->r->bytes_zero += n;
                zero_add(g, off, n);
            } else {
                chunk_has_data |= 1ull << ((off - s->start) / VC_CHUNK_SIZE);
                if (g->has_dst)
                    add_op(s, off, n);
            }
            off = granule_end;
        }
        at = end;
    }
    if (at < s->start + s->len && !g->p->extents) {
        if (g->digest)
            memset(s->buf + (at - s->start), 0, s->start + s->len - at);
        g->r->bytes_skipped += s->start + s->len - at;
        zero_add(g, at, s->start + s->len - at);
    }
    if (g->digest) {
        for (uint64_t c = s->start; c < s->start + s->len; c += VC_CHUNK_SIZE) {
            uint64_t len = VC_MIN((uint64_t)VC_CHUNK_SIZE, s->start + s->len - c);
            uint8_t *out = g->p->chunk_digests + (c / VC_CHUNK_SIZE) * VC_DIGEST_SIZE;
            if (chunk_has_data & (1ull << ((c - s->start) / VC_CHUNK_SIZE)))
                vc_digest_chunk(s->buf + (c - s->start), (size_t)len, out);
            else
                memcpy(out, zero_digest(g, len), VC_DIGEST_SIZE);
        }
    }
    if (s->n_ops == 0) {
        finish_slot(g, i);
        return;
    }
    s->state = SLOT_WRITING;
    slot_queue(g, i);
}

static void finish_slot(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    g->done += s->len;
    if (s->buffered) {
        zero_flush(g); /* its unaligned zero ranges, while nothing else is in flight */
        g->buffered_busy = false;
    }
    s->state = SLOT_FREE;
    g->busy_slots--;
}

static void account(struct engine *g, int op, uint64_t n)
{
    if (op == VC_OP_READ)
        g->r->bytes_read += n;
    else
        g->r->bytes_written += n;
}

/* Short transfers and interrupted requests are retried here, where they happen; true if requeued. */
static bool retry(struct engine *g, struct request *rq, unsigned tag, int64_t res)
{
    bool short_transfer = res > 0 && res < rq->len;
    if (!short_transfer && res != -EINTR && res != -EAGAIN)
        return false;
    if (short_transfer) {
        account(g, rq->op, (uint64_t)res);
        rq->off += (uint64_t)res;
        rq->buf += res;
        rq->len -= (uint32_t)res;
    }
    return queue_request(g, rq, tag) == 0;
}

static void complete(struct engine *g, const struct vc_io_completion *c)
{
    unsigned tag = (unsigned)c->tag;
    struct request *rq = &g->reqs[tag];
    unsigned i = rq->slot;
    struct slot *s = &g->slots[i];
    int side = rq->op == VC_OP_READ ? VC_SIDE_SRC : VC_SIDE_DST;

    if (!g->status) {
        if (retry(g, rq, tag, c->res))
            return;
        if (c->res < 0)
            fail(g, (int)-c->res, side, rq->op, rq->off, rq->op == VC_OP_READ ? "read" : "write");
        else if (c->res == 0)
            fail(g, EIO, side, rq->op, rq->off,
                 rq->op == VC_OP_READ ? "read (unexpected end of file)" : "write (no progress)");
        else
            account(g, rq->op, rq->len);
    }
    release_request(g, tag);
    /* Stopping, a slot only waits for its requests to come home; it stays busy so that the
     * watermark of the last checkpoint stays below it. */
    if (s->in_flight || s->queued || g->status)
        return;
    if (s->state == SLOT_READING)
        process_read(g, i);
    else
        finish_slot(g, i);
}

static int reap(struct engine *g, struct vc_io *io, unsigned min, int timeout_ms)
{
    int n = io->ops->reap(io, g->completions, g->n_reqs, min, timeout_ms);
    if (n < 0)
        return fail(g, -n, VC_SIDE_NONE, VC_OP_NONE, 0, "waiting for I/O");
    for (int k = 0; k < n; k++)
        complete(g, &g->completions[k]);
    return n;
}

/* ---------------------------------------------------------------- progress and checkpoints */

/* Everything below it is done in dst (but maybe not durable yet). */
static uint64_t watermark(struct engine *g)
{
    uint64_t w = g->pos;
    for (unsigned i = 0; i < g->n_slots; i++)
        if (g->slots[i].state != SLOT_FREE)
            w = VC_MIN(w, g->slots[i].start);
    if (g->zero_pending.len)
        w = VC_MIN(w, g->zero_pending.off);
    return g->p->extents ? VC_ROUND_DOWN(w, VC_ALIGN) : VC_ROUND_DOWN(w, VC_CHUNK_SIZE);
}

static int checkpoint(struct engine *g, uint64_t now)
{
    g->ckpt_last_ns = now;
    g->ckpt_last_done = g->done;
    if (zero_flush(g) < 0)
        return -1;
    uint64_t w = g->pos >= g->end && !g->busy_slots ? g->end : watermark(g);
    if (w <= g->ckpt_watermark)
        return 0;
    /* dst first: a checkpoint must never be ahead of what dst durably holds. */
    int rc = g->dst_ops->flush(g->p->dst.fd);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_DST, VC_OP_FLUSH, 0, "flush");
    rc = vc_checkpoint_save(&g->ckpt, w, g->digest ? g->p->chunk_digests : NULL);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_CHECKPOINT, VC_OP_CHECKPOINT, w, "saving the checkpoint");
    g->ckpt_watermark = w;
    return 0;
}

static void tick(struct engine *g)
{
    uint64_t now = vc_now_ns();
    if (g->p->progress && now - g->last_progress_ns >= PROGRESS_NS) {
        g->last_progress_ns = now;
        if (g->p->progress(g->p->progress_ctx, g->done, g->total) && !g->status) {
            vc_fail(g->e, ECANCELED, VC_SIDE_NONE, VC_OP_NONE, g->pos, "cancelled");
            g->status = -ECANCELED;
        }
    }
    if (g->ckpt_open && !g->status &&
        (now - g->ckpt_last_ns >= CHECKPOINT_NS || g->done - g->ckpt_last_done >= CHECKPOINT_BYTES))
        checkpoint(g, now);
}

/* ---------------------------------------------------------------- setup and the loop */

static int validate(const struct vc_copy_params *p, struct vc_error *e)
{
    if (p->block_size == 0 || p->block_size % VC_CHUNK_SIZE || p->block_size > 64u * VC_CHUNK_SIZE)
        return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0,
                       "block_size must be a multiple of 1 MiB (the digest chunk), at most 64 MiB");
    if (p->queue_depth == 0 || p->queue_depth > 1024)
        return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0, "queue_depth must be between 1 and 1024");
    if ((p->flags & VC_FLAG_DIGEST) && (!p->chunk_digests || p->extents))
        return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0, "a digest needs chunk_digests and no extents");
    for (uint64_t i = 0; p->extents && i < p->n_extents; i++) {
        int64_t off = p->extents[2 * i], len = p->extents[2 * i + 1];
        int64_t prev_end = i ? p->extents[2 * i - 2] + p->extents[2 * i - 1] : 0;
        if (off < prev_end || len <= 0 || (uint64_t)(off + len) > p->length)
            return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0,
                           "extent %llu is out of order, empty, overlapping or beyond the length",
                           (unsigned long long)i);
    }
    return 0;
}

/* Files in memory (tmpfs, ramfs): every transfer is a memcpy by the CPU that asks for it, and io_uring
 * and aio run it inline on this one thread; the threads engine spreads it over the CPUs (see
 * io_threads.c for the numbers). */
static bool in_memory(int fd)
{
    struct stat st;
    struct statfs fs;
    if (fd < 0)
        return true;
    /* A regular file only: a device node in /dev sits on devtmpfs, whose magic is tmpfs's. */
    return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && fstatfs(fd, &fs) == 0 &&
           (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC);
}

/* The engine asked for; for auto, the best one whose set-up succeeds here (set up once: no probe). */
static int start_engine(struct engine *g, const struct vc_io_setup *setup)
{
    /* In memory only the threads engine overlaps anything; elsewhere it is the fallback with a queue. */
    static const int on_devices[] = {VC_ENGINE_URING, VC_ENGINE_AIO, VC_ENGINE_THREADS, VC_ENGINE_SYNC, -1};
    static const int in_memory_files[] = {VC_ENGINE_THREADS, VC_ENGINE_SYNC, -1};
    const struct vc_copy_params *p = g->p;

    if (p->engine != VC_ENGINE_AUTO) {
        g->io.ops = vc_io_backend(p->engine);
        if (!g->io.ops)
            return vc_engine_available(p->engine, g->e);
        int rc = g->io.ops->init(&g->io, setup, g->e);
        if (rc < 0) {
            g->io.ops = NULL;
            return rc;
        }
        g->r->engine = p->engine;
        return 0;
    }
    const int *preference = in_memory(p->src.fd) && in_memory(p->dst.fd) ? in_memory_files : on_devices;
    for (unsigned i = 0; preference[i] >= 0; i++) {
        struct vc_error ignored = {0};
        g->io.ops = vc_io_backend(preference[i]);
        if (g->io.ops && g->io.ops->init(&g->io, setup, &ignored) == 0) {
            g->r->engine = preference[i];
            return 0;
        }
    }
    g->io.ops = NULL;
    return vc_fail(g->e, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "no I/O engine could be set up");
}

/* The buffers sit on huge pages where the kernel can give them. A direct request is one run of physical
 * memory per page of its buffer; past the device's limit on such runs (a loop device takes 128, the
 * virtio disk here 254) the block layer splits the request, and io_uring cannot split one without
 * blocking, so it hands every such request to a kernel worker thread and wakes it. On 4 KiB pages that
 * is every 1 MiB request; on 2 MiB pages a 1 MiB request is a handful of runs and is issued at once.
 * 16 GiB loop device to loop device, 1 MiB x 16: 1.44-1.89 s and 0.30-0.38 s of system time before,
 * 1.09-1.43 s and 0.28-0.33 s after (with cooperative completions, io_uring.c: 1.03-1.33 s, 0.12-0.15 s). */
static int allocate_buffers(struct engine *g)
{
    size_t size = (size_t)g->n_slots * g->p->block_size;
    if (posix_memalign((void **)&g->buffers, HUGE_PAGE_SIZE, size))
        return -ENOMEM;
    madvise(g->buffers, size, MADV_HUGEPAGE); /* a hint: where it is refused, 4 KiB pages still work */
    return 0;
}

static int setup(struct engine *g)
{
    const struct vc_copy_params *p = g->p;
    int rc;

    g->n_slots = p->queue_depth;
    g->n_reqs = p->queue_depth * 8;
    if (allocate_buffers(g) < 0)
        return vc_fail(g->e, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot allocate %u buffers of %u bytes",
                       g->n_slots, p->block_size);
    g->slots = calloc(g->n_slots, sizeof(*g->slots));
    g->reqs = calloc(g->n_reqs, sizeof(*g->reqs));
    g->completions = calloc(g->n_reqs, sizeof(*g->completions));
    g->read_queue = calloc(g->n_slots, sizeof(unsigned));
    g->write_queue = calloc(g->n_slots, sizeof(unsigned));
    if (!g->slots || !g->reqs || !g->completions || !g->read_queue || !g->write_queue)
        return vc_fail(g->e, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    for (unsigned i = 0; i < g->n_slots; i++)
        g->slots[i].buf = g->buffers + (size_t)i * p->block_size;
    for (unsigned i = 0; i < g->n_reqs; i++)
        g->reqs[i].next_free = i + 1 < g->n_reqs ? i + 1 : UINT32_MAX;
    g->free_req = 0;

    struct vc_io_setup io_setup = {
        .max_inflight = g->n_reqs,
        .buffers = g->buffers,
        .n_buffers = g->n_slots,
        .buffer_size = p->block_size,
        .fds = {p->src.fd, g->has_dst ? p->dst.fd : -1},
        .one_write_at_a_time = g->has_dst && in_memory(p->dst.fd),
    };
    rc = start_engine(g, &io_setup);
    if (rc < 0)
        return rc;
    g->io_buffered.ops = &vc_io_sync_ops;
    rc = g->io_buffered.ops->init(&g->io_buffered, &io_setup, g->e);
    if (rc < 0) {
        g->io_buffered.ops = NULL;
        return rc;
    }

    /* Throttled, a read is at most 1/64 of a second's worth and the bucket holds 50 ms of credit:
     * no 2 s window runs over by more than 2.5%, and a loop busy for a few milliseconds (a
     * checkpoint's flush, a progress report) loses no credit. */
    g->io_max = p->block_size;
    if (p->rate_limit)
        g->io_max = VC_MAX((uint64_t)VC_ALIGN, VC_MIN(g->io_max, VC_ROUND_DOWN(p->rate_limit / 64, VC_ALIGN)));
    vc_throttle_init(&g->throttle, p->rate_limit, VC_MAX(g->io_max, p->rate_limit / 20));

    vc_digest_zeros(VC_CHUNK_SIZE, g->zero_digest_chunk);
    vc_digest_zeros(p->length % VC_CHUNK_SIZE, g->zero_digest_tail);

    if (p->extents) {
        for (uint64_t i = 0; i < p->n_extents; i++)
            g->total += (uint64_t)p->extents[2 * i + 1];
    } else {
        g->total = p->length;
    }

    if (p->checkpoint_path && g->has_dst) {
        uint64_t w;
        rc = vc_checkpoint_open(&g->ckpt, p->checkpoint_path, p->fingerprint, p->length,
                                g->digest ? p->chunk_digests : NULL, &w, g->e);
        if (rc < 0)
            return rc;
        g->ckpt_open = true;
        g->ckpt_watermark = w;
        g->pos = w;
        g->r->resumed_from = w;
        if (p->extents) {
            for (uint64_t i = 0; i < p->n_extents; i++) {
                uint64_t off = (uint64_t)p->extents[2 * i], len = (uint64_t)p->extents[2 * i + 1];
                g->done += off >= w ? 0 : VC_MIN(len, w - off);
            }
        } else {
            g->done = w;
        }
    }
    g->ckpt_last_ns = g->last_progress_ns = vc_now_ns();
    g->ckpt_last_done = g->done;
    return 0;
}

static void teardown(struct engine *g)
{
    if (g->io.ops)
        g->io.ops->fini(&g->io);
    if (g->io_buffered.ops)
        g->io_buffered.ops->fini(&g->io_buffered);
    if (g->ckpt_open)
        vc_checkpoint_close(&g->ckpt);
    free(g->slots);
    free(g->reqs);
    free(g->completions);
    free(g->read_queue);
    free(g->write_queue);
    free(g->buffers);
    free(g->zero_buffer);
}

static void run(struct engine *g)
{
    for (;;) {
        if (!g->status) {
            produce(g);
            issue(g);
        }
        int rc = g->io.ops->submit(&g->io);
        if (rc < 0 && !g->status)
            fail(g, -rc, VC_SIDE_NONE, VC_OP_NONE, g->pos, "submitting I/O");

        bool in_flight = g->in_flight > 0;
        if (!in_flight && (g->status || (g->pos >= g->end && !g->busy_slots)))
            break;
        /* The page-cache path completes inside queue(); its completions only need collecting. */
        if (reap(g, &g->io_buffered, 0, 0) > 0)
            continue;
        if (in_flight) {
            /* Wake at least every 50 ms so that progress, cancel and checkpoints stay on time. */
            int timeout = g->throttle_wait_ms ? VC_MIN(g->throttle_wait_ms, 50) : 50;
            reap(g, &g->io, 1, timeout);
        } else if (g->throttle_wait_ms) {
            struct timespec ts = {0, (long)VC_MIN(g->throttle_wait_ms, 50) * 1000000L};
            nanosleep(&ts, NULL);
        }
        tick(g);
    }
}

int vc_copy(const struct vc_copy_params *params, struct vc_copy_result *result, struct vc_error *error)
{
    struct engine g;
    int rc;

    memset(result, 0, sizeof(*result));
    memset(error, 0, sizeof(*error));
    rc = validate(params, error);
    if (rc < 0)
        return rc;

    memset(&g, 0, sizeof(g));
    g.p = params;
    g.r = result;
    g.e = error;
    g.end = params->length;
    g.has_dst = params->dst.fd >= 0;
    g.digest = (params->flags & VC_FLAG_DIGEST) != 0;
    g.sparse = (params->flags & VC_FLAG_SPARSE) != 0;
    g.any_direct = params->src.direct || (g.has_dst && params->dst.direct);
    g.src_ops = vc_endpoint_ops_for(params->src.kind);
    g.dst_ops = vc_endpoint_ops_for(params->dst.kind);

    rc = setup(&g);
    if (rc == 0) {
        run(&g);
        zero_flush(&g);
        if (!g.status && g.has_dst) {
            rc = g.dst_ops->flush(params->dst.fd);
            if (rc < 0)
                fail(&g, -rc, VC_SIDE_DST, VC_OP_FLUSH, 0, "flush");
        }
        /* A cancelled or failed copy still records how far it durably got, so it can resume. */
        if (g.ckpt_open && g.status) {
            int status = g.status;
            g.status = 0;
            checkpoint(&g, vc_now_ns());
            g.status = status;
        }
        if (params->progress && !g.status)
            params->progress(params->progress_ctx, g.done, g.total);
        if (g.digest && !g.status)
            vc_volume_digest(params->chunk_digests, VC_ROUND_UP(params->length, VC_CHUNK_SIZE) / VC_CHUNK_SIZE,
                             result->digest);
        rc = g.status;
    }
    teardown(&g);
    return rc;
}
