/* The slots of the pipeline: each unit is read, then scanned for zero blocks and hashed in one pass over
 * its buffer, then its data is written while zero runs go to the zeroer.
 *
 * A unit never splits a 1 MiB digest chunk, so each chunk is hashed once, from one buffer, when its reads
 * complete; no hash state outlives a slot. */
#include <errno.h>
#include <string.h>

#include "engine.h"

/* Zero runs shorter than this that lie between data are written as data: they are in the buffer
 * already, and a zeroing call for each would cost more than the write and fragment dst. */
#define ZERO_RUN_MIN VC_CHUNK_SIZE

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

static void finish_slot(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    g->done += s->len;
    if (s->buffered) {
        zero_flush(g); /* its unaligned zero ranges, while nothing else is in flight */
        g->buffered_busy = false;
    }
    give_back_buffer(g, s);
    s->state = SLOT_FREE;
    g->busy_slots--;
}

void slot_start(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    s->state = SLOT_READING;
    s->in_flight = 0;
    g->busy_slots++;
    if (s->n_ops == 0) /* nothing to read (an explicit extent in a hole cannot happen; be safe) */
        finish_slot(g, i);
    else
        slot_queue(g, i);
}

static int queue_request(struct engine *g, struct request *rq, unsigned tag)
{
    struct slot *s = &g->slots[rq->slot];
    const struct vc_endpoint *ep = rq->op == VC_OP_READ ? &g->p->src : &g->p->dst;
    /* An RBD image has no page cache to go around: its side of a buffered unit stays on the engine. */
    bool buffered = s->buffered && ep->kind != VC_KIND_RBD;
    struct vc_io_request io_rq = {
        .op = rq->op,
        .fd = buffered || rq->cached ? ep->fd_buffered : ep->fd,
        .rbd = ep->kind == VC_KIND_RBD ? ep->rbd : NULL,
        .buf = rq->buf,
        .len = rq->len,
        .offset = rq->off,
        .tag = tag,
        .buf_index = buffered ? -1 : 0, /* inside the one registered buffer, the arena */
        .cached = rq->cached,
    };
    struct vc_io *io = buffered ? &g->io_buffered : &g->io;
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
        bool cached = false;
        if (g->free_req == UINT32_MAX)
            return false;
        if (op == VC_OP_READ && g->residency.map && !s->buffered)
            len = resident_run(g, s->next_off, len, &cached);
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
        rq->cached = cached;
        rq->off = s->next_off;
        rq->len = (uint32_t)len;
        rq->buf = s->buf + (s->next_off - s->base);
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
    /* The sync engine and the page-cache path run each request inside queue(): look for a cancel
     * between requests, not only between turns of the loop. */
    while (*count && !stop_requested(g)) {
        if (!slot_issue(g, ring[*head]))
            return;
        *head = (*head + 1) % g->n_slots;
        (*count)--;
    }
}

void issue(struct engine *g)
{
    g->throttle_wait_ms = 0;
    issue_queue(g, g->write_queue, &g->wq_head, &g->wq_count); /* writes first: they free slots */
    issue_queue(g, g->read_queue, &g->rq_head, &g->rq_count);
}

/* A run of a unit that must read as zeros in dst: holes of src (never read) and zero blocks read from
 * it, merged where they touch. */
struct zeros {
    uint64_t off, len;
    uint64_t found;   /* bytes of it that were read and found zero */
    bool data_before; /* the unit had data before it */
};

static void zeros_extend(struct zeros *z, uint64_t off, uint64_t len, bool found)
{
    if (!z->len)
        z->off = off;
    z->len += len;
    z->found += found ? len : 0;
}

/* The run ends, at data or at the end of the unit. A short run between data is written as data: the
 * buffer holds its zeros already, and a zeroing call of its own would cost more and fragment dst. */
static void zeros_settle(struct engine *g, struct slot *s, struct zeros *z, bool data_follows)
{
    if (!z->len)
        return;
    bool write = data_follows && z->data_before && z->len < ZERO_RUN_MIN && g->has_dst &&
                 !(g->p->flags & VC_FLAG_DST_IS_ZERO);
    if (write) {
        add_op(s, z->off, z->len);
    } else {
        g->r->bytes_zero += z->found;
        zero_add(g, z->off, z->len);
    }
    z->len = z->found = 0;
}

/* The parts of the holes that writes cross (short runs written as data, or add_op merging past MAX_OPS)
 * are zeroed in the buffer; the rest of them is never looked at, so a unit that is mostly hole costs no
 * memset (3 GiB of them for 1 GiB of data in 256 KiB extents). */
static void zero_holes_written(struct slot *s, const struct extent *holes, unsigned n_holes)
{
    for (unsigned h = 0; h < n_holes; h++)
        for (unsigned k = 0; k < s->n_ops; k++) {
            uint64_t from = VC_MAX(holes[h].off, s->ops[k].off);
            uint64_t to = VC_MIN(holes[h].off + holes[h].len, s->ops[k].off + s->ops[k].len);
            if (from < to)
                memset(s->buf + (from - s->base), 0, to - from);
        }
}

/* The digest of each chunk of the unit; the holes in one with data are hashed as zeros (streamed). */
static void hash_chunks(struct engine *g, struct slot *s, uint64_t chunk_has_data, const struct extent *holes,
                        unsigned n_holes)
{
    unsigned h = 0;
    for (uint64_t c = s->start; c < s->start + s->len; c += VC_CHUNK_SIZE) {
        uint64_t len = VC_MIN((uint64_t)VC_CHUNK_SIZE, s->start + s->len - c);
        uint64_t in_chunk[MAX_OPS + 1][2];
        unsigned n = 0;
        uint8_t digest[VC_DIGEST_SIZE];

        if (!(chunk_has_data & (1ull << ((c - s->start) / VC_CHUNK_SIZE)))) {
            record_digest(g, c, NULL);
            continue;
        }
        while (h < n_holes && holes[h].off + holes[h].len <= c)
            h++;
        for (unsigned k = h; k < n_holes && holes[k].off < c + len; k++) {
            uint64_t from = VC_MAX(holes[k].off, c), to = VC_MIN(holes[k].off + holes[k].len, c + len);
            in_chunk[n][0] = from - c;
            in_chunk[n++][1] = to - from;
        }
        uint64_t held_from = VC_MAX(c, s->base); /* the buffer starts at base: before it, all is hole */
        if (n)
            vc_digest_chunk_with_holes(s->buf + (held_from - s->base), (size_t)(held_from - c), (size_t)len,
                                       (const uint64_t (*)[2])in_chunk, n, digest);
        else
            vc_digest_chunk(s->buf + (c - s->base), (size_t)len, digest);
        record_digest(g, c, digest);
    }
}

/* All reads of a slot are in: zero-scan in one pass over the buffer, hash, then queue the writes. */
static void process_read(struct engine *g, unsigned i)
{
    struct slot *s = &g->slots[i];
    struct extent reads[MAX_OPS], holes[MAX_OPS + 1];
    unsigned n_reads = s->n_ops, n_holes = 0;
    uint64_t chunk_has_data = 0; /* bit per chunk of the unit; a unit has at most 64 chunks */
    uint64_t at = s->start, unit_end = s->start + s->len;
    struct zeros z = {0};

    memcpy(reads, s->ops, n_reads * sizeof(reads[0]));
    s->n_ops = 0;
    for (unsigned k = 0; k <= n_reads; k++) {
        /* the hole before this read, or after the last one (explicit extents have no holes) */
        uint64_t off = k < n_reads ? reads[k].off : g->p->extents ? at : unit_end;
        uint64_t end = k < n_reads ? off + reads[k].len : off;
        if (off > at) {
            holes[n_holes++] = (struct extent){at, off - at};
            g->r->bytes_skipped += off - at;
            zeros_extend(&z, at, off - at, false);
        }
        while (off < end) {
            uint64_t granule_end = VC_MIN(VC_ROUND_DOWN(off, VC_ALIGN) + VC_ALIGN, end);
            uint64_t n = granule_end - off;
            if (g->sparse && vc_zero_check(s->buf + (off - s->base), n)) {
                zeros_extend(&z, off, n, true);
            } else {
                zeros_settle(g, s, &z, true);
                z.data_before = true;
                chunk_has_data |= 1ull << ((off - s->start) / VC_CHUNK_SIZE);
                if (g->has_dst)
                    add_op(s, off, n);
            }
            off = granule_end;
        }
        at = end;
    }
    zeros_settle(g, s, &z, false);
    zero_holes_written(s, holes, n_holes);
    if (g->digest)
        hash_chunks(g, s, chunk_has_data, holes, n_holes);
    if (s->n_ops == 0) {
        finish_slot(g, i);
        return;
    }
    s->state = SLOT_WRITING;
    slot_queue(g, i);
}

static void account(struct engine *g, const struct request *rq, uint64_t n)
{
    if (rq->op == VC_OP_READ) {
        g->r->bytes_read += n;
        g->r->bytes_from_cache += rq->cached ? n : 0;
    } else {
        g->r->bytes_written += n;
    }
}

/* Short transfers and interrupted requests are retried here, where they happen; true if requeued. A
 * short read is never taken as the whole: the rest is asked for again, and end of file is an error. */
static bool retry(struct engine *g, struct request *rq, unsigned tag, int64_t res)
{
    bool short_transfer = res > 0 && res < rq->len;
    if (!short_transfer && res != -EINTR && res != -EAGAIN)
        return false;
    if (short_transfer) {
        account(g, rq, (uint64_t)res);
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
            account(g, rq, rq->len);
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

int reap(struct engine *g, struct vc_io *io, unsigned min, int timeout_ms)
{
    int n = io->ops->reap(io, g->completions, g->n_reqs, min, timeout_ms);
    if (n < 0)
        return fail(g, -n, VC_SIDE_NONE, VC_OP_NONE, 0, "waiting for I/O");
    for (int k = 0; k < n; k++)
        complete(g, &g->completions[k]);
    return n;
}
