/* Cutting the volume into units for the slots: a run of whole 1 MiB chunks with the data extents to read
 * in it (whole-volume mode), or a piece of one explicit extent. Whole chunks of hole never get a slot:
 * they are hashed as zeros and handed to the zeroer here. */
#include <errno.h>

#include "engine.h"

static bool is_aligned(uint64_t x)
{
    return x % VC_ALIGN == 0;
}

/* Appends [off, off+len) to a slot's ops; past MAX_OPS the last op grows over the gap instead. That is
 * only allowed where the gap may be read (a hole reads as zeros) or written (zero blocks written as
 * data), which is true everywhere ops are added. */
void add_op(struct slot *s, uint64_t off, uint64_t len)
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

/* SEEK_DATA finding no more data is also what a src truncated under the copy looks like: its size
 * tells the two apart. */
int check_src_size(struct engine *g, uint64_t from)
{
    uint64_t size;
    int rc = g->src_ops->size(&g->p->src, &size);
    if (rc < 0)
        return fail(g, -rc, VC_SIDE_SRC, VC_OP_READ, from, "finding the size");
    if (size < g->end)
        return fail_with(g, EIO, VC_SIDE_SRC, VC_OP_READ, size,
                         "the source shrank to %llu bytes during the copy of %llu", (unsigned long long)size,
                         (unsigned long long)g->end);
    return 0;
}

/* Where src may be read to: its end, or, behind a running copy (readable_until), the last whole chunk
 * the copy has written, so that a unit never splits a chunk. */
uint64_t readable_end(struct engine *g)
{
    if (!g->p->readable_until)
        return g->end;
    uint64_t written = __atomic_load_n(g->p->readable_until, __ATOMIC_ACQUIRE);
    return written >= g->end ? g->end : VC_ROUND_DOWN(written, VC_CHUNK_SIZE);
}

/* The data of src in [from, to), from the endpoint's extent map (cached between calls). The map is asked
 * only up to limit: behind a running copy, what lies past it may still change. */
static int next_data(struct engine *g, uint64_t from, uint64_t to, uint64_t limit, uint64_t *start,
                     uint64_t *stop)
{
    if (!g->sparse) {
        *start = from;
        *stop = to;
        return 0;
    }
    /* The cached answer holds for any offset between where we asked and the end of its extent; an
     * answer cut at the limit it was asked with says nothing of what lies past that limit. */
    bool cut = g->data_stop == g->data_limit;
    if (!(from >= g->data_query && from < g->data_stop && !(cut && to > g->data_limit))) {
        g->data_query = from;
        g->data_limit = limit;
        int rc = g->src_ops->next_data(&g->p->src, from, limit, &g->data_start, &g->data_stop);
        if (rc < 0)
            return fail(g, -rc, VC_SIDE_SRC, VC_OP_READ, from, "finding data extents");
        if (g->data_start >= g->end && check_src_size(g, from) < 0)
            return -1;
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
    return NO_SLOT;
}

/* Whole-volume mode: the next run of chunks before limit. Holes of whole chunks are settled here,
 * without a slot. */
static int produce_chunks(struct engine *g, struct slot *s, uint64_t limit)
{
    uint64_t unit_end = VC_MIN(g->pos + g->p->block_size, limit);
    uint64_t ds, de;

    if (next_data(g, g->pos, limit, limit, &ds, &de) < 0)
        return -1;
    uint64_t hole_end = ds >= limit ? limit : VC_ROUND_DOWN(ds, VC_CHUNK_SIZE);
    if (hole_end > g->pos) {
        /* Whole chunks of hole before the next data: nothing to read, nothing to hash, nothing to record.
         * chunk_digests is zero-filled on entry, and nothing at or after pos has been recorded yet (a
         * resumed checkpoint fills it below its watermark only), so these chunks already read as the 16
         * zero bytes of a hole. Looking at them would fault in a page of it per 256 chunks: 32768 faults
         * on an 8 TiB volume, on the engine's thread. */
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
        if (next_data(g, at, unit_end, limit, &ds, &de) < 0)
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

/* The next unit, cut into a free slot; NO_SLOT when none can be cut now, or none is left. */
static unsigned cut_unit(struct engine *g)
{
    while (!g->status && g->pos < g->end) {
        uint64_t limit = readable_end(g);
        if (g->pos >= limit) {
            g->awaiting_writer = true;
            return NO_SLOT;
        }
        unsigned i = free_slot(g);
        if (i == NO_SLOT)
            return NO_SLOT;
        int rc = g->p->extents ? produce_extent(g, &g->slots[i]) : produce_chunks(g, &g->slots[i], limit);
        if (rc < 0)
            return NO_SLOT;
        if (rc > 0) {
            g->slots[i].state = SLOT_CUT;
            return i;
        }
    }
    return NO_SLOT;
}

/* Starts units in free slots. A unit waits, cut, until a buffer for it is free, and an unaligned one
 * until the pipeline has drained: with O_DIRECT, an unaligned unit goes through the page cache alone,
 * since a buffered write to a page that a direct write also touches could write back stale bytes. */
void produce(struct engine *g)
{
    g->awaiting_writer = false;
    while (!g->status && !g->buffered_busy) {
        if (g->cut == NO_SLOT && (g->cut = cut_unit(g)) == NO_SLOT)
            return;
        struct slot *s = &g->slots[g->cut];
        bool unaligned = g->any_direct && unit_unaligned(s);
        if (unaligned && g->busy_slots)
            return;
        if (!take_buffer(g, s)) /* until a unit in flight gives some back */
            return;
        s->buffered = unaligned;
        if (unaligned) {
            /* Nothing is in flight; the zeroer's pending range may be unaligned too. */
            if (zero_flush(g) < 0)
                return;
            g->buffered_busy = true;
        }
        slot_start(g, g->cut);
        g->cut = NO_SLOT;
    }
}
