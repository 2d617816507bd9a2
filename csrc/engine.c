/* The copy engine: vc_copy sets up a pipeline of slots, with buffers from queue_depth blocks of memory
 * (engine.h lists the files that make it up), runs it until every unit is done or something failed, and
 * ends the copy: the last zeroing, the flush, the final checkpoint, the digest.
 *
 * With O_DIRECT, a unit whose offsets are not aligned (the tail of a volume of odd size, unaligned
 * extents) goes through the page cache on the buffered descriptors, alone (produce.c says why). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

static int validate(const struct vc_copy_params *p, struct vc_error *e)
{
    if (p->block_size == 0 || p->block_size % VC_CHUNK_SIZE || p->block_size > 64u * VC_CHUNK_SIZE)
        return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0,
                       "block_size must be a multiple of 1 MiB (the digest chunk), at most 64 MiB");
    if (p->queue_depth == 0 || p->queue_depth > 1024)
        return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0, "queue_depth must be between 1 and 1024");
    if ((uint64_t)p->queue_depth * p->block_size > VC_MAX_BUFFER_BYTES)
        return vc_fail(e, EINVAL, VC_SIDE_NONE, VC_OP_SETUP, 0,
                       "queue_depth * block_size must be at most 1 GiB: that much memory is in flight");
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

static int setup(struct engine *g)
{
    const struct vc_copy_params *p = g->p;
    int rc;

    /* No more blocks of buffer than the copy has blocks: io_uring registers (and so faults in) all of it,
     * and a 1 MiB copy at 1 MiB x 32 held 32 MiB (51 MiB peak RSS for `volcopy copy`, 20 MiB now). Units
     * with less data than a block take less of it (buffers.c), so there are more slots than blocks. */
    uint64_t blocks = (p->length + p->block_size - 1) / p->block_size;
    unsigned buffer_blocks = (unsigned)VC_MAX(1, VC_MIN(blocks, (uint64_t)p->queue_depth));
    g->n_slots = buffer_blocks * SLOTS_PER_BLOCK;
    g->n_reqs = buffer_blocks * 8;
    if (buffers_open(g, (size_t)buffer_blocks * p->block_size) < 0)
        return vc_fail(g->e, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "cannot allocate %u buffer blocks of %u bytes",
                       buffer_blocks, p->block_size);
    g->slots = calloc(g->n_slots, sizeof(*g->slots));
    g->reqs = calloc(g->n_reqs, sizeof(*g->reqs));
    g->completions = calloc(g->n_reqs, sizeof(*g->completions));
    g->read_queue = calloc(g->n_slots, sizeof(unsigned));
    g->write_queue = calloc(g->n_slots, sizeof(unsigned));
    if (!g->slots || !g->reqs || !g->completions || !g->read_queue || !g->write_queue)
        return vc_fail(g->e, ENOMEM, VC_SIDE_NONE, VC_OP_SETUP, 0, "out of memory");
    g->cut = NO_SLOT;
    for (unsigned i = 0; i < g->n_reqs; i++)
        g->reqs[i].next_free = i + 1 < g->n_reqs ? i + 1 : UINT32_MAX;
    g->free_req = 0;

    struct vc_io_setup io_setup = {
        .max_inflight = g->n_reqs,
        .buffers = g->buffers,
        .n_buffers = 1,
        .buffer_size = g->buffers_size,
        .fds = {p->src.fd, g->has_dst ? p->dst.fd : -1},
        .one_write_at_a_time = g->has_dst && p->dst.kind != VC_KIND_RBD && vc_in_memory(p->dst.fd),
    };
    rc = choose_engine(g, &io_setup);
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
    /* Zeroing a device may write every byte (BLKZEROOUT without offload, or the zeros written where it
     * is refused); punching a hole in a file writes none. */
    g->zeroing_throttled = p->rate_limit && g->has_dst && p->dst.kind == VC_KIND_BLOCKDEV;

    residency_open(g);

    vc_digest_zeros(VC_CHUNK_SIZE, g->zero_digest_chunk);
    vc_digest_zeros(p->length % VC_CHUNK_SIZE, g->zero_digest_tail);

    if (p->extents) {
        for (uint64_t i = 0; i < p->n_extents; i++)
            g->total += (uint64_t)p->extents[2 * i + 1];
    } else {
        g->total = p->length;
    }

    if (p->checkpoint_path && g->has_dst) {
        struct vc_checkpoint_identity identity = {p->fingerprint_src, p->fingerprint_dst, p->fingerprint_request};
        uint64_t w;
        rc = vc_checkpoint_open(&g->ckpt, p->checkpoint_path, &identity, p->length, p->flags & VC_FLAG_DST_NEW,
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
    residency_close(g);
    free(g->slots);
    free(g->reqs);
    free(g->completions);
    free(g->read_queue);
    free(g->write_queue);
    buffers_close(g);
    free(g->zero_buffer);
}

static void run(struct engine *g)
{
    for (;;) {
        if (!stop_requested(g)) {
            produce(g);
            issue(g);
        }
        /* A request that could not be submitted comes back from reap failed with submit's errno, so the
         * error names its side, operation and offset, and nothing waits for it forever. */
        g->io.ops->submit(&g->io);

        bool in_flight = g->in_flight > 0;
        if (!in_flight && (g->status || (g->pos >= g->end && !g->busy_slots && g->cut == NO_SLOT)))
            break;
        /* The page-cache path completes inside queue(); its completions only need collecting. */
        if (reap(g, &g->io_buffered, 0, 0) == 0) {
            if (in_flight) {
                /* Wake at least every 50 ms so that progress, cancel and checkpoints stay on time. */
                int timeout = g->throttle_wait_ms ? VC_MIN(g->throttle_wait_ms, 50) : 50;
                reap(g, &g->io, 1, timeout);
            } else if (g->throttle_wait_ms) {
                sleep_ms(VC_MIN(g->throttle_wait_ms, 50));
            } else if (g->awaiting_writer) {
                sleep_ms(1); /* the copy ahead publishes at every turn of its own loop */
            }
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
    g.fail_floor = UINT64_MAX;
    g.has_dst = params->dst.fd >= 0 || params->dst.rbd;
    g.digest = (params->flags & VC_FLAG_DIGEST) != 0;
    g.sparse = (params->flags & VC_FLAG_SPARSE) != 0;
    g.any_direct = params->src.direct || (g.has_dst && params->dst.direct);
    g.src_ops = vc_endpoint_ops_for(params->src.kind);
    g.dst_ops = vc_endpoint_ops_for(params->dst.kind);

    rc = setup(&g);
    if (rc == 0) {
        run(&g);
        if (!g.status)
            zero_flush(&g);
        if (!g.status) /* a src that shrank under the copy was read in part as end of file or holes */
            check_src_size(&g, g.end);
        if (!g.status && g.has_dst) {
            rc = g.dst_ops->flush(&params->dst);
            if (rc < 0)
                fail(&g, -rc, VC_SIDE_DST, VC_OP_FLUSH, 0, "flush");
        }
        if (!g.status && params->written_until)
            __atomic_store_n(params->written_until, g.end, __ATOMIC_RELEASE);
        /* A cancelled or failed copy still records how far it durably got, so it can resume. */
        if (g.ckpt_open && g.status)
            save_checkpoint(&g);
        if (params->progress && !g.status)
            params->progress(params->progress_ctx, g.done, g.total);
        if (g.digest && !g.status)
            vc_volume_digest_recorded(params->chunk_digests, params->length, result->digest);
        rc = g.status;
    }
    teardown(&g);
    return rc;
}
